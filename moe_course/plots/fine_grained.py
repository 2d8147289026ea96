"""Notebook 05's figures: expert layouts, routing combinations, the trained comparison and specialisation heatmaps.

===========================  ==========================================================================
``plot_expert_layouts``      the three layouts at equal parameters: N top-k, m·N top-m·k, K_s shared + rest
``plot_combinations``        log10 C(m·N, m·k) as experts are split finer (and DeepSeek-V3's C(256, 8))
``plot_seed_comparison``     one final number per run label: every seed as a dot, the mean as a bar
``plot_regime_comparison``   each layout's mean test loss under each balancing regime, with 95% intervals
``plot_type_heatmaps``       per MoE layer, token types × experts: P(expert | type) / P(expert) (lift)
===========================  ==========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from moe_course.fine_grained import FineGrainedConfig, n_combinations
from moe_course.metrics import mean_std, t_quantile
from moe_course.plots.style import COLORS, figure_axes, style_axes

__all__ = ["plot_combinations", "plot_expert_layouts", "plot_regime_comparison", "plot_seed_comparison",
           "plot_type_heatmaps", "type_lift"]

_ROUTED, _CHOSEN, _SHARED = "#d9d9d9", COLORS[1], COLORS[2]


def plot_expert_layouts(layouts: Mapping[str, FineGrainedConfig], width: int | None = None,
                        ax: Axes | None = None) -> Figure:
    """One row per layout: each expert a box as wide as its hidden size; one token's experts coloured.

    Grey: routed experts the token skips; orange: its top-k routed experts; green: shared experts.
    """
    fig, ax = figure_axes(ax, (8.0, 0.9 + 0.7 * len(layouts)))
    width = width or max(c.expert_hidden * (c.n_routed + c.n_shared) for c in layouts.values())
    gen = np.random.default_rng(0)
    for row, (label, cfg) in enumerate(layouts.items()):
        y = len(layouts) - 1 - row
        chosen = set(gen.choice(cfg.n_routed, cfg.top_k, replace=False).tolist())
        x = 0.0
        for e in range(cfg.n_shared + cfg.n_routed):
            shared = e < cfg.n_shared
            color = _SHARED if shared else (_CHOSEN if e - cfg.n_shared in chosen else _ROUTED)
            ax.add_patch(Rectangle((x, y + 0.15), cfg.expert_hidden * 0.92, 0.7, color=color, lw=0))
            x += cfg.expert_hidden
        ax.text(-0.01 * width, y + 0.5, label, ha="right", va="center", fontsize=9)
    ax.set_xlim(-0.02 * width, width * 1.01)
    ax.set_ylim(0, len(layouts))
    ax.set_yticks([])
    ax.set_xlabel("hidden units (box width = expert width); same total width in every row")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in (_SHARED, _CHOSEN, _ROUTED)]
    ax.legend(handles, ["shared (every token)", "routed, chosen for this token", "routed, not chosen"],
              loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3, frameon=False, fontsize=8)
    return fig


def plot_combinations(n_experts: int = 8, top_k: int = 2, ms: Sequence[int] = (1, 2, 4, 8, 16),
                      extra: Mapping[str, tuple[int, int]] | None = None, ax: Axes | None = None) -> Figure:
    """log10 of C(m·N, m·k), the expert sets a token can get, for each split m (plus ``extra`` labelled points)."""
    fig, ax = figure_axes(ax, (7.0, 3.6))
    labels = [f"m={m}\nC({m * n_experts},{m * top_k})" for m in ms]
    values = [math.log10(n_combinations(m * n_experts, m * top_k)) for m in ms]
    for name, (n, k) in (extra or {}).items():
        labels.append(f"{name}\nC({n},{k})")
        values.append(math.log10(n_combinations(n, k)))
    bars = ax.bar(range(len(values)), values, color=[COLORS[0]] * len(ms) + [COLORS[3]] * (len(values) - len(ms)))
    for bar, v in zip(bars, values, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{10 ** v:.2g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    style_axes(ax, f"expert sets per token, N={n_experts} experts top-{top_k} split m ways", None, "log10 combinations")
    return fig


def plot_seed_comparison(values: Mapping[str, Sequence[float]], ylabel: str = "validation loss (nats/byte)",
                         title: str | None = None, ax: Axes | None = None, zoom: bool = True) -> Figure:
    """Each label's seeds as dots and their mean as a bar, with the min-max spread as an error bar."""
    fig, ax = figure_axes(ax, (7.0, 3.6))
    for i, seeds in enumerate(values.values()):
        arr = np.asarray(seeds, dtype=float)
        mean = float(arr.mean())
        ax.bar(i, mean, color=COLORS[i % len(COLORS)], alpha=0.35, width=0.6)
        ax.errorbar(i, mean, yerr=[[mean - arr.min()], [arr.max() - mean]], color="black", capsize=4, lw=1)
        ax.scatter(np.full(len(arr), i) + np.linspace(-0.12, 0.12, len(arr)), arr, color=COLORS[i % len(COLORS)],
                   zorder=3, s=18)
    ax.set_xticks(range(len(values)), list(values), fontsize=8)
    if zoom:
        lo = min(min(v) for v in values.values())
        hi = max(max(v) for v in values.values())
        pad = 0.25 * (hi - lo) + 1e-3
        ax.set_ylim(lo - pad, hi + pad)
    style_axes(ax, title, None, ylabel)
    return fig


