"""moe_course.plots.fine_grained: each figure draws what it says (boxes, bars, heatmap values)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from moe_course.fine_grained import fine_grained_config  # noqa: E402
from moe_course.plots.fine_grained import (  # noqa: E402
    plot_combinations,
    plot_expert_layouts,
    plot_regime_comparison,
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


def test_heatmap_rows_with_too_few_tokens_are_masked_and_labelled() -> None:
    table = torch.tensor([[0, 0], [1, 2], [40, 60]])  # a type with no tokens, one with 3, one with 100
    fig = plot_type_heatmaps([table], ["none", "rare", "common"], min_count=10)
    ax = fig.axes[0]
    array = ax.images[0].get_array()
    assert array.mask[:2].all() and not array.mask[2].any()  # only the measured row is painted
    assert [t.get_text() for t in ax.get_yticklabels()] == ["none (0)", "rare (3)", "common (100)"]
    assert len([p for p in ax.patches if p.get_hatch()]) == 2
    assert "fewer than 10 tokens" in fig._supxlabel.get_text() and "(none, rare)" in fig._supxlabel.get_text()
    # an expert that no token chose has an undefined lift (0 / 0): its column is masked too
    unused = torch.tensor([[0, 5, 0], [50, 60, 0]])
    fig = plot_type_heatmaps([unused], ["a", "b"], min_count=10)
    mask = fig.axes[0].images[0].get_array().mask
    assert mask[:, 2].all() and mask[0].all() and not mask[1, :2].any()
    assert "no token's first choice" in fig._supxlabel.get_text()
    # the default paints every row, labels unchanged
    fig = plot_type_heatmaps([table], ["none", "rare", "common"])
    assert not np.ma.getmaskarray(fig.axes[0].images[0].get_array()).any()
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["none", "rare", "common"]
    with pytest.raises(ValueError, match="min_count must be an int >= 0"):
        plot_type_heatmaps([table], ["a", "b", "c"], min_count=-1)


def test_regime_comparison_draws_means_with_t_intervals() -> None:
    from moe_course.metrics import t_quantile

    values = {"none": {"a": [1.0, 2.0, 3.0], "b": [2.0, 2.0, 2.0]}, "aux": {"a": [1.0, 1.0, 1.0]}}
    fig = plot_regime_comparison(values, reference={"dense": [1.5, 2.5]})
    ax = fig.axes[0]
    points = [line for line in ax.lines if line.get_marker() == "o"]
    assert [float(p.get_ydata()[0]) for p in points] == pytest.approx([2.0, 2.0, 1.0])
    caps = ax.containers[0].lines[2][0].get_segments()[0]  # the first error bar: mean ± t(0.975, 2) · 1 / √3
    half = t_quantile(0.975, 2) / math.sqrt(3)
    assert [caps[0][1], caps[1][1]] == pytest.approx([2.0 - half, 2.0 + half])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["none", "aux"]
    assert any(line.get_linestyle() == "--" and line.get_ydata()[0] == pytest.approx(2.0) for line in ax.lines)
    with pytest.raises(ValueError, match="at least 2 per-seed results"):
        plot_regime_comparison({"none": {"a": [1.0]}})
    with pytest.raises(ValueError, match="values must map each regime"):
        plot_regime_comparison({})
