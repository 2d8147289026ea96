"""Checks for notebook 03's dispatch exercises: ``check.dispatch_combine(fn)``, ``check.sort_by_expert(fn)`` and
``check.capacity_mask(fn)``.

``dispatch_combine``: the learner's ``fn(x (T, d), weights (T, k), indices (T, k), experts) -> (T, d)``
must compute ``y_t = sum_j weights[t, j] * experts[indices[t, j]](x_t)``, equal to
:func:`moe_course.dispatch.dispatch_dense` in the forward pass and in the gradients of x, of the weights and
of every expert parameter. The cases include k = 1, 2, 3, and experts that receive no token at all.

``sort_by_expert``: the learner's ``fn(indices (T, k), n_experts) -> (order, token_of, counts)`` must return
the permutation that sorted dispatch, grouped GEMM and expert parallelism use: ``order`` (T*k,) is the stable
argsort of ``indices.reshape(-1)``, ``token_of = order // k`` and ``counts`` (N,) the pairs per expert.

``capacity_mask``: the learner's ``fn(indices (T, k), n_experts, capacity) -> keep (T, k) bool`` must equal
:func:`moe_course.dispatch.capacity_mask`: every first choice claims a slot before any second choice,
tokens in order within one choice rank, and an expert keeps exactly ``capacity`` assignments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from moe_course.check._core import (
    CheckError,
    as_tensor,
    call,
    call_unchanged,
    close,
    compare_grads,
    expect_shape,
    fail,
    ok,
)
from moe_course.dispatch import capacity_mask as _ref_capacity_mask
from moe_course.dispatch import dispatch_dense
from moe_course.experts import make_experts

__all__ = ["capacity_mask", "dispatch_combine", "sort_by_expert"]


# ----------------------------------------------------------------------------------------------------------
# dispatch_combine
# ----------------------------------------------------------------------------------------------------------

def _dispatch_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, nn.ModuleList, str | None]]:
    """(label, x, weights, indices, experts, empty-expert note). Built without touching the global RNG."""
    g = torch.Generator().manual_seed(2024)
    cases = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        experts4 = make_experts(4, 6, 12)
        experts5 = make_experts(5, 6, 12)
    # k = 2, every expert used; weights differ per slot and need not sum to 1 (as after capacity drops)
    t = 8
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(t)])
    idx[:4] = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]])
    w = torch.rand(t, 2, generator=g) + 0.1
    cases.append(("8 tokens, 4 experts, k=2", torch.randn(t, 6, generator=g), w, idx, experts4, None))
    # k = 1
    t = 7
    idx = torch.tensor([[2], [0], [1], [2], [3], [0], [2]])
    w = torch.rand(t, 1, generator=g) + 0.1
    cases.append(("7 tokens, 4 experts, k=1", torch.randn(t, 6, generator=g), w, idx, experts4, None))
    # k = 2 with experts 1 and 4 (a middle one and the last one) receiving no token
    t = 6
    idx = torch.tensor([[0, 2], [3, 0], [2, 3], [0, 3], [2, 0], [3, 2]])
    w = torch.rand(t, 2, generator=g) + 0.1
    cases.append(("6 tokens, 5 experts, k=2", torch.randn(t, 6, generator=g), w, idx, experts5,
                  "experts 1 and 4 receive no token"))
    # k = 3: slots 1 and 2 must not be confused with each other either
    t = 5
    idx = torch.tensor([[3, 0, 1], [1, 2, 4], [4, 3, 0], [0, 1, 2], [2, 4, 3]])
    w = torch.rand(t, 3, generator=g) + 0.1
    cases.append(("5 tokens, 5 experts, k=3", torch.randn(t, 6, generator=g), w, idx, experts5, None))
    return cases


def _dispatch_variant(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: Sequence[nn.Module],
                      mode: str) -> torch.Tensor:
    """Typical wrong combines, written out with the per-token sum."""
    t, k = indices.shape
    outs = torch.stack([expert(x) for expert in experts], dim=1)  # (T, N, d)
    picked = outs[torch.arange(t).unsqueeze(1), indices]  # (T, k, d)
    w = weights.unsqueeze(-1)
    if mode == "unweighted":
        return picked.sum(dim=1)
    if mode == "first":
        return (w * picked)[:, 0]
    if mode == "first_unweighted":
        return picked[:, 0]
    if mode == "last_slot":  # assignment in slot order: the last slot overwrites the first
        return (w * picked)[:, -1]
    if mode == "last_expert":  # assignment in expert order: the larger expert id overwrites
        last = indices.argmax(dim=1)
        return (w * picked)[torch.arange(t), last]
    if mode == "slot0_weight":
        return (weights[:, :1].unsqueeze(-1) * picked).sum(dim=1)
    if mode == "swapped_slots":
        return (weights.flip(1).unsqueeze(-1) * picked).sum(dim=1)
    if mode == "first_two":
        return (w * picked)[:, :2].sum(dim=1)
    if mode == "normalised":
        return ((w / w.sum(dim=1, keepdim=True)) * picked).sum(dim=1)
    raise ValueError(mode)


_DISPATCH_MISTAKES = [
    ("unweighted", "forgot to multiply each expert's output by its routing weight"),
    ("first_unweighted", "used only the first choice (column 0) and forgot the routing weight"),
    ("first", "used only each token's first choice (column 0 of indices); add up all k choices"),
    ("last_slot", "overwrote the output instead of accumulating: a token's k weighted expert outputs must be "
                  "added up (out.index_add / +=), not assigned (out[token] = ..., index_copy); only the last "
                  "choice survived"),
    ("last_expert", "overwrote the output instead of accumulating: a token's k weighted expert outputs must be "
                    "added up (out.index_add / +=), not assigned (out[token] = ..., index_copy); only the "
                    "expert processed last survived"),
    ("slot0_weight", "weighted every choice with the first choice's weight; the expert in slot j gets "
                     "weights[t, j]"),
    ("first_two", "added up only the first two choices; a token has k choices (here k = 3): loop over all "
                  "k columns of indices"),
    ("swapped_slots", "weighted each expert with the other slot's weight; the expert in slot j gets "
                      "weights[t, j] (take the slot from the same torch.where/nonzero that found the token)"),
    ("normalised", "renormalised the weights; use them as given (after capacity drops they need not sum to 1)"),
]


def _run(fn: Callable[..., Any], x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
         experts: Sequence[nn.Module], what: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Call ``fn`` on fresh copies of x and weights that require grad; return the output and the inputs."""
    xg = x.clone().requires_grad_(True)
    wg = weights.clone().requires_grad_(True)
    out = as_tensor(call(fn, xg, wg, indices.clone(), experts, what=what), what)
    expect_shape(out, tuple(x.shape), what)
    return out, {"x": xg, "weights": wg, "the experts' parameters": list(nn.ModuleList(experts).parameters())}


