"""Load balancing (notebooks 04 and 06): the losses added to the training loss, and the policies that apply them.

Losses (functions, each cited): the Switch auxiliary loss, the router z-loss, Shazeer et al.'s importance loss
and DeepSeek-V3's sequence-wise auxiliary loss. Policies (small modules an :class:`~moe_course.moe.MoE` layer
holds in ``layer.balancing``) see each forward pass's routing: ``loss(routing, batch_shape)`` returns a term
for the loss, and ``after_step(layer, counts)`` runs after the optimizer step (DeepSeek-V3's routing-bias
update, which no optimizer sees). Adding a policy touches nothing else.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _check_n_experts(n_experts: object) -> None:
    if isinstance(n_experts, bool) or not isinstance(n_experts, int):
        raise TypeError(f"n_experts must be an int, got {type(n_experts).__name__} {n_experts!r}")
    if n_experts < 1:
        raise ValueError(f"n_experts must be an int >= 1, got {n_experts}")


def _check_tensor(name: str, t: object, shape: str, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {shape}, got shape {tuple(t.shape)}")


def _check_expert_ids(indices: torch.Tensor, n_experts: int) -> None:
    """Integer expert ids in [0, n_experts); the values are checked on the CPU only (on a GPU: no sync)."""
    if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
        raise TypeError(f"indices must hold integer expert ids (torch.long), got dtype {indices.dtype}")
    on_cpu = indices.device.type == "cpu"
    if on_cpu and indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < n_experts):
        raise ValueError(f"indices must lie in [0, n_experts={n_experts}), got {int(indices.min())}.."
                         f"{int(indices.max())}; pass the number of experts the router chose from")


def switch_aux_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """N · Σᵢ fᵢ · Pᵢ (Fedus et al. 2021, arXiv:2101.03961, eq. 4), generalised to top-k.

    fᵢ: fraction of the T·k assignments that went to expert i (no gradient); Pᵢ: mean router probability
    of expert i over the T tokens. Equals 1 when routing is uniform and grows as it collapses.
    """
    _check_n_experts(n_experts)
    _check_tensor("scores", scores, "(T, N)", 2)
    _check_tensor("indices", indices, "(T, k)", 2)
    if scores.shape[1] != n_experts or indices.shape[0] != scores.shape[0]:
        raise ValueError(f"scores must be (T, n_experts={n_experts}) and indices (T, k) with the same T, got scores "
                         f"{tuple(scores.shape)} and indices {tuple(indices.shape)}")
    _check_expert_ids(indices, n_experts)
    t, k = indices.shape
    if t == 0:
        return scores.sum() * 0.0  # no tokens: nothing to balance (keeps the graph, never NaN)
    counts = torch.zeros(n_experts, device=scores.device, dtype=scores.dtype)
    counts = counts.scatter_add(0, indices.reshape(-1), torch.ones(t * k, device=scores.device, dtype=scores.dtype))
    f = counts / (t * k)
    p = scores.mean(dim=0)
    return n_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of logsumexp(logits)² (Zoph et al. 2022, ST-MoE, arXiv:2202.08906, eq. 5)."""
    _check_tensor("logits", logits, "(T, N)", 2)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def importance_loss(scores: torch.Tensor) -> torch.Tensor:
    """CV(Importance)² with Importance_i = Σ_t gate_{t,i} (Shazeer et al. 2017, arXiv:1701.06538, eq. 6).

    The predecessor of the Switch loss; multiply by w_importance. Population variance, as a coefficient of
    variation over the N experts: 0 when every expert gets the same total gate value.
    """
    _check_tensor("scores", scores, "(T, N)", 2)
    importance = scores.sum(dim=0)  # (N,)
    mean = importance.mean()
    if scores.shape[0] == 0 or mean == 0:
        return scores.sum() * 0.0
    return importance.var(unbiased=False) / mean.square()


def sequence_aux_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss Σᵢ fᵢ·Pᵢ per sequence, averaged over sequences.

    scores (B, S, N) affinities, indices (B, S, k). In each sequence: s'_{i,t} = s_{i,t} / Σ_j s_{j,t},
    Pᵢ = mean_t s'_{i,t}, fᵢ = N / (k·S) · #{t: i ∈ topk_t} (arXiv:2412.19437, eqs. 17-20); multiply by α.
    """
    _check_n_experts(n_experts)
    _check_tensor("scores", scores, "(B, S, N)", 3)
    _check_tensor("indices", indices, "(B, S, k)", 3)
    if scores.shape[2] != n_experts or indices.shape[:2] != scores.shape[:2]:
        raise ValueError(f"scores must be (B, S, n_experts={n_experts}) and indices (B, S, k) with the same B and S, "
                         f"got scores {tuple(scores.shape)} and indices {tuple(indices.shape)}")
    _check_expert_ids(indices, n_experts)
    b, s, k = indices.shape
    if b * s == 0:
        return scores.sum() * 0.0
    normed = scores / scores.sum(dim=-1, keepdim=True)  # (B, S, N)
    p = normed.mean(dim=1)  # (B, N)
    counts = torch.zeros(b, n_experts, device=scores.device, dtype=scores.dtype)
    counts = counts.scatter_add(1, indices.reshape(b, s * k), torch.ones(b, s * k, device=scores.device,
                                                                           dtype=scores.dtype))
    f = counts * n_experts / (k * s)  # (B, N), no gradient (counts of a discrete choice)
    return (f * p).sum(dim=-1).mean()


def _coef(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class BalancingPolicy(nn.Module):
    """One balancing rule. Subclasses override :meth:`loss` and/or :meth:`after_step`."""

    def loss(self, routing, batch_shape: tuple[int, ...]) -> torch.Tensor | None:  # noqa: ANN001
        """The weighted term this policy adds to the training loss (None: nothing)."""
        return None

    def after_step(self, layer: nn.Module, counts: torch.Tensor) -> None:
        """Runs after each optimizer step with the step's assignments per expert (whole batch)."""


