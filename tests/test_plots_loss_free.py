"""Notebook 06's figures and the bias explorer (widget and static fallback)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from moe_course.plots.loss_free import (  # noqa: E402
    STATIC_RATES,
    bias_explorer,
    plot_bias,
    plot_series,
    plot_tradeoff,
)


def test_plot_bias_one_line_per_expert():
    fig, ax = plt.subplots()
    try:
        bias = [[0.0, 0.0, 0.0], [0.001, -0.001, 0.0], [0.002, -0.002, 0.001]]
        assert plot_bias(bias, steps=[0, 10, 20], ax=ax) is fig
        lines = ax.get_lines()[:3]
        assert [list(line.get_ydata()) for line in lines] == [list(col) for col in np.array(bias).T]
        assert list(lines[0].get_xdata()) == [0, 10, 20]
        with pytest.raises(ValueError, match="steps has 2 entries"):
            plot_bias(bias, steps=[0, 1], ax=ax)
        with pytest.raises(ValueError, match="points, N"):
            plot_bias([0.0, 1.0], ax=ax)
    finally:
        plt.close(fig)


def test_plot_series_mean_and_band():
    fig, ax = plt.subplots()
    try:
        plot_series({"a": ([1, 2], [[1.0, 3.0], [3.0, 5.0]]), "b": ([1, 2], [2.0, 2.0])}, ax=ax, ylabel="MaxVio")
        a, b = ax.get_lines()
        assert list(a.get_ydata()) == [2.0, 4.0] and list(b.get_ydata()) == [2.0, 2.0]
        assert len(ax.collections) == 1  # a band only where there are several seeds
    finally:
        plt.close(fig)


def test_plot_tradeoff_one_dot_per_seed():
    fig, ax = plt.subplots()
    try:
        plot_tradeoff({"a": [(0.1, 2.5), (0.2, 2.6)], "b": [(1.0, 2.7)]}, ax=ax)
        assert [len(c.get_offsets()) for c in ax.collections] == [2, 1]
    finally:
        plt.close(fig)


def test_static_fallback_has_a_row_per_rate():
    fig = bias_explorer(static=True, steps=30)
    assert isinstance(fig, Figure)
    assert len(fig.subfigs) == len(STATIC_RATES)
    titles = [ax.get_title() for sub in fig.subfigs for ax in sub.axes]
    assert any("u = 0.0001" in t for t in titles) and any("u = 0.01" in t for t in titles)


def test_widget_without_ipywidgets_falls_back(block_ipywidgets):
    block_ipywidgets()
    assert isinstance(bias_explorer(steps=20), Figure)


def test_widget_has_rate_and_skew_controls():
    pytest.importorskip("ipywidgets")
    box = bias_explorer(steps=20)
    assert set(box.controls) == {"rate", "skew"}
    box.controls["rate"].value = 1e-2
    box.controls["skew"].value = 2.0
    with pytest.raises(ValueError, match="not on the slider"):
        bias_explorer(rate=0.5)


def test_plot_tradeoff_curves_one_line_per_method_with_intervals():
    import pytest

    from moe_course.plots.loss_free import plot_tradeoff_curves

    curves = {"aux": [("0", [2.0, 2.2], [2.30, 2.32]), ("1e-2", [0.4, 0.3], [2.35, 2.37])],
              "bias": [("1e-3", [0.1, 0.12], [2.29, 2.31])]}
    fig = plot_tradeoff_curves(curves)
    ax = fig.axes[0]
    assert len(ax.containers) == 2  # one errorbar curve per method
    line = ax.containers[0].lines[0]
    assert list(line.get_xdata()) == pytest.approx([2.1, 0.35])
    assert list(line.get_ydata()) == pytest.approx([2.31, 2.36])
    assert [t.get_text() for t in ax.texts] == ["0", "1e-2", "1e-3"]
    with pytest.raises(ValueError, match="at least 2"):
        plot_tradeoff_curves({"aux": [("0", [2.0], [2.3])]})
    with pytest.raises(ValueError, match="empty"):
        plot_tradeoff_curves({})
