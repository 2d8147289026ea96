"""Notebook 04's experiments (load balancing): collapse without a balancing loss, the Switch loss's alpha with and
without a capacity limit, the router z-loss, and learned against fixed routers.

Each ``build(size)`` returns the runs; ``@register`` names the experiment for ``python -m moe_course.experiments``.
"""

from __future__ import annotations

from moe_course.experiments.runner import Run, register
from moe_course.loss_free import course_model as base_model
from moe_course.loss_free import course_train as base_train

__all__ = ["ALPHAS"]

ALPHAS = (0.0, 1e-3, 1e-2, 1e-1)


@register("collapse", "notebook 04: no balancing loss; which settings (N, k, learning rate) collapse most")
def _collapse(size: str) -> list[Run]:
    n = base_model(size).n_experts
    lr = base_train(size).lr
    return [
        Run(f"N={n} top-2", base_model(size), base_train(size)),
        Run(f"N={n} top-1", base_model(size, top_k=1), base_train(size)),
        Run(f"N={2 * n} top-2", base_model(size, n_experts=2 * n), base_train(size)),
        Run(f"N={n} top-2, lr x3", base_model(size), base_train(size, lr=3 * lr)),
    ]


@register("aux_sweep", "notebook 04: Switch auxiliary-loss weight alpha in (0, 1e-3, 1e-2, 1e-1)", seeds=(0, 1, 2))
def _aux_sweep(size: str) -> list[Run]:
    return [Run(f"alpha={a:g}", base_model(size, aux_loss_coef=a), base_train(size)) for a in ALPHAS]


@register("aux_sweep_capacity", "notebook 04: the alpha sweep with capacity factor 1.25 (Switch trains with a "
          "capacity limit, so imbalance drops tokens)")
def _aux_sweep_capacity(size: str) -> list[Run]:
    return [Run(f"alpha={a:g}", base_model(size, aux_loss_coef=a, capacity_factor=1.25), base_train(size))
            for a in ALPHAS]


@register("z_loss", "notebook 04: router z-loss (1e-3) or none, at a high learning rate")
def _z_loss(size: str) -> list[Run]:
    lr = 10 * base_train(size).lr
    return [
        Run(f"z={z:g}", base_model(size, aux_loss_coef=1e-2, z_loss_coef=z), base_train(size, lr=lr))
        for z in (0.0, 1e-3)
    ]


@register("routers", "notebook 04: token choice (alpha 0.01), expert choice, hash routing and a dense twin")
def _routers(size: str) -> list[Run]:
    shape = base_model(size)
    return [
        Run("token choice, alpha=0.01", base_model(size, aux_loss_coef=1e-2), base_train(size)),
        Run("expert choice", base_model(size, router="expert_choice"), base_train(size)),
        Run("hash", base_model(size, router="hash"), base_train(size)),
        Run("dense (same active width)", base_model(size, ffn="dense", d_hidden=shape.top_k * shape.expert_hidden),
            base_train(size)),
    ]
