"""Expert offloading (notebook 09): only C of a layer's N experts fit in fast memory. Which ones should stay?

A *routing trace* of one MoE layer is a (T, m) tensor of expert ids: row t holds the experts that decoding step t
needs (the k choices of one token, or the B·k choices of a batch decoded together). A repeat within a row counts
once: a loaded expert serves every token of its step. Each layer has its own cache of ``capacity`` experts,
empty at the start of a trace. At each step the layer first knows its whole request (the router runs before the
experts), so an expert already cached is a hit even if loading the step's misses has to evict something.

=========================  ====================================================================================
``lru_hit_rate``           the least-recently-used cache of Eliseev & Mazur (2023) on one trace (the exercise)
``simulate_cache``         LRU, Belady's optimal MIN, a static set of C experts; optionally with prefetching
``hit_rate_curve``         hits / requests over many traces (sequences), for a list of capacities
``batch_trace``            B sequences decoded side by side: their choices at each step as one request
``random_trace``           uniform random routing, the baseline without any reuse (LRU hit rate C/N)
``record_routing``         run a TinyLM and keep each MoE layer's choices and its speculative guesses
``prefetch_recall``        the share of a token's experts that a guess of m experts contains
``offload_seconds_per_token``  time per decoded token from a cache's loads and prefetches, a link and compute
=========================  ====================================================================================

Speculative prefetch (Eliseev & Mazur, "Fast Inference of Mixture-of-Experts Language Models with Offloading",
2023, arXiv:2312.17238, §4.1: "applying the next layer's gating function on current layer activations"): here the
next layer's router is applied to exactly the normalised hidden states that the current MoE layer's router reads,
and the experts it ranks highest are loaded while the current layer computes. Each layer adds to the residual
stream instead of replacing it, so the guess is often right (``prefetch_recall`` measures how often).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from moe_course.validate import check_choice, check_int, check_int_tensor, check_number, check_tensor

__all__ = [
    "CacheStats",
    "RoutingRecord",
    "batch_trace",
    "cache_counts",
    "hit_rate_curve",
    "lru_hit_rate",
    "offload_seconds_per_token",
    "prefetch_recall",
    "random_trace",
    "record_routing",
    "simulate_cache",
]

POLICIES = ("lru", "belady", "static")


def _check_capacity(capacity: object) -> int:
    check_int("capacity", capacity, 1, hint=" (experts that fit in fast memory)")
    return capacity


def _as_ids(trace: object, what: str) -> torch.Tensor:
    """``trace`` as a tensor of integer expert ids (TypeError for anything else: strings, floats, bools)."""
    try:
        trace = torch.as_tensor(trace)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{what} must be a tensor of integer expert ids, got {type(trace).__name__}") from None
    check_int_tensor(what, trace, "expert ids")
    return trace


def _rows(trace: torch.Tensor, what: str = "trace") -> list[list[int]]:
    """The requests of a (T, m) trace: each row's distinct expert ids, in order of first appearance."""
    trace = _as_ids(trace, what)
    if trace.dim() != 2:
        raise ValueError(f"{what} must be a (T, m) tensor of expert ids (one row per decoding step), got shape "
                         f"{tuple(trace.shape)}")
    if trace.numel() and int(trace.min()) < 0:
        raise ValueError(f"{what} holds a negative expert id ({int(trace.min())})")
    return [list(dict.fromkeys(row)) for row in trace.tolist()]


def lru_hit_rate(trace: torch.Tensor, capacity: int) -> float:
    """Hit rate of a least-recently-used cache of ``capacity`` experts on one layer's trace (T, m).

    Per step: count the requested experts already cached (hits), then mark all of them most recently used,
    loading the misses, and evict the least recently used experts until ``capacity`` remain. Returns
    hits / requests (requests = distinct experts per step, summed over the steps); 0.0 for an empty trace.
    """
    return simulate_cache(trace, capacity, "lru").hit_rate


@dataclass
class CacheStats:
    """What a simulated expert cache did over one or more traces."""

    hits: int = 0
    requests: int = 0
    loads: int = 0  # experts loaded on demand (the misses, which the layer waits for)
    prefetched: int = 0  # experts loaded ahead of time by prefetching (overlapped with compute)

    @property
    def hit_rate(self) -> float:
        """hits / requests (0.0 when nothing was requested)."""
        return self.hits / self.requests if self.requests else 0.0

    def __add__(self, other: CacheStats) -> CacheStats:
        return CacheStats(self.hits + other.hits, self.requests + other.requests, self.loads + other.loads,
                          self.prefetched + other.prefetched)


