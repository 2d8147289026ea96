"""Checks for notebook 04's exercises: the Switch auxiliary loss, the router z-loss and expert-choice routing.

* ``check.switch_aux_loss(fn)``: ``fn(probs (T, N), indices (T, k), n_experts) -> scalar``, the loss
  N·Σᵢ fᵢ·Pᵢ of Fedus et al. 2021 (arXiv:2101.03961), generalised to top-k: fᵢ is the fraction of the T·k
  assignments that went to expert i (a count: no gradient), Pᵢ the mean router probability of expert i over
  the T tokens (the full softmax: the gradient flows through it).
* ``check.router_z_loss(fn)``: ``fn(logits (T, N)) -> scalar``, the mean over tokens of logsumexp(logits)²
  (Zoph et al. 2022, arXiv:2202.08906, eq. 5).
* ``check.expert_choice(fn)``: ``fn(logits (T, N), capacity_factor) -> (weights (N, c), token_ids (N, c))``:
  a softmax over the experts of each token, then each expert takes its c = ceil(T·cf/N) highest-scoring
  tokens (Zhou et al. 2022, arXiv:2202.09368).

Each check compares values on fixed inputs (T != N, k > 1, logits large enough that ``exp`` overflows, fractional
means and capacities, repeated tokens whose scores tie) and the gradient with respect to the differentiable input,
fails naming the input when the learner's function changed one in place, and names the usual mistakes by
recomputing them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from moe_course.balancing import router_z_loss as ref_z_loss
from moe_course.balancing import switch_aux_loss as ref_switch_aux_loss
from moe_course.check._core import (
    as_tensor,
    call_unchanged,
    close,
    expect_shape,
    fail,
    ok,
    same_choices,
    weights_and_ids,
)
from moe_course.routing import expert_choice as ref_expert_choice
from moe_course.routing import expert_choice_capacity

__all__ = ["expert_choice", "router_z_loss", "switch_aux_loss"]

NO_GRAD = ("keep the computation in torch (no .item(), .tolist(), NumPy, torch.tensor(...) of a result, "
           ".detach() on the path to the output, or torch.no_grad())")


def _scalar(value: Any, what: str) -> torch.Tensor:
    value = as_tensor(value, what)
    if value.numel() != 1:
        fail(f"{what} should return one number (a 0-d tensor), got shape {tuple(value.shape)}; "
             "reduce over tokens and experts")
    if not value.is_floating_point():
        fail(f"{what} should return a floating-point tensor, got {value.dtype}")
    return value.reshape(())


def _grad(out: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor | None:
    """d out / d leaf (zeros where autograd reaches nothing), or None when out does not depend on leaf."""
    if not out.requires_grad:
        return None
    (g,) = torch.autograd.grad(out, leaf, allow_unused=True)
    return g


# ---------------------------------------------------------------------------------------------------------
# Switch auxiliary loss
# ---------------------------------------------------------------------------------------------------------


def _switch_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, int]]:
    """(label, probs (T, N), indices (T, k), N): skewed routers with T != N, k = 2, 3 and 1, plus uniform."""
    g = torch.Generator().manual_seed(404)
    cases = []
    for t, n, k, spread in ((12, 5, 2, 1.5), (10, 6, 3, 2.0), (9, 4, 1, 1.0)):
        logits = spread * torch.randn(t, n, generator=g) + torch.linspace(1.0, -1.0, n)  # popular experts first
        probs = logits.softmax(dim=-1)
        cases.append((f"{t} tokens x {n} experts, k={k}", probs, probs.topk(k, dim=-1).indices, n))
    uniform = torch.full((8, 4), 0.25)
    cases.append(("8 tokens x 4 experts, k=2, uniform routing", uniform,
                  torch.tensor([[0, 1], [2, 3]] * 4), 4))
    return cases


def _switch_mistakes(probs: torch.Tensor, indices: torch.Tensor, n: int) -> list[tuple[str, torch.Tensor]]:
    """(explanation, the value that mistake gives), most specific first."""
    t, k = indices.shape
    counts = torch.bincount(indices.reshape(-1), minlength=n).to(probs.dtype)
    mask = torch.zeros_like(probs).scatter(1, indices, 1.0)  # (T, N) 1 where expert chosen
    f, p = counts / (t * k), probs.mean(dim=0)
    p_topk = (probs * mask).sum(dim=0) / t
    w = probs.gather(1, indices)
    p_renorm = torch.zeros_like(probs).scatter(1, indices, w / w.sum(dim=-1, keepdim=True)).sum(dim=0) / t
    f_first = torch.bincount(indices[:, 0], minlength=n).to(probs.dtype) / t
    fix_f = "fᵢ = (assignments to expert i) / (T·k)"
    return [
        ("counted fᵢ over the T tokens instead of the T·k assignments, so Σᵢ fᵢ = k and the loss is k times too "
         f"large (some implementations do this and fold k into α); here divide the counts by T·k ({fix_f}), so "
         "that the loss is 1 under uniform routing", n * (counts / t * p).sum()),
        ("took Pᵢ from the top-k weights (the probabilities of the chosen experts only); Pᵢ is the mean of "
         "the full softmax over all T tokens, probs.mean(dim=0), so that every expert gets a gradient",
         n * (f * p_topk).sum()),
        ("took Pᵢ from the renormalised top-k weights; Pᵢ is the mean of the full softmax over all T tokens, "
         "probs.mean(dim=0)", n * (f * p_renorm).sum()),
        ("took Pᵢ from the top-k weights and counted fᵢ over T instead of T·k; Pᵢ = probs.mean(dim=0) and "
         + fix_f, n * (counts / t * p_topk).sum()),
        ("left out the factor N: the loss is N·Σᵢ fᵢ·Pᵢ, which makes it 1 under uniform routing whatever N "
         "(a mean over experts instead of the sum has the same effect)", (f * p).sum()),
        ("counted fᵢ over T instead of T·k and left out the factor N", (counts / t * p).sum()),
        ("used Pᵢ in place of fᵢ (N·Σᵢ Pᵢ²): fᵢ is the fraction of assignments actually dispatched to expert i, "
         "a count from the chosen indices", n * (p * p).sum()),
        ("computed fᵢ from the router probabilities of the chosen experts (a soft count), so gradient flows "
         f"through it; fᵢ counts assignments and carries no gradient ({fix_f})",
         n * ((probs * mask).sum(dim=0) / (t * k) * p).sum()),
        ("counted only each token's first choice in fᵢ; count all k choices of every token (T·k assignments)",
         n * (f_first * p).sum()),
        ("divided with floor division (// or rounding_mode='floor'): fᵢ = counts / (T·k) and Pᵢ = probs.mean(dim=0) "
         "are fractions, which floor division turns into 0; convert the counts to float and divide with /",
         n * (torch.div(counts, t * k, rounding_mode="floor") * p).sum()),
    ]


def switch_aux_loss(fn: Callable[[torch.Tensor, torch.Tensor, int], Any]) -> None:
    """Check ``fn(probs (T, N), indices (T, k), n_experts) -> N·Σᵢ fᵢ·Pᵢ`` and its gradient w.r.t. probs."""
    for label, probs, indices, n in _switch_cases():
        what = f"switch_aux_loss on {label}"
        given = probs.clone().requires_grad_(True)
        loss = _scalar(call_unchanged(fn, {"probs": given, "indices": indices.clone(), "n_experts": n}, what=what),
                       what)
        ref_probs = probs.clone().requires_grad_(True)
        ref = ref_switch_aux_loss(ref_probs, indices, n)
        if not close(loss, ref):
            got = f"got {float(loss.detach()):.4f}, expected {float(ref.detach()):.4f}"
            for hint, value in _switch_mistakes(probs, indices, n):
                if close(loss, value) and not close(value, ref):
                    fail(f"{what}: {got}. It looks like you {hint}.")
            f = torch.bincount(indices.reshape(-1), minlength=n) / indices.numel()
            fail(f"{what}: {got} = N·Σᵢ fᵢ·Pᵢ with f = {[round(v, 3) for v in f.tolist()]} "
                 f"and P = {[round(v, 3) for v in probs.mean(dim=0).tolist()]}")
        ref_grad = _grad(ref, ref_probs)
        grad = _grad(loss, given)
        if grad is None:
            fail(f"{what}: the value is right but no gradient reaches the router probabilities; the loss trains "
                 f"the router through Pᵢ, so {NO_GRAD}")
        if not close(grad, ref_grad):
            fail(f"{what}: the value is right but the gradient with respect to the router probabilities is not. "
                 "fᵢ must carry no gradient (it counts discrete choices: compute it from the indices, or "
                 ".detach() it); only Pᵢ = probs.mean(dim=0) is differentiable, giving d loss / d probs[t, i] "
                 "= N·fᵢ/T")
    ok("switch_aux_loss", "N·Σ fᵢ·Pᵢ and its gradient; k = 1, 2, 3; equals 1 under uniform routing")


# ---------------------------------------------------------------------------------------------------------
# Router z-loss
# ---------------------------------------------------------------------------------------------------------


def _z_cases() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2202)
    return [
        ("7 tokens x 5 experts", 2.0 * torch.randn(7, 5, generator=g)),
        ("4 tokens x 9 experts", 3.0 * torch.randn(4, 9, generator=g) + 1.0),
        ("6 tokens x 4 experts with logits near 100", 5.0 * torch.randn(6, 4, generator=g) + 100.0),
    ]


def _z_mistakes(logits: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    lse = torch.logsumexp(logits, dim=-1)
    return [
        ("used the largest logit instead of logsumexp; the z-loss penalises log Σⱼ exp(xⱼ), torch.logsumexp(..., "
         "dim=-1)", logits.amax(dim=-1).square().mean()),
        ("did not square the logsumexp: the z-loss is the mean of logsumexp(x)²", lse.mean()),
        ("summed over the tokens instead of averaging: the z-loss is (1/T)·Σ_t logsumexp(x_t)²", lse.square().sum()),
        ("took the logsumexp over the tokens (dim=0); take it over each token's experts (dim=-1)",
         torch.logsumexp(logits, dim=0).square().mean()),
        ("penalised the squared logits themselves; the z-loss squares logsumexp(x) of each token",
         logits.square().mean()),
        ("squared the mean logsumexp; the z-loss is the mean of the squares, (1/T)·Σ_t logsumexp(x_t)²",
         lse.mean().square()),
        ("divided the sum by T with floor division (// or rounding_mode='floor'): the mean (1/T)·Σ_t logsumexp(x_t)² "
         "is a fraction; use .mean() or /", torch.div(lse.square().sum(), logits.shape[0], rounding_mode="floor")),
    ]


def router_z_loss(fn: Callable[[torch.Tensor], Any]) -> None:
    """Check ``fn(logits (T, N)) -> mean_t logsumexp(logits_t)²`` and its gradient w.r.t. the logits."""
    for label, logits in _z_cases():
        what = f"router_z_loss on {label}"
        given = logits.clone().requires_grad_(True)
        loss = _scalar(call_unchanged(fn, {"logits": given}, what=what), what)
        ref_logits = logits.clone().requires_grad_(True)
        ref = ref_z_loss(ref_logits)
        if not torch.isfinite(loss):
            fail(f"{what}: got {float(loss.detach())}; exp(100) overflows float32, so log(exp(x).sum()) fails. Use "
                 "torch.logsumexp, which subtracts the largest logit before exponentiating")
        if not close(loss, ref):
            got = f"got {float(loss.detach()):.4f}, expected {float(ref.detach()):.4f}"
            for hint, value in _z_mistakes(logits):
                if close(loss, value):
                    fail(f"{what}: {got}. It looks like you {hint}.")
            fail(f"{what}: {got} = mean over tokens of logsumexp(logits, dim=-1)²")
        grad, ref_grad = _grad(loss, given), _grad(ref, ref_logits)
        if grad is None:
            fail(f"{what}: the value is right but no gradient reaches the logits; {NO_GRAD}")
        if not torch.isfinite(grad).all():
            fail(f"{what}: the value is right but its gradient is not finite; use torch.logsumexp (stable) "
                 "rather than log(exp(x).sum())")
        if not close(grad, ref_grad):
            fail(f"{what}: the value is right but the gradient with respect to the logits is not; compute it "
                 "with differentiable torch operations (expected 2·logsumexp(x_t)·softmax(x_t)/T per token)")
    ok("router_z_loss", "mean logsumexp² and its gradient, stable for logits near 100")


# ---------------------------------------------------------------------------------------------------------
# Expert-choice routing
# ---------------------------------------------------------------------------------------------------------


def _ec_cases() -> list[tuple[str, torch.Tensor, float]]:
    """(label, logits, cf): integer and fractional T·cf/N (5.25 tells ceil from round and floor), and ties."""
    g = torch.Generator().manual_seed(2209)
    tokens = 1.5 * torch.randn(3, 4, generator=g)  # 3 distinct tokens, each repeated 12 times: scores tie
    return [
        ("12 tokens x 4 experts, capacity factor 2", 1.5 * torch.randn(12, 4, generator=g), 2.0),
        ("11 tokens x 3 experts, capacity factor 1.5", 2.0 * torch.randn(11, 3, generator=g), 1.5),
        ("16 tokens x 8 experts, capacity factor 1", 1.0 * torch.randn(16, 8, generator=g), 1.0),
        ("14 tokens x 4 experts, capacity factor 1.5 (T·cf/N = 5.25)", 1.5 * torch.randn(14, 4, generator=g), 1.5),
        ("36 tokens x 4 experts, capacity factor 1, 3 different tokens repeated 12 times (tied scores)",
         tokens[torch.arange(36) % 3], 1.0),
    ]


def _ec_reference(logits: torch.Tensor, cf: float) -> tuple[torch.Tensor, torch.Tensor]:
    t, n = logits.shape
    return ref_expert_choice(logits.softmax(dim=-1), expert_choice_capacity(t, n, cf))


def _ec_mistakes(logits: torch.Tensor, c: int) -> list[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
    return [
        ("took the softmax over the tokens (dim=0); the gate is a softmax over each token's experts (dim=-1), "
         "then each expert picks tokens from its column", logits.softmax(dim=0).t().topk(c, dim=-1)),
        ("used the raw logits as weights; the weights are the softmax probabilities (over experts) of the "
         "chosen tokens", logits.t().topk(c, dim=-1)),
        ("picked the c lowest-scoring tokens; each expert takes its c highest (topk's largest=True)",
         logits.softmax(dim=-1).t().topk(c, dim=-1, largest=False)),
    ]


def _ec_shape(what: str, rows: int, cols: int, t: int, n: int, cf: float) -> None:
    """Name the mistake behind a (rows, cols) that is not (N, c)."""
    c = expert_choice_capacity(t, n, cf)
    if rows == t and cols != t:
        fail(f"{what} returned shape {(rows, cols)}: one row per token means you took the top entries of each "
             "token's row (over the experts, dim=-1), which is token choice. Each expert picks tokens: take "
             f"the top-c over the token axis of each expert's column, giving (N, c) = {(n, c)}")
    if (rows, cols) == (c, n) and c != n:
        fail(f"{what} returned shape {(c, n)}: transpose it so that row e lists the c tokens of expert e, "
             f"shape (N, c) = {(n, c)} (e.g. scores.t().topk(c, dim=-1))")
    if rows == n and cols != c:
        exact = t * cf / n
        if cols == max(1, math.ceil(t / n)) and cf != 1:
            fail(f"{what}: each expert took {cols} tokens = T/N, without the capacity factor; "
                 f"c = ceil(T·cf/N) = ceil({t}·{cf:g}/{n}) = {c}")
        if cols in (math.floor(exact), round(exact)):
            fail(f"{what}: each expert took {cols} tokens; round T·cf/N = {t}·{cf:g}/{n} = {exact:g} up: "
                 f"c = ceil(T·cf/N) = {c} (math.ceil, not int(), // or round(), which round down or to the nearest)")
        fail(f"{what}: each expert should take c = ceil(T·cf/N) = ceil({t}·{cf:g}/{n}) = {c} tokens, got {cols}")


def _ec_ties_only(weights: torch.Tensor, ids: torch.Tensor, scores_t: torch.Tensor, i_ref: torch.Tensor) -> int | None:
    """The first expert whose tokens differ from the reference's only among tokens of equal score, else None."""
    mine, ids = scores_t.gather(1, ids.long()), ids.long().sort(-1).values
    if not close(weights, mine) or not torch.equal(mine.sort(-1).values, scores_t.gather(1, i_ref).sort(-1).values):
        return None
    if bool((ids[:, 1:] == ids[:, :-1]).any()):  # a token taken twice is no tie-break
        return None
    differs = (ids != i_ref.sort(-1).values).any(-1).nonzero()
    return int(differs[0]) if len(differs) else None


