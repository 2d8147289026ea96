"""moe_course.plots.parallel: each figure draws what it says (bars per expert and per phase, the traffic matrix)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402

from moe_course.plots.parallel import (  # noqa: E402
    PHASE_COLORS,
    plot_expert_parallel_flow,
    plot_overlap,
    plot_phase_times,
    plot_received_rows,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_flow_draws_the_traffic_matrix_and_one_line_per_nonzero_pair():
    sent = [[3, 1, 0], [2, 0, 4], [0, 5, 1]]
    fig = plot_expert_parallel_flow(sent)
    assert isinstance(fig, Figure)
    flow, heat = fig.axes[:2]
    image = [c for c in heat.get_children() if isinstance(c, AxesImage)][0]
    assert image.get_array().tolist() == sent
    texts = [t.get_text() for t in heat.texts]
    assert texts == [str(v) for row in sent for v in row]
    nonzero = sum(v > 0 for row in sent for v in row)
    assert len(flow.lines) == 2 * nonzero  # one line per nonzero pair in each all-to-all
    widths = sorted(line.get_linewidth() for line in flow.lines)
    assert widths[-1] > widths[0]  # the width grows with the rows exchanged
    assert {t.get_text() for t in flow.texts} >= {"rank 0", "rank 1", "rank 2"}


def test_flow_rejects_a_matrix_that_is_not_square():
    with pytest.raises(ValueError, match="W x W"):
        plot_expert_parallel_flow([[1, 2], [3]])


def test_received_rows_one_bar_per_expert_coloured_by_rank():
    ax = plot_received_rows([[4, 6], [0, 2], [5, 3]])
    heights = [p.get_height() for p in ax.patches]
    assert heights == [4, 6, 0, 2, 5, 3]
    colors = [p.get_facecolor() for p in ax.patches]
    assert colors[0] == colors[1] and colors[1] != colors[2]
    assert ax.lines[0].get_ydata()[0] == pytest.approx(20 / 6)
    with pytest.raises(ValueError, match="one list of counts per rank"):
        plot_received_rows([])


def test_phase_times_stack_in_milliseconds():
    seconds = [{"router": 0.001, "dispatch": 0.002, "experts": 0.010, "combine": 0.003},
               {"router": 0.001, "dispatch": 0.001, "experts": 0.001, "combine": 0.012}]
    ax = plot_phase_times(seconds)
    bars = ax.patches
    assert len(bars) == 2 * len(PHASE_COLORS)
    rank0 = [b for b in bars if b.get_y() < 0.5 and b.get_y() + b.get_height() > -0.5]
    assert sum(b.get_width() for b in rank0) == pytest.approx(16.0)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0", "rank 1"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(PHASE_COLORS)
    assert plot_phase_times(seconds, legend=False).get_legend() is None


def test_phase_times_draw_a_training_step_split_and_refuse_unnamed_parts():
    from moe_course.plots.parallel import STEP_COLORS

    parts = [{"total": 0.030, "compute": 0.025, "all-to-all": 0.002, "waiting": 0.003},
             {"total": 0.030, "compute": 0.012, "all-to-all": 0.002, "waiting": 0.016}]
    ax = plot_phase_times(parts, colors=STEP_COLORS, title="training step")
    widths = [[b.get_width() for b in ax.patches if abs(b.get_y() + b.get_height() / 2 - r) < 0.5] for r in (0, 1)]
    assert widths == [pytest.approx([25.0, 2.0, 3.0]), pytest.approx([12.0, 2.0, 16.0])]  # "total" is not a part
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(STEP_COLORS)
    with pytest.raises(ValueError, match="colors=STEP_COLORS"):
        plot_phase_times(parts)  # compute / all-to-all / waiting are not forward phases


def test_received_rows_legend_sits_above_every_bar():
    ax = plot_received_rows([[40, 90, 30, 20], [25, 25, 88, 10], [5, 6, 7, 8], [60, 61, 62, 63]])
    ax.figure.canvas.draw()
    legend = ax.get_legend().get_window_extent().transformed(ax.transData.inverted())
    tallest = max(b.get_height() for b in ax.patches)
    assert legend.y0 > tallest, f"the legend starts at {legend.y0:.1f} rows, below the tallest bar ({tallest})"


def test_overlap_bars_show_every_arm_each_seed_and_the_floor():
    runs = [{"exchanges only": 0.030, "experts only": 0.020, "one after another": 0.050, "overlapped": 0.040},
            {"exchanges only": 0.034, "experts only": 0.022, "one after another": 0.054, "overlapped": 0.042}]
    ax = plot_overlap(runs)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(runs[0])
    assert [round(p.get_width(), 6) for p in ax.patches] == [32.0, 21.0, 52.0, 41.0]  # means in ms
    dots = [line for line in ax.get_lines() if line.get_marker() == "."]
    assert [list(d.get_xdata()) for d in dots][3] == pytest.approx([40.0, 42.0])
    floor = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert floor and floor[0].get_xdata()[0] == pytest.approx(32.0)  # the exchanges, the longer of the two
    with pytest.raises(ValueError, match="one dict of seconds"):
        plot_overlap([])
    with pytest.raises(ValueError, match="same arms"):
        plot_overlap([runs[0], {"overlapped": 1.0}])