def dispatch_combine(fn: Callable[..., Any]) -> None:
    """Check a learner's ``fn(x, weights, indices, experts) -> (T, d)`` against ``dispatch_dense``."""
    for label, x, weights, indices, experts, empty in _dispatch_cases():
        what = f"dispatch_combine on {label}"
        try:
            out, mine = _run(fn, x, weights, indices, experts, what)
        except CheckError as exc:
            if empty and exc.__cause__ is not None:  # the learner's function crashed
                fail(f"{exc}\nIn this case {empty}: an expert with no tokens must simply be skipped (or run "
                     "on an empty batch) and contribute nothing.")
            raise
        ref, theirs = _run(dispatch_dense, x, weights, indices, experts, "dispatch_dense")
        if not close(out, ref):
            with torch.no_grad():
                for mode, hint in _DISPATCH_MISTAKES:
                    if close(out, _dispatch_variant(x, weights, indices, experts, mode)):
                        fail(f"{what}: it looks like you {hint}.")
            bad = (out.detach() - ref.detach()).abs().amax(dim=1)
            token = int(bad.argmax())
            fail(f"{what}: wrong output (largest error {float(bad.max()):.3g}, at token {token}, which chose "
                 f"experts {indices[token].tolist()} with weights "
                 f"{[round(v, 3) for v in weights[token].tolist()]}). Each token's output is "
                 "sum_j weights[t, j] * experts[indices[t, j]](x[t]).")
        compare_grads(what, out, ref, mine, theirs)
    ok("dispatch_combine", "matches dispatch_dense (forward and gradients); k = 1, 2, 3; empty experts")


# ----------------------------------------------------------------------------------------------------------
# sort_by_expert
# ----------------------------------------------------------------------------------------------------------