def _mean_interval(name: str, values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval of the mean of one arm's per-seed results."""
    if len(values) < 2:
        raise ValueError(f"{name} needs at least 2 per-seed results for an interval, got {len(values)}")
    mean, std = mean_std(values)
    return mean, t_quantile(0.975, len(values) - 1) * std / math.sqrt(len(values))


def plot_regime_comparison(values: Mapping[str, Mapping[str, Sequence[float]]],
                           reference: Mapping[str, Sequence[float]] | None = None,
                           ylabel: str = "test loss (nats/byte)", title: str | None = None,
                           ax: Axes | None = None) -> Figure:
    """One group per regime, one point per layout: mean over seeds with its 95% t-interval, seeds as dots.

    ``values[regime][layout]`` holds the per-seed results; ``reference`` (e.g. a dense twin trained once) is drawn
    as a horizontal line with its 95% interval shaded.
    """
    if not isinstance(values, Mapping) or not values:
        raise ValueError("values must map each regime to {layout: per-seed results}, got an empty or non-mapping "
                         f"{type(values).__name__}")
    layouts = list(dict.fromkeys(lay for row in values.values() for lay in row))
    fig, ax = figure_axes(ax, (8.0, 3.8))
    width = 0.8 / max(len(layouts), 1)
    for i, (regime, row) in enumerate(values.items()):
        for j, layout in enumerate(layouts):
            if layout not in row:
                continue
            mean, half = _mean_interval(f"values[{regime!r}][{layout!r}]", row[layout])
            x = i + (j - (len(layouts) - 1) / 2) * width
            color = COLORS[j % len(COLORS)]
            ax.errorbar(x, mean, yerr=half, fmt="o", color=color, capsize=3, ms=5,
                        label=layout if i == 0 else None)
            ax.scatter(np.full(len(row[layout]), x + 0.25 * width), row[layout], color=color, s=6, alpha=0.4,
                       zorder=1)
    for k, (label, seeds) in enumerate((reference or {}).items()):
        mean, half = _mean_interval(f"reference[{label!r}]", seeds)
        color = COLORS[(len(layouts) + k) % len(COLORS)]
        ax.axhline(mean, color=color, ls="--", lw=1, label=f"{label} (95% interval shaded)")
        ax.axhspan(mean - half, mean + half, color=color, alpha=0.12, lw=0)
    ax.set_xticks(range(len(values)), list(values), fontsize=8)
    ax.legend(fontsize=8, frameon=False, loc="best")
    style_axes(ax, title, "balancing regime", ylabel)
    return fig


def type_lift(table: torch.Tensor | Sequence[Sequence[int]]) -> np.ndarray:
    """P(expert | type) / P(expert) of a (types, experts) count table; 1 means no preference."""
    t = np.asarray(table.tolist() if hasattr(table, "tolist") else table, dtype=float)
    p_type_expert = t / np.maximum(t.sum(axis=1, keepdims=True), 1)
    p_expert = t.sum(axis=0) / max(t.sum(), 1)
    return np.divide(p_type_expert, p_expert, out=np.zeros_like(p_type_expert), where=p_expert > 0)


def plot_type_heatmaps(tables: Sequence[torch.Tensor | Sequence[Sequence[int]]], type_names: Sequence[str],
                       title: str | None = None, vmax: float = 4.0, axes: Sequence[Axes] | None = None,
                       min_count: int = 0) -> Figure:
    """One heatmap per MoE layer: token types (rows) × experts (columns), coloured by the lift (log scale).

    With ``min_count > 0``, a row whose token type has fewer than ``min_count`` tokens in that layer's table is
    not painted (grey, hatched): its lift would be noise, or undefined with no tokens at all; nor is a column
    whose expert was no token's first choice (its lift is 0 / 0). Every row label then shows the type's token
    count, and the figure says what was left out.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
        raise ValueError(f"min_count must be an int >= 0, got {min_count!r}")
    if axes is None:
        fig, axes = plt.subplots(1, len(tables), figsize=(3.2 * len(tables) + 1, 3.2), layout="constrained",
                                 squeeze=False)
        axes = list(axes[0])
    fig = axes[0].figure
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#e0e0e0")
    image = None
    hidden: set[str] = set()
    any_unused = False
    for i, (ax, table) in enumerate(zip(axes, tables, strict=True)):
        t = np.asarray(table.tolist() if hasattr(table, "tolist") else table, dtype=float)
        counts = t.sum(axis=1)
        lift = np.clip(type_lift(table), 1 / vmax, vmax)
        few = counts < min_count
        unused = (t.sum(axis=0) == 0) if min_count else np.zeros(t.shape[1], dtype=bool)
        lift = np.ma.masked_array(lift, mask=few[:, None] | unused[None, :])
        image = ax.imshow(lift, aspect="auto", cmap=cmap, norm=LogNorm(1 / vmax, vmax), interpolation="nearest")
        for row in np.flatnonzero(few):
            ax.add_patch(Rectangle((-0.5, row - 0.5), lift.shape[1], 1, fill=False, hatch="///", color="#9e9e9e",
                                   lw=0))
            hidden.add(type_names[row])
        for col in np.flatnonzero(unused):
            ax.add_patch(Rectangle((col - 0.5, -0.5), 1, lift.shape[0], fill=False, hatch="///", color="#9e9e9e",
                                   lw=0))
            any_unused = True
        labels = [f"{name} ({int(n)})" for name, n in zip(type_names, counts, strict=True)] if min_count else \
            list(type_names)
        ax.set_title(f"layer {i}", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_yticks(range(len(type_names)), labels if i == 0 else [""] * len(type_names), fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="P(expert | type) / P(expert)", shrink=0.9)
    if title:
        fig.suptitle(title, fontsize=10)
    if hidden or any_unused:
        parts = [f"rows with fewer than {min_count} tokens of their type ({', '.join(sorted(hidden))})"] if hidden \
            else []
        parts += ["experts that were no token's first choice"] if any_unused else []
        fig.supxlabel(f"grey, not shown: {' and '.join(parts)}; row labels give each type's token count",
                      fontsize=7)
    return fig
