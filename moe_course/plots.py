"""The figures the notebooks draw, with one look: each function returns its ``Figure``.

Every function takes an optional ``ax`` (draw into an existing subplot) and otherwise makes a new figure
of a standard size. Nothing here calls ``plt.show()``: in a notebook the returned figure is displayed
when it is the cell's last expression, or by ``plt.show()``.

=========================  =====================================================================
``plot_param_breakdown``   where a model's parameters live (attention, experts, ...), stacked bars
``plot_total_vs_active``   total vs active parameters of published MoE models (log-log scatter)
``plot_scaling``           wall-clock or FLOPs against the number of experts N
``plot_loss_curves``       train and validation loss of one or more runs
``plot_expert_load``       the share of tokens each expert receives during training
``plot_routing_map``       router scores of a few tokens, with the chosen experts marked
``moe_block_diagram``      the MoE block drawn: router, top-k, experts, weighted sum, with shapes
=========================  =====================================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = [
    "COLORS",
    "COMPONENT_COLORS",
    "COMPONENT_LABELS",
    "moe_block_diagram",
    "plot_expert_load",
    "plot_loss_curves",
    "plot_param_breakdown",
    "plot_routing_map",
    "plot_scaling",
    "plot_total_vs_active",
]

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]
"""The colour cycle shared by all figures (matplotlib's tab10)."""

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


def figure_axes(ax: Axes | None, figsize: tuple[float, float] = (7.0, 4.0)) -> tuple[Figure, Axes]:
    """The figure and axes to draw into: the given ``ax``, or a new figure."""
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def style_axes(ax: Axes, title: str | None, xlabel: str | None = None, ylabel: str | None = None,
               title_size: float | None = None) -> None:
    """The course's look for one axes: title and labels, a light grid behind the data, no top/right spines."""
    if title:
        ax.set_title(title, fontsize=title_size)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _numpy(values: Any) -> np.ndarray:
    """A tensor (any device, with or without grad), list or array as a NumPy array."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values)


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


# ----------------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------------


def plot_loss_curves(
    histories: Mapping[str, Any],
    ax: Axes | None = None,
    title: str | None = "Loss",
    ylabel: str = "cross-entropy (nats per byte)",
) -> Figure:
    """Train (solid) and validation (dashed, same colour) loss against the step, one colour per run.

    ``histories`` maps a run name to a :class:`moe_course.train.History` (anything with ``step``,
    ``train_loss``, ``val_step`` and ``val_loss`` lists).
    """
    fig, ax = figure_axes(ax)
    for i, (name, hist) in enumerate(histories.items()):
        color = COLORS[i % len(COLORS)]
        ax.plot(hist.step, hist.train_loss, color=color, label=f"{name} (train)")
        if getattr(hist, "val_loss", None):
            ax.plot(hist.val_step, hist.val_loss, color=color, ls="--", marker="o", ms=3, label=f"{name} (val)")
    style_axes(ax, title, "step", ylabel)
    if histories:
        ax.legend(frameon=False)
    return fig


def plot_expert_load(
    history: Any,
    layer: int = 0,
    kind: str = "area",
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Share of the routed tokens that each expert of one MoE layer received over training.

    ``history.load[t][layer][e]`` is expert e's fraction at log point t (as recorded by
    :func:`moe_course.train.train`). ``kind="area"`` stacks the fractions (a balanced layer shows bands
    of equal width; the dotted lines mark where they would be); ``kind="heatmap"`` draws experts × steps.
    """
    if kind not in ("area", "heatmap"):
        raise ValueError(f"unknown kind {kind!r}; use 'area' or 'heatmap'")
    if not history.load:
        raise ValueError("the history has no expert load (was the model an MoE?)")
    n_layers = len(history.load[0])
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer={layer} out of range: the history has {n_layers} MoE layer(s)")
    load = np.array([point[layer] for point in history.load], dtype=float)  # (log points, N)
    steps = np.asarray(history.step[: len(load)])
    n_experts = load.shape[1]
    fig, ax = figure_axes(ax)
    title = title if title is not None else f"Expert load, MoE layer {layer}"
    if kind == "area":
        colors = [COLORS[e % len(COLORS)] for e in range(n_experts)]
        ax.stackplot(steps, load.T, labels=[f"expert {e}" for e in range(n_experts)], colors=colors, alpha=0.85)
        for e in range(1, n_experts):
            ax.axhline(e / n_experts, color="white", ls=":", lw=0.8)
        ax.set_ylim(0, 1)
        ax.set_xlim(steps.min(), steps.max())
        style_axes(ax, title, "step", "share of routed tokens")
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
    else:
        image = ax.imshow(load.T, aspect="auto", cmap="viridis", origin="lower", interpolation="nearest",
                          extent=(steps.min(), steps.max(), -0.5, n_experts - 0.5))
        fig.colorbar(image, ax=ax, label="share of routed tokens")
        ax.set_yticks(range(n_experts))
        style_axes(ax, title, "step", "expert")
        ax.grid(False)
    return fig


# ----------------------------------------------------------------------------------------------------
# Routing decisions
# ----------------------------------------------------------------------------------------------------


def plot_routing_map(
    scores: Any,
    indices: Any,
    token_labels: Sequence[str] | None = None,
    ax: Axes | None = None,
    title: str | None = "Router scores and chosen experts",
) -> Figure:
    """Heatmap of router scores (tokens × experts) with each token's chosen experts marked.

    ``scores``: (T, N) probabilities or affinities; ``indices``: (T, k) the experts picked per token
    (column 0 = first choice, drawn as a filled marker; later choices hollow). Tensors or arrays.
    """
    scores, indices = _numpy(scores), _numpy(indices).astype(int)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (T, N), got shape {scores.shape}")
    if indices.ndim == 1:
        indices = indices[:, None]
    n_tokens, n_experts = scores.shape
    if indices.shape[0] != n_tokens:
        raise ValueError(f"indices has {indices.shape[0]} rows for {n_tokens} tokens")
    if token_labels is not None and len(token_labels) != n_tokens:
        raise ValueError(f"{len(token_labels)} token labels for {n_tokens} tokens")
    fig, ax = figure_axes(ax, (1.2 + 0.45 * n_experts, 1.2 + 0.32 * n_tokens))
    image = ax.imshow(scores, aspect="auto", cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="router score")
    rows = np.arange(n_tokens)
    for choice in range(indices.shape[1]):
        first = choice == 0
        ax.scatter(indices[:, choice], rows, marker="o", s=40, facecolors="#d62728" if first else "none",
                   edgecolors="#d62728", linewidths=1.5, label="1st choice" if first else f"choice {choice + 1}")
    ax.set_xticks(range(n_experts))
    ax.xaxis.tick_top()  # experts along the top, the marker legend below
    ax.xaxis.set_label_position("top")
    ax.set_yticks(rows, list(token_labels) if token_labels is not None else [str(t) for t in rows])
    ax.set_xlabel("expert")
    ax.set_ylabel("token")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), frameon=False, ncol=indices.shape[1], fontsize=8)
    return fig


