"""Figures of parameter counts and cost (notebooks 00 and 02): where a model's parameters live, total against
active parameters of published MoEs, and cost against the number of experts.

=========================  =====================================================================
``plot_param_breakdown``   where a model's parameters live (attention, experts, ...), stacked bars
``plot_total_vs_active``   total vs active parameters of published MoE models (log-log scatter)
``plot_scaling``           wall-clock or FLOPs against the number of experts N
=========================  =====================================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from moe_course.plots.style import COLORS, figure_axes, style_axes

__all__ = ["COMPONENT_COLORS", "COMPONENT_LABELS", "plot_param_breakdown", "plot_scaling", "plot_total_vs_active"]

COMPONENT_COLORS = {
    "embeddings": "#7f7f7f",
    "attention": "#1f77b4",
    "dense_ffn": "#9467bd",
    "routed_experts": "#ff7f0e",
    "shared_experts": "#2ca02c",
    "router": "#d62728",
    "norms": "#bcbd22",
}
"""One fixed colour per component of :func:`moe_course.params.param_breakdown`, the same in every figure."""

COMPONENT_LABELS = {
    "embeddings": "embeddings",
    "attention": "attention",
    "dense_ffn": "dense FFN",
    "routed_experts": "routed experts",
    "shared_experts": "shared experts",
    "router": "router",
    "norms": "norms",
}



def _billions(n: float) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


# ----------------------------------------------------------------------------------------------------
# Parameter counts
# ----------------------------------------------------------------------------------------------------


def plot_param_breakdown(
    breakdowns: Mapping[str, Mapping[str, int]],
    relative: bool = True,
    ax: Axes | None = None,
    title: str | None = "Where the parameters live",
) -> Figure:
    """Stacked horizontal bars, one per model, split into the components of ``params.param_breakdown``.

    ``breakdowns`` maps a model name to ``{component: count}``. With ``relative=True`` each bar shows
    percentages of that model's total (models of very different sizes side by side), otherwise billions
    of parameters. Components that are zero in every model are left out of the bars and the legend.
    Every bar is labelled with its model's total.
    """
    if not breakdowns:
        raise ValueError("plot_param_breakdown needs at least one model")
    names = list(breakdowns)
    keys: list[str] = []
    for parts in breakdowns.values():
        keys += [k for k in parts if k not in keys]
    keys = [k for k in keys if any(parts.get(k, 0) for parts in breakdowns.values())]
    totals = np.array([sum(parts.values()) for parts in breakdowns.values()], dtype=float)
    fig, ax = figure_axes(ax, (9.0, 1.4 + 0.6 * len(names)))
    y = np.arange(len(names))
    left = np.zeros(len(names))
    for i, key in enumerate(keys):
        values = np.array([parts.get(key, 0) for parts in breakdowns.values()], dtype=float)
        widths = 100 * values / totals if relative else values / 1e9
        color = COMPONENT_COLORS.get(key, COLORS[i % len(COLORS)])
        ax.barh(y, widths, left=left, color=color, label=COMPONENT_LABELS.get(key, key), height=0.6)
        left += widths
    for yi, (end, total) in enumerate(zip(left, totals, strict=True)):
        ax.annotate(f"{_billions(total)} total", (end, yi), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=9)
    ax.set_yticks(y, names)
    ax.invert_yaxis()  # first model on top
    ax.set_xlim(0, (100 if relative else left.max()) * 1.2)  # room for the totals
    if relative:
        ax.set_xticks(range(0, 101, 20))
    style_axes(ax, title, "share of all parameters (%)" if relative else "parameters (billions)")
    ax.grid(False, axis="y")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)
    return fig


def plot_total_vs_active(
    models: Mapping[str, tuple[float, float]],
    ax: Axes | None = None,
    title: str | None = "Total vs active parameters",
) -> Figure:
    """Log-log scatter of ``{name: (total, active)}``: active parameters per token on x, total on y.

    Dotted lines mark total = 1x, 5x, 10x and 20x active: a dense model sits on the 1x line, and the
    further up a model sits, the larger the share of its weights that any one token skips.
    """
    if not models:
        raise ValueError("plot_total_vs_active needs at least one model")
    totals = np.array([float(t) for t, _ in models.values()]) / 1e9
    actives = np.array([float(a) for _, a in models.values()]) / 1e9
    if np.any(actives <= 0) or np.any(totals < actives):
        raise ValueError("every model needs 0 < active <= total")
    fig, ax = figure_axes(ax, (7.0, 5.0))
    xlim = (actives.min() / 2, actives.max() * 4)
    ylim = (min(totals.min(), actives.min()) / 2, totals.max() * 2)
    line = np.array([min(xlim[0], ylim[0]), max(xlim[1], ylim[1])])
    for ratio in (1, 5, 10, 20):
        ax.plot(line, ratio * line, ls=":", color="#999999", lw=1, zorder=1)
        y_text = ylim[1] / 1.25  # label where the line leaves the plot: the top edge, else the right edge
        x_text = y_text / ratio
        if x_text > xlim[1] / 1.25:
            x_text = xlim[1] / 1.25
            y_text = ratio * x_text
        ax.text(x_text, y_text, f"{ratio}x", color="#777777", fontsize=8, ha="right", va="bottom")
    log_a, log_t = np.log10(actives), np.log10(totals)
    for i, (name, total, active) in enumerate(zip(models, totals, actives, strict=True)):
        ax.scatter([active], [total], s=60, color=COLORS[i % len(COLORS)], zorder=3)
        # A neighbour closer than ~0.1 decade: the upper label goes above its point, the lower one below.
        near = (np.abs(log_a - log_a[i]) < 0.1) & (np.abs(log_t - log_t[i]) < 0.1)
        near[i] = False
        if near.any():
            up = bool(log_t[i] >= log_t[near].max())
            offset, va = ((5, 3), "bottom") if up else ((5, -3), "top")
        else:
            offset, va = (7, 0), "center"
        ax.annotate(name, (active, total), xytext=offset, textcoords="offset points", fontsize=9, va=va)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    style_axes(ax, title, "active parameters per token (billions, log scale)", "total parameters (billions, log scale)")
    return fig


# ----------------------------------------------------------------------------------------------------
# Cost against the number of experts
# ----------------------------------------------------------------------------------------------------


def plot_scaling(
    ns: Sequence[int],
    series: Mapping[str, Sequence[float]],
    ylabel: str,
    ax: Axes | None = None,
    title: str | None = None,
    logy: bool = False,
    logx: bool = False,
    xlabel: str = "number of experts N",
) -> Figure:
    """One line with markers per series (e.g. milliseconds or FLOPs) against the number of experts N.

    Both axes are linear by default, so that cost proportional to N shows as a straight line. With
    ``logx=True`` and ``ns`` powers of two (1, 2, 4, 8, ...) the x axis is logarithmic in base 2.
    """
    ns = list(ns)
    if not ns:
        raise ValueError("plot_scaling needs at least one value of N")
    fig, ax = figure_axes(ax)
    for i, (label, values) in enumerate(series.items()):
        values = list(values)
        if len(values) != len(ns):
            raise ValueError(f"series {label!r} has {len(values)} values for {len(ns)} values of N")
        ax.plot(ns, values, marker="o", color=COLORS[i % len(COLORS)], label=label)
    if logx:
        ax.set_xscale("log", base=2 if all(n > 0 and (n & (n - 1)) == 0 for n in ns) else 10)
    ax.set_xticks(ns, [str(n) for n in ns])
    if logy:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    style_axes(ax, title, xlabel, ylabel)
    if series:
        ax.legend(frameon=False)
    return fig
