"""Checks for the expert-parallelism exercises (notebook 07): ``check.send_counts(fn)``,
``check.rank_order(fn)`` and ``check.dispatch_bytes(fn)``.

Experts are placed contiguously: with W ranks and E experts, rank r holds experts [r·E/W, (r+1)·E/W), so
expert e lives on rank ``e // (E/W)``. Pair p = t·k + j is token t's j-th choice (``indices.reshape(-1)``).

``send_counts``: ``fn(indices (T, k), n_experts, world) -> (W,)`` pairs this rank sends to each rank.
``rank_order``: ``fn(indices, n_experts, world) -> (order, inverse)``: the stable argsort of the pairs'
destination ranks, and the permutation that undoes it (``pairs[order][inverse] == pairs``).
``dispatch_bytes``: ``fn(indices, n_experts, world, rank, d_model, bytes_per_element) -> int``: bytes of
token rows one dispatch all-to-all sends to *other* ranks.

Every check fails naming the input when the learner's function changed ``indices`` in place, and names the rank,
position or pair that is wrong. One case has 48 pairs with many on each rank, enough that an unstable sort
(``argsort()`` without ``stable=True``) breaks the ties between them differently, and ranks whose counts all differ,
so that subtracting another rank's count than ``counts[rank]`` shows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moe_course.check._core import as_tensor, call_unchanged, expect_shape, fail, ok
from moe_course.parallel import dispatch_bytes as _ref_bytes
from moe_course.parallel import rank_order as _ref_order
from moe_course.parallel import send_counts as _ref_counts

__all__ = ["dispatch_bytes", "rank_order", "send_counts"]


def _cases() -> list[tuple[str, torch.Tensor, int, int]]:
    """(label, indices, n_experts, world): several experts per rank, an idle rank, k = 1, 2, 3."""
    return [
        ("6 tokens, 8 experts on 4 ranks, k=2 (rank 2 gets nothing)",
         torch.tensor([[7, 0], [1, 6], [3, 2], [0, 3], [6, 1], [2, 7]]), 8, 4),
        ("7 tokens, 4 experts on 2 ranks, k=1",
         torch.tensor([[3], [0], [2], [1], [3], [0], [2]]), 4, 2),
        ("5 tokens, 12 experts on 3 ranks, k=3",
         torch.tensor([[11, 0, 5], [4, 9, 1], [2, 3, 10], [8, 7, 6], [0, 11, 4]]), 12, 3),
        ("4 tokens, 16 experts on 2 ranks, k=2 (rank 1 gets nothing)",
         torch.tensor([[5, 0], [1, 7], [3, 2], [6, 4]]), 16, 2),
        ("24 tokens, 6 experts on 3 ranks, k=2 (48 pairs: 18, 17 and 13 for ranks 0, 1, 2, many ties)",
         torch.tensor([[1, 2], [2, 0], [2, 0], [3, 5], [5, 3], [1, 3], [1, 3], [1, 4], [2, 4], [1, 3], [5, 3], [2, 5],
                       [1, 5], [3, 1], [0, 3], [4, 2], [0, 4], [3, 4], [3, 0], [1, 5], [0, 5], [1, 0], [0, 4], [2, 0]]),
         6, 3),
    ]


def _inputs(indices: torch.Tensor, n_experts: int, world: int) -> dict[str, Any]:
    """The learner's arguments, by name: a copy of indices, whose changes the check reports."""
    return {"indices": indices.clone(), "n_experts": n_experts, "world": world}


def _int_tensor(value: Any, what: str) -> torch.Tensor:
    value = as_tensor(value, what)
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        fail(f"{what} has dtype {value.dtype}; return integer (torch.long) tensors, as bincount and argsort do")
    return value.detach().cpu().long()


def _distinct_tokens(dest: torch.Tensor, world: int) -> torch.Tensor:
    """(T, k) destination ranks -> (W,) tokens with at least one expert on each rank."""
    hit = torch.zeros(dest.shape[0], world, dtype=torch.long).scatter(1, dest, 1)
    return hit.sum(dim=0)


# ----------------------------------------------------------------------------------------------------------
# send_counts
# ----------------------------------------------------------------------------------------------------------


