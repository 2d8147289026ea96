"""Check for notebook 03's top-k router exercise: ``check.topk_router(fn)``.

The learner writes ``fn(logits, k) -> (weights, indices)`` for Mixtral-style routing: a softmax over all N
experts, keep the k largest probabilities, renormalise them to sum to 1. Columns must be sorted by
descending weight (column 0 is the first choice, which capacity limits rely on); when two chosen experts
have exactly equal weights, either order is accepted.

The check runs fixed logits with T != N (so that a softmax over the wrong axis changes the answer), for
k = 1, 2 and 3, and recognises the usual mistakes by recomputing them: no renormalisation, softmax over
the tokens, the k smallest instead of the largest, sigmoid scores, a second softmax, positions instead of
expert ids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moe_course.check._core import call, close, compare_grads, expect_shape, fail, ok, same_choices, weights_and_ids
from moe_course.routing import softmax_topk

__all__ = ["topk_router"]


def _cases() -> list[tuple[str, torch.Tensor, int]]:
    """Fixed logits: T != N, spread wide enough that every mistake changes the answer."""
    g = torch.Generator().manual_seed(1234)
    return [
        ("7 tokens x 5 experts, k=2", 2.0 * torch.randn(7, 5, generator=g), 2),
        ("4 tokens x 6 experts, k=3", 1.5 * torch.randn(4, 6, generator=g), 3),
        ("9 tokens x 4 experts, k=1", 2.0 * torch.randn(9, 4, generator=g), 1),
    ]


def _variant(logits: torch.Tensor, k: int, *, axis: int = -1, score: str = "softmax", largest: bool = True,
             renorm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The router with each design choice switchable (the correct one is all defaults)."""
    probs = logits.softmax(dim=axis) if score == "softmax" else logits.sigmoid()
    weights, indices = probs.topk(k, dim=-1, largest=largest)
    if renorm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def _same_weights(w: torch.Tensor, w_ref: torch.Tensor) -> bool:
    return w.shape == w_ref.shape and close(w.sort(dim=-1).values, w_ref.sort(dim=-1).values)


def _mistakes(logits: torch.Tensor, k: int) -> list[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(explanation, what that mistake returns), most specific first."""
    out: list[tuple[str, tuple[torch.Tensor, torch.Tensor]]] = []
    for axis in (-1, 0):
        for score in ("softmax", "sigmoid"):
            for largest in (True, False):
                for renorm in (True, False):
                    problems = []
                    if axis == 0 and score == "softmax":
                        problems.append("took the softmax over the tokens (dim=0); it must run over the "
                                        "experts of each token (dim=-1), so each row sums to 1")
                    if score == "sigmoid":
                        problems.append("used sigmoid scores; this router uses a softmax over all experts "
                                        "(sigmoid scores are DeepSeek-V3's variant)")
                    if not largest:
                        problems.append("kept the k smallest probabilities; keep the k largest "
                                        "(topk(..., largest=True), the default)")
                    if not renorm:
                        problems.append("did not renormalise: weights must sum to 1 over the k chosen "
                                        "experts (divide by their sum)")
                    if problems and not (axis == 0 and score == "sigmoid"):
                        out.append(("; and you ".join(problems),
                                    _variant(logits, k, axis=axis, score=score, largest=largest,
                                             renorm=renorm)))
    probs_top, idx = logits.softmax(dim=-1).topk(k, dim=-1)
    out.append(("applied a second softmax to the chosen probabilities; renormalise by dividing by their "
                "sum instead (or take one softmax over the k chosen logits)", (probs_top.softmax(dim=-1), idx)))
    return out


def topk_router(fn: Callable[[torch.Tensor, int], Any]) -> None:
    """Check a learner's ``fn(logits (T, N), k) -> (weights (T, k), indices (T, k))``, Mixtral-style."""
    for label, logits, k in _cases():
        t, n = logits.shape
        what = f"topk_router on {label}"
        given = logits.clone().requires_grad_(True)
        weights, indices = weights_and_ids(call(fn, given, k, what=what), what)
        if not torch.equal(given.detach(), logits):
            fail(f"{what} changed the logits in place; compute new tensors instead")
        if tuple(weights.shape) == (k, n) or tuple(indices.shape) == (k, n):
            fail(f"{what} returned shape {(k, n)}: you took the top-k over the tokens (dim=0); "
                 "take it over the experts (dim=-1), giving (T, k)")
        expect_shape(weights, (t, k), what + "'s weights")
        expect_shape(indices, (t, k), what + "'s indices")
        w_ref, i_ref = softmax_topk(logits, k)
        if not same_choices(weights, indices, w_ref, i_ref):
            for hint, (w_bad, i_bad) in _mistakes(logits, k):
                if same_choices(weights, indices, w_bad, i_bad):
                    fail(f"{what}: it looks like you {hint}.")
            if _same_weights(weights, w_ref):
                if int(indices.max()) < k <= int(i_ref.max()):
                    fail(f"{what}: the weights are right but the indices look like positions 0..{k - 1} "
                         f"among the chosen; return the expert ids (0..{n - 1}) that topk gives you")
                fail(f"{what}: the weights are right but the indices are not the ids of the experts they "
                     "belong to; return the indices from the same topk call that produced the weights")
            sums = weights.detach().double().sum(dim=-1)
            if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
                fail(f"{what}: weights must sum to 1 over the k chosen experts (row sums "
                     f"{sums.min():.3f}..{sums.max():.3f}); renormalise by dividing by their sum")
            if weights.detach().min() < 0:
                fail(f"{what}: weights are probabilities and cannot be negative; softmax the logits first")
            fail(f"{what}: wrong (expert, weight) pairs. Expected, for token 0: experts "
                 f"{i_ref[0].tolist()} with weights {[round(v, 3) for v in w_ref[0].tolist()]}, got "
                 f"experts {indices[0].tolist()} with weights "
                 f"{[round(v, 3) for v in weights[0].detach().tolist()]}")
        diffs = weights.detach()[:, 1:] - weights.detach()[:, :-1]
        if k > 1 and bool((diffs > 1e-6).any()):
            fail(f"{what}: sort the k columns by descending weight (column 0 is each token's first choice); "
                 "torch.topk already returns them in that order")
        # pair up columns by expert id so that the gradient test ignores the column order of equal weights
        perm, r_perm = indices.long().argsort(dim=-1), i_ref.argsort(dim=-1)
        ref_logits = logits.clone().requires_grad_(True)
        w_ref2, _ = softmax_topk(ref_logits, k)
        compare_grads(what, weights.gather(-1, perm), w_ref2.gather(-1, r_perm),
                      {"the logits": given}, {"the logits": ref_logits})
    ok("topk_router", "softmax over experts, top-k, renormalised; T != N and k = 1, 2, 3")
