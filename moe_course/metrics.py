"""How evenly is the work spread over the experts (notebooks 00-09)? Load fractions, MaxVio, CV, entropy, seed gaps."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moe_course.validate import check_ids, check_int, check_number, check_tensor


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert, counting every one of a token's k choices. indices: (..., k) -> (N,)."""
    check_int("n_experts", n_experts, 1)
    check_tensor("indices", indices, tuple(range(1, 8)), "(..., k) expert ids")
    check_ids("indices", indices, n_experts, "expert ids")
    return torch.bincount(indices.reshape(-1).long(), minlength=n_experts)


def expert_load(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Fraction of all token-to-expert assignments that each expert received; sums to 1."""
    counts = expert_counts(indices, n_experts).double()
    total = counts.sum()
    if total == 0:
        raise ValueError(f"no routing decisions given: indices is empty (shape {tuple(indices.shape)}); the load "
                         "of an empty batch is undefined, so measure it on a batch with at least one token")
    return counts / total


def _as_load(load: torch.Tensor) -> torch.Tensor | None:
    """A per-expert load (fractions or counts) as float64 (N,); None when it is all zero (nothing routed)."""
    load = torch.as_tensor(load).detach().double().cpu()
    if load.dim() != 1 or load.numel() == 0:
        raise ValueError(f"load must be a 1-D tensor with one entry per expert, got shape {tuple(load.shape)}; "
                         "pass one MoE layer's load, e.g. expert_load(indices, n_experts)")
    if not bool(torch.isfinite(load).all()) or bool((load < 0).any()):
        raise ValueError(f"load must hold finite, non-negative shares or counts, got {load.tolist()}")
    return None if load.sum() == 0 else load


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = (max load − mean load) / mean load (Wang et al. 2024, arXiv:2408.15664). 0 = perfectly even.

    An all-zero load (an empty batch's counts: no expert got any work) counts as even: 0.
    """
    load = _as_load(load)
    if load is None:
        return 0.0
    mean = load.mean()
    return float((load.max() - mean) / mean)


def coefficient_of_variation(load: torch.Tensor) -> float:
    """Standard deviation of the per-expert load over its mean (population std; 0 = perfectly even).

    An all-zero load (an empty batch's counts) counts as even: 0.
    """
    load = _as_load(load)
    if load is None:
        return 0.0
    return float(load.std(unbiased=False) / load.mean())


def routing_entropy(scores: torch.Tensor, normalized: bool = False) -> float:
    """Mean over tokens of the entropy (nats) of each token's router distribution over experts.

    High: the router is unsure and spreads each token; low: confident, peaked routing. ``normalized``
    divides by log N so the value lies in [0, 1] (0 with a single expert, which leaves no choice).
    scores: (..., N) probabilities (or non-negative scores, renormalised per token).
    """
    scores = torch.as_tensor(scores).detach()
    if scores.dim() == 0 or scores.shape[-1] == 0:
        raise ValueError(f"scores must have shape (..., N) with N >= 1 experts, got {tuple(scores.shape)}")
    if scores.numel() == 0:
        raise ValueError(f"scores is an empty batch (shape {tuple(scores.shape)}): the mean entropy over no tokens "
                         "is undefined; measure it on a batch with at least one token")
    p = scores.double()
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError("scores must be finite, non-negative router probabilities (e.g. the softmax of the "
                         "logits, not the logits themselves)")
    p = p.clamp_min(1e-12)
    p = p / p.sum(dim=-1, keepdim=True)
    h = float(-(p * p.log()).sum(dim=-1).mean())
    if not normalized:
        return h
    n = scores.shape[-1]
    return h / math.log(n) if n > 1 else 0.0


def load_entropy(load: torch.Tensor) -> float:
    """Entropy (nats) of the load distribution itself: log N when every expert gets the same share.

    An all-zero load (an empty batch's counts) counts as even: log N.
    """
    p = _as_load(load)
    if p is None:
        return math.log(torch.as_tensor(load).numel())
    p = p.clamp_min(1e-12)
    p = p / p.sum()
    return float(-(p * p.log()).sum())


# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets; MFU divides by these.
PEAK_BF16_FLOPS = {
    "H200": 989e12,  # NVIDIA H200 SXM
    "H100 PCIe": 756e12,  # checked before "H100": the first name contained in the device name wins
    "H100": 989e12,  # NVIDIA H100 SXM
    "A100": 312e12,
    "L4": 121e12,
    "T4": 65e12,  # fp16: a T4 has no bf16 tensor cores
}


def mfu(tokens_per_s: float, flops_per_token: float, device_name: str) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the device's bf16 peak; None for an unknown device."""
    check_number("tokens_per_s", tokens_per_s, 0)
    check_number("flops_per_token", flops_per_token, 0)
    if not isinstance(device_name, str):
        raise TypeError(f"device_name must be a str such as 'NVIDIA H100 80GB HBM3', got {device_name!r}")
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)
    return None if peak is None else tokens_per_s * flops_per_token / peak


@dataclass(frozen=True)
class PairedGaps:
    """Two models compared seed by seed: gaps a − b (positive: b is better), their mean ± std, and the margin test."""

    gaps: list[float]
    mean: float
    std: float
    margin: float  # worst of b against best of a: min(a) − max(b); positive when b wins on every pairing
    spread: float  # the larger of the two models' seed spreads, max − min

    @property
    def clear(self) -> bool:
        """Whether b's lead exceeds the seed noise: the worst-against-best margin is larger than the spread."""
        return self.margin > self.spread


def _results(name: str, values: object) -> list[float]:
    """Per-seed results as floats: a list or tuple of finite real numbers (not strings, not a tensor)."""
    if isinstance(values, (str, bytes, torch.Tensor)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of per-seed results (floats), got {type(values).__name__}; "
                        f"convert a tensor with {name}.tolist()")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must hold numbers (one result per seed), got {type(v).__name__} {v!r}")
        if not math.isfinite(float(v)):
            raise ValueError(f"{name} must hold finite results, got {v}; a diverged run has no comparable loss")
    return [float(v) for v in values]


def paired_gaps(a: Sequence[float], b: Sequence[float]) -> PairedGaps:
    """Compare per-seed results of two models (the same seeds in the same order), as notebook 08 and RESULTS.md do."""
    a, b = _results("a", a), _results("b", b)
    if len(a) != len(b) or not a:
        raise ValueError(f"a and b must hold one result per seed each, the same seeds; got {len(a)} and {len(b)}")
    gaps = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    m, s = mean_std(gaps)
    return PairedGaps(gaps, m, s, min(a) - max(b), max(max(a) - min(a), max(b) - min(b)))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of per-seed results: the course's one convention for ±."""
    values = _results("values", values)
    if not values:
        raise ValueError("values is empty: give one result per seed")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
