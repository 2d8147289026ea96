"""Notebook 08's figures: training curves over seeds, loss against the number of experts, and the GPU summary.

==========================  ===========================================================================
``plot_seed_curves``        one colour per model: a thin line per seed, a thick line for the seed mean
``plot_expert_sweep``       final loss against the number of experts at fixed active width (log2 axis)
``plot_tuning``             each model's tuning loss over the learning-rate x warm-up grid, its choice marked
==========================  ===========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from moe_course.plots import COLORS, figure_axes, style_axes

__all__ = ["plot_expert_sweep", "plot_seed_curves", "plot_tuning"]

Curve = tuple[Sequence[float], Sequence[float]]


def plot_seed_curves(curves: Mapping[str, Sequence[Curve]], ax: Axes | None = None, title: str | None = None,
                     xlabel: str = "training tokens", ylabel: str = "validation loss (nats/byte)",
                     bits_axis: bool = True) -> Figure:
    """``curves[label]``: one ``(x, y)`` pair per seed. Seeds as thin lines, their mean (where x agree) thick.

    With ``bits_axis`` a right-hand axis gives the same loss in bits per byte (nats / ln 2).
    """
    fig, ax = figure_axes(ax, (7.0, 4.0))
    for i, (label, runs) in enumerate(curves.items()):
        if not runs:
            raise ValueError(f"curves[{label!r}] is empty: give one (x, y) pair per seed")
        color = COLORS[i % len(COLORS)]
        for x, y in runs:
            ax.plot(x, y, color=color, lw=0.8, alpha=0.45)
        xs = [tuple(x) for x, _ in runs]
        if len(set(xs)) == 1:  # same evaluation points: draw the mean over seeds
            mean = np.mean([np.asarray(y, dtype=float) for _, y in runs], axis=0)
            ax.plot(xs[0], mean, color=color, lw=2.2, label=f"{label} (mean of {len(runs)})")
        else:
            ax.plot([], [], color=color, lw=2.2, label=label)
    style_axes(ax, title, xlabel, ylabel, title_size=10)
    ax.legend(frameon=False, fontsize=8)
    if bits_axis:
        right = ax.secondary_yaxis("right", functions=(lambda n: n / math.log(2), lambda b: b * math.log(2)))
        right.set_ylabel("bits/byte")
    return fig


def plot_expert_sweep(points: Mapping[int, Sequence[float]], totals: Mapping[int, int] | None = None,
                      ax: Axes | None = None, title: str | None = None,
                      ylabel: str = "validation loss (nats/byte)") -> Figure:
    """``points[E]``: final losses (one per seed) with E experts; E = 1 is the dense twin. Mean line, seed dots.

    ``totals[E]`` (total parameters) is written next to each mean.
    """
    if not points:
        raise ValueError("points is empty: give {number of experts: [loss per seed]}")
    fig, ax = figure_axes(ax, (6.0, 3.8))
    es = sorted(points)
    means = [float(np.mean(points[e])) for e in es]
    for e in es:
        ax.scatter([e] * len(points[e]), points[e], color=COLORS[0], s=16, alpha=0.5, zorder=3)
    ax.plot(es, means, color=COLORS[0], lw=2, marker="o", zorder=4, label="mean over seeds")
    if totals:
        for e, m in zip(es, means, strict=True):
            if e in totals:
                ax.annotate(f"{totals[e] / 1e6:.1f}M", (e, m), textcoords="offset points", xytext=(6, 6),
                            fontsize=8, color="0.3")
    ax.set_xscale("log", base=2)
    ax.set_xticks(es, [("1 (dense)" if e == 1 else str(e)) for e in es])
    style_axes(ax, title, "experts E (same active parameters per token)", ylabel, title_size=10)
    ax.legend(frameon=False, fontsize=8)
    return fig


def plot_tuning(losses: Mapping[str, Mapping[tuple[float, int], float]], chosen: Mapping[str, tuple[float, int]],
                title: str | None = None, ylabel: str = "tuning loss (nats/byte)") -> Figure:
    """One panel per model: ``losses[model][(lr, warmup)]`` against lr, a line per warm-up; ``chosen`` ringed."""
    if not losses:
        raise ValueError("losses is empty: give {model: {(lr, warmup): loss}}")
    fig, axes = _panels(len(losses))
    warmups = sorted({w for grid in losses.values() for _, w in grid})
    for ax, (model, grid) in zip(axes, losses.items(), strict=True):
        for i, w in enumerate(warmups):
            lrs = sorted(lr for lr, ww in grid if ww == w)
            ax.plot(lrs, [grid[(lr, w)] for lr in lrs], marker="o", color=COLORS[i % len(COLORS)],
                    label=f"warm-up {w} steps")
        lr, w = chosen[model]
        ax.scatter([lr], [grid[(lr, w)]], s=160, facecolors="none", edgecolors="black", lw=1.5, zorder=5,
                   label="chosen")
        ax.set_xscale("log")
        lrs = sorted({lr for lr, _ in grid})
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        ax.minorticks_off()
        style_axes(ax, model, "learning rate", ylabel if ax is axes[0] else None, title_size=10)
    axes[0].legend(frameon=False, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def _panels(n: int) -> tuple[Figure, list[Axes]]:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.2), sharey=True, squeeze=False, layout="constrained")
    return fig, list(axes[0])
