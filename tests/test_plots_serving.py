"""Notebook 09's figures draw what they say, and the offloading explorer (widget and static fallback) works."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from moe_course.plots.serving import (  # noqa: E402
    PART_COLORS,
    explorer_data,
    offload_explorer,
    plot_decode_split,
    plot_hit_rates,
    plot_per_batch,
    plot_popularity,
    plot_prefetch,
    plot_roofline,
    static_offload_figure,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _extra():
    """A small stand-in for one record's ``extra`` of the stored serving_traces result (2 layers, N = 4)."""
    return {
        "grid_batches": [1, 2], "capacities": [1, 2, 3, 4], "n_experts": 4,
        "grid_lru": [[[0.1, 0.4, 0.7, 0.9], [0.05, 0.3, 0.6, 0.9]], [[0.3, 0.5, 0.8, 0.9], [0.15, 0.4, 0.7, 0.9]]],
        "batches": [1, 2, 4], "distinct": [[2.0, 3.0, 3.5], [2.0, 2.6, 3.3]],
        "weight_bytes": {"expert": 1000.0, "other": 5000.0},
    }


def test_plot_per_batch_draws_each_series_on_a_log_axis():
    fig = plot_per_batch([1, 2, 4], {"a": [1, 2, 3], "b": [3, 2, 1]}, hline=(4.0, "N"), styles={"b": "--"})
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [list(line.get_ydata()) for line in lines[:2]] == [[1, 2, 3], [3, 2, 1]]
    assert lines[1].get_linestyle() == "--" and ax.get_xscale() == "log"
    assert list(lines[2].get_ydata()) == [4.0, 4.0]  # the reference line
    with pytest.raises(ValueError, match="has 2 values for 3 batch sizes"):
        plot_per_batch([1, 2, 4], {"a": [1, 2]})


def test_plot_roofline_caps_at_the_peak_and_marks_points():
    fig = plot_roofline(100.0, 10.0, {"layer": ([1.0, 100.0], [10.0, 100.0])}, {"layer": ["B=1", "B=64"]})
    ax = fig.axes[0]
    roof = ax.get_lines()[0]
    assert np.allclose(roof.get_ydata(), np.minimum(100.0, 10.0 * roof.get_xdata()))
    assert [t.get_text() for t in ax.texts][-2:] == ["B=1", "B=64"] and "ridge: 10" in ax.texts[0].get_text()


def test_plot_hit_rates_one_line_per_policy():
    fig = plot_hit_rates([1, 2, 3], {"LRU": [0.1, 0.5, 0.9], "Belady": [0.2, 0.6, 1.0]})
    assert [list(line.get_ydata()) for line in fig.axes[0].get_lines()] == [[0.1, 0.5, 0.9], [0.2, 0.6, 1.0]]
    with pytest.raises(ValueError, match="3 capacities"):
        plot_hit_rates([1, 2, 3], {"LRU": [0.1]})
    costs = plot_hit_rates([1, 2], {"LRU": [1.8, 1.2]}, ylabel="experts copied per token", ylim=None).axes[0]
    assert costs.get_ylabel() == "experts copied per token" and costs.get_ylim()[1] >= 1.8  # not clipped at 1


def test_plot_popularity_sorts_each_layer_and_labels_the_experts():
    fig = plot_popularity([[0.1, 0.7, 0.4, 0.8], [0.5, 0.5, 0.5, 0.5]], k=2)
    ax0 = fig.axes[0]
    assert [bar.get_height() for bar in ax0.patches] == [0.8, 0.7, 0.4, 0.1]
    assert [t.get_text() for t in ax0.get_xticklabels()] == ["3", "1", "2", "0"]
    assert list(ax0.get_lines()[0].get_ydata()) == [0.5, 0.5]  # the uniform share k / N
    assert isinstance(fig, Figure) and len(fig.axes) == 2


def test_plot_decode_split_stacks_the_parts():
    rows = {"dense": {"attention": 1.0, "ffn": 0.5, "other": 0.25}, "MoE": {"attention": 1.0, "router": 0.1,
                                                                         "experts": 2.0, "other": -0.1}}
    ax = plot_decode_split(rows).axes[0]
    by_color = {}
    for bar in ax.patches:
        by_color.setdefault(bar.get_facecolor()[:3], []).append(bar.get_width())
    assert by_color[matplotlib.colors.to_rgb(PART_COLORS["experts"])] == [0.0, 2.0]
    assert by_color[matplotlib.colors.to_rgb(PART_COLORS["other"])] == [0.25, 0.0]  # a negative rest is drawn as 0
    assert [t.get_text() for t in ax.get_yticklabels()] == ["dense", "MoE"]


def test_plot_prefetch_has_the_random_baseline():
    ax = plot_prefetch([1, 2, 3, 4], {"1 ahead": [0.4, 0.7, 0.9, 1.0]}, k=2).axes[0]
    assert list(ax.get_lines()[1].get_ydata()) == [0.25, 0.5, 0.75, 1.0]


def test_explorer_data_averages_the_layers():
    data = explorer_data(_extra())
    assert data["hit_rate"][0] == pytest.approx([0.2, 0.45, 0.75, 0.9])
    assert data["distinct"] == [2.0, 2.8] and data["n_layers"] == 2 and data["batches"] == [1, 2]


def test_static_figure_and_fallback(block_ipywidgets):
    data = explorer_data(_extra())
    fig = static_offload_figure(data)
    assert isinstance(fig, Figure)
    assert fig.axes[0].images[0].get_array().shape == (2, 4)
    block_ipywidgets()
    assert isinstance(offload_explorer(data), Figure)
    assert isinstance(offload_explorer(data, static=True), Figure)


def test_widget_builds_and_redraws():
    widgets = pytest.importorskip("ipywidgets")
    box = offload_explorer(explorer_data(_extra()), capacity=2, batch=1)
    assert isinstance(box, widgets.VBox) and set(box.controls) == {"capacity", "batch"}
    drawn = box.state["draws"]
    box.controls["capacity"].value = 4
    box.controls["batch"].value = 2
    assert box.state["draws"] >= drawn + 2
    with pytest.raises(ValueError, match="capacity must be one of"):
        offload_explorer(explorer_data(_extra()), capacity=9)