def _sort_reference(indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, token_of, counts): the (token, slot) pairs grouped by expert, token order kept within one."""
    k = indices.shape[1]
    flat = indices.reshape(-1)  # (T*k,) pair p = t*k + j is token t's j-th choice
    order = flat.argsort(stable=True)  # (T*k,)
    return order, order // k, torch.bincount(flat, minlength=n_experts)  # (T*k,), (T*k,), (N,)


def _sort_cases() -> list[tuple[str, torch.Tensor, int]]:
    """(label, indices, n_experts): k = 1, 2, 3, with a middle expert and trailing experts left empty; then 64
    tokens with many ties (an unstable sort reorders ties only above 16 elements, so small cases cannot tell)."""
    gen = torch.Generator().manual_seed(26)
    many_ties = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(64)])  # (64, 2), 6 experts
    return [
        ("7 tokens, 4 experts, k=1 (expert 3 gets no token)",
         torch.tensor([[2], [0], [1], [2], [0], [0], [2]]), 4),
        ("6 tokens, 5 experts, k=2 (experts 1 and 4 get no token)",
         torch.tensor([[0, 2], [3, 0], [2, 3], [0, 3], [2, 0], [3, 2]]), 5),
        ("5 tokens, 8 experts, k=3 (experts 2, 6 and 7 get no token)",
         torch.tensor([[4, 0, 1], [5, 1, 0], [0, 4, 3], [4, 3, 1], [1, 5, 0]]), 8),
        ("64 tokens, 8 experts, k=2 (about 21 pairs per used expert; experts 6 and 7 get no token)", many_ties, 8),
    ]


def _as_index(value: Any, name: str, what: str) -> torch.Tensor:
    """One of the three outputs as a CPU long tensor; floats and bools are named as the mistake."""
    value = as_tensor(value, f"{what}: {name}")
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        fail(f"{what}: {name} has dtype {value.dtype}; return integer (torch.long) tensors, as argsort and "
             "bincount do")
    return value.detach().cpu().long()


def _check_counts(counts: torch.Tensor, t: int, k: int, n_experts: int, what: str) -> None:
    """Name the usual mistakes in ``counts`` (per token; bincount without minlength); otherwise say what it is."""
    flat_k = counts.reshape(-1)
    if counts.dim() == 1 and counts.numel() >= t and bool((flat_k[:t] == k).all()) and not bool(flat_k[t:].any()):
        fail(f"{what}: counts look like pairs per token (each token has k = {k}); count pairs per expert: "
             "torch.bincount(indices.reshape(-1), minlength=n_experts)")
    if counts.dim() == 1 and counts.numel() < n_experts:
        fail(f"{what}: counts has {counts.numel()} entries, expected one per expert ({n_experts}); bincount "
             "without minlength drops the experts after the last one used: "
             "torch.bincount(flat, minlength=n_experts)")
    expect_shape(counts, (n_experts,), f"{what}: counts")
    if int(counts.sum()) != t * k:
        fail(f"{what}: counts add up to {int(counts.sum())}, expected T*k = {t * k} (one per pair); "
             "counts[e] = number of pairs routed to expert e")


_OUTPUTS = ("order", "token_of", "counts")


def sort_by_expert(fn: Callable[..., Any]) -> None:
    """Check a learner's ``fn(indices, n_experts) -> (order, token_of, counts)`` against a stable argsort."""
    for label, indices, n_experts in _sort_cases():
        what = f"sort_by_expert on {label}"
        t, k = indices.shape
        result = call_unchanged(fn, {"indices": indices.clone(), "n_experts": n_experts}, what=what)
        if not isinstance(result, (tuple, list)) or len(result) != 3:
            fail(f"{what} should return a tuple (order, token_of, counts), got {type(result).__name__}"
                 + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
        order, token_of, counts = (_as_index(v, name, what) for v, name in zip(result, _OUTPUTS, strict=True))
        expect_shape(order, (t * k,), f"{what}: order")
        expect_shape(token_of, (t * k,), f"{what}: token_of")
        ref_order, ref_token_of, ref_counts = _sort_reference(indices, n_experts)
        flat = indices.reshape(-1)

        # order
        if not torch.equal(order, ref_order):
            if not torch.equal(order.sort().values, torch.arange(t * k)):
                fail(f"{what}: order is not a permutation of 0..T*k-1 ({t * k} pairs); it should be the "
                     "argsort of indices.reshape(-1), the positions of the pairs, not their experts")
            if torch.equal(order, indices.t().reshape(-1).argsort(stable=True)):
                fail(f"{what}: it looks like you flattened slot-major (indices.t().reshape(-1): all first "
                     "choices, then all second choices); flatten row by row with indices.reshape(-1), so pair "
                     "p = t*k + j is token t's j-th choice and token_of = order // k holds")
            sorted_experts = flat[order]
            if torch.equal(sorted_experts, flat.sort(descending=True).values):
                fail(f"{what}: order sorts the experts in descending order; expert 0's pairs come first "
                     "(argsort(stable=True), ascending)")
            if torch.equal(sorted_experts, flat.sort().values):
                fail(f"{what}: order groups the pairs by expert but changes their order within an expert; "
                     "use a stable sort (argsort(stable=True)) so each expert sees its tokens in token order")
            fail(f"{what}: order should be indices.reshape(-1).argsort(stable=True); expected "
                 f"{ref_order.tolist()}, got {order.tolist()}")

        # token_of
        if not torch.equal(token_of, ref_token_of):
            if torch.equal(token_of, ref_order % k):
                fail(f"{what}: token_of = order % k gives the slot (which choice), not the token; "
                     "pair p = t*k + j came from token t = p // k")
            if k > 1 and torch.equal(token_of, ref_order):
                fail(f"{what}: token_of equals order, the pair positions; divide by k: token_of = order // k")
            fail(f"{what}: token_of should be order // k (pair p = t*k + j came from token t); expected "
                 f"{ref_token_of.tolist()}, got {token_of.tolist()}")

        # counts
        if not torch.equal(counts, ref_counts):
            _check_counts(counts, t, k, n_experts, what)
            fail(f"{what}: counts should be torch.bincount(indices.reshape(-1), minlength=n_experts); expected "
                 f"{ref_counts.tolist()}, got {counts.tolist()}")
    ok("sort_by_expert", "stable argsort by expert, token_of = order // k, counts per expert; k = 1, 2, 3")


# ----------------------------------------------------------------------------------------------------------
# capacity_mask
# ----------------------------------------------------------------------------------------------------------

def _capacity_cases() -> list[tuple[str, torch.Tensor, int, int]]:
    """(label, indices, n_experts, capacity): skewed, so that some experts overflow."""
    return [
        # expert 0 is popular as a first choice, expert 1 as a second choice
        ("8 tokens, 4 experts, k=2, capacity 3",
         torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1], [2, 1], [0, 3], [1, 0], [0, 1]]), 4, 3),
        ("10 tokens, 3 experts, k=1, capacity 4",
         torch.tensor([[2], [0], [2], [2], [1], [2], [0], [2], [2], [1]]), 3, 4),
        ("6 tokens, 5 experts, k=3, capacity 2",
         torch.tensor([[4, 0, 1], [4, 1, 0], [0, 4, 2], [4, 2, 1], [1, 4, 0], [4, 0, 3]]), 5, 2),
        ("5 tokens, 4 experts, k=2, capacity 10 (nothing dropped)",
         torch.tensor([[0, 1], [0, 1], [0, 1], [2, 3], [0, 2]]), 4, 10),
    ]


