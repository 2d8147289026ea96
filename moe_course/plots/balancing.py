"""Notebook 04's figures, the rich-get-richer simulation behind them, and the balancing explorer widget.

=============================  ==================================================================
``simulate_collapse``          a toy router and N experts that improve only on the tokens they get
``router_gradient_norms``      how hard the LM loss and the Switch loss each pull on a TinyLM's routers
``plot_simulated_load``        the toy's expert shares over time (stacked) and its MaxVio
``balancing_explorer``         sliders for N, k and the aux-loss weight α over the toy (static fallback)
``plot_layer_loads``           one stacked expert-share panel per MoE layer of a training run
``plot_alpha_sweep``           MaxVio against validation loss, one colour per α, one dot per seed
``plot_curves``                one statistic (MaxVio, router-logit size, val loss) over training, per run
``plot_experts_per_token``     histogram: how many experts each token got (expert choice), zero included
=============================  ==================================================================
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from moe_course.plots.style import COLORS, expert_colors, figure_axes, style_axes

__all__ = [
    "CollapseSimulation",
    "balancing_explorer",
    "plot_alpha_sweep",
    "plot_curves",
    "plot_experts_per_token",
    "plot_layer_loads",
    "plot_simulated_load",
    "router_gradient_norms",
    "simulate_collapse",
    "static_balancing_figure",
]

STATIC_ALPHAS = (0.0, 0.01, 0.1, 1.0)
SLIDER_ALPHAS = (0.0, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


# ---------------------------------------------------------------------------------------------------------
# The rich-get-richer simulation
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CollapseSimulation:
    """What :func:`simulate_collapse` recorded: per-step expert shares and the resulting MaxVio."""

    load: torch.Tensor  # (steps, N) fraction of the T·k assignments each expert got at each step
    expert_loss: torch.Tensor  # (steps, N) each expert's loss (1 = no better than skipping the layer)
    n_experts: int
    top_k: int
    alpha: float
    task_grad: torch.Tensor | None = None  # (steps,) ‖∂ task / ∂W‖: how hard the task pulls on the router weights
    aux_grad: torch.Tensor | None = None  # (steps,) ‖∂ N·Σ fᵢPᵢ / ∂W‖ of the *unweighted* Switch loss

    @property
    def max_vio(self) -> torch.Tensor:
        """(steps,) MaxVio = (max share - 1/N) / (1/N) at each step."""
        return self.load.max(dim=1).values * self.n_experts - 1.0

    @property
    def dead(self) -> int:
        """Experts that received less than 1% of the assignments over the last 10% of the steps."""
        tail = self.load[-max(1, len(self.load) // 10):].mean(dim=0)
        return int((tail < 0.01).sum())


@contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny tensors run fastest on one thread, and a busy machine slows multi-threaded tiny ops badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def simulate_collapse(
    n_experts: int = 8,
    k: int = 2,
    alpha: float = 0.0,
    steps: int = 300,
    n_tokens: int = 256,
    d: int = 16,
    lr: float = 1.0,
    expert_lr: float = 0.02,
    floor: float = 0.3,
    seed: int = 0,
) -> CollapseSimulation:
    """A toy of router collapse: experts improve only on the tokens they receive, the router follows them.

    Each step draws T random tokens x (T, d); a linear router (W, b) picks the top-k of softmax(x·W + b).
    Expert i has one skill sᵢ and loss ℓᵢ = floor + (1 - floor)·exp(-sᵢ); a token's task loss is
    Σⱼ pⱼ·(ℓⱼ - 1) over its k chosen experts (1 = the loss without the layer), so the router learns to
    send tokens to the experts that are better *now*. Each expert's skill grows with its share of the
    assignments, sᵢ += expert_lr · N · fᵢ: an expert that happens to get more tokens early gets better,
    attracts more tokens, and the others starve. ``alpha`` adds α · N·Σᵢ fᵢ·Pᵢ (the Switch loss) to the
    router's objective. Plain SGD with step ``lr``. ``task_grad`` and ``aux_grad`` record, per step, the norm of
    the gradient of the task and of the unweighted Switch loss with respect to W: their ratio is the α at which
    the two pull on the router equally hard.
    """
    if not 1 <= k <= n_experts:
        raise ValueError(f"k={k} must be between 1 and n_experts={n_experts}")
    if alpha < 0 or steps < 1:
        raise ValueError(f"alpha must be >= 0 and steps >= 1, got alpha={alpha}, steps={steps}")
    g = torch.Generator().manual_seed(seed)
    with _one_thread():
        w = (0.1 * torch.randn(d, n_experts, generator=g)).requires_grad_(True)
        b = torch.zeros(n_experts, requires_grad=True)
        skill = torch.zeros(n_experts)
        loads, losses, task_grads, aux_grads = [], [], [], []
        for _ in range(steps):
            x = torch.randn(n_tokens, d, generator=g)
            probs = (x @ w + b).softmax(dim=-1)  # (T, N)
            weights, idx = probs.topk(k, dim=-1)  # (T, k), not renormalised (so k = 1 learns too)
            expert_loss = floor + (1 - floor) * torch.exp(-skill)  # (N,)
            task = (weights * (expert_loss[idx] - 1.0)).sum(dim=-1).mean()
            f = torch.bincount(idx.reshape(-1), minlength=n_experts).float() / (n_tokens * k)
            aux = n_experts * (f * probs.mean(dim=0)).sum()  # the Switch loss without its weight α
            task_w, task_b = torch.autograd.grad(task, [w, b], retain_graph=True)
            aux_w, aux_b = torch.autograd.grad(aux, [w, b])
            with torch.no_grad():
                w -= lr * (task_w + alpha * aux_w)
                b -= lr * (task_b + alpha * aux_b)
            skill += expert_lr * n_experts * f
            loads.append(f)
            losses.append(expert_loss)
            task_grads.append(task_w.norm())
            aux_grads.append(aux_w.norm())
    return CollapseSimulation(torch.stack(loads), torch.stack(losses), n_experts, k, alpha,
                              torch.stack(task_grads), torch.stack(aux_grads))


def router_gradient_norms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """How hard the language-model loss and the Switch loss each pull on a TinyLM's router weights, on one batch.

    Returns ``(‖∂CE/∂W_g‖, ‖∂L_aux/∂W_g‖)`` over the router weights of every top-k MoE layer, where CE is the
    next-byte cross-entropy on ``(x, y)`` and L_aux the *unweighted* Switch loss N·Σᵢ fᵢPᵢ summed over the
    layers (recomputed from each layer's input, so the model's own ``aux_loss_coef`` does not matter). Their
    ratio is the α at which the two gradients are equally large. The model's training flag is restored.
    """
    import torch.nn.functional as F

    from moe_course.balancing import switch_aux_loss

    layers = [m for m in model.moe_layers() if hasattr(getattr(m, "router", None), "gate")]
    if not layers:
        raise ValueError("router_gradient_norms needs a model with learned top-k routers (router.gate)")
    inputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
             for layer in layers]
    was_training = model.training
    model.train()
    try:
        logits, _ = model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    aux = sum(switch_aux_loss(r.scores, r.indices, layer.n_experts)
              for layer, r in ((layer, layer.router(h)) for layer, h in zip(layers, inputs, strict=True)))
    gates = [layer.router.gate.weight for layer in layers]
    ce_grad = torch.autograd.grad(ce, gates, retain_graph=True)
    aux_grad = torch.autograd.grad(aux, gates)
    norm = lambda grads: float(torch.cat([g.reshape(-1) for g in grads]).norm())  # noqa: E731
    return norm(ce_grad), norm(aux_grad)


def plot_simulated_load(sim: CollapseSimulation, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Stacked expert shares of a :class:`CollapseSimulation` over its steps, with the final MaxVio."""
    fig, ax = figure_axes(ax, (6.0, 3.5))
    steps = np.arange(1, len(sim.load) + 1)
    colors = expert_colors(sim.n_experts)
    ax.stackplot(steps, sim.load.numpy().T, colors=colors, alpha=0.85)
    for e in range(1, sim.n_experts):
        ax.axhline(e / sim.n_experts, color="white", ls=":", lw=0.8)
    ax.set_ylim(0, 1)
    ax.set_xlim(1, len(steps))
    if title is None:
        title = (f"N={sim.n_experts}, k={sim.top_k}, α={sim.alpha:g}: MaxVio {float(sim.max_vio[-1]):.2f}, "
                 f"{sim.dead} starved")
    style_axes(ax, title, "step", "share of assignments", title_size=10)
    return fig


