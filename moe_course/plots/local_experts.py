"""Notebook 01's figures: the data and its regimes, how the gate partitions the input, each expert's fit, and
learning curves of the 1991 mixture of local experts (:mod:`moe_course.local_experts`).

==========================  ==================================================================================
``plot_data``               the inputs and targets, coloured by regime
``plot_gate_partition``     the gate's probabilities over the input (1-D curves or a 2-D map of the winner)
``plot_expert_fits``        each expert's output, drawn bold where the gate picks it
``plot_learning_curves``    a metric of several trainings against the training step
==========================  ==================================================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from moe_course.local_experts import MixtureOfLocalExperts, TrainHistory

__all__ = ["REGION_COLOURS", "plot_data", "plot_expert_fits", "plot_gate_partition", "plot_learning_curves"]

REGION_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                  "tab:olive", "tab:cyan", "tab:gray")


def _colour(i: int) -> str:
    return REGION_COLOURS[i % len(REGION_COLOURS)]



def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _grid_2d(steps: int = 200, lim: float = 1.0) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    g = torch.linspace(-lim, lim, steps)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    return _np(xx), _np(yy), torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def plot_data(x: torch.Tensor, y: torch.Tensor, regimes: torch.Tensor, names: Sequence[str] | None = None,
              title: str = "The data and its regimes") -> Figure:
    """Scatter the data coloured by true regime (1-D: y against x; 2-D: the plane, and y as colour)."""
    x, y, regimes = _np(x), _np(y).reshape(len(x), -1)[:, 0], _np(regimes)
    n = int(regimes.max()) + 1
    if x.shape[1] == 1:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for r in range(n):
            m = regimes == r
            ax.scatter(x[m, 0], y[m], s=8, color=_colour(r), label=names[r] if names else f"regime {r}")
        ax.set(xlabel="x", ylabel="y", title=title)
        ax.legend(fontsize=8, loc="best")
    else:
        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        for r in range(n):
            m = regimes == r
            axes[0].scatter(x[m, 0], x[m, 1], s=6, color=_colour(r), label=names[r] if names else f"regime {r}")
        axes[0].set(xlabel="x1", ylabel="x2", title="true regimes", aspect="equal")
        axes[0].legend(fontsize=7, loc="lower left")
        sc = axes[1].scatter(x[:, 0], x[:, 1], c=y, s=6, cmap="viridis")
        fig.colorbar(sc, ax=axes[1], label="y")
        axes[1].set(xlabel="x1", ylabel="x2", title="target y", aspect="equal")
        fig.suptitle(title)
    fig.tight_layout()
    return fig


@torch.no_grad()
def plot_gate_partition(models: MixtureOfLocalExperts | Mapping[str, MixtureOfLocalExperts],
                        boundaries: Sequence[float] | None = None) -> Figure:
    """How each gate splits the input space; one panel per model (pass a dict ``{title: model}``).

    1-D: the gate probabilities p_i(x) as curves over a grid of x in [-1, 1], with the background coloured
    by the winning expert and the true regime boundaries as dashed lines. 2-D: the map of the winning
    expert over [-1, 1]^2, shaded lighter where the largest probability is below 0.9.
    """
    if isinstance(models, MixtureOfLocalExperts):
        models = {"gate": models}
    d_in = next(iter(models.values())).d_in
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.4 if d_in == 1 else 4.6),
                             squeeze=False)
    for ax, (title, model) in zip(axes[0], models.items(), strict=True):
        device = next(model.parameters()).device
        if d_in == 1:
            grid = torch.linspace(-1, 1, 801).unsqueeze(1)
            p = _np(model.gate(grid.to(device)))
            xs = _np(grid[:, 0])
            win = p.argmax(1)
            starts = np.flatnonzero(np.r_[True, win[1:] != win[:-1]])
            ends = np.r_[starts[1:], len(xs) - 1]
            for s, e in zip(starts, ends, strict=True):
                ax.axvspan(xs[s], xs[e], color=_colour(int(win[s])), alpha=0.12, lw=0)
            for i in range(p.shape[1]):
                ax.plot(xs, p[:, i], color=_colour(i), lw=2, label=f"p{i}")
            for b in boundaries or ():
                ax.axvline(b, color="k", ls="--", lw=0.8)
            ax.set(xlabel="x", ylabel="gate probability", ylim=(-0.03, 1.03), title=title)
            ax.legend(fontsize=8, loc="center right", ncols=1)
        else:
            xx, yy, grid = _grid_2d()
            p = _np(model.gate(grid.to(device)))
            win = p.argmax(1).reshape(xx.shape)
            conf = p.max(1).reshape(xx.shape)
            rgb = np.array([to_rgb(_colour(i)) for i in range(p.shape[1])])
            img = rgb[win]
            img = np.where((conf > 0.9)[..., None], img, 0.55 * img + 0.45)
            ax.imshow(img, origin="lower", extent=(-1, 1, -1, 1))
            for b in boundaries or ():
                ax.axvline(b, color="k", ls="--", lw=0.8)
                ax.axhline(b, color="k", ls="--", lw=0.8)
            ax.set(xlabel="x1", ylabel="x2", title=title)
    fig.tight_layout()
    return fig


@torch.no_grad()
def plot_expert_fits(models: MixtureOfLocalExperts | Mapping[str, MixtureOfLocalExperts], x: torch.Tensor,
                     y: torch.Tensor) -> Figure:
    """Each expert's function over the data; one panel per model.

    1-D: the data in grey, every expert's output o_i(x) over the whole range (thin, dotted) and drawn thick
    where that expert has the largest gate probability, plus the mixture prediction in black. 2-D: per
    model, predicted against true y for each expert on its own region (on the diagonal = a good fit).
    """
    if isinstance(models, MixtureOfLocalExperts):
        models = {"experts": models}
    d_in = next(iter(models.values())).d_in
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.6), squeeze=False)
    for ax, (title, model) in zip(axes[0], models.items(), strict=True):
        device = next(model.parameters()).device
        if d_in == 1:
            grid = torch.linspace(-1, 1, 801).unsqueeze(1)
            out = model(grid.to(device))
            xs, o, win = _np(grid[:, 0]), _np(out.o[:, :, 0]), _np(out.p.argmax(1))
            ax.scatter(_np(x[:, 0]), _np(y[:, 0]), s=5, color="0.75", label="data")
            for i in range(o.shape[1]):
                ax.plot(xs, o[:, i], color=_colour(i), lw=0.9, ls=":")
                ax.plot(xs, np.where(win == i, o[:, i], np.nan), color=_colour(i), lw=2.5, label=f"expert {i}")
            ax.plot(xs, _np(out.y[:, 0]), color="k", lw=1, label="mixture")
            lo, hi = float(y.min()), float(y.max())
            pad = 0.15 * (hi - lo)
            ax.set(xlabel="x", ylabel="y", ylim=(lo - pad, hi + pad), title=title)
            ax.legend(fontsize=7, loc="lower left", ncols=2)
        else:
            out = model(x.to(device))
            win = _np(out.p.argmax(1))
            target = _np(y[:, 0])
            for i in range(model.n_experts):
                m = win == i
                ax.scatter(target[m], _np(out.o[:, i, 0])[m], s=5, color=_colour(i), label=f"expert {i}")
            lo, hi = float(target.min()), float(target.max())
            ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
            ax.set(xlabel="true y", ylabel="expert output on its region", title=title)
            ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def plot_learning_curves(histories: Mapping[str, TrainHistory], metric: str = "test_mse") -> Figure:
    """``metric`` (``"test_mse"``, ``"train_mse"`` or ``"loss"``) against the step, one line per history."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, (label, h) in enumerate(histories.items()):
        values = getattr(h, metric)
        if not values:
            raise ValueError(f"history {label!r} has no {metric!r} values (did you pass test data?)")
        ax.plot(h.step, values, color=_colour(i), lw=1.8, label=label)
    if metric != "loss":
        ax.set_yscale("log")
    ax.set(xlabel="training step", ylabel=metric.replace("_", " "), title="Learning curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
