"""How evenly is the work spread over the experts? Load fractions, MaxVio, CV and routing entropy."""

from __future__ import annotations

import math

import torch


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert, counting every one of a token's k choices. indices: (..., k) -> (N,)."""
    flat = indices.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n_experts):
        raise ValueError(f"expert ids must lie in [0, {n_experts}), got {int(flat.min())}..{int(flat.max())}")
    return torch.bincount(flat, minlength=n_experts)


def expert_load(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Fraction of all token-to-expert assignments that each expert received; sums to 1."""
    counts = expert_counts(indices, n_experts).double()
    total = counts.sum()
    if total == 0:
        raise ValueError("no routing decisions given: indices is empty")
    return counts / total


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = (max load − mean load) / mean load (Wang et al. 2024, arXiv:2408.15664). 0 = perfectly even."""
    load = load.double()
    mean = load.mean()
    return float((load.max() - mean) / mean)


def coefficient_of_variation(load: torch.Tensor) -> float:
    """Standard deviation of the per-expert load over its mean (population std; 0 = perfectly even)."""
    load = load.double()
    return float(load.std(unbiased=False) / load.mean())


def routing_entropy(scores: torch.Tensor, normalized: bool = False) -> float:
    """Mean over tokens of the entropy (nats) of each token's router distribution over experts.

    High: the router is unsure and spreads each token; low: confident, peaked routing. ``normalized``
    divides by log N so the value lies in [0, 1].
    """
    p = scores.double().clamp_min(1e-12)
    p = p / p.sum(dim=-1, keepdim=True)
    h = -(p * p.log()).sum(dim=-1).mean()
    return float(h / math.log(scores.shape[-1])) if normalized else float(h)


def load_entropy(load: torch.Tensor) -> float:
    """Entropy (nats) of the load distribution itself: log N when every expert gets the same share."""
    p = load.double().clamp_min(1e-12)
    p = p / p.sum()
    return float(-(p * p.log()).sum())