def _next_uses(rows: list[list[int]]) -> list[dict[int, int]]:
    """For each step t, {expert: the next step after t that requests it} for the experts of step t and before."""
    upcoming: dict[int, int] = {}
    out: list[dict[int, int]] = [{} for _ in rows]
    for t in range(len(rows) - 1, -1, -1):
        out[t] = dict(upcoming)  # next use strictly after t
        for e in rows[t]:
            upcoming[e] = t
    return out


def simulate_cache(trace: torch.Tensor, capacity: int, policy: str = "lru", prefetch: torch.Tensor | None = None,
                   keep: Sequence[int] | None = None, bypass: bool = False) -> CacheStats:
    """Run one layer's expert cache over a trace (T, m); returns the counts of hits, requests and loads.

    ``policy``: ``"lru"`` evicts the least recently used expert; ``"belady"`` evicts the cached expert whose next
    request is farthest in the future (Belady's MIN); ``"static"`` holds the fixed set ``keep`` (e.g. the C most
    popular experts) from the start and streams every other expert in for its step without caching it.
    ``prefetch`` (T, p), LRU only: before step t the experts of row t are loaded into the cache (counted in
    ``prefetched``), as speculative loading does. ``keep`` with LRU: a warm start, these experts cached first.

    The policies count memory alike (C experts stay between steps) but start and cache differently. LRU and
    Belady start cold (empty) and cache each step's experts; a step that needs more experts than fit (m > C)
    streams the rest, and Belady then keeps whichever C of the cached and requested experts are needed soonest.
    Under these rules Belady's MIN is optimal for a known trace: no policy that starts cold and caches what fits
    without prefetching gets more hits (LRU is one). Static starts warm and bypasses the cache, so it can beat
    cold Belady. For a like-for-like bound give Belady the same rules: ``keep`` (its warm start) and
    ``bypass=True`` (any expert may be streamed without caching); it is then optimal among all non-prefetching
    policies that start with ``keep`` loaded, static with the same ``keep`` included.
    """
    capacity = _check_capacity(capacity)
    check_choice("policy", policy, POLICIES)
    if not isinstance(bypass, bool):
        raise TypeError(f"bypass must be a bool (True: experts may be streamed without caching), got {bypass!r}")
    if bypass and policy != "belady":
        raise ValueError(f"bypass=True is simulated with the belady policy only, got policy={policy!r}")
    rows = _rows(trace)
    if keep is not None or policy == "static":
        keep = _check_keep(keep, capacity)
    if policy == "static":
        return _static(rows, set(keep))
    guesses = None
    if prefetch is not None:
        if policy != "lru":
            raise ValueError("prefetch is simulated with the lru policy only")
        guesses = _rows(prefetch, "prefetch")
        if len(guesses) != len(rows):
            raise ValueError(f"prefetch has {len(guesses)} rows for a trace of {len(rows)} steps; give one row "
                             "of guesses per step")
    if policy == "belady":
        return _belady(rows, capacity, set(keep or ()), bypass)
    return _lru(rows, capacity, guesses, keep or ())


def _check_keep(keep: object, capacity: int) -> list[int]:
    """``keep``: at most ``capacity`` distinct expert ids (ints >= 0)."""
    if keep is None:
        raise ValueError(f"the static policy needs keep=... with at most capacity={capacity} expert ids")
    if isinstance(keep, torch.Tensor):
        keep = keep.tolist()
    if isinstance(keep, (str, bytes)) or not isinstance(keep, Sequence):
        raise TypeError(f"keep must be a sequence of expert ids, got {type(keep).__name__} {keep!r}")
    for e in keep:
        check_int("keep", e, 0, hint=" (expert ids)")
    if len(set(keep)) > capacity:
        raise ValueError(f"keep must hold at most capacity={capacity} expert ids, got {len(set(keep))}")
    return list(keep)


def _static(rows: list[list[int]], kept: set[int]) -> CacheStats:
    stats = CacheStats()
    for row in rows:
        hits = sum(e in kept for e in row)
        stats.hits += hits
        stats.requests += len(row)
        stats.loads += len(row) - hits
    return stats


def _lru(rows: list[list[int]], capacity: int, guesses: list[list[int]] | None, start: Sequence[int] = ()
         ) -> CacheStats:
    stats = CacheStats()
    cache: OrderedDict[int, None] = OrderedDict.fromkeys(start)  # least recently used first
    for t, row in enumerate(rows):
        if guesses is not None:
            for e in guesses[t]:
                if e not in cache:
                    stats.prefetched += 1
                cache[e] = None
                cache.move_to_end(e)
            while len(cache) > capacity:
                cache.popitem(last=False)
        hits = sum(e in cache for e in row)
        stats.hits += hits
        stats.requests += len(row)
        stats.loads += len(row) - hits
        for e in row:
            cache[e] = None
            cache.move_to_end(e)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return stats


