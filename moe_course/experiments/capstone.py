"""Notebook 08's experiments (the capstone): the tuning grid, the race of the dense twin, the top-2 MoE and the
recipe at equal active parameters (and a dense run at equal time), the recipe's bias rate, and the number of
experts.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from moe_course.experiments.runner import ExperimentResult, Run, register
from moe_course.loss_free import course_train as base_train
from moe_course.model import ModelConfig, TinyLM

__all__ = [
    "BIAS_RATES",
    "CAPSTONE_LABELS",
    "CAPSTONE_SAMPLE_PROMPT",
    "EQUAL_TIME_STEPS",
    "EXPERT_COUNTS",
    "TUNING_LRS",
    "TUNING_WARMUPS",
    "capstone_shapes",
    "tuning_choice",
    "tuning_label",
]

CAPSTONE_LABELS = ("dense", "MoE top-2", "MoE recipe")
TUNING_LRS = (1.5e-3, 3e-3, 6e-3, 1.2e-2)
TUNING_WARMUPS = (30, 100)
"""Notebook 08's tuning grid: every model of the race gets the same 4 x 2 learning rates x warm-up steps."""


def capstone_shapes(size: str) -> tuple[Run, Run, Run]:
    """Notebook 08's dense twin, plain top-2 MoE and recipe MoE: the train presets, each with the learning rate
    and warm-up the ``capstone_tuning`` sweep chose for it and otherwise the same training (tokens, schedule);
    tiny models at smoke size."""
    from moe_course.train import get_preset

    if size == "smoke":
        shape = dict(block_size=16, n_layer=1, n_head=2, d_model=16)
        t = base_train("smoke")
        return (Run("dense", ModelConfig(ffn="dense", d_hidden=32, **shape), t, probe=_probe_08),
                Run("MoE top-2", ModelConfig(ffn="moe", n_experts=4, top_k=2, expert_hidden=16, **shape), t,
                    probe=_probe_08),
                Run("MoE recipe", ModelConfig(ffn="moe", n_experts=8, top_k=2, expert_hidden=8, n_shared=2,
                                              router_score="sigmoid", aux_loss_coef=0.0, bias_update_rate=1e-3,
                                              **shape), t, probe=_probe_08))
    presets = [get_preset(f"{size}-{name}") for name in ("dense", "moe", "best")]
    return tuple(Run(label, p.model, replace(p.train, eval_batches=16), probe=_probe_08, val="test")
                 for label, p in zip(CAPSTONE_LABELS, presets, strict=True))


def tuning_label(label: str, lr: float, warmup: int) -> str:
    """The run label of one grid point of ``capstone_tuning``: ``"dense lr=0.003 warmup=30"``."""
    return f"{label} lr={lr:g} warmup={warmup}"


@register("capstone_tuning", "notebook 08: the same grid of learning rate x warm-up (4 x 2) for the dense twin, "
          "the top-2 MoE and the recipe, scored on the tuning half of the validation files", seeds=(0,))
def _capstone_tuning(size: str) -> list[Run]:
    runs = []
    for run in capstone_shapes(size):
        for lr in TUNING_LRS:
            for warmup in TUNING_WARMUPS:
                w = min(warmup, run.train.steps // 2) if size == "smoke" else warmup
                runs.append(replace(run, label=tuning_label(run.label, lr, warmup), probe=None,
                                    train=replace(run.train, lr=lr, warmup=w),
                                    val="all" if size == "smoke" else "tune"))
    return runs


def tuning_choice(result: ExperimentResult) -> dict[str, dict[str, float]]:
    """Per model of the race, the grid point of a ``capstone_tuning`` result with the lowest final tuning loss
    (mean over seeds): ``{label: {"lr", "warmup", "val_loss"}}``."""
    if not isinstance(result, ExperimentResult) or result.experiment != "capstone_tuning":
        got = result.experiment if isinstance(result, ExperimentResult) else type(result).__name__
        raise ValueError(f"result must be the capstone_tuning result (load_result('capstone_tuning', size)), "
                         f"got {got!r}")
    out: dict[str, dict[str, float]] = {}
    for label in CAPSTONE_LABELS:
        points = [(result.mean(tuning_label(label, lr, w), "val_loss"), lr, w)
                  for lr in TUNING_LRS for w in TUNING_WARMUPS]
        loss, lr, warmup = min(points)
        out[label] = {"lr": lr, "warmup": warmup, "val_loss": loss}
    return out


CAPSTONE_SAMPLE_PROMPT = "def "
EQUAL_TIME_STEPS = 1.2
"""The recipe MoE takes about 1.2x the dense twin's time per step on one CPU thread (README benchmarks and
the stored runs' tokens/s), so the equal wall-clock dense run trains 1.2x the steps (and tokens)."""
EXPERT_COUNTS = (4, 8, 32)  # with the recipe's 16 (capstone result) and the dense twin as "1 expert"


def _probe_08(model: TinyLM, corpus: Any) -> dict[str, Any]:
    """Token type x first-choice expert tables per layer, I(type; expert), and a sample from a fixed prompt."""
    from moe_course.analysis import routing_tables, specialisation
    from moe_course.corpus import TOKEN_TYPE_NAMES, encode

    out: dict[str, Any] = {}
    if model.moe_layers():
        tables = routing_tables(model, corpus.val, corpus.val_types, len(TOKEN_TYPE_NAMES), n_batches=8)
        out["type_tables"] = [t.tolist() for t in tables]
        out.update(specialisation(tables))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompt = encode(CAPSTONE_SAMPLE_PROMPT).long()[None].to(device)  # (1, T)
    gen = torch.Generator(device=device).manual_seed(0)
    sample = model.generate(prompt, 240, temperature=0.8, generator=gen)[0].tolist()
    model.train(was_training)
    out["sample"] = bytes(sample).decode("utf-8", errors="replace")
    return out


@register("capstone", "notebook 08: dense twin vs plain top-2 MoE vs the course's recipe (fine-grained + shared + "
          "loss-free) at equal active parameters and tokens; and a dense run given the recipe's wall-clock time",
          seeds=(0, 1, 2))
def _capstone(size: str) -> list[Run]:
    dense, moe, best = capstone_shapes(size)
    runs = [dense, moe, best]
    if size != "gpu":  # equal time is a CPU question: on a GPU the MoE's step time depends on the kernels
        steps = round(EQUAL_TIME_STEPS * dense.train.steps)
        runs.append(replace(dense, label="dense, equal time", train=replace(dense.train, steps=steps)))
    return runs


BIAS_RATES = (1e-3, 3e-3, 1e-2)
"""u of the recipe's routing-bias update tried in ``recipe_bias_rate`` (the recipe uses 1e-3, DeepSeek-V3's)."""


@register("recipe_bias_rate", "notebook 08: the recipe with bias update rate u = 1e-3 (its own), 3e-3 and 1e-2: "
          "how long the early collapse lasts and what faster balancing costs", seeds=(0, 1))
def _recipe_bias_rate(size: str) -> list[Run]:
    best = capstone_shapes(size)[2]
    return [replace(best, label=f"u={u:g}", model=replace(best.model, bias_update_rate=u), probe=None)
            for u in BIAS_RATES]


@register("experts_sweep", "notebook 08: the recipe with 4, 8 or 32 routed experts at fixed active width (more "
          "experts, more total parameters, same compute per token: Shazeer et al. 2017 in miniature)")
def _experts_sweep(size: str) -> list[Run]:
    best = capstone_shapes(size)[2]
    return [Run(f"E={n}", replace(best.model, n_experts=n), best.train, val=best.val) for n in EXPERT_COUNTS]