def static_balancing_figure(n_experts: int = 8, k: int = 2, alphas: Sequence[float] = STATIC_ALPHAS,
                            steps: int = 300, seed: int = 0) -> Figure:
    """The explorer's static version: the toy at several α side by side."""
    fig = Figure(figsize=(3.2 * len(alphas), 3.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(alphas), sharey=True))
    for ax, alpha in zip(axes, alphas, strict=True):
        sim = simulate_collapse(n_experts, k, alpha, steps=steps, seed=seed)
        plot_simulated_load(sim, ax, title=f"α = {alpha:g}: MaxVio {float(sim.max_vio[-1]):.2f}, {sim.dead} starved")
    fig.suptitle(f"rich get richer: N = {n_experts}, k = {k}, expert shares over {steps} steps", fontsize=11)
    return fig


def balancing_explorer(static: bool = False, n_experts: int = 8, k: int = 2, alpha: float = 0.0,
                       steps: int = 300, seed: int = 0) -> Any:
    """Sliders for N, k, α and the seed over :func:`simulate_collapse`; returns the widget.

    Falls back to :func:`static_balancing_figure` (a ``Figure``) when ``static=True`` or without ipywidgets.
    """
    try:
        if static:
            raise ImportError
        import ipywidgets as widgets
        from IPython.display import display
    except ImportError:
        return static_balancing_figure(n_experts, k, steps=steps, seed=seed)

    if alpha not in SLIDER_ALPHAS:
        raise ValueError(f"alpha={alpha:g} is not on the slider; use one of {', '.join(map(str, SLIDER_ALPHAS))}")
    style = {"description_width": "initial"}
    controls = {
        "n_experts": widgets.IntSlider(value=n_experts, min=2, max=32, description="experts N", style=style),
        "k": widgets.IntSlider(value=k, min=1, max=4, description="top-k", style=style),
        "alpha": widgets.SelectionSlider(options=list(SLIDER_ALPHAS), value=alpha, description="aux weight α",
                                         style=style),
        "seed": widgets.IntSlider(value=seed, min=0, max=9, description="seed", style=style),
    }

    def update(n_experts: int, k: int, alpha: float, seed: int) -> None:
        sim = simulate_collapse(n_experts, min(k, n_experts), alpha, steps=steps, seed=seed)
        fig = Figure(figsize=(11, 3.5), layout="constrained")
        ax_load, ax_vio = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
        plot_simulated_load(sim, ax_load)
        ax_vio.plot(np.arange(1, steps + 1), sim.max_vio.numpy(), color=COLORS[3])
        style_axes(ax_vio, "MaxVio over time", "step", "MaxVio", title_size=10)
        display(fig)

    out = widgets.interactive_output(update, controls)
    box = widgets.VBox([widgets.HBox(list(controls.values())[:2]), widgets.HBox(list(controls.values())[2:]), out])
    box.controls = controls  # for tests and for notebooks that set values programmatically
    return box


