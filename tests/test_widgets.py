"""The capacity explorer: the static figure, the plotting functions and the widget."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from moe_course.dispatch import capacity_mask  # noqa: E402
from moe_course.plots.widgets import (  # noqa: E402
    capacity_explorer,
    plot_capacity,
    plot_dropped_grid,
    skewed_logits,
)


def test_plot_capacity_bars_and_line():
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [0, 2]])
    fig, ax = plt.subplots()
    try:
        assert plot_capacity(indices, 4, 2, ax=ax) is fig
        kept, dropped = ax.containers  # two bar series, one bar per expert each
        keep = capacity_mask(indices, 4, 2)
        assert [bar.get_height() for bar in kept] == torch.bincount(indices[keep], minlength=4).tolist()
        assert [bar.get_height() for bar in dropped] == torch.bincount(indices[~keep], minlength=4).tolist()
        # expert 0: 4 first choices + 1 second choice, keeps 2; expert 1: 1 first + 2 second choices, keeps 2
        assert [bar.get_height() for bar in dropped] == [3, 1, 0, 0]
        (line,) = ax.get_lines()
        assert list(line.get_ydata()) == [2, 2]
        assert "dropped 4 of 10" in ax.get_title()
    finally:
        plt.close(fig)


def test_plot_dropped_grid_shape():
    indices = torch.tensor([[0, 1], [0, 2], [0, 1]])
    fig, ax = plt.subplots()
    try:
        plot_dropped_grid(indices, 3, 1, ax=ax)
        (mesh,) = ax.collections
        grid = mesh.get_array().reshape(2, 3)  # choices x tokens
        assert grid.tolist() == [[0, 1, 1], [0, 0, 1]]  # 1 = dropped; first choices claim slots first
        assert ax.get_ylim() == (1.5, -0.5)  # first choice drawn on top
    finally:
        plt.close(fig)


def test_skewed_logits_are_fixed_and_skewed():
    a, b = skewed_logits(200, 8, skew=2.0, seed=3), skewed_logits(200, 8, skew=2.0, seed=3)
    assert torch.equal(a, b)
    first = torch.bincount(a.argmax(dim=1), minlength=8)
    assert first[0] > first[-1]


def test_static_figure():
    fig = capacity_explorer(static=True)
    assert isinstance(fig, Figure)
    axes = fig.get_axes()
    assert len(axes) == 2 + 4  # load + grid at the defaults, then four capacity factors
    load = axes[0]
    assert len(load.patches) == 2 * 8  # kept and dropped bar per expert
    capacities = [ax.get_lines()[0].get_ydata()[0] for ax in axes if ax.get_lines()]
    assert capacities == [8, 8, 10, 12, 16]  # ceil(cf * 32 * 2 / 8) for the default and cf 1, 1.25, 1.5, 2


def test_falls_back_without_ipywidgets(block_ipywidgets):
    block_ipywidgets()
    assert isinstance(capacity_explorer(), Figure)


def test_widget_builds():
    widgets = pytest.importorskip("ipywidgets")
    box = capacity_explorer(n_tokens=16)
    assert isinstance(box, widgets.VBox)
    assert set(box.controls) == {"n_experts", "k", "capacity_factor", "skew"}
    box.controls["k"].value = 4
    box.controls["n_experts"].value = 3  # k is clamped to N when redrawing; must not raise


def test_plot_functions_make_their_own_figure():
    indices = torch.tensor([[0, 1], [2, 1]])
    for plot in (plot_capacity, plot_dropped_grid):
        fig = plot(indices, 3, 1)
        try:
            assert isinstance(fig, Figure) and len(fig.get_axes()) == 1
        finally:
            plt.close(fig)


def test_widget_redraws_at_slider_extremes():
    pytest.importorskip("ipywidgets")
    box = capacity_explorer(n_tokens=8)
    c = box.controls
    for n, k, cf, skew in [(16, 4, 0.5, 3.0), (2, 1, 3.0, 0.0), (2, 4, 0.5, 1.5)]:
        c["n_experts"].value, c["k"].value = n, k  # an error while redrawing would propagate here
        c["capacity_factor"].value, c["skew"].value = cf, skew
