"""Checks for notebook 09 (serving): ``check.expected_distinct_experts(fn)``, ``check.lru_hit_rate(fn)`` and
``check.bytes_per_token(fn)``.

Each check calls the learner's function on small fixed cases (hand-made ones that tell the usual mistakes
apart, plus a seeded random one), compares it with the package's reference (:mod:`moe_course.serving`,
:mod:`moe_course.offload`), names the mistake when the answer equals a known wrong variant, requires the
ValueError the exercise asks for, and fails a function that changes its inputs in place.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from moe_course.check._core import CheckError, call, fail, fn_name, ok
from moe_course.offload import lru_hit_rate as ref_lru
from moe_course.serving import bytes_per_token as ref_bytes
from moe_course.serving import expected_distinct_experts as ref_distinct

__all__ = ["bytes_per_token", "expected_distinct_experts", "lru_hit_rate"]


def _number(value: Any, what: str) -> float:
    """A float from a Python number or a one-element tensor; anything else fails with its type."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(f"{what} should return a number, got {type(value).__name__}")
    return float(value)


def _same(a: Any, b: Any) -> bool:
    """Equal up to rounding: numbers, or tensors of the same shape."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-6, atol=1e-9, equal_nan=False))
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)


def _diagnose(results: list[tuple[Any, Any, list[tuple[str, Any]]]]) -> int | str | None:
    """Which known mistake explains every answer: ``results`` holds (got, ref, [(hint, wrong value), ...]) per case,
    the mistakes in the same order in every case. Returns the hint of the first mistake that matches the answer in
    *all* cases (so that a coincidence in one case does not name the wrong mistake), else None."""
    for j, (hint, _) in enumerate(results[0][2]):
        if all(_same(got, mistakes[j][1]) for got, _, mistakes in results):
            return hint
    return None


def _fail_first_wrong(shown: list[tuple[str, str]], results: list[tuple[Any, Any, list[tuple[str, Any]]]],
                      extra: Callable[[], str | None] | None = None) -> None:
    """Fail on the first case whose answer differs from the reference: name the mistake that explains every case
    (:func:`_diagnose`), else ``extra()``'s note, else the case's own explanation. ``shown``: (text, explanation)."""
    for (text, explanation), (got, ref, _) in zip(shown, results, strict=True):
        if _same(got, ref):
            continue
        hint = _diagnose(results)
        if hint is not None:
            fail(f"{text}: it looks like you {hint}")
        note = extra() if extra is not None else None
        if note is not None:
            fail(f"{text}: {note}")
        fail(f"{text}{explanation}")


def _requires_value_error(fn: Callable[..., Any], args: tuple[Any, ...], what: str, why: str) -> None:
    try:
        got = fn(*args)
    except ValueError:
        return
    except (NotImplementedError, CheckError):
        raise
    except Exception as exc:  # noqa: BLE001 - any other error is the learner's mistake, named below
        fail(f"{what} raised {type(exc).__name__}: {exc}; raise a ValueError instead ({why})")
    fail(f"{what} returned {got!r}; it should raise a ValueError ({why})")


# ----------------------------------------------------------------------------------------------------------
# expected_distinct_experts: N·(1 − (1 − k/N)^B)
# ----------------------------------------------------------------------------------------------------------

DISTINCT_CASES = (
    ("N=8, k=2 (the course's top-2 MoE)", 8, 2, torch.tensor([0, 1, 2, 4, 16, 64])),
    ("N=256, k=8 (DeepSeek-V3's routed experts)", 256, 8, torch.tensor([1, 8, 32, 256, 1024])),
    ("N=16, k=1", 16, 1, torch.tensor([1, 3, 10, 40])),
    ("N=6, k=3", 6, 3, torch.tensor([1, 2, 5])),
    ("N=4, k=4 (k = N: every token uses all experts; no token, none)", 4, 4, torch.tensor([0, 1, 3])),
    ("N=8, k=2, a (2, 3) grid of batch sizes", 8, 2, torch.tensor([[0, 1, 2], [4, 8, 16]])),
    ("N=8, k=2, float64 batch sizes", 8, 2, torch.tensor([1.0, 3.0, 12.0], dtype=torch.float64)),
)


def _literal(batch: torch.Tensor) -> str:
    """How the batch sizes would be written: torch.tensor([...]), with the dtype when it is not the default."""
    dtype = "" if batch.dtype == torch.long else f", dtype={batch.dtype}"
    return f"torch.tensor({batch.tolist()}{dtype})"


def _call_distinct(fn: Callable[..., Any], n: int, k: int, batch: torch.Tensor, what: str) -> Any:  # noqa: ANN401
    """Call the learner's function; a ValueError for k = N is named (k = N is allowed: every expert is used)."""
    try:
        return call(fn, n, k, batch, what=what)
    except CheckError as exc:
        if k == n and isinstance(exc.__cause__, ValueError):
            fail(f"{what} raised ValueError: {exc.__cause__}; k = N is allowed (each token uses all N experts, "
                 "so any B >= 1 uses N and B = 0 uses none): raise only when k > N")
        raise


