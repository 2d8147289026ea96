"""Notebook 04's experiments (load balancing): collapse without a balancing loss, the Switch loss's alpha with and
without a capacity limit, the router z-loss, and learned against fixed routers.

Each ``build(size)`` returns the runs; ``@register`` names the experiment for ``python -m moe_course.experiments``.
Every run follows the evidence protocol: five paired seeds, training curves on the tuning half of the validation
files and the headline score on the whole test half (``RunRecord.test_loss``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from moe_course.experiments.runner import Run, register
from moe_course.experiments.tuning import tuned
from moe_course.loss_free import course_model as base_model
from moe_course.loss_free import course_train as base_train
from moe_course.model import TinyLM

__all__ = ["ALPHAS", "ALPHAS_CAPACITY", "SEEDS", "Z_LOSSES", "leak_probe"]

SEEDS = (0, 1, 2, 3, 4)  # the protocol's minimum of five paired seeds
ALPHAS = (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # the balance-against-quality curve of the Switch loss
ALPHAS_CAPACITY = (0.0, 1e-3, 1e-2, 1e-1, 3e-1)
Z_LOSSES = (0.0, 1e-3)


def _run(label: str, model: Any, train: Any, **kw: Any) -> Run:
    return Run(label, model, train, val="tune", **kw)


def leak_probe(model: TinyLM, corpus: Any, n_windows: int = 64) -> dict[str, Any]:
    """Expert choice's view of the future, measured: the same trained model scored three ways on the test half.

    ``batch16`` scores windows 16 at a time, as in training (each expert picks its tokens from all 16 × T);
    ``batch1`` one window at a time; ``causal`` position by position, each prediction routed with only the
    prefix up to it (what generation sees), on the first ``n_windows`` windows, with ``batch16_same`` on those.
    """
    from moe_course.train import causal_prefix_loss, evaluate_text

    data = corpus.val_part("test")[0]
    return {"leak": {
        "batch16": evaluate_text(model, data, 16),
        "batch1": evaluate_text(model, data, 1),
        "causal": causal_prefix_loss(model, data, n_windows),
        "batch16_same": evaluate_text(model, data, 16, max_windows=n_windows),
    }}


@register("collapse", "notebook 04: no balancing loss; which settings (N, k, learning rate) collapse most",
          seeds=SEEDS, version=2)
def _collapse(size: str) -> list[Run]:
    n = base_model(size).n_experts
    lr = base_train(size).lr
    return [
        _run(f"N={n} top-2", base_model(size), base_train(size)),
        _run(f"N={n} top-1", base_model(size, top_k=1), base_train(size)),
        _run(f"N={2 * n} top-2", base_model(size, n_experts=2 * n), base_train(size)),
        _run(f"N={n} top-2, lr x3", base_model(size), base_train(size, lr=3 * lr)),
    ]


@tuned("aux_sweep", "notebook 04: Switch auxiliary-loss weight alpha from 0 to 0.1 (7 values)", seeds=SEEDS,
       version=3)
def _aux_sweep(size: str) -> list[Run]:
    return [_run(f"alpha={a:g}", base_model(size, aux_loss_coef=a), base_train(size)) for a in ALPHAS]


@tuned("aux_sweep_capacity", "notebook 04: the alpha sweep with capacity factor 1.25 (Switch trains with a "
       "capacity limit, so imbalance drops tokens)", seeds=SEEDS, version=3)
def _aux_sweep_capacity(size: str) -> list[Run]:
    return [_run(f"alpha={a:g}", base_model(size, aux_loss_coef=a, capacity_factor=1.25), base_train(size))
            for a in ALPHAS_CAPACITY]


@register("z_loss", "notebook 04: router z-loss (1e-3) or none, at a high learning rate", seeds=SEEDS, version=2)
def _z_loss(size: str) -> list[Run]:
    lr = 10 * base_train(size).lr
    return [_run(f"z={z:g}", base_model(size, aux_loss_coef=1e-2, z_loss_coef=z), base_train(size, lr=lr))
            for z in Z_LOSSES]


@tuned("routers", "notebook 04: token choice (alpha 0 and 0.01), noisy top-k, expert choice, hash routing and "
       "a dense twin", seeds=SEEDS, version=2)
def _routers(size: str) -> list[Run]:
    """The six routers at the course's base settings (the learning rate is tuned per arm)."""
    shape = base_model(size)
    return [
        _run("token choice, alpha=0.01", base_model(size, aux_loss_coef=1e-2), base_train(size)),
        _run("token choice, alpha=0", base_model(size), base_train(size)),
        _run("noisy top-k, alpha=0.01", replace(base_model(size, aux_loss_coef=1e-2), noisy_router=True),
             base_train(size)),
        _run("expert choice", base_model(size, router="expert_choice"), base_train(size), probe=leak_probe),
        _run("hash", base_model(size, router="hash"), base_train(size)),
        _run("dense (same active width)", base_model(size, ffn="dense", d_hidden=shape.top_k * shape.expert_hidden),
             base_train(size)),
    ]
