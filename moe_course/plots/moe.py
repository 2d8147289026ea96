"""Figures of the MoE layer at work (notebooks 00, 02 and 03): the block diagram, router scores with the chosen
experts, and loss curves and expert load over training.

=========================  =====================================================================
``moe_block_diagram``      the MoE block drawn: router, top-k, experts, weighted sum, with shapes
``plot_routing_map``       router scores of a few tokens, with the chosen experts marked
``plot_loss_curves``       train and validation loss of one or more runs
``plot_expert_load``       the share of tokens each expert receives during training
=========================  =====================================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from moe_course.plots.style import COLORS, _numpy, figure_axes, style_axes

__all__ = ["moe_block_diagram", "plot_expert_load", "plot_loss_curves", "plot_routing_map"]

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