class SwitchAuxLoss(BalancingPolicy):
    """coef · N · Σᵢ fᵢ · Pᵢ (Switch Transformer; α = 1e-2 there).

    With sigmoid scores (``normalize=True``) Pᵢ uses each token's scores normalised to sum to 1, s/Σs, as
    DeepSeek-V3's balance losses do: on raw sigmoids the loss could only push popular experts down, never
    pull idle ones up. Softmax scores already sum to 1 and are used as they are.
    """

    def __init__(self, coef: float, n_experts: int, normalize: bool = False) -> None:
        super().__init__()
        _check_n_experts(n_experts)
        self.coef, self.n_experts, self.normalize = _coef("aux_loss_coef", coef), n_experts, normalize

    def loss(self, routing, batch_shape: tuple[int, ...]) -> torch.Tensor:  # noqa: ANN001
        scores = routing.scores
        if self.normalize:
            scores = scores / scores.sum(dim=-1, keepdim=True)
        return self.coef * switch_aux_loss(scores, routing.indices, self.n_experts)

    def extra_repr(self) -> str:
        return f"coef={self.coef}, normalize={self.normalize}"


class RouterZLoss(BalancingPolicy):
    """coef · mean logsumexp(logits)² (ST-MoE; 1e-3 there): keeps router logits small and stable."""

    def __init__(self, coef: float) -> None:
        super().__init__()
        self.coef = _coef("z_loss_coef", coef)

    def loss(self, routing, batch_shape: tuple[int, ...]) -> torch.Tensor:  # noqa: ANN001
        return self.coef * router_z_loss(routing.logits)

    def extra_repr(self) -> str:
        return f"coef={self.coef}"


class SequenceAuxLoss(BalancingPolicy):
    """coef · DeepSeek-V3's sequence-wise balance loss (α = 1e-4 there), per sequence of the batch."""

    def __init__(self, coef: float, n_experts: int) -> None:
        super().__init__()
        _check_n_experts(n_experts)
        self.coef, self.n_experts = _coef("seq_aux_loss_coef", coef), n_experts

    def loss(self, routing, batch_shape: tuple[int, ...]) -> torch.Tensor:  # noqa: ANN001
        seqs = batch_shape[0] if len(batch_shape) == 2 else 1  # (B, S) or one sequence of T tokens
        k = routing.indices.shape[-1]
        return self.coef * sequence_aux_loss(routing.scores.reshape(seqs, -1, self.n_experts),
                                             routing.indices.reshape(seqs, -1, k), self.n_experts)

    def extra_repr(self) -> str:
        return f"coef={self.coef}"


def bias_update(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """bᵢ ← bᵢ + u · sign(c̄ − cᵢ) (DeepSeek-V3, arXiv:2412.19437 §2.1.2; Wang et al. 2024, arXiv:2408.15664).

    Overloaded experts (more than the mean count c̄) are pushed down, underloaded ones up.
    """
    _check_tensor("bias", bias, "(N,)", 1)
    if not isinstance(counts, torch.Tensor) or counts.shape != bias.shape:
        got = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
        raise ValueError(f"counts must be a tensor of shape {tuple(bias.shape)}, one count per expert like bias, "
                         f"got {got}")
    _coef("rate", rate)
    if counts.device.type == "cpu" and counts.numel():  # on a GPU reading the values would be a sync
        if bool((counts < 0).any()) or (counts.is_floating_point() and not bool((counts == counts.round()).all())):
            raise ValueError(f"counts must be non-negative whole numbers of assignments per expert, got "
                             f"{counts.tolist()}")
    counts = counts.to(bias.dtype)
    return bias + rate * torch.sign(counts.mean() - counts)


class BiasUpdate(BalancingPolicy):
    """Auxiliary-loss-free balancing: after each step, nudge the router's ``expert_bias`` by ±u."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = _coef("bias_update_rate", rate)

    @torch.no_grad()
    def after_step(self, layer: nn.Module, counts: torch.Tensor) -> None:
        bias = layer.router.expert_bias
        bias.copy_(bias_update(bias, counts.to(bias.device), self.rate))

    def extra_repr(self) -> str:
        return f"rate={self.rate}"
