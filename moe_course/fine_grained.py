"""Fine-grained and shared experts (DeepSeekMoE, notebook 05): the configuration helper and the shared + routed pass.

DeepSeekMoE (Dai et al. 2024, arXiv:2401.06066) changes a GShard-style layer of ``N`` experts of width ``h``,
top-``k``, in two steps that keep the total and the active expert parameters fixed:

1. **Fine-grained segmentation**: split every expert into ``m`` experts of width ``h / m`` and route each
   token to ``m·k`` of the ``m·N`` narrower experts. The number of expert sets a token can get grows from
   C(N, k) to C(mN, mk): C(8, 2) = 28 but C(32, 8) = 10,518,300.
2. **Shared expert isolation**: make ``K_s`` of the fine experts *shared* (every token passes through them,
   unweighted by the router) and route to ``m·k − K_s`` of the remaining ``m·N − K_s``.

:func:`fine_grained_config` does this arithmetic; :func:`comparison_configs` builds the course's four
:class:`~moe_course.model.ModelConfig` (GShard-style, fine-grained, DeepSeekMoE, dense twin) and
:func:`param_table` counts them with :func:`moe_course.params.count_model` so a notebook can assert that the
totals and active counts match. :func:`shared_moe_forward` is the layer's equation, written out for one layer.
:func:`expert_similarity` compares the routed experts' outputs, optionally in groups of ``m`` fine experts so
that layouts of different expert widths are compared at the same width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from moe_course.analysis import expert_output_similarity
from moe_course.model import ModelConfig, TinyLM
from moe_course.params import count_model
from moe_course.validate import check_int, check_tensor

__all__ = [
    "FineGrainedConfig",
    "comparison_configs",
    "expert_similarity",
    "fine_grained_config",
    "n_combinations",
    "param_table",
    "shared_moe_forward",
]


def _int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def n_combinations(n_experts: int, top_k: int) -> int:
    """How many different sets of ``top_k`` experts a token can be sent to: C(N, k)."""
    _int("n_experts", n_experts, 1)
    _int("top_k", top_k, 1)
    if top_k > n_experts:
        raise ValueError(f"top_k={top_k} must be <= n_experts={n_experts}")
    return math.comb(n_experts, top_k)


@dataclass(frozen=True)
class FineGrainedConfig:
    """One layer's experts: ``n_routed`` routed (top-``top_k``) + ``n_shared`` shared, each ``expert_hidden`` wide."""

    n_routed: int
    top_k: int  # routed experts chosen per token (the shared ones are not counted here)
    n_shared: int
    expert_hidden: int

    @property
    def active_experts(self) -> int:
        """Experts a token passes through: its ``top_k`` routed ones plus every shared one."""
        return self.top_k + self.n_shared

    @property
    def combinations(self) -> int:
        """C(n_routed, top_k): the routed expert sets a token can get (shared experts add no choice)."""
        return n_combinations(self.n_routed, self.top_k)

    def expert_params(self, d_model: int) -> tuple[int, int]:
        """(total, active) SwiGLU expert weights of one layer: 3·d·h per expert (routers excluded)."""
        per_expert = 3 * d_model * self.expert_hidden
        return (self.n_routed + self.n_shared) * per_expert, self.active_experts * per_expert

    def model_config(self, base: ModelConfig, **overrides: Any) -> ModelConfig:
        """``base`` (an MoE :class:`ModelConfig`) with this expert layout."""
        return replace(base, ffn="moe", n_experts=self.n_routed, top_k=self.top_k, n_shared=self.n_shared,
                       expert_hidden=self.expert_hidden, **overrides)