# ----------------------------------------------------------------------------------------------------
# The MoE block, drawn
# ----------------------------------------------------------------------------------------------------


def moe_block_diagram(
    n_experts: int = 6,
    top_k: int = 2,
    chosen: Sequence[int] | None = None,
    ax: Axes | None = None,
    title: str | None = "One MoE layer, for a batch of T tokens",
) -> Figure:
    """Draw the MoE block: tokens → router → top-k → the chosen experts → weighted sum, with tensor shapes.

    Uses the course's notation (T tokens, width d, N experts of hidden width h, k per token, router
    W_g of shape (d, N)). ``chosen``: the k experts highlighted for one token (default: the first k).
    """
    if not isinstance(n_experts, int) or not 1 <= n_experts <= 12:
        raise ValueError(f"n_experts must be an int from 1 to 12 (the figure draws every expert), got {n_experts!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must be an int from 1 to n_experts={n_experts}, got {top_k!r}")
    chosen = list(range(top_k)) if chosen is None else [int(e) for e in chosen]
    if len(set(chosen)) != top_k or not all(0 <= e < n_experts for e in chosen):
        raise ValueError(f"chosen must list {top_k} distinct expert ids in 0..{n_experts - 1}, got {chosen}")
    from matplotlib.patches import Circle, FancyBboxPatch

    fig, ax = figure_axes(ax, (10.0, 4.8))
    box = {"boxstyle": "round,pad=0.02,rounding_size=0.12", "linewidth": 1.2}
    arrow = {"arrowstyle": "-|>", "color": "#444444", "linewidth": 1.1, "shrinkA": 2, "shrinkB": 2}

    def block(x: float, y: float, w: float, h: float, text: str, color: str, gid: str) -> None:
        patch = FancyBboxPatch((x - w / 2, y - h / 2), w, h, facecolor=color, edgecolor="#333333", **box)
        patch.set_gid(gid)
        ax.add_patch(patch)
        ax.text(x, y, text, ha="center", va="center", fontsize=9)

    def link(start: tuple[float, float], end: tuple[float, float], label: str = "", **style: Any) -> None:
        ax.annotate("", xy=end, xytext=start, arrowprops={**arrow, **style})
        if label:
            mid = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
            ax.text(*mid, label, ha="center", va="bottom", fontsize=8, color="#444444")

    top = 4.4  # the router's row; the experts fill y in [0, 3.4]
    block(0.9, 2.2, 1.5, 0.9, "tokens x\n(T, d)", "#e8e8e8", "input")
    block(3.3, top, 2.0, 0.9, "router: x W_g\nW_g (d, N)\nlogits (T, N)", "#f4c7c7", "router")
    block(6.1, top, 2.2, 0.9, "top-k, softmax\nweights (T, k)\nindices (T, k)", "#f4c7c7", "topk")
    link((1.3, 2.65), (2.3, top), "")
    link((4.3, top), (5.0, top))

    ys = [1.7] if n_experts == 1 else list(np.linspace(3.4, 0.0, n_experts))
    for e, y in enumerate(ys):
        picked = e in chosen
        block(6.1, y, 1.9, 0.42 if n_experts > 6 else 0.5, f"expert E{e}: d → h → d", COLORS[1] if picked else
              "#f2f2f2", f"expert {e}")
        if picked:
            link((1.65, 2.2), (5.15, y), color=COLORS[1])
            link((7.05, y), (8.55, 1.7), color=COLORS[1])
        else:
            ax.texts[-1].set_color("#999999")
    ax.text(6.1, -0.55, f"N = {n_experts} experts; this token runs k = {top_k} of them", ha="center", fontsize=8)
    ax.text(2.9, 0.2, "dispatch: each token\nto its k experts\n(T·k rows in all)", ha="center", fontsize=8,
            color=COLORS[1])
    link((7.0, top - 0.47), (7.0, ys[0] + 0.3), linestyle="--")
    ax.text(7.1, (top + ys[0]) / 2, "indices", fontsize=8, color="#444444", va="center")
    link((7.2, top - 0.1), (8.75, 2.0))
    ax.text(8.2, 3.2, "weights w", fontsize=8, color="#444444")
    ax.add_patch(Circle((8.8, 1.7), 0.32, facecolor="#fff2cc", edgecolor="#333333", gid="sum"))
    ax.text(8.8, 1.7, "Σ", ha="center", va="center", fontsize=13)
    ax.text(8.8, 1.05, "y = Σ w_i E_i(x)\nover the k chosen", ha="center", va="top", fontsize=8)
    link((9.12, 1.7), (9.6, 1.7))
    block(10.2, 1.7, 1.1, 0.8, "output y\n(T, d)", "#e8e8e8", "output")
    ax.set_xlim(-0.1, 10.9)
    ax.set_ylim(-0.8, 5.0)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title)
    return fig
