"""Figures of notebook 07 (expert parallelism): the dispatch/compute/combine picture, the all-to-all traffic,
the rows each expert received, and where each rank's time goes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

PHASE_COLORS = {"router": "#8da0cb", "dispatch": "#fc8d62", "experts": "#66c2a5", "combine": "#e78ac3"}
STEP_COLORS = {"compute": "#66c2a5", "all-to-all": "#fc8d62", "waiting": "#bbbbbb"}
"""The parts of a training step that ``parallel.profile_layer`` reports in ``step_parts``."""
STAGES = ("route +\nsort by rank", "all-to-all\n(dispatch)", "local experts\n(grouped GEMM)",
          "all-to-all\n(combine)", "weighted\nsum")


def _check_square(matrix: Sequence[Sequence[int]], name: str) -> int:
    w = len(matrix)
    if w == 0 or any(len(row) != w for row in matrix):
        raise ValueError(f"{name} must be a non-empty W x W matrix (row i: what rank i sends to each rank)")
    return w


def plot_expert_parallel_flow(sent: Sequence[Sequence[int]], title: str | None = None) -> Figure:
    """Left: one row per rank through the five stages, the two all-to-alls as crossing lines whose width
    grows with the rows exchanged. Right: the dispatch traffic matrix (pairs rank i sends to rank j)."""
    w = _check_square(sent, "sent")
    fig, (ax, heat) = plt.subplots(1, 2, figsize=(11, 0.9 * w + 2.2), width_ratios=(2.4, 1), layout="constrained")
    colors = plt.get_cmap("tab10").colors
    biggest = max(1, max(max(row) for row in sent))
    xs = [0, 2, 4, 6, 8]
    for r in range(w):
        y = -r
        for x, stage in zip(xs, STAGES, strict=True):
            if "all-to-all" in stage:
                continue
            ax.add_patch(FancyBboxPatch((x - 0.8, y - 0.32), 1.6, 0.64, boxstyle="round,pad=0.02",
                                        facecolor=colors[r % 10], alpha=0.25, edgecolor=colors[r % 10]))
            ax.text(x, y, stage, ha="center", va="center", fontsize=7.5)
        ax.text(-1.0, y, f"rank {r}", ha="right", va="center", fontsize=10, color=colors[r % 10])
    for x0, x1, back in ((0.8, 3.2, False), (4.8, 7.2, True)):
        for i in range(w):
            for j in range(w):
                n = sent[i][j]
                if n == 0:
                    continue
                src, dst = (j, i) if back else (i, j)
                ax.plot([x0, x1], [-src, -dst], color=colors[i % 10],  # coloured by the tokens' rank
                        linewidth=0.5 + 4 * n / biggest, alpha=0.7)
    ax.text(2, 0.75, "all-to-all #1\n(tokens out)", ha="center", fontsize=9)
    ax.text(6, 0.75, "all-to-all #2\n(results back)", ha="center", fontsize=9)
    ax.set_xlim(-2.2, 9)
    ax.set_ylim(-w + 0.4, 1.4)
    ax.axis("off")
    ax.set_title(title or "expert parallelism: each rank's tokens travel to the experts' ranks and back")
    im = heat.imshow(sent, cmap="Blues", vmin=0)
    for i in range(w):
        for j in range(w):
            heat.text(j, i, str(sent[i][j]), ha="center", va="center", fontsize=9,
                      color="white" if sent[i][j] > 0.6 * biggest else "black")
    heat.set_xlabel("to rank")
    heat.set_ylabel("from rank")
    heat.set_xticks(range(w))
    heat.set_yticks(range(w))
    heat.set_title("(token, expert) pairs sent\n(diagonal: stays on the rank)")
    fig.colorbar(im, ax=heat, shrink=0.8)
    return fig


def plot_received_rows(received_per_expert: Sequence[Sequence[int]], ax: Axes | None = None,
                       title: str = "rows each expert received") -> Axes:
    """Bars of the rows every expert received, coloured by the rank that holds it (contiguous layout)."""
    if not received_per_expert:
        raise ValueError("received_per_expert must hold one list of counts per rank")
    ax = ax or plt.subplots(figsize=(7, 3), layout="constrained")[1]
    colors = plt.get_cmap("tab10").colors
    e = 0
    for r, counts in enumerate(received_per_expert):
        ax.bar(range(e, e + len(counts)), counts, color=colors[r % 10], label=f"rank {r}")
        e += len(counts)
    mean = sum(map(sum, received_per_expert)) / max(1, e)
    ax.axhline(mean, color="black", linestyle="--", linewidth=1, label="mean per expert")
    ax.set_xlabel("expert")
    ax.set_ylabel("rows received")
    ax.set_xticks(range(e))
    ax.set_title(title)
    biggest = max((max(c) for c in received_per_expert if len(c)), default=0)
    ax.set_ylim(0, 1.35 * max(biggest, mean, 1))  # headroom: the legend sits above the tallest bar
    ax.legend(fontsize=8, ncols=min(5, len(received_per_expert) + 1), loc="upper left")
    return ax


def plot_phase_times(seconds: Sequence[Mapping[str, float]], ax: Axes | None = None,
                     title: str = "forward pass per rank", legend: bool = True,
                     colors: Mapping[str, str] = PHASE_COLORS) -> Axes:
    """Stacked horizontal bars of each rank's times (milliseconds) in the order and colours of ``colors``:
    the forward phases by default, :data:`STEP_COLORS` for a training step's compute / all-to-all / waiting."""
    if not seconds:
        raise ValueError("seconds must hold one dict of phase times per rank")
    unknown = sorted({name for phases in seconds for name in phases} - set(colors) - {"step", "total"})
    if unknown:
        raise ValueError(f"seconds has parts {unknown} that colors does not name; pass colors=STEP_COLORS for "
                         "profile_layer's step_parts")
    ax = ax or plt.subplots(figsize=(7, 0.5 * len(seconds) + 1.5), layout="constrained")[1]
    for r, phases in enumerate(seconds):
        left = 0.0
        for name, color in colors.items():
            ms = 1e3 * phases.get(name, 0.0)
            ax.barh(r, ms, left=left, color=color, label=name if r == 0 else None)
            left += ms
    ax.set_yticks(range(len(seconds)), [f"rank {r}" for r in range(len(seconds))])
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds")
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def plot_overlap(runs: Sequence[Mapping[str, float]], ax: Axes | None = None,
                 title: str = "forward pass in micro-batches: blocking vs overlapped exchanges") -> Axes:
    """Bars of the mean time (ms) of each arm of ``parallel.overlap_profile`` over runs (one dict of seconds per
    seed), a dot per run, and the floor of a perfect overlap: the exchanges alone or the experts alone,
    whichever is longer."""
    if not runs:
        raise ValueError("runs must hold one dict of seconds per arm for each seed")
    arms = list(runs[0])
    if any(list(r) != arms for r in runs):
        raise ValueError("every run must time the same arms in the same order")
    ms = {arm: [1e3 * r[arm] for r in runs] for arm in arms}
    mean = [sum(v) / len(v) for v in ms.values()]
    ax = ax or plt.subplots(figsize=(8, 0.4 * len(arms) + 1.4), layout="constrained")[1]
    colors = ["#bbbbbb" if "only" in arm or arm == "whole batch" else
              "#66c2a5" if "overlapped" in arm else "#fc8d62" for arm in arms]
    ax.barh(range(len(arms)), mean, color=colors)
    for i, arm in enumerate(arms):
        ax.plot(ms[arm], [i] * len(runs), "k.", markersize=4, label="one seed" if i == 0 else None)
        ax.text(max(ms[arm]), i, f"  {mean[i]:.1f}", va="center", fontsize=8)
    if "exchanges only" in ms and "experts only" in ms:
        floor = max(mean[arms.index("exchanges only")], mean[arms.index("experts only")])
        ax.axvline(floor, color="black", linestyle="--", linewidth=1,
                   label="longer of exchanges / experts alone: a perfect overlap")
    ax.set_yticks(range(len(arms)), arms)
    ax.set_ylim(len(arms) - 0.5, -1.7)  # a free row on top: the legend covers no bar
    ax.set_xlim(0, 1.25 * max(max(v) for v in ms.values()))
    ax.set_xlabel("milliseconds (bars: mean over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right", ncols=2)
    return ax