def _belady_keep(cache: set[int], row: list[int], capacity: int, next_use: dict[int, int],
                bypass: bool = False) -> set[int]:
    """The experts Belady's MIN keeps after a step: the step's own if they fit (unless ``bypass``), then the
    cached or requested experts needed soonest, up to ``capacity`` (the rest are evicted or streamed)."""
    forced = set() if bypass or len(row) > capacity else set(row)
    rest = sorted((cache | set(row)) - forced, key=lambda e: (next_use.get(e, math.inf), e))
    return forced | set(rest[:capacity - len(forced)])


def _belady(rows: list[list[int]], capacity: int, start: set[int], bypass: bool) -> CacheStats:
    stats = CacheStats()
    nxt = _next_uses(rows)
    cache = set(start)
    for t, row in enumerate(rows):
        hits = sum(e in cache for e in row)
        stats.hits += hits
        stats.requests += len(row)
        stats.loads += len(row) - hits
        cache = _belady_keep(cache, row, capacity, nxt[t], bypass)
    return stats


def hit_rate_curve(traces: torch.Tensor, capacities: Sequence[int], policy: str = "lru",
                   prefetch: torch.Tensor | None = None, keep: Sequence[Sequence[int]] | None = None) -> list[float]:
    """Hit rate (all hits / all requests) of each capacity over traces (S, T, m), each starting with an empty cache.

    ``prefetch`` (S, T, p) holds each step's prefetched experts; ``keep[i]`` the static set for ``capacities[i]``.
    """
    return [stats.hit_rate for stats in cache_counts(traces, capacities, policy, prefetch, keep)]


def cache_counts(traces: torch.Tensor, capacities: Sequence[int], policy: str = "lru",
                 prefetch: torch.Tensor | None = None, keep: Sequence[Sequence[int]] | None = None,
                 bypass: bool = False) -> list[CacheStats]:
    """:func:`simulate_cache` summed over traces (S, T, m), one :class:`CacheStats` per capacity: hits, requests,
    loads on demand and prefetched experts. ``keep[i]``: the static set, or the warm start, for ``capacities[i]``.
    """
    traces = _as_ids(traces, "traces")
    if traces.dim() != 3:
        raise ValueError(f"traces must be (S, T, m): S sequences of T steps, got shape {tuple(traces.shape)}")
    for c in capacities:
        _check_capacity(c)
    if keep is not None and len(keep) != len(capacities):
        raise ValueError(f"keep must hold one set per capacity ({len(capacities)}), got {len(keep)}")
    if prefetch is not None:
        prefetch = _as_ids(prefetch, "prefetch")
        if prefetch.dim() != 3 or prefetch.shape[:2] != traces.shape[:2]:
            raise ValueError(f"prefetch must be (S, T, p) with the traces' S, T = {tuple(traces.shape[:2])}, got "
                             f"shape {tuple(prefetch.shape)}")
    out = []
    for i, c in enumerate(capacities):
        total = CacheStats()
        for s in range(traces.shape[0]):
            total = total + simulate_cache(traces[s], c, policy, None if prefetch is None else prefetch[s],
                                           None if keep is None else keep[i], bypass)
        out.append(total)
    return out


def batch_trace(traces: torch.Tensor, batch: int) -> torch.Tensor:
    """Group S sequences (S, T, k) into S // batch batches decoded side by side: (S // batch, T, batch · k).

    Step t of a group requests the experts of all its sequences' tokens t at once.
    """
    traces = _as_ids(traces, "traces")
    if traces.dim() != 3:
        raise ValueError(f"traces must be (S, T, k), got shape {tuple(traces.shape)}")
    check_int("batch", batch, 1, traces.shape[0], " (at most the number of sequences)")
    s, t, k = traces.shape
    g = s // batch
    return traces[:g * batch].reshape(g, batch, t, k).permute(0, 2, 1, 3).reshape(g, t, batch * k)


def random_trace(steps: int, n_experts: int, k: int, generator: torch.Generator | None = None,
                 sequences: int | None = None) -> torch.Tensor:
    """Uniform random routing: each step picks k distinct experts of N. (steps, k), or (sequences, steps, k)."""
    check_int("steps", steps, 0)
    check_int("n_experts", n_experts, 1)
    check_int("k", k, 1, n_experts, f" (at most n_experts={n_experts})")
    if sequences is not None:
        check_int("sequences", sequences, 1)
    shape = (steps, n_experts) if sequences is None else (sequences, steps, n_experts)
    return torch.rand(shape, generator=generator).argsort(dim=-1)[..., :k]


# ---------------------------------------------------------------------------------------------------------
# Routing of a real model, and its speculative guesses
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RoutingRecord:
    """Per MoE layer of a TinyLM, the experts each token chose and the guesses of speculative prefetch."""

    indices: list[torch.Tensor]  # per layer (B, T, k) long: the chosen experts, first choice first
    guesses: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)  # ahead -> per layer (B, T, N) long:
    # the experts layer l's router ranks highest (best first) on the gate input of layer l - ahead (None: no layer)


