"""Notebook 05's experiment (shared and fine-grained experts): GShard top-2 against its fine-grained and
DeepSeekMoE versions at equal expert parameters, under six balancing regimes, with the masking, shared-expert
and specialisation probes.
"""

from __future__ import annotations

from typing import Any

from moe_course.experiments.balancing import SEEDS
from moe_course.experiments.runner import Run
from moe_course.experiments.tuning import tuned
from moe_course.loss_free import course_model as base_model
from moe_course.loss_free import course_train as base_train
from moe_course.model import TinyLM

__all__ = ["FINE_GRAINED_SHAPES", "LAYOUTS", "M", "REGIMES", "TUNED", "tuned_regime"]

FINE_GRAINED_SHAPES = {  # notebook 05: a GShard-style layer N=8 (16 on GPU) top-2 of width h; m = 4, K_s = 1
    "smoke": dict(block_size=16, n_layer=1, n_head=2, d_model=16, n_experts=4, top_k=2, expert_hidden=16),
    "cpu": dict(block_size=64, n_layer=2, n_head=2, d_model=64, n_experts=8, top_k=2, expert_hidden=64),
    "gpu": dict(block_size=256, n_layer=4, n_head=4, d_model=256, n_experts=16, top_k=2, expert_hidden=256),
}
M = 4  # fine-grained segmentation: each expert split into 4
REGIMES = {  # how each layout is kept balanced: the label suffix and the ModelConfig settings
    "none": dict(aux_loss_coef=0.0),
    "aux 1e-3": dict(aux_loss_coef=1e-3),
    "aux 1e-2": dict(aux_loss_coef=1e-2),
    "aux 3e-2": dict(aux_loss_coef=3e-2),
    "aux 1e-1": dict(aux_loss_coef=1e-1),
    "bias 1e-3": dict(bias_update_rate=1e-3),
}

LAYOUTS = ("GShard 8 top-2", "fine 32 top-8", "DeepSeekMoE 1+31 top-7")
"""The three MoE layouts of the race, each trained under every regime of :data:`REGIMES`."""
TUNED = ("none", "aux 1e-3", "aux 1e-2", "aux 3e-2", "aux 1e-1")
"""The Switch-loss weights searched for every layout alike (α = 0, 1e-3 ... 1e-1); α = 0 is the axis's floor."""


def tuned_regime(result: Any, layout: str) -> str:
    """The regime of :data:`TUNED` with the lowest mean tuning-half loss for ``layout``: its α, tuned alike."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")

    def tune(regime: str) -> float:
        losses = result.tune_losses(f"{layout}, {regime}")
        return sum(losses) / len(losses)

    return min(TUNED, key=tune)


def _probe_05(model: TinyLM, corpus: Any) -> dict[str, Any]:
    from moe_course.analysis import probe

    return probe(model, corpus, masks=(1, 4), group=M if model.cfg.n_experts > FINE_GRAINED_SHAPES["cpu"]["n_experts"]
                 else 1)


@tuned("fine_grained", "notebook 05: GShard 8 top-2 vs fine-grained 32 top-8 vs DeepSeekMoE 1+31 top-7 under "
       "six balancing regimes (none, aux 1e-3, 1e-2, 3e-2, 1e-1, bias 1e-3), and dense; equal expert parameters; "
       "masking, shared-as-routed and specialisation probes", seeds=SEEDS, version=2)
def _fine_grained(size: str) -> list[Run]:
    from moe_course.fine_grained import comparison_configs

    steps = {"smoke": {}, "cpu": dict(steps=600, eval_every=100, eval_batches=16), "gpu": {}}[size]
    runs = []
    for regime, settings in REGIMES.items():
        base = base_model(size, **{"aux_loss_coef": 0.0, **settings, **FINE_GRAINED_SHAPES[size]})
        for label, cfg in comparison_configs(base, m=M, n_shared=1).items():
            if cfg.ffn == "dense":
                if regime == "none":
                    runs.append(Run(label, cfg, base_train(size, **steps), val="tune"))
                continue
            runs.append(Run(f"{label}, {regime}", cfg, base_train(size, **steps), probe=_probe_05, val="tune"))
    return runs