def _ec_values(what: str, weights: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor, w_ref: torch.Tensor,
               i_ref: torch.Tensor) -> None:
    """Fail naming the mistake, a tie broken differently, or the first expert with the wrong tokens."""
    t, n = logits.shape
    if same_choices(weights, ids, w_ref, i_ref):
        return
    if ids.min() < 0 or ids.max() >= t:
        fail(f"{what}: token_ids must be token positions 0..{t - 1}, got values from {int(ids.min())} to "
             f"{int(ids.max())}")
    e = _ec_ties_only(weights, ids, logits.softmax(dim=-1).t(), i_ref)
    if e is not None:
        fail(f"{what}: expert {e} took tokens {sorted(ids[e].tolist())}, expected {sorted(i_ref[e].tolist())}. "
             "They differ only among tokens with equal scores (ties: repeated tokens get the same scores); ties "
             "must be broken as the reference does: take each expert's tokens with torch.topk, as sort-based "
             "selections (argsort(descending=True)[:, :c], or sorting ascending and taking the last c) pick other "
             "tokens among equal scores")
    for hint, (w_bad, i_bad) in _ec_mistakes(logits, i_ref.shape[1]):
        if same_choices(weights, ids, w_bad, i_bad):
            fail(f"{what}: it looks like you {hint}.")
    e = next(r for r in range(n) if not same_choices(weights[r:r + 1], ids[r:r + 1], w_ref[r:r + 1], i_ref[r:r + 1]))
    order, r_order = ids[e].long().argsort(), i_ref[e].argsort()
    fail(f"{what}: wrong (token, weight) pairs for expert {e}: expected tokens {i_ref[e][r_order].tolist()} with "
         f"weights {[round(v, 3) for v in w_ref[e][r_order].tolist()]}, got tokens {ids[e][order].tolist()} with "
         f"weights {[round(v, 3) for v in weights[e][order].tolist()]}")


