"""How evenly is the work spread over the experts (notebooks 00-09)? Load fractions, MaxVio, CV, entropy; and the
course's one statistic for trained comparisons: paired seed gaps with a Student-t interval (:func:`paired_gaps`)."""

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
    """Two models compared seed by seed: gaps a − b (positive: b is better) and their 95% Student-t interval.

    The course's one statistic for trained comparisons (notebooks 04-08, RESULTS.md): say "b beats a" only when
    the interval excludes 0 (:attr:`clear`); otherwise "no difference detected at this scale", with the interval
    and :attr:`detectable`, the smallest true gap this many seeds would find four times in five.
    """

    gaps: list[float]
    mean: float
    std: float  # sample std (n − 1) of the gaps
    low: float  # the confidence interval of the mean gap
    high: float
    detectable: float  # smallest |true gap| found with 80% power by a two-sided paired t-test at this noise
    p: float  # two-sided p-value of the paired t-test (mean gap = 0)
    confidence: float = 0.95

    @property
    def n(self) -> int:
        """Number of paired seeds."""
        return len(self.gaps)

    @property
    def clear(self) -> bool:
        """Whether the interval excludes 0: then one model beats the other at this confidence."""
        return self.low > 0 or self.high < 0

    def better(self, a: str = "a", b: str = "b") -> str | None:
        """The arm the interval says is better (lower loss), or None when it holds 0."""
        return b if self.low > 0 else a if self.high < 0 else None

    def interval(self, digits: int = 3) -> str:
        """The mean gap and its interval for a table cell, e.g. "+0.057 [+0.048, +0.067]"."""
        def sign(x: float) -> str:
            return f"{x + 0.0:+.{digits}f}".replace("-", "−")

        return f"{sign(self.mean)} [{sign(self.low)}, {sign(self.high)}]"

    def verdict(self, a: str = "a", b: str = "b", unit: str = "nats/byte", digits: int = 3) -> str:
        """The protocol's sentence: who beats whom by how much, or "no difference detected" with the interval."""
        def sign(x: float) -> str:
            return f"{x + 0.0:+.{digits}f}".replace("-", "−")

        ci = f"{sign(self.mean)}, {self.confidence:.0%} CI [{sign(self.low)}, {sign(self.high)}]"
        seeds = f"{self.n} paired seeds"
        winner = self.better(a, b)
        if winner is not None:
            return f"{winner} beats {b if winner == a else a}: {a} − {b} = {ci} {unit}, {seeds}"
        return (f"no difference detected at this scale between {a} and {b}: {a} − {b} = {ci} {unit}, {seeds}; "
                f"it could detect a gap of about {self.detectable:.{digits}f} (80% power)")


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (Lentz's method)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _beta_inc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b), for the Student t distribution."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    check_int("df", df, 1)
    tail = 0.5 * _beta_inc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`)."""
    check_number("q", q, 0.0, 1.0, hint=" (a probability strictly between 0 and 1, e.g. 0.975)")
    check_int("df", df, 1)
    if q in (0.0, 1.0):
        raise ValueError(f"q must be strictly between 0 and 1, got {q}; e.g. 0.975 for a 95% interval")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return 0.5 * (lo + hi)


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


def paired_gaps(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedGaps:
    """Compare per-seed results of two models trained with the same seeds (in the same order): paired t-interval.

    The interval is mean ± t(1 − (1 − confidence)/2, n − 1) · std / √n of the gaps a − b; ``detectable`` is
    (t(1 − (1 − confidence)/2) + t(0.8)) · std / √n, the usual power-analysis size at 80% power.
    """
    a, b = _results("a", a), _results("b", b)
    check_number("confidence", confidence, 0.0, 1.0, hint=" (e.g. 0.95 for a 95% interval)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}; e.g. 0.95")
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a and b must hold one result per seed each, the same seeds, at least 2 for an "
                         f"interval (the protocol asks for 5); got {len(a)} and {len(b)}")
    gaps = [x - y for x, y in zip(a, b, strict=True)]
    n = len(gaps)
    m, s = mean_std(gaps)
    se = s / math.sqrt(n)
    t_crit = t_quantile(1.0 - (1.0 - confidence) / 2.0, n - 1)
    p = 1.0 if se == 0 and m == 0 else (0.0 if se == 0 else 2.0 * (1.0 - t_cdf(abs(m) / se, n - 1)))
    return PairedGaps(gaps, m, s, m - t_crit * se, m + t_crit * se, (t_crit + t_quantile(0.8, n - 1)) * se, p,
                      confidence)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of per-seed results: the course's one convention for ±."""
    values = _results("values", values)
    if not values:
        raise ValueError("values is empty: give one result per seed")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
