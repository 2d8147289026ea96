"""Notebook 06's figures and the bias-dynamics explorer (with a static fallback).

=============================  ==================================================================
``plot_bias``                  each expert's routing bias over steps (one line per expert)
``plot_series``                one statistic over training, one line per run (mean over seeds, band = range)
``plot_tradeoff``              MaxVio_global against validation loss, one colour per run, one dot per seed
``plot_tradeoff_curves``       one curve per balancing method through its settings: mean balance against mean
                               loss, with the loss's 95% interval over the seeds
``bias_explorer``              sliders for the update rate u and the router skew over ``simulate_bias``
=============================  ==================================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from moe_course.loss_free import BiasSimulation, simulate_bias
from moe_course.plots.style import COLORS, expert_colors, figure_axes, style_axes

__all__ = ["STATIC_RATES", "bias_explorer", "plot_bias", "plot_series", "plot_tradeoff", "plot_tradeoff_curves",
           "static_bias_figure"]

STATIC_RATES = (1e-4, 1e-3, 1e-2)
SLIDER_RATES = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def plot_bias(bias: Any, steps: Sequence[int] | None = None, ax: Axes | None = None,
              title: str | None = None) -> Figure:
    """One line per expert: bias (points, N) against ``steps`` (default 0, 1, 2, ...)."""
    _, ax = figure_axes(ax, (6.0, 3.5))
    b = np.asarray(torch.as_tensor(bias, dtype=torch.float64))
    if b.ndim != 2:
        raise ValueError(f"bias must be (points, N), got shape {b.shape}; pass one layer's trajectory")
    x = np.arange(len(b)) if steps is None else np.asarray(steps)
    if len(x) != len(b):
        raise ValueError(f"steps has {len(x)} entries for {len(b)} bias points")
    colors = expert_colors(b.shape[1])
    for e in range(b.shape[1]):
        ax.plot(x, b[:, e], color=colors[e], linewidth=1.2, label=f"E{e}")
    ax.axhline(0.0, color="black", linewidth=0.8)
    style_axes(ax, title, "step", "bias bᵢ", title_size=10)
    return ax.figure


def plot_series(series: Mapping[str, tuple[Sequence[float], Sequence[Sequence[float]]]], ax: Axes | None = None,
                title: str | None = None, ylabel: str | None = None, log: bool = False) -> Figure:
    """label -> (steps, [seed][point] values): the mean over seeds as a line, the range over seeds as a band."""
    _, ax = figure_axes(ax, (6.0, 3.5))
    for i, (label, (steps, per_seed)) in enumerate(series.items()):
        v = np.asarray(per_seed, dtype=float)
        if v.ndim == 1:
            v = v[None]
        color = COLORS[i % len(COLORS)]
        ax.plot(steps, v.mean(axis=0), color=color, label=label)
        if len(v) > 1:
            ax.fill_between(steps, v.min(axis=0), v.max(axis=0), color=color, alpha=0.15, linewidth=0)
    if log:
        ax.set_yscale("log")
    style_axes(ax, title, "step", ylabel, title_size=10)
    ax.legend(fontsize=7)
    return ax.figure


def plot_tradeoff(points: Mapping[str, Sequence[tuple[float, float]]], ax: Axes | None = None,
                  title: str | None = None) -> Figure:
    """label -> [(MaxVio_global, val loss) per seed]: lower-left is better on both."""
    _, ax = figure_axes(ax, (5.5, 3.8))
    for i, (label, pts) in enumerate(points.items()):
        p = np.asarray(pts, dtype=float).reshape(-1, 2)
        ax.scatter(p[:, 0], p[:, 1], color=COLORS[i % len(COLORS)], label=label, s=28)
    style_axes(ax, title, "MaxVio_global (validation set)", "validation loss (nats/byte)", title_size=10)
    ax.legend(fontsize=7)
    return ax.figure


def plot_tradeoff_curves(curves: Mapping[str, Sequence[tuple[str, Sequence[float], Sequence[float]]]],
                         ax: Axes | None = None, title: str | None = None,
                         xlabel: str = "MaxVio_global (validation set)",
                         ylabel: str = "test loss (nats/byte)") -> Figure:
    """method -> [(setting, balance per seed, loss per seed)]: a line through the settings' means, each point
    with the 95% Student-t interval of its mean loss, and the setting written beside it."""
    from moe_course.metrics import mean_std, t_quantile

    if not curves:
        raise ValueError("curves must map each method to its settings, got an empty mapping")
    _, ax = figure_axes(ax, (6.5, 4.2))
    for i, (method, points) in enumerate(curves.items()):
        if not points or any(len(xs) != len(ys) or len(ys) < 2 for _, xs, ys in points):
            raise ValueError(f"{method}: every setting needs the same number (at least 2) of balance and loss values")
        color = COLORS[i % len(COLORS)]
        x = [mean_std(xs)[0] for _, xs, _ in points]
        y = [mean_std(ys)[0] for _, _, ys in points]
        half = [t_quantile(0.975, len(ys) - 1) * mean_std(ys)[1] / len(ys) ** 0.5 for _, _, ys in points]
        ax.errorbar(x, y, yerr=half, color=color, marker="o", markersize=4, capsize=3, linewidth=1.4, label=method)
        for (setting, _, _), xi, yi in zip(points, x, y, strict=True):
            ax.annotate(setting, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    style_axes(ax, title, xlabel, ylabel, title_size=10)
    ax.legend(fontsize=8)
    return ax.figure


def _draw(fig: Figure, sim: BiasSimulation) -> None:
    ax_bias, ax_vio = fig.subplots(1, 2)
    plot_bias(sim.bias.numpy(), ax=ax_bias, title=f"bias per expert, u = {sim.rate:g}")
    steps = np.arange(1, len(sim.max_vio) + 1)
    ax_vio.plot(steps, sim.max_vio.numpy(), color=COLORS[3], linewidth=1.0)
    tail = float(sim.max_vio[-len(steps) // 5:].mean())
    style_axes(ax_vio, f"MaxVio_batch (last fifth: {tail:.2f})", "step", "MaxVio", title_size=10)


def static_bias_figure(rates: Sequence[float] = STATIC_RATES, skew: float = 1.0, n_experts: int = 8, k: int = 2,
                       steps: int = 300, seed: int = 0) -> Figure:
    """The explorer's static version: one row (bias, MaxVio) per update rate."""
    fig = Figure(figsize=(10, 2.8 * len(rates)), layout="constrained")
    rows = np.atleast_1d(fig.subfigures(len(rates), 1))
    for row, rate in zip(rows, rates, strict=True):
        _draw(row, simulate_bias(n_experts, k, rate, skew, steps, seed=seed))
    fig.suptitle(f"a frozen sigmoid router with skew {skew:g} (N = {n_experts}, k = {k}), balanced by the bias",
                 fontsize=11)
    return fig