# ---------------------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------------------


def plot_layer_loads(load: Sequence[Sequence[Sequence[float]]], steps: Sequence[int], title: str | None = None,
                     fig: Figure | None = None) -> Figure:
    """One stacked panel per MoE layer: each expert's share of the routed tokens over training.

    ``load[t][layer][e]``: expert e's fraction at log point t (``History.load``); ``steps``: the log points.
    """
    arr = np.asarray(load, dtype=float)  # (points, layers, N)
    if arr.ndim != 3:
        raise ValueError(f"load must be [log point][layer][expert], got an array of shape {arr.shape}")
    points, layers, n = arr.shape
    if len(steps) != points:
        raise ValueError(f"{len(steps)} steps for {points} log points")
    fig = fig or plt.figure(figsize=(4.2 * layers + 1.2, 3.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, layers, sharey=True))
    colors = expert_colors(n)
    for layer, ax in enumerate(axes):
        ax.stackplot(steps, arr[:, layer].T, colors=colors, alpha=0.85, labels=[f"expert {e}" for e in range(n)])
        for e in range(1, n):
            ax.axhline(e / n, color="white", ls=":", lw=0.8)
        ax.set_ylim(0, 1)
        ax.set_xlim(min(steps), max(steps))
        style_axes(ax, f"MoE layer {layer}", "step", "share of routed tokens" if layer == 0 else None, title_size=10)
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_alpha_sweep(rows: Sequence[Mapping[str, Any]], ax: Axes | None = None,
                     title: str | None = "Balance vs quality: the α trade-off") -> Figure:
    """MaxVio (x) against validation loss (y): one colour per α, a small dot per seed, a large one for the mean.

    ``rows``: dicts with ``alpha``, ``max_vio`` and ``val_loss`` (one per run and seed).
    """
    fig, ax = figure_axes(ax, (6.0, 4.0))
    alphas = sorted({float(r["alpha"]) for r in rows})
    for i, alpha in enumerate(alphas):
        mine = [r for r in rows if float(r["alpha"]) == alpha]
        x = [r["max_vio"] for r in mine]
        y = [r["val_loss"] for r in mine]
        color = COLORS[i % len(COLORS)]
        ax.scatter(x, y, color=color, s=18, alpha=0.6)
        ax.scatter([np.mean(x)], [np.mean(y)], color=color, s=90, edgecolors="black", label=f"α = {alpha:g}")
    style_axes(ax, title, "MaxVio at the end of training (0 = perfectly balanced)", "validation loss (nats/byte)",
               title_size=10)
    ax.legend(frameon=False, fontsize=8)
    return fig


