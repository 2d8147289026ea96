"""Notebook 03's capacity explorer: skewed routing against a capacity limit, with sliders and a static fallback.

:func:`capacity_explorer` shows what a capacity limit does to a skewed router: sliders for the number of
experts N, the top-k, the capacity factor and the router's skew redraw the per-expert load (kept and
dropped assignments, with the capacity line) and a token x choice grid of which assignments were dropped.

Widgets do not render on GitHub or in a plain script, so every explorer also draws a static matplotlib
figure: when ipywidgets cannot be imported, or when called with ``static=True``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from moe_course.dispatch import capacity_mask, expert_capacity
from moe_course.plots.style import figure_axes
from moe_course.routing import softmax_topk

__all__ = ["capacity_explorer", "plot_capacity", "plot_dropped_grid", "skewed_logits"]

KEPT_COLOR = "#4C72B0"
DROPPED_COLOR = "#DD5555"
STATIC_FACTORS = (1.0, 1.25, 1.5, 2.0)


def skewed_logits(n_tokens: int, n_experts: int, skew: float = 1.5, seed: int = 0) -> torch.Tensor:
    """Router logits (T, N) where low-numbered experts are popular: noise plus ``skew`` · a linear ramp.

    ``skew = 0`` gives a roughly even router; larger values pile the tokens onto the first experts.
    """
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n_tokens, n_experts, generator=g)
    return noise + skew * torch.linspace(1.0, -1.0, n_experts)


def plot_capacity(indices: torch.Tensor, n_experts: int, capacity: int, ax: Axes | None = None) -> Figure:
    """Bar chart of the assignments each expert received, split into kept and dropped, with the capacity.

    ``indices``: (T, k) chosen experts, column 0 the first choice. Kept/dropped follow
    :func:`moe_course.dispatch.capacity_mask` (first choices claim slots before second choices).
    Draws into ``ax`` when given, else into a new figure; returns the figure (as :mod:`moe_course.plots`).
    """
    _, ax = figure_axes(ax, (6.0, 3.5))
    keep = capacity_mask(indices, n_experts, capacity)
    kept = torch.bincount(indices[keep], minlength=n_experts).numpy()
    dropped = torch.bincount(indices[~keep], minlength=n_experts).numpy()
    experts = np.arange(n_experts)
    ax.bar(experts, kept, color=KEPT_COLOR, label="kept")
    ax.bar(experts, dropped, bottom=kept, color=DROPPED_COLOR, label="dropped")
    ax.axhline(capacity, color="black", linestyle="--", linewidth=1.2, label=f"capacity = {capacity}")
    total = indices.numel()
    n_dropped = int(dropped.sum())
    ax.set_title(f"dropped {n_dropped} of {total} assignments ({100 * n_dropped / total:.0f}%)", fontsize=10)
    ax.set_xlabel("expert")
    ax.set_ylabel("assignments")
    ax.set_xticks(experts)
    ax.legend(fontsize=8, loc="upper right")
    return ax.figure


def plot_dropped_grid(indices: torch.Tensor, n_experts: int, capacity: int, ax: Axes | None = None) -> Figure:
    """Grid of choices (rows) x tokens (columns): blue = kept, red = dropped; each cell names its expert."""
    _, ax = figure_axes(ax, (6.0, 3.5))
    keep = capacity_mask(indices, n_experts, capacity)
    t, k = indices.shape
    # pcolormesh draws exact cell edges (imshow resamples the image and can blur the row border)
    ax.pcolormesh(np.arange(t + 1) - 0.5, np.arange(k + 1) - 0.5, (~keep).t().numpy().astype(float),
                  cmap=ListedColormap([KEPT_COLOR, DROPPED_COLOR]), vmin=0, vmax=1,
                  edgecolors="white", linewidth=0.5)
    ax.set_ylim(k - 0.5, -0.5)  # first choice on top
    if t <= 64:
        for j in range(k):
            for i in range(t):
                ax.text(i, j, str(int(indices[i, j])), ha="center", va="center", color="white",
                        fontsize=7 if t <= 32 else 5)
    ax.set_yticks(range(k), [f"choice {j + 1}" for j in range(k)])
    ax.set_xlabel("token")
    ax.set_title("which assignments are dropped (number = expert)", fontsize=10)
    return ax.figure


def _route(n_tokens: int, n_experts: int, k: int, capacity_factor: float, skew: float,
           seed: int) -> tuple[torch.Tensor, int]:
    _, indices = softmax_topk(skewed_logits(n_tokens, n_experts, skew, seed), k)
    return indices, expert_capacity(n_tokens, n_experts, k, capacity_factor)


def _draw(fig: Figure, n_tokens: int, n_experts: int, k: int, capacity_factor: float, skew: float,
          seed: int) -> None:
    indices, capacity = _route(n_tokens, n_experts, k, capacity_factor, skew, seed)
    ax_load, ax_grid = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
    plot_capacity(indices, n_experts, capacity, ax_load)
    plot_dropped_grid(indices, n_experts, capacity, ax_grid)
    fig.suptitle(f"{n_tokens} tokens, N = {n_experts}, k = {k}, capacity factor {capacity_factor:g} "
                 f"-> capacity ceil({capacity_factor:g}·{n_tokens}·{k}/{n_experts}) = {capacity}", fontsize=11)


def static_capacity_figure(n_tokens: int = 32, seed: int = 0, n_experts: int = 8, k: int = 2,
                           capacity_factor: float = 1.0, skew: float = 1.5,
                           factors: tuple[float, ...] = STATIC_FACTORS) -> Figure:
    """The explorer at its default values, plus the load chart for a few capacity factors."""
    fig = Figure(figsize=(12, 7), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.1, 1])
    _draw(top, n_tokens, n_experts, k, capacity_factor, skew, seed)
    axes = bottom.subplots(1, len(factors), sharey=True)
    for ax, cf in zip(np.atleast_1d(axes), factors, strict=True):
        indices, capacity = _route(n_tokens, n_experts, k, cf, skew, seed)
        plot_capacity(indices, n_experts, capacity, ax)
        n_dropped = int((~capacity_mask(indices, n_experts, capacity)).sum())
        ax.set_title(f"factor {cf:g}: capacity {capacity}, {n_dropped}/{indices.numel()} dropped", fontsize=9)
        ax.legend().remove()
        if ax is not np.atleast_1d(axes)[0]:
            ax.set_ylabel("")
    bottom.suptitle("the same router under capacity factors " + ", ".join(f"{f:g}" for f in factors), fontsize=11)
    return fig


def capacity_explorer(n_tokens: int = 32, seed: int = 0, static: bool = False, n_experts: int = 8, k: int = 2,
                      capacity_factor: float = 1.0, skew: float = 1.5) -> Any:
    """Sliders for N, k, capacity factor and router skew over a fixed skewed router; returns the widget.

    Falls back to :func:`static_capacity_figure` (a matplotlib ``Figure``) when ``static=True`` or when
    ipywidgets is not installed.
    """
    try:
        if static:
            raise ImportError
        import ipywidgets as widgets
        from IPython.display import display
    except ImportError:
        return static_capacity_figure(n_tokens, seed, n_experts, k, capacity_factor, skew)

    style = {"description_width": "initial"}
    controls = {
        "n_experts": widgets.IntSlider(value=n_experts, min=2, max=16, description="experts N", style=style),
        "k": widgets.IntSlider(value=k, min=1, max=4, description="top-k", style=style),
        "capacity_factor": widgets.FloatSlider(value=capacity_factor, min=0.5, max=3.0, step=0.25,
                                               description="capacity factor", style=style),
        "skew": widgets.FloatSlider(value=skew, min=0.0, max=3.0, step=0.25, description="router skew",
                                    style=style),
    }

    def update(n_experts: int, k: int, capacity_factor: float, skew: float) -> None:
        fig = Figure(figsize=(12, 3.8), layout="constrained")
        _draw(fig, n_tokens, n_experts, min(k, n_experts), capacity_factor, skew, seed)
        display(fig)

    out = widgets.interactive_output(update, controls)
    box = widgets.VBox([widgets.HBox(list(controls.values())[:2]), widgets.HBox(list(controls.values())[2:]), out])
    box.controls = controls  # for tests and for notebooks that want to set values programmatically
    return box