def _distinct_mistakes(n: int, k: int, b: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    b = b.double()
    return [
        ("left k out: with (1 − 1/N)^B each token uses one expert; a token uses k of them, so it misses a given "
         "expert with probability 1 − k/N", n * (1 - (1 - 1 / n) ** b)),
        ("drew B·k experts independently with replacement, N·(1 − (1 − 1/N)^(B·k)); a token's k experts are "
         "distinct, so it misses a given expert with probability 1 − k/N, and B tokens with (1 − k/N)^B",
         n * (1 - (1 - 1 / n) ** (b * k))),
        ("assumed no two tokens share an expert, min(N, B·k); tokens overlap, and the overlap grows with B",
         torch.clamp(b * k, max=n)),
        ("returned B·k, the expert assignments, not the distinct experts (and more than N for large B)", b * k),
        ("returned N·(1 − k/N)^B, the experts that *no* token uses; the distinct experts are N minus that",
         n * (1 - k / n) ** b),
        ("wrote (k/N)^B: the probability that one token misses a given expert is 1 − k/N, not k/N",
         n * (1 - (k / n) ** b)),
        ("returned the fraction of experts used, 1 − (1 − k/N)^B; multiply by N for the number of experts",
         1 - (1 - k / n) ** b),
        ("used the exponent B − 1; all B tokens must miss the expert: (1 − k/N)^B", n * (1 - (1 - k / n) ** (b - 1))),
    ]


def _rounded(values: torch.Tensor) -> list:
    """The values as (nested) lists rounded to 3 decimals, for a message."""
    return (values.double() * 1000).round().div(1000).tolist()


def expected_distinct_experts(fn: Callable[[int, int, torch.Tensor], Any]) -> None:
    """Check ``fn(n_experts, k, batch) -> N·(1 − (1 − k/N)^B)`` for a tensor of batch sizes ``batch``."""
    results, whats = [], []
    for name, n, k, batch in DISTINCT_CASES:
        given = batch.clone()
        what = f"{fn_name(fn)}({n}, {k}, {_literal(batch)}) [{name}]"
        got = _call_distinct(fn, n, k, given, what)
        if not torch.equal(given, batch):
            fail(f"{what} changed the batch sizes it was given (now {given.tolist()}): compute with new tensors "
                 "(e.g. 1 - (1 - k / n) ** batch; no out= or in-place op on batch, and batch.double() is batch "
                 "itself when it is float64 already) and leave the input as it is")
        if not isinstance(got, torch.Tensor):
            try:
                got = torch.as_tensor(got, dtype=torch.float64)
            except Exception as exc:  # noqa: BLE001
                raise CheckError(f"{what} should return a tensor of the same shape as batch, got "
                                 f"{type(got).__name__}") from exc
        ref = ref_distinct(n, k, batch)
        if tuple(got.shape) != tuple(ref.shape):
            fail(f"{what} returned shape {tuple(got.shape)}, expected {tuple(ref.shape)}: one expected count per "
                 "batch size (compute with tensor operations on batch, not a Python loop that keeps one value)")
        results.append((got.double(), ref, _distinct_mistakes(n, k, batch)))
        whats.append(what)
    shown = [(f"{what} returned {_rounded(got)}, expected {_rounded(ref)}",
              " = N·(1 − (1 − k/N)^B)") for what, (got, ref, _) in zip(whats, results, strict=True)]
    rounded = all(_same(g, r.round()) or _same(g, r.floor()) for g, r, _ in results)
    _fail_first_wrong(shown, results,
                      lambda: "an *expected* count is a real number, do not round it" if rounded else None)
    _requires_value_error(fn, (4, 5, torch.tensor([1, 2])), f"{fn_name(fn)}(4, 5, torch.tensor([1, 2]))",
                          "a token cannot use k=5 distinct experts out of n_experts=4")
    ex = ref_distinct(256, 8, torch.tensor([1, 32, 256]))
    ok("expected_distinct_experts", f"DeepSeek-V3 (N=256, k=8): {ex[0]:.1f}, {ex[1]:.1f} and {ex[2]:.1f} distinct "
       "experts for batches of 1, 32 and 256 tokens; k > N raises ValueError")


# ----------------------------------------------------------------------------------------------------------
# lru_hit_rate: one layer's LRU expert cache on a (T, k) trace
# ----------------------------------------------------------------------------------------------------------

LRU_CASES: tuple[tuple[str, list[list[int]], int], ...] = (
    ("k=1, C=2: a hit refreshes an expert", [[0], [1], [0], [2], [0], [1], [0]], 2),
    ("k=2, C=2: expert 0 is cached when step 2 needs (3, 0)", [[0, 1], [3, 0], [1, 3], [0, 1], [2, 0]], 2),
    ("k=1, C=2: evict the least, not the most, recently used", [[0], [1], [2], [0], [1], [2], [1], [0]], 2),
    ("k=2, C=3: partial hits", [[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 2], [2, 0]], 3),
    ("k=2, C=4: every expert fits", [[0, 1], [2, 3], [1, 2], [3, 0], [0, 1]], 4),
    ("k=1, C=2: frequent is not recent", [[0], [0], [0], [1], [2], [1], [2], [0], [1]], 2),
)


def _splits_a_step(last_used: dict[int, int], capacity: int) -> bool:
    """Whether evicting down to ``capacity`` must choose among experts last used in the same step."""
    excess = len(last_used) - capacity
    if excess <= 0:
        return False
    ages = sorted(last_used.values())
    return ages[excess - 1] == ages[excess]


def _random_unambiguous_rows(gen: torch.Generator, steps: int, n_experts: int, k: int, capacity: int
                             ) -> list[list[int]]:
    """Random top-k steps, each redrawn until no eviction must choose among one step's experts.

    The exercise marks a step's experts most recently used without fixing their order within the step; on
    such a trace every order gives the same hit rate, so the check accepts every correct reading.
    """
    rows: list[list[int]] = []
    last_used: dict[int, int] = {}
    while len(rows) < steps:
        row = torch.rand(n_experts, generator=gen).argsort()[:k].tolist()
        after = {**last_used, **dict.fromkeys(row, len(rows))}
        if _splits_a_step(after, capacity):
            continue
        rows.append(row)
        last_used = dict(sorted(after.items(), key=lambda item: item[1])[-capacity:])  # the cache after the step
    return rows


def _lru_variant(trace: list[list[int]], capacity: int, *, refresh: bool = True, sequential: bool = False,
                 evict_mru: bool = False, warm: bool = False, all_or_nothing: bool = False,
                 lfu: bool = False) -> float:
    """The LRU simulation with one of the usual mistakes switched on."""
    cache: OrderedDict[int, None] = OrderedDict((e, None) for e in range(capacity)) if warm else OrderedDict()
    uses: Counter[int] = Counter()
    hits = requests = 0
    for row in trace:
        if sequential:  # each expert of the step in turn: a load may evict an expert the same step needs next
            for e in row:
                requests += 1
                uses[e] += 1
                if e in cache:
                    hits += 1
                    if refresh:
                        cache.move_to_end(e)
                    continue
                if len(cache) >= capacity:
                    cache.popitem(last=evict_mru)
                cache[e] = None
            continue
        if not refresh:  # first in, first out: hits keep their place, misses join the end, the oldest leave
            hits += sum(e in cache for e in row)
            requests += len(row)
            for e in row:
                cache.setdefault(e, None)
            while len(cache) > capacity:
                cache.popitem(last=False)
            continue
        found = [e in cache for e in row]
        hits += (len(row) if all(found) else 0) if all_or_nothing else sum(found)
        requests += len(row)
        for e, hit in zip(row, found, strict=True):
            uses[e] += 1
            if not hit and len(cache) >= capacity:
                if lfu:  # the least frequently used; among equals the least recently used
                    victim = min((x for x in cache if x not in row), key=lambda x: uses[x], default=None)
                    if victim is not None:
                        del cache[victim]
                else:
                    stale = [x for x in cache if x not in row]
                    if stale:
                        del cache[stale[-1] if evict_mru else stale[0]]
            cache[e] = None
            cache.move_to_end(e)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hits / requests


def _lru_mistakes(trace: list[list[int]], capacity: int) -> list[tuple[str, float]]:
    ref = _lru_variant(trace, capacity)
    return [
        ("did not refresh an expert on a hit (that is first-in-first-out): a hit makes the expert the most "
         "recently used", _lru_variant(trace, capacity, refresh=False)),
        ("handled a step's experts one at a time, so loading the first miss evicted an expert that the same step "
         "needs next; the router picks all k experts before any runs: count the step's hits against the cache as "
         "it was, then load the misses, evicting only experts this step does not use",
         _lru_variant(trace, capacity, sequential=True)),
        ("evicted the most recently used expert; evict the least recently used one (the front of an OrderedDict, "
         "popitem(last=False))", _lru_variant(trace, capacity, evict_mru=True)),
        ("started with experts 0 ... C−1 in the cache; the cache starts empty, so the first uses are misses",
         _lru_variant(trace, capacity, warm=True)),
        ("counted a step as a hit only when all its k experts were cached; count every cached expert of the "
         "step as one hit out of k requests", _lru_variant(trace, capacity, all_or_nothing=True)),
        ("evicted the least *frequently* used expert (LFU); LRU evicts the one used longest ago",
         _lru_variant(trace, capacity, lfu=True)),
        ("returned the miss rate; the hit rate is hits / requests", 1 - ref),
        ("simulated a cache of capacity − 1 experts (evicting before the cache is full): keep `capacity` experts, "
         "evict only when more are cached", _lru_variant(trace, capacity - 1) if capacity > 1 else math.nan),
        ("simulated a cache of capacity + 1 experts: evict as soon as more than `capacity` are cached",
         _lru_variant(trace, capacity + 1)),
    ]


def lru_hit_rate(fn: Callable[[torch.Tensor, int], Any]) -> None:
    """Check ``fn(trace (T, k), capacity) -> hit rate`` of a least-recently-used expert cache."""
    gen = torch.Generator().manual_seed(9)
    random_rows = {c: _random_unambiguous_rows(gen, 60, 8, 2, c) for c in (3, 5)}
    cases = [*LRU_CASES, ("60 random top-2 steps of 8 experts, C=3", random_rows[3], 3),
             ("60 random top-2 steps of 8 experts, C=5", random_rows[5], 5)]
    results, shown = [], []
    for name, rows, capacity in cases:
        trace = torch.tensor(rows)
        given = trace.clone()
        what = f"{fn_name(fn)}(trace, capacity={capacity}) [{name}]"
        got = _number(call(fn, given, capacity, what=what), what)
        if not torch.equal(given, trace):
            fail(f"{what} changed the trace it was given: read it (e.g. trace.tolist()) without writing to it")
        ref = ref_lru(trace, capacity)
        hits = round(ref * sum(len(r) for r in rows))
        mistakes = [("returned the number of hits; return the hit rate, hits / requests", float(hits)),
                    *_lru_mistakes(rows, capacity)]
        results.append((got, ref, mistakes))
        shown.append((f"{what} returned {got:.4f}, expected {ref:.4f}" + (f" (trace {rows})" if len(rows) <= 9 else ""),
                      ". Per step: count the requested experts already cached, then mark them all most recently used "
                      "(loading the misses) and evict least recently used experts until `capacity` remain"))
    _fail_first_wrong(shown, results)
    _requires_value_error(fn, (torch.tensor([[0, 1]]), 0), f"{fn_name(fn)}(trace, capacity=0)",
                          "a cache must hold at least one expert")
    ok("lru_hit_rate", f"e.g. {ref_lru(torch.tensor(random_rows[3]), 3):.3f} at C=3 and "
       f"{ref_lru(torch.tensor(random_rows[5]), 5):.3f} at C=5 on its 60-step top-2 traces over 8 experts (drawn "
       "so that no eviction depends on the order within a step); capacity 0 raises ValueError")


# ----------------------------------------------------------------------------------------------------------
# bytes_per_token: (other + Σ_layers distinct · expert) / B
# ----------------------------------------------------------------------------------------------------------

BYTES_CASES: tuple[tuple[str, list[list[list[int]]], float, float], ...] = (
    ("2 layers, B=3, k=2", [[[0, 1], [1, 2], [0, 2]], [[0, 1], [0, 1], [3, 0]]], 10.0, 100.0),
    ("1 layer, B=1, k=2 (batch 1 reads the active weights)", [[[5, 2]]], 7.0, 50.0),
    ("3 layers, B=4, k=1", [[[0], [0], [3], [0]], [[2], [1], [2], [2]], [[6], [6], [6], [6]]], 4.0, 30.0),
    ("2 layers, B=5, k=3, experts up to 15", [[[0, 4, 9], [4, 9, 15], [0, 9, 2], [15, 4, 0], [2, 9, 4]],
                                              [[1, 3, 5], [3, 5, 7], [1, 3, 5], [7, 1, 3], [5, 7, 1]]], 3.0, 20.0),
)


def _bytes_mistakes(layers: list[list[list[int]]], expert: float, other: float) -> list[tuple[str, float]]:
    b = len(layers[0])
    k = len(layers[0][0])
    distinct = sum(len({e for row in layer for e in row}) for layer in layers)
    union = len({e for layer in layers for row in layer for e in row})
    maxid = sum(max(e for row in layer for e in row) + 1 for layer in layers)
    return [
        ("counted every token's k experts separately (B·k per layer): an expert that several tokens of the batch "
         "use is read once and serves them all, so count distinct experts per layer (torch.unique)",
         (other + len(layers) * b * k * expert) / b),
        ("did not divide by the batch: the step's bytes are shared by its B tokens",
         other + distinct * expert),
        ("counted the distinct expert ids over all layers together; layer 0's expert 3 and layer 1's expert 3 are "
         "different weights, so count the distinct experts of each layer and add them up",
         (other + union * expert) / b),
        ("left out other_bytes: attention, norms, routers, shared experts and the head are read every step too",
         distinct * expert / b),
        ("charged other_bytes to every token: those weights are read once per step and shared by the batch, "
         "(other + experts) / B", other + distinct * expert / b),
        ("counted max(id) + 1 experts per layer; count the ids that occur (torch.unique(...).numel())",
         (other + maxid * expert) / b),
        ("divided by the B·k assignments; divide by the B tokens", (other + distinct * expert) / (b * k)),
    ]


def bytes_per_token(fn: Callable[[list[torch.Tensor], float, float], Any]) -> None:
    """Check ``fn(indices, expert_bytes, other_bytes) -> (other + Σ_layers distinct_l · expert) / B``."""
    results, shown = [], []
    for name, layers, expert, other in BYTES_CASES:
        indices = [torch.tensor(layer) for layer in layers]
        given = [i.clone() for i in indices]
        what = f"{fn_name(fn)}(indices, expert_bytes={expert:g}, other_bytes={other:g}) [{name}]"
        got = _number(call(fn, given, expert, other, what=what), what)
        if len(given) != len(indices) or any(not torch.equal(g, i) for g, i in zip(given, indices, strict=False)):
            fail(f"{what} changed the routing it was given (the list or its tensors): read it without writing to it")
        ref = ref_bytes(indices, expert, other)
        results.append((got, ref, _bytes_mistakes(layers, expert, other)))
        shown.append((f"{what} returned {got:.4g}, expected {ref:.4g}",
                      f" = (other_bytes + Σ over layers of the layer's distinct experts · expert_bytes) / B, with "
                      f"routing {layers}"))
    _fail_first_wrong(shown, results)
    _requires_value_error(fn, ([torch.zeros(0, 2, dtype=torch.long)], 10.0, 100.0),
                          f"{fn_name(fn)}([an empty (0, 2) batch], 10, 100)",
                          "no token was decoded, so there is no cost per token")
    ok("bytes_per_token", "each layer reads each distinct expert once per step, shared by the B tokens with the "
       "weights every token uses; an empty batch raises ValueError")