def send_counts(fn: Callable[..., Any]) -> None:
    """Check a learner's ``fn(indices, n_experts, world) -> (W,)`` pairs sent to each rank."""
    for label, indices, n_experts, world in _cases():
        what = f"send_counts on {label}"
        got = _int_tensor(call_unchanged(fn, _inputs(indices, n_experts, world), what=what), what)
        ref = _ref_counts(indices, n_experts, world)
        if got.shape == ref.shape and torch.equal(got, ref):
            continue
        flat, per = indices.reshape(-1), n_experts // world
        per_expert = torch.bincount(flat, minlength=n_experts)
        if got.shape == per_expert.shape and torch.equal(got, per_expert):
            fail(f"{what}: these are counts per expert ({n_experts} numbers); the all-to-all needs one count per "
                 f"destination rank ({world}): add up each rank's {per} experts, or bincount the owners "
                 "indices // (n_experts // world)")
        if got.numel() < world and torch.equal(got, ref[: got.numel()]):
            fail(f"{what}: got {got.numel()} counts for {world} ranks; bincount without minlength drops the last "
                 "ranks that receive nothing: torch.bincount(dest, minlength=world)")
        if got.shape == ref.shape and torch.equal(got, torch.bincount(flat % world, minlength=world)):
            fail(f"{what}: you placed the experts round-robin (expert e on rank e % world); the layout is "
                 f"contiguous: rank r holds experts [r*E/W, (r+1)*E/W), so expert e lives on rank e // (E/W)")
        if world != per and got.numel() == world and \
                torch.equal(got, torch.bincount(flat // world, minlength=world)[:world]):
            fail(f"{what}: you divided the expert id by the number of ranks ({world}); divide by the number of "
                 f"experts per rank, E/W = {per}: rank = expert // (n_experts // world)")
        if got.shape == ref.shape and torch.equal(got, _distinct_tokens(indices // per, world)):
            fail(f"{what}: you counted tokens, not (token, expert) pairs; a token whose two experts live on the "
                 "same rank sends two rows there (one per expert), so count every entry of indices")
        if got.shape == ref.shape and torch.equal(got, ref.flip(0)):
            fail(f"{what}: the counts are in reverse rank order ({got.tolist()}, expected {ref.tolist()}): rank r "
                 "holds experts [r*E/W, (r+1)*E/W), so expert 0 lives on rank 0; rank = expert // (n_experts // world)")
        expect_shape(got, (world,), what)
        r = int((got != ref).nonzero()[0])
        fail(f"{what}: rank {r} should get {int(ref[r])} pairs, got {int(got[r])}; expected {ref.tolist()} (pairs per "
             f"destination rank), got {got.tolist()}")
    ok("send_counts", "pairs per destination rank, contiguous expert layout; idle ranks counted as 0")


# ----------------------------------------------------------------------------------------------------------
# rank_order
# ----------------------------------------------------------------------------------------------------------


def rank_order(fn: Callable[..., Any]) -> None:
    """Check a learner's ``fn(indices, n_experts, world) -> (order, inverse)``."""
    for label, indices, n_experts, world in _cases():
        what = f"rank_order on {label}"
        result = call_unchanged(fn, _inputs(indices, n_experts, world), what=what)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            fail(f"{what} should return a tuple (order, inverse), got {type(result).__name__}")
        order, inverse = (_int_tensor(v, f"{what}: {n}") for v, n in zip(result, ("order", "inverse"), strict=True))
        n = indices.numel()
        expect_shape(order, (n,), f"{what}: order")
        expect_shape(inverse, (n,), f"{what}: inverse")
        ref_order, ref_inverse = _ref_order(indices, n_experts, world)
        if not torch.equal(order, ref_order):
            _order_mistake(what, order, ref_order, indices, world, n_experts // world)
        if not torch.equal(inverse, ref_inverse):
            if torch.equal(inverse, order):
                fail(f"{what}: inverse equals order. Undoing a permutation is not applying it again "
                     "(and argsort applied twice gives order back); inverse = order.argsort(), or scatter: "
                     "inverse[order] = arange(T*k)")
            if torch.equal(inverse, ref_inverse[ref_inverse]):
                fail(f"{what}: you applied the inverse permutation twice; apply it once: "
                     "pairs[order][inverse] == pairs")
            i = int((inverse != ref_inverse).nonzero()[0])
            fail(f"{what}: inverse does not undo order (pairs[order][inverse] must equal pairs): pair {i} sits at "
                 f"position {int(ref_inverse[i])} of order, so inverse[{i}] should be {int(ref_inverse[i])}, got "
                 f"{int(inverse[i])}; expected {ref_inverse.tolist()}, got {inverse.tolist()}")
    ok("rank_order", "stable sort by destination rank, and its inverse")


def _pair(p: int, k: int, dest: torch.Tensor) -> str:
    """Pair p described for a message: its token, its choice and its destination rank."""
    return f"pair {p} (token {p // k}'s choice {p % k}, for rank {int(dest[p])})"


def _order_mistake(what: str, order: torch.Tensor, ref_order: torch.Tensor, indices: torch.Tensor, world: int,
                   per: int) -> None:
    """Name what makes ``order`` differ from the stable argsort ``ref_order`` of the destination ranks."""
    n, k = indices.numel(), indices.shape[1]
    flat = indices.reshape(-1)
    dest = flat // per
    if not torch.equal(order.sort().values, torch.arange(n)):
        fail(f"{what}: order is not a permutation of the {n} pair numbers 0..T*k-1; return positions "
             "(an argsort), not ranks or experts")
    i = int((order != ref_order).nonzero()[0])
    where = (f"position {i} of order holds {_pair(int(order[i]), k, dest)}, expected "
             f"{_pair(int(ref_order[i]), k, dest)}")
    if torch.equal(dest[order], dest.sort().values):
        if torch.equal(flat[order], flat.sort().values):
            fail(f"{what}: you sorted by expert id; the pairs are grouped by rank, but inside a rank "
                 "they must stay in token order (the receiver groups them by its local expert). Sort "
                 f"by the destination rank, expert // (n_experts // world), with argsort(stable=True) ({where})")
        fail(f"{what}: order groups the pairs by destination rank but not in token order inside a rank: "
             f"the sort is unstable; use argsort(stable=True). {where}: ties (pairs for the same rank) must be "
             "broken as the reference does, by pair number, which a stable sort keeps")
    if k > 1 and torch.equal(order, (indices.t().reshape(-1) // per).argsort(stable=True)):
        fail(f"{what}: you numbered the pairs column by column (indices.t().reshape(-1)); pair p = t·k + j is "
             f"token t's j-th choice, row by row: indices.reshape(-1) ({where})")
    if torch.equal(order, (flat % world).argsort(stable=True)):
        fail(f"{what}: you sorted by expert % world (round-robin placement); experts are contiguous, "
             "so the destination rank is expert // (n_experts // world)")
    if world != per and torch.equal(order, (flat // world).argsort(stable=True)):
        fail(f"{what}: you divided the expert id by the number of ranks ({world}); divide by the number of "
             f"experts per rank, E/W = {per}: rank = expert // (n_experts // world) ({where})")
    if torch.equal(dest[order], dest.sort(descending=True).values):
        fail(f"{what}: order puts the last rank first; sort ascending, rank 0's pairs first")
    fail(f"{what}: order should be the stable argsort of the destination ranks; {where}. Expected "
         f"{ref_order.tolist()}, got {order.tolist()}")


# ----------------------------------------------------------------------------------------------------------
# dispatch_bytes
# ----------------------------------------------------------------------------------------------------------


def _bytes_cases() -> list[tuple[str, torch.Tensor, int, int, int, int, int]]:
    """(label, indices, n_experts, world, rank, d_model, bytes_per_element)."""
    cases = []
    for (label, indices, n_experts, world), rank, d, size in zip(_cases(), (1, 0, 2, 0, 2), (64, 48, 32, 16, 8),
                                                                 (2, 4, 2, 1, 2), strict=True):
        cases.append((f"{label}, seen from rank {rank}, d={d}, {size} byte(s) per element", indices, n_experts,
                      world, rank, d, size))
    return cases


def dispatch_bytes(fn: Callable[..., Any]) -> None:
    """Check a learner's ``fn(indices, n_experts, world, rank, d_model, bytes_per_element) -> int``."""
    for label, indices, n_experts, world, rank, d, size in _bytes_cases():
        what = f"dispatch_bytes on {label}"
        inputs = {**_inputs(indices, n_experts, world), "rank": rank, "d_model": d, "bytes_per_element": size}
        got = call_unchanged(fn, inputs, what=what)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            fail(f"{what} should return a number of bytes (an int), got {type(got).__name__}")
        ref = _ref_bytes(indices, n_experts, world, rank, d, size)
        if got == ref:
            continue
        per = n_experts // world
        counts = _ref_counts(indices, n_experts, world)
        row = d * size
        rr = torch.bincount(indices.reshape(-1) % world, minlength=world)
        tokens = _distinct_tokens(indices // per, world)
        idle = [r for r in range(world) if r != rank and counts[r] == 0]
        or_idle = (f" (or subtracted counts[{idle[0]}] of rank {idle[0]}, which receives nothing, instead of this "
                   f"rank's counts[{rank}])") if idle else ""
        hints = [
            (int(counts.sum()) * row, "counted the rows that stay on this rank too; rows for its own experts never "
                                      f"leave it: subtract counts[rank]{or_idle}"),
            *[(int(counts.sum() - counts[r]) * row,
               f"subtracted counts[{r}], the rows for rank {r}; the rows that stay home are this rank's, "
               f"counts[rank] = counts[{rank}] (and the rank numbers the ranks 0..W-1, as send_counts does)")
              for r in range(world) if r != rank],
            (ref // size, "returned elements, not bytes: multiply by bytes_per_element"),
            (2 * ref, "counted both all-to-alls (dispatch and combine); this is one dispatch"),
            (int(rr.sum() - rr[rank]) * row, "placed the experts round-robin (e % world); expert e lives on rank "
                                             "e // (n_experts // world)"),
            (int(tokens.sum() - tokens[rank]) * row, "counted tokens, not (token, expert) pairs: our layer sends "
                                                     "one row per pair, even when two experts share a rank"),
            (int(counts.sum() - counts[rank]) * size, "forgot d_model: each row holds d_model elements"),
        ]
        for value, hint in hints:
            if value != ref and got == value:
                fail(f"{what}: got {got}, expected {ref}: you {hint}.")
        fail(f"{what}: expected {ref} bytes ((pairs sent to other ranks) x d_model x bytes_per_element), got {got}")
    ok("dispatch_bytes", "rows for other ranks x d_model x bytes per element")
