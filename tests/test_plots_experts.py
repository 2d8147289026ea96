"""moe_course.plots_experts: each figure draws what it says (boxes, bars, heatmap values)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from moe_course.fine_grained import fine_grained_config  # noqa: E402
from moe_course.plots_experts import (  # noqa: E402
    plot_combinations,
    plot_expert_layouts,
    plot_seed_comparison,
    plot_type_heatmaps,
    type_lift,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_layouts_draw_one_box_per_expert_with_equal_total_width() -> None:
    layouts = {"8 top-2": fine_grained_config(8, 2, 1, 0, 128), "1+31 top-7": fine_grained_config(8, 2, 4, 1, 128)}
    fig = plot_expert_layouts(layouts)
    patches = fig.axes[0].patches
    assert len(patches) == 8 + 32
    shared = [p for p in patches if matplotlib.colors.to_hex(p.get_facecolor()) == "#2ca02c"]
    assert len(shared) == 1
    chosen = [p for p in patches if matplotlib.colors.to_hex(p.get_facecolor()) == "#ff7f0e"]
    assert len(chosen) == 2 + 7


def test_combinations_bars_are_log10_of_the_counts() -> None:
    fig = plot_combinations(8, 2, ms=(1, 4), extra={"V3": (256, 8)})
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx([math.log10(28), math.log10(10_518_300), math.log10(409_663_695_276_000)])


def test_seed_comparison_bars_are_means() -> None:
    fig = plot_seed_comparison({"a": [1.0, 2.0, 3.0], "b": [2.0, 2.0]})
    assert [p.get_height() for p in fig.axes[0].patches] == pytest.approx([2.0, 2.0])


def test_type_lift_and_heatmaps() -> None:
    table = torch.tensor([[10, 0], [5, 5]])
    lift = type_lift(table)
    np.testing.assert_allclose(lift, [[1 / 0.75, 0.0], [0.5 / 0.75, 2.0]])
    fig = plot_type_heatmaps([table, table.flip(1)], ["A", "B"], title="t")
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 2
    np.testing.assert_allclose(images[0].get_array(), np.clip(lift, 0.25, 4.0))
