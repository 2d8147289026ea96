"""Notebook 06's experiment (auxiliary-loss-free balancing): a sigmoid-gated MoE with no balancing, the aux loss
at eight weights (1e-4 ... 1), DeepSeek-V3's routing bias at five rates, the sequence-wise loss and group-limited
routing.

The model is notebook 04's with a sigmoid gate, the tracker notebook 06's own (:mod:`moe_course.loss_free`); ten
paired seeds, every setting at its own learning rate (:mod:`moe_course.experiments.tuning`), scored on the whole
test half of the validation files.
"""

from __future__ import annotations

from typing import Any

from moe_course import loss_free
from moe_course.experiments.runner import Run
from moe_course.experiments.tuning import tuned

__all__ = ["BALANCE_TARGETS", "balanced_choice"]

BALANCE_TARGETS = (0.3, 0.5)
"""Balance requirements for choosing α and u on the tuning half: MaxVio_global at most this (the busiest expert at
most 30% or 50% above the mean load). On loss alone the tuning half picks the least balancing (α = 0, u = 0), so
every balancing method is tuned for the lowest loss among the settings that meet the requirement."""


def balanced_choice(result: Any, prefix: str, target: float) -> str | None:
    """The run label starting with ``prefix`` ("aux alpha=" or "loss-free u=") with the lowest mean tuning-half loss
    among those whose mean MaxVio_global is at most ``target``; None when no setting of the grid meets it."""
    if prefix not in ("aux alpha=", "loss-free u="):
        raise ValueError(f"prefix must be 'aux alpha=' or 'loss-free u=', got {prefix!r}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0:
        raise ValueError(f"target must be a MaxVio_global > 0 (e.g. 0.3), got {target!r}")
    ok = [label for label in result.labels if label.startswith(prefix)
          and loss_free.stats(result, label, "max_vio_global")[0] <= target]
    return min(ok, key=lambda label: loss_free.stats(result, label, "tune_loss")[0]) if ok else None


@tuned("loss_free_06", "notebook 06: sigmoid gate with no balancing, aux loss (alpha 1e-4 ... 1), loss-free "
       "bias (u = 1e-4 ... 1e-2), + sequence-wise aux loss, + group-limited routing", seeds=loss_free.SEEDS,
       version=2)
def _loss_free_06(size: str) -> list[Run]:
    m, t = loss_free.base_model, loss_free.base_train(size)
    groups = 4 if m(size).n_experts >= 8 else 2  # DeepSeek-V3: 8 groups (nodes), each token uses at most 4
    u = loss_free.U
    configs = [("no balancing", m(size))]
    configs += [(f"aux alpha={a:g}", m(size, aux_loss_coef=a)) for a in loss_free.ALPHAS]
    configs += [(f"loss-free u={r:g}", m(size, bias_update_rate=r)) for r in loss_free.RATES]
    configs += [
        ("loss-free + seq aux 1e-4", m(size, bias_update_rate=u, seq_aux_loss_coef=1e-4)),
        (f"loss-free, best {groups // 2} of {groups} groups",
         m(size, bias_update_rate=u, n_groups=groups, topk_groups=groups // 2)),
    ]
    return [Run(label, cfg, t, tracker=loss_free.track, log_every=loss_free.LOG_EVERY[size], val="tune",
                probe=loss_free.bias_probe)
            for label, cfg in configs]
