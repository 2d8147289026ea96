"""Checks for the expert-parallelism exercises (notebook 07): ``check.send_counts(fn)``,
``check.rank_order(fn)`` and ``check.dispatch_bytes(fn)``.

Experts are placed contiguously: with W ranks and E experts, rank r holds experts [r·E/W, (r+1)·E/W), so
expert e lives on rank ``e // (E/W)``. Pair p = t·k + j is token t's j-th choice (``indices.reshape(-1)``).

``send_counts``: ``fn(indices (T, k), n_experts, world) -> (W,)`` pairs this rank sends to each rank.
``rank_order``: ``fn(indices, n_experts, world) -> (order, inverse)``: the stable argsort of the pairs'
destination ranks, and the permutation that undoes it (``pairs[order][inverse] == pairs``).
``dispatch_bytes``: ``fn(indices, n_experts, world, rank, d_model, bytes_per_element) -> int``: bytes of
token rows one dispatch all-to-all sends to *other* ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moe_course.check._core import as_tensor, call, expect_shape, fail, ok
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
    ]


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
        got = _int_tensor(call(fn, indices.clone(), n_experts, world, what=what), what)
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
        expect_shape(got, (world,), what)
        fail(f"{what}: expected {ref.tolist()} (pairs per destination rank), got {got.tolist()}")
    ok("send_counts", "pairs per destination rank, contiguous expert layout; idle ranks counted as 0")


# ----------------------------------------------------------------------------------------------------------
# rank_order
# ----------------------------------------------------------------------------------------------------------


def rank_order(fn: Callable[..., Any]) -> None:
    """Check a learner's ``fn(indices, n_experts, world) -> (order, inverse)``."""
    for label, indices, n_experts, world in _cases():
        what = f"rank_order on {label}"
        result = call(fn, indices.clone(), n_experts, world, what=what)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            fail(f"{what} should return a tuple (order, inverse), got {type(result).__name__}")
        order, inverse = (_int_tensor(v, f"{what}: {n}") for v, n in zip(result, ("order", "inverse"), strict=True))
        n = indices.numel()
        expect_shape(order, (n,), f"{what}: order")
        expect_shape(inverse, (n,), f"{what}: inverse")
        ref_order, ref_inverse = _ref_order(indices, n_experts, world)
        flat, per = indices.reshape(-1), n_experts // world
        dest = flat // per
        if not torch.equal(order, ref_order):
            if not torch.equal(order.sort().values, torch.arange(n)):
                fail(f"{what}: order is not a permutation of the {n} pair numbers 0..T*k-1; return positions "
                     "(an argsort), not ranks or experts")
            if torch.equal(dest[order], dest.sort().values):
                if torch.equal(flat[order], flat.sort().values):
                    fail(f"{what}: you sorted by expert id; the pairs are grouped by rank, but inside a rank "
                         "they must stay in token order (the receiver groups them by its local expert). Sort "
                         "by the destination rank, expert // (n_experts // world), with argsort(stable=True)")
                fail(f"{what}: order groups the pairs by destination rank but not in token order inside a rank: "
                     "the sort is unstable; use argsort(stable=True)")
            if torch.equal(order, (flat % world).argsort(stable=True)):
                fail(f"{what}: you sorted by expert % world (round-robin placement); experts are contiguous, "
                     "so the destination rank is expert // (n_experts // world)")
            if torch.equal(dest[order], dest.sort(descending=True).values):
                fail(f"{what}: order puts the last rank first; sort ascending, rank 0's pairs first")
            fail(f"{what}: order should be the stable argsort of the destination ranks; expected "
                 f"{ref_order.tolist()}, got {order.tolist()}")
        if not torch.equal(inverse, ref_inverse):
            if torch.equal(inverse, order):
                fail(f"{what}: inverse equals order. Undoing a permutation is not applying it again "
                     "(and argsort applied twice gives order back); inverse = order.argsort(), or scatter: "
                     "inverse[order] = arange(T*k)")
            if torch.equal(inverse, ref_inverse[ref_inverse]):
                fail(f"{what}: you applied the inverse permutation twice; apply it once: "
                     "pairs[order][inverse] == pairs")
            fail(f"{what}: inverse does not undo order (pairs[order][inverse] must equal pairs); expected "
                 f"{ref_inverse.tolist()}, got {inverse.tolist()}")
    ok("rank_order", "stable sort by destination rank, and its inverse")


# ----------------------------------------------------------------------------------------------------------
# dispatch_bytes
# ----------------------------------------------------------------------------------------------------------


def _bytes_cases() -> list[tuple[str, torch.Tensor, int, int, int, int, int]]:
    """(label, indices, n_experts, world, rank, d_model, bytes_per_element)."""
    cases = []
    for (label, indices, n_experts, world), rank, d, size in zip(_cases(), (1, 0, 2, 0), (64, 48, 32, 16),
                                                                 (2, 4, 2, 1), strict=True):
        cases.append((f"{label}, seen from rank {rank}, d={d}, {size} byte(s) per element", indices, n_experts,
                      world, rank, d, size))
    return cases


def dispatch_bytes(fn: Callable[..., Any]) -> None:
    """Check a learner's ``fn(indices, n_experts, world, rank, d_model, bytes_per_element) -> int``."""
    for label, indices, n_experts, world, rank, d, size in _bytes_cases():
        what = f"dispatch_bytes on {label}"
        got = call(fn, indices.clone(), n_experts, world, rank, d, size, what=what)
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
        hints = [
            (int(counts.sum()) * row, "counted the rows that stay on this rank too; rows for its own experts never "
                                      "leave it: subtract counts[rank]"),
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