def plot_curves(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], ax: Axes | None = None,
                title: str | None = None, ylabel: str | None = None, logy: bool = False) -> Figure:
    """One line per named ``(steps, values)`` pair, e.g. MaxVio or the largest router logit over training."""
    fig, ax = figure_axes(ax, (6.0, 3.5))
    for i, (name, (steps, values)) in enumerate(series.items()):
        ax.plot(steps, values, color=COLORS[i % len(COLORS)], label=name)
    if logy:
        ax.set_yscale("log")
    style_axes(ax, title, "step", ylabel, title_size=10)
    if series:
        ax.legend(frameon=False, fontsize=8)
    return fig


def plot_experts_per_token(counts: torch.Tensor | Sequence[int], ax: Axes | None = None,
                           title: str | None = None) -> Figure:
    """Bar chart of how many tokens got 0, 1, 2, ... experts (``counts``: experts per token, (T,))."""
    counts = torch.as_tensor(counts).long().reshape(-1)
    hist = torch.bincount(counts, minlength=int(counts.max()) + 1 if counts.numel() else 1)
    fig, ax = figure_axes(ax, (5.5, 3.3))
    bars = ax.bar(np.arange(len(hist)), hist.numpy(), color=COLORS[0])
    bars[0].set_color(COLORS[3])  # the tokens that skip the layer
    if title is None:
        mean = counts.double().mean().item() if counts.numel() else math.nan
        title = f"experts per token: mean {mean:.2f}, {int(hist[0])} of {counts.numel()} tokens get none"
    ax.set_xticks(np.arange(len(hist)))
    style_axes(ax, title, "experts that processed the token", "tokens", title_size=10)
    return fig
