"""Load-balancing terms added to the loss: the Switch auxiliary loss and the router z-loss."""

from __future__ import annotations

import torch


def switch_aux_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """N · Σᵢ fᵢ · Pᵢ (Fedus et al. 2021, arXiv:2101.03961, eq. 4), generalised to top-k.

    fᵢ: fraction of the T·k assignments that went to expert i (no gradient); Pᵢ: mean router probability
    of expert i over the T tokens. Equals 1 when routing is uniform and grows as it collapses.
    """
    t, k = indices.shape
    counts = torch.zeros(n_experts, device=scores.device, dtype=scores.dtype)
    counts = counts.scatter_add(0, indices.reshape(-1), torch.ones(t * k, device=scores.device, dtype=scores.dtype))
    f = counts / (t * k)
    p = scores.mean(dim=0)
    return n_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of logsumexp(logits)² (Zoph et al. 2022, ST-MoE, arXiv:2202.08906, eq. 5)."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