def _queue_position(order: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Place of each assignment in its expert's queue, for assignments listed in ``order``."""
    onehot = torch.nn.functional.one_hot(order, n_experts)
    return ((onehot.cumsum(dim=0) - 1) * onehot).sum(dim=-1)


def _capacity_variant(indices: torch.Tensor, n_experts: int, capacity: int, mode: str) -> torch.Tensor:
    t, k = indices.shape
    if mode == "token_major":  # token 0's choices, then token 1's, ...
        return _queue_position(indices.reshape(-1), n_experts).reshape(t, k) < capacity
    rank_major = indices.t().reshape(-1)
    pos = _queue_position(rank_major, n_experts)
    if mode == "no_transpose_back":  # the rank-order mask reshaped straight to (T, k)
        return (pos < capacity).reshape(t, k)
    if mode == "plus_one":
        return (pos <= capacity).reshape(k, t).t()
    if mode == "minus_one":
        return (pos < capacity - 1).reshape(k, t).t()
    if mode == "latest":  # the whole queue reversed: keep the last arrivals
        return (_queue_position(rank_major.flip(0), n_experts).flip(0) < capacity).reshape(k, t).t()
    if mode == "latest_tokens":  # first choices still first, but later tokens win within a rank
        rev = indices.flip(0).t().reshape(-1)
        return (_queue_position(rev, n_experts) < capacity).reshape(k, t).t().flip(0)
    if mode == "per_token":  # counts a token's own choices, not the expert's queue
        return torch.arange(k).expand(t, k) < capacity
    if mode == "global":  # one counter for all experts
        return (torch.arange(t * k) < capacity).reshape(k, t).t()
    if mode == "first_tokens":  # keeps the first `capacity` tokens whatever their expert
        return (torch.arange(t) < capacity).unsqueeze(1).expand(t, k)
    raise ValueError(mode)


_OFF_BY_ONE = ("The cumulative sum counts each assignment itself (the first to arrive at an expert counts 1), so "
               "with that count an assignment fits when count <= capacity; with 0-based queue places (cumsum - 1) "
               "it fits when place < capacity")
_CAPACITY_MISTAKES = [
    ("token_major", "filled the queues in token order (token 0's choices, then token 1's, ...); every "
                    "token's first choice must claim a slot before any second choice: walk indices rank by rank "
                    "(indices.t())"),
    ("no_transpose_back", "reshaped the rank-order mask (all first choices, then all second choices) straight to "
                          "(T, k), so its rows are no longer tokens; reshape it to (k, T), then transpose: "
                          ".reshape(k, t).t()"),
    ("plus_one", f"let each expert keep capacity + 1 assignments (off by one). {_OFF_BY_ONE}"),
    ("minus_one", f"let each expert keep only capacity - 1 assignments (off by one). {_OFF_BY_ONE}"),
    ("latest", "dropped the earliest assignments instead of the latest; the first to arrive keep their slots"),
    ("latest_tokens", "dropped the earliest tokens instead of the latest; within a choice rank, tokens claim "
                      "slots in order (token 0 first)"),
    ("per_token", "counted assignments per token instead of per expert; each expert has its own queue"),
    ("global", "used one counter for all experts; each expert has its own queue of capacity slots"),
    ("first_tokens", "kept the first capacity tokens whatever their expert; count per expert"),
]


def capacity_mask(fn: Callable[..., Any]) -> None:
    """Check a learner's ``fn(indices, n_experts, capacity) -> keep (T, k) bool``."""
    for label, indices, n_experts, capacity in _capacity_cases():
        what = f"capacity_mask on {label}"
        keep = as_tensor(call(fn, indices.clone(), n_experts, capacity, what=what), what)
        t, k = indices.shape
        if tuple(keep.shape) == (k, t) and k != t:
            fail(f"{what} returned shape {(k, t)}; transpose back to (T, k), one row per token")
        expect_shape(keep, (t, k), what)
        if keep.dtype != torch.bool:
            fail(f"{what} returned {keep.dtype}; return a bool tensor (True = the assignment fits), "
                 "e.g. position < capacity")
        expected = _ref_capacity_mask(indices, n_experts, capacity)
        if torch.equal(keep.cpu(), expected):
            continue
        for mode, hint in _CAPACITY_MISTAKES:
            if torch.equal(keep.cpu(), _capacity_variant(indices, n_experts, capacity, mode)):
                fail(f"{what}: it looks like you {hint}.")
        kept = torch.bincount(indices[keep.cpu()], minlength=n_experts)
        over = [e for e in range(n_experts) if int(kept[e]) > capacity]
        if over:
            fail(f"{what}: expert {over[0]} keeps {int(kept[over[0]])} assignments, more than its capacity "
                 f"{capacity}")
        wrong = (keep.cpu() != expected).nonzero()[0].tolist()
        fail(f"{what}: wrong at token {wrong[0]}, choice {wrong[1]} (expert {int(indices[wrong[0], wrong[1]])}): "
             f"expected {'kept' if expected[wrong[0], wrong[1]] else 'dropped'}. First choices of all tokens "
             "claim slots first (in token order), then second choices; each expert keeps `capacity`.")
    ok("capacity_mask", "first choices before second choices, exactly `capacity` slots per expert")