def fine_grained_config(n_experts: int, top_k: int, m: int = 1, n_shared: int = 0,
                        expert_hidden: int = 128) -> FineGrainedConfig:
    """Split N experts of width h (top-k) into m·N of width h/m, isolate K_s of them as shared (DeepSeekMoE §3).

    Routed experts: m·N − K_s; routed top-k: m·k − K_s; width: h / m (so m must divide h). Total expert
    parameters stay N·3dh and active ones k·3dh; only the router grows (d·(m·N − K_s) weights instead of d·N).
    """
    _int("n_experts", n_experts, 1)
    _int("top_k", top_k, 1)
    _int("m", m, 1)
    _int("n_shared", n_shared, 0)
    _int("expert_hidden", expert_hidden, 1)
    if top_k > n_experts:
        raise ValueError(f"top_k={top_k} must be <= n_experts={n_experts}")
    if expert_hidden % m:
        raise ValueError(f"m={m} must divide expert_hidden={expert_hidden}: each expert is split into m experts "
                         f"of width expert_hidden / m; pick m among the divisors of {expert_hidden}")
    if n_shared >= m * top_k:
        raise ValueError(f"n_shared={n_shared} must be < m·top_k={m * top_k}: the shared experts come out of the "
                         "token's m·k active experts, and at least one must stay routed")
    return FineGrainedConfig(n_routed=m * n_experts - n_shared, top_k=m * top_k - n_shared, n_shared=n_shared,
                             expert_hidden=expert_hidden // m)


def comparison_configs(base: ModelConfig, m: int = 4, n_shared: int = 1) -> dict[str, ModelConfig]:
    """The four models of notebook 05, from a GShard-style ``base`` (N experts of width h, top-k).

    GShard-style N top-k; fine-grained m·N top-m·k; DeepSeekMoE with ``n_shared`` shared experts; and a
    dense twin whose SwiGLU FFN has the active width k·h.
    """
    if base.ffn != "moe":
        raise ValueError("base must be an MoE ModelConfig (ffn='moe'): its n_experts, top_k and expert_hidden "
                         "describe the GShard-style layer")
    n, k, h = base.n_experts, base.top_k, base.expert_hidden
    fine = fine_grained_config(n, k, m, 0, h)
    shared = fine_grained_config(n, k, m, n_shared, h)
    return {
        f"GShard {n} top-{k}": fine_grained_config(n, k, 1, 0, h).model_config(base),
        f"fine {fine.n_routed} top-{fine.top_k}": fine.model_config(base),
        f"DeepSeekMoE {shared.n_shared}+{shared.n_routed} top-{shared.top_k}": shared.model_config(base),
        f"dense (width {k * h})": replace(base, ffn="dense", d_hidden=k * h, n_shared=0),
    }


def param_table(configs: dict[str, ModelConfig]) -> list[dict[str, Any]]:
    """Build each model and count it: label, total and active parameters, routed combinations per token."""
    rows = []
    for label, cfg in configs.items():
        total, active = count_model(TinyLM(cfg))
        combos = n_combinations(cfg.n_experts, cfg.top_k) if cfg.ffn == "moe" else 1
        rows.append({"label": label, "total": total, "active": active, "combinations": combos})
    return rows


def shared_moe_forward(x: torch.Tensor, gate_weight: torch.Tensor, experts: Sequence[nn.Module],
                       shared: Sequence[nn.Module], k: int) -> torch.Tensor:
    """DeepSeekMoE's layer (eqs. 9-11 without the residual): Σ_shared E(x) + Σ_{i ∈ topk(s)} s_i · E_i(x).

    x (T, d), gate_weight (N, d) for the N *routed* experts only, ``experts`` the N routed modules, ``shared``
    the K_s shared modules, k the routed experts per token. s = softmax(x·Wᵀ) over the routed experts; the
    gates are the chosen s_i themselves, not renormalised (as in the paper; Mixtral and DeepSeek-V3 renormalise).
    """
    check_tensor("x", x, 2, "(T, d) tokens", "; flatten (B, S, d) to (B*S, d)")
    check_tensor("gate_weight", gate_weight, 2, "(N, d): one row per routed expert")
    if gate_weight.shape != (len(experts), x.shape[1]):
        raise ValueError(f"gate_weight must be (N, d) = ({len(experts)}, {x.shape[1]}): one row per routed expert, "
                         f"got {tuple(gate_weight.shape)}")
    check_int("k", k, 1, len(experts), f" (at most the N={len(experts)} routed experts)")
    scores = (x @ gate_weight.T).softmax(dim=-1)  # (T, N)
    weights, indices = scores.topk(k, dim=-1)  # (T, k)
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token, slot = (indices == e).nonzero(as_tuple=True)
        if token.numel():
            y = y.index_add(0, token, weights[token, slot, None] * expert(x[token]))
    for expert in shared:
        y = y + expert(x)
    return y


@torch.no_grad()
def expert_similarity(model: nn.Module, data: torch.Tensor, group: int = 1, n_tokens: int = 512,
                      seed: int = 1234) -> list[float]:
    """Per MoE layer: how alike the routed experts' outputs are, as the mean cosine over pairs and tokens.

    The inputs are each MoE layer's real inputs on ``n_tokens // block_size`` random windows of ``data`` (drawn
    with ``seed``). Every token goes through every routed expert (no routing, no gate weights). The routed
    experts are split, in order, into ``n_routed // group`` blocks of ``group`` experts (left-over experts are
    not used), and a block's output is the sum of its experts' outputs: a block of ``m`` fine experts of width
    h/m is one SwiGLU of width h, the width of a GShard expert. The result is

        sim = 1 / (B (B - 1)) · Σ_{a ≠ b} (1/T) Σ_t cos(Y_a(u_t), Y_b(u_t))

    over the B blocks. 0: unrelated outputs (as at a random initialisation); 1: the same direction on every
    token. ``group=1`` compares single experts; :func:`moe_course.analysis.expert_output_similarity` computes it.
    """
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be an int >= 1, got {group!r}")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be an int >= 1, got {n_tokens!r}")
    if not model.moe_layers():
        raise ValueError("expert_similarity needs a model with MoE layers (a dense model has no experts)")
    return expert_output_similarity(model, data, n_tokens, seed, group=group)
