"""The protocol's equal search for notebooks 04–06: each arm of a comparison tuned over the same learning rates on
the tuning half.

``@tuned(name, ...)`` registers two experiments from one ``build(size)``: ``NAME_tuning`` trains every arm at each
rate of :data:`LRS` (seed 0, scored on the tuning half, no probes), and ``NAME`` trains every arm at the rate that
search chose for it (:data:`TUNED_LR`, kept equal to the stored choice by a test, every choice strictly inside the
grid). Only the cpu size has been searched; other sizes train at their base rate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from moe_course.experiments.runner import Run, register

__all__ = ["LRS", "TUNED_LR", "format_lr_table", "lr_choice", "tuned"]

LRS = (7.5e-4, 1.5e-3, 3e-3, 6e-3, 1.2e-2)
"""The learning rates each arm is tried at: the course's base 3e-3 in the middle, a factor of 2 apart (1.2e-2 was
added when two arms of 05 and 06 chose 6e-3, the earlier edge)."""

TUNED_LR: dict[str, dict[str, float]] = {
    "routers": {"token choice, alpha=0.01": 1.5e-3, "token choice, alpha=0": 3e-3, "noisy top-k, alpha=0.01": 3e-3,
                "expert choice": 1.5e-3, "hash": 3e-3, "dense (same active width)": 3e-3},
    "aux_sweep": {"alpha=0": 3e-3, "alpha=0.0001": 3e-3, "alpha=0.001": 1.5e-3, "alpha=0.003": 1.5e-3,
                  "alpha=0.01": 1.5e-3, "alpha=0.03": 1.5e-3, "alpha=0.1": 1.5e-3},
    "aux_sweep_capacity": {"alpha=0": 1.5e-3, "alpha=0.001": 3e-3, "alpha=0.01": 1.5e-3, "alpha=0.1": 1.5e-3,
                           "alpha=0.3": 1.5e-3},
    "fine_grained": {
        "GShard 8 top-2, none": 3e-3, "fine 32 top-8, none": 3e-3, "DeepSeekMoE 1+31 top-7, none": 3e-3,
        "dense (width 128)": 3e-3,
        "GShard 8 top-2, aux 1e-3": 1.5e-3, "fine 32 top-8, aux 1e-3": 3e-3, "DeepSeekMoE 1+31 top-7, aux 1e-3": 3e-3,
        "GShard 8 top-2, aux 1e-2": 1.5e-3, "fine 32 top-8, aux 1e-2": 3e-3, "DeepSeekMoE 1+31 top-7, aux 1e-2": 3e-3,
        "GShard 8 top-2, aux 3e-2": 1.5e-3, "fine 32 top-8, aux 3e-2": 3e-3, "DeepSeekMoE 1+31 top-7, aux 3e-2": 3e-3,
        "GShard 8 top-2, aux 1e-1": 1.5e-3, "fine 32 top-8, aux 1e-1": 3e-3, "DeepSeekMoE 1+31 top-7, aux 1e-1": 3e-3,
        "GShard 8 top-2, bias 1e-3": 6e-3, "fine 32 top-8, bias 1e-3": 3e-3, "DeepSeekMoE 1+31 top-7, bias 1e-3": 3e-3,
    },
    "loss_free_06": {
        "no balancing": 3e-3, "aux alpha=0.0001": 1.5e-3, "aux alpha=0.001": 3e-3, "aux alpha=0.003": 6e-3,
        "aux alpha=0.01": 1.5e-3, "aux alpha=0.03": 1.5e-3, "aux alpha=0.1": 1.5e-3, "aux alpha=0.3": 1.5e-3,
        "aux alpha=1": 1.5e-3,
        "loss-free u=0.0001": 3e-3,
        "loss-free u=0.0003": 1.5e-3, "loss-free u=0.001": 1.5e-3, "loss-free u=0.003": 1.5e-3,
        "loss-free u=0.01": 1.5e-3, "loss-free + seq aux 1e-4": 1.5e-3, "loss-free, best 2 of 4 groups": 3e-3,
    },
}
"""Per experiment, each arm's learning rate: the one its ``NAME_tuning`` chose on the tuning half (cpu size)."""


def _search_label(arm: str, lr: float) -> str:
    """The label of one arm at one rate in ``NAME_tuning``: "hash, lr=0.003"."""
    return f"{arm}, lr={lr:g}"


def _arm_and_lr(label: str) -> tuple[str, float]:
    """The arm and rate a ``NAME_tuning`` label was made from (the inverse of :func:`_search_label`)."""
    arm, lr = label.rsplit(", lr=", 1)
    return arm, float(lr)


def lr_choice(result: Any) -> dict[str, float]:
    """Each arm's learning rate with the lowest mean tuning-half loss in a stored ``NAME_tuning`` result."""
    choice: dict[str, tuple[float, float]] = {}
    for label in result.labels:
        arm, lr = _arm_and_lr(label)
        losses = result.tune_losses(label)
        loss = sum(losses) / len(losses)
        if arm not in choice or loss < choice[arm][1]:
            choice[arm] = (lr, loss)
    return {arm: lr for arm, (lr, _) in choice.items()}


def tuned(name: str, description: str, seeds: tuple[int, ...], version: int) -> Callable:
    """Decorator: register ``build(size)`` as ``NAME_tuning`` (every arm × :data:`LRS`, seed 0) and as ``NAME``
    (every arm at its :data:`TUNED_LR` at cpu size)."""

    def wrap(build: Callable[[str], list[Run]]) -> Callable[[str], list[Run]]:
        def search(size: str) -> list[Run]:
            return [replace(r, label=_search_label(r.label, lr), train=replace(r.train, lr=lr), probe=None)
                    for r in build(size) for lr in LRS]

        def race(size: str) -> list[Run]:
            runs = build(size)
            if size != "cpu":
                return runs
            table = TUNED_LR.get(name, {})
            missing = [r.label for r in runs if r.label not in table]
            if missing:
                raise ValueError(f"experiment {name!r}: no tuned learning rate for {missing}; run {name}_tuning "
                                 f"--size cpu and copy lr_choice(load_result({name + '_tuning'!r})) into TUNED_LR")
            return [replace(r, train=replace(r.train, lr=table[r.label])) for r in runs]

        register(f"{name}_tuning", f"{name}'s arms at learning rates {', '.join(f'{lr:g}' for lr in LRS)}, seed 0, "
                 "scored on the tuning half (the protocol's equal search)", seeds=(0,), version=1)(search)
        register(name, f"{description}; each arm at its learning rate from {name}_tuning", seeds=seeds,
                 version=version)(race)
        return build

    return wrap


def format_lr_table(result: Any) -> str:
    """A stored ``NAME_tuning`` result as a table: each arm's tuning-half loss at every rate, and its choice."""
    lrs = sorted({_arm_and_lr(label)[1] for label in result.labels})
    choice = lr_choice(result)
    width = max(len(arm) for arm in choice) + 2
    rows = [f"{'arm':<{width}}" + "".join(f"{lr:>9g}" for lr in lrs) + "   chosen (tuning half, seed 0)"]
    for arm, lr in choice.items():
        cells = [result.tune_losses(_search_label(arm, x))[0] for x in lrs]
        rows.append(f"{arm:<{width}}" + "".join(f"{v:9.3f}" for v in cells) + f"   {lr:g}")
    return "\n".join(rows)