def bias_explorer(static: bool = False, rate: float = 1e-3, skew: float = 1.0, n_experts: int = 8, k: int = 2,
                  steps: int = 300, seed: int = 0) -> Any:
    """Sliders for the update rate u and the router skew over :func:`simulate_bias`; returns the widget.

    Falls back to :func:`static_bias_figure` (a ``Figure``) when ``static=True`` or without ipywidgets.
    """
    if rate not in SLIDER_RATES:
        raise ValueError(f"rate={rate:g} is not on the slider; use one of {', '.join(map(str, SLIDER_RATES))}")
    try:
        if static:
            raise ImportError
        import ipywidgets as widgets
        from IPython.display import display
    except ImportError:
        return static_bias_figure(skew=skew, n_experts=n_experts, k=k, steps=steps, seed=seed)

    style = {"description_width": "initial"}
    controls = {
        "rate": widgets.SelectionSlider(options=list(SLIDER_RATES), value=rate, description="update rate u",
                                        style=style),
        "skew": widgets.FloatSlider(value=skew, min=0.0, max=3.0, step=0.25, description="router skew", style=style),
    }

    def update(rate: float, skew: float) -> None:
        fig = Figure(figsize=(10, 3.2), layout="constrained")
        _draw(fig, simulate_bias(n_experts, k, rate, skew, steps, seed=seed))
        display(fig)

    out = widgets.interactive_output(update, controls)
    box = widgets.VBox([widgets.HBox(list(controls.values())), out])
    box.controls = controls  # for tests and notebooks that set values programmatically
    return box