def _ec_grad(what: str, weights: torch.Tensor, ids: torch.Tensor, given: torch.Tensor, logits: torch.Tensor,
             i_ref: torch.Tensor) -> None:
    """The weights' gradient w.r.t. the logits, entries paired by token id (the order within a row is free)."""
    if not weights.requires_grad:
        fail(f"{what}: the weights carry no gradient back to the logits; the router learns through them, so "
             + NO_GRAD)
    n, c = i_ref.shape
    perm, r_perm = ids.long().argsort(dim=-1), i_ref.argsort(dim=-1)
    probe = torch.linspace(-1.0, 1.0, n * c).reshape(n, c)
    grad = _grad((weights.gather(-1, perm) * probe).sum(), given)
    ref_logits = logits.clone().requires_grad_(True)
    w_ref2, _ = ref_expert_choice(ref_logits.softmax(dim=-1), c)
    ref_grad = _grad((w_ref2.gather(-1, r_perm) * probe).sum(), ref_logits)
    if grad is None or not close(grad, ref_grad):
        fail(f"{what}: the weights are right but their gradient with respect to the logits is not; compute "
             "them with differentiable torch operations (softmax, then topk)")


def expert_choice(fn: Callable[[torch.Tensor, float], Any]) -> None:
    """Check ``fn(logits (T, N), capacity_factor) -> (weights (N, c), token_ids (N, c))`` and its gradient."""
    for label, logits, cf in _ec_cases():
        t, n = logits.shape
        c = expert_choice_capacity(t, n, cf)
        what = f"expert_choice on {label}"
        given = logits.clone().requires_grad_(True)
        result = call_unchanged(fn, {"logits": given, "capacity_factor": cf}, what=what)
        weights, ids = weights_and_ids(result, what, "token_ids", "integer token positions")
        if weights.dim() != 2 or ids.dim() != 2:
            fail(f"{what} should return 2-D (N, c) tensors, got shapes {tuple(weights.shape)}, {tuple(ids.shape)}")
        _ec_shape(what, *weights.shape, t, n, cf)
        expect_shape(weights, (n, c), what + "'s weights")
        expect_shape(ids, (n, c), what + "'s token_ids")
        w_ref, i_ref = _ec_reference(logits, cf)
        _ec_values(what, weights.detach(), ids, logits, w_ref, i_ref)
        _ec_grad(what, weights, ids, given, logits, i_ref)
    ok("expert_choice", "softmax over experts, each expert takes its top-c tokens, c = ceil(T·cf/N), ties as topk")