def _choice_scores(router: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The scores a TopKRouter chooses its experts by: score(x W_g) + expert_bias, (T, N)."""
    routing = router(x)
    bias = getattr(router, "expert_bias", None)
    return routing.scores if bias is None else routing.scores + bias


@torch.no_grad()
def record_routing(model: torch.nn.Module, idx: torch.Tensor, ahead: Sequence[int] = (1,)) -> RoutingRecord:
    """Run ``model`` (a TinyLM, in eval mode for the call) on idx (B, T); keep every MoE layer's routing.

    For each distance a in ``ahead``, layer l's router is also applied to the input of layer l - a's gate (the
    normalised hidden states that layer's router reads; Eliseev & Mazur 2023, §4.1), giving the ranking that
    speculative prefetch would load from, a layers early.
    """
    if not hasattr(model, "moe_layers"):
        raise TypeError(f"model must be a moe_course TinyLM, got {type(model).__name__}")
    check_tensor("idx", idx, 2, "(B, T) token ids")
    check_int_tensor("idx", idx, "token ids")
    if isinstance(ahead, (int, str)) or not isinstance(ahead, Sequence):
        raise TypeError(f"ahead must be a sequence of ints >= 1 (layers ahead), e.g. (1, 2); got {ahead!r}")
    for a in ahead:
        check_int("ahead", a, 1, hint=" (layers ahead)")
    layers = model.moe_layers()
    if not layers:
        raise ValueError("model has no MoE layers: a dense model routes nothing")
    if any(not hasattr(getattr(layer, "router", None), "gate") for layer in layers):
        raise ValueError("record_routing needs gated token-choice routers (TopKRouter); hash routing has no gate")
    inputs: list[torch.Tensor | None] = [None] * len(layers)
    hooks = [layer.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0].detach()))
             for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        model(idx)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    b, t = idx.shape
    record = RoutingRecord([layer.last_routing.indices.reshape(b, t, -1).long().cpu() for layer in layers])
    for a in ahead:
        per_layer: list[torch.Tensor | None] = []
        for i, layer in enumerate(layers):
            if i < a:
                per_layer.append(None)
                continue
            x = inputs[i - a]
            scores = _choice_scores(layer.router, x.reshape(-1, x.shape[-1]))
            per_layer.append(scores.argsort(dim=-1, descending=True, stable=True).reshape(b, t, -1).cpu())
        record.guesses[a] = per_layer
    return record


def prefetch_recall(ranking: torch.Tensor, chosen: torch.Tensor, m: int) -> float:
    """Mean over tokens of |top-m guessed experts ∩ chosen experts| / k (1.0: every expert was prefetched).

    ranking: (..., N) expert ids best first; chosen: (..., k) the experts the layer then used.
    """
    check_tensor("ranking", ranking, tuple(range(2, 6)), "(..., N) expert ids best first")
    check_tensor("chosen", chosen, ranking.dim(), "(..., k) expert ids")
    if ranking.shape[:-1] != chosen.shape[:-1]:
        raise ValueError(f"ranking {tuple(ranking.shape)} and chosen {tuple(chosen.shape)} must have the same "
                         "leading (token) dimensions")
    check_int("m", m, 1, ranking.shape[-1], f" (at most N={ranking.shape[-1]} experts)")
    guess = ranking[..., :m]
    found = (chosen.unsqueeze(-1) == guess.unsqueeze(-2)).any(dim=-1)  # (..., k)
    return float(found.float().mean())


def offload_seconds_per_token(loads: float, prefetched: float, n_moe_layers: int, expert_bytes: float,
                              link_bytes_per_s: float, compute_s: float = 0.0) -> float:
    """Seconds per decoded token (batch 1) when experts are copied over a link, from a cache's counts per layer:
    n_moe_layers · (loads · expert_bytes / link + max(compute_s, prefetched · expert_bytes / link)).

    ``loads``: experts copied on demand per layer and token (the misses: the layer stalls until they arrive);
    ``prefetched``: experts copied ahead per layer and token, during the previous layer's ``compute_s``, so they
    cost only what their copy takes beyond it. Every expert copied, needed or not, uses the same link. An
    optimistic model: the link at its rated speed, nothing else waits, the averages stand for every token.
    """
    check_number("loads", loads, 0)
    check_number("prefetched", prefetched, 0)
    check_int("n_moe_layers", n_moe_layers, 0)
    check_number("expert_bytes", expert_bytes, 0)
    check_number("link_bytes_per_s", link_bytes_per_s, positive=True)
    check_number("compute_s", compute_s, 0)
    copy = expert_bytes / link_bytes_per_s
    return n_moe_layers * (loads * copy + max(compute_s, prefetched * copy))
