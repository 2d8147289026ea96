"""Checks for notebook 01 (Jacobs, Jordan, Nowlan & Hinton, 1991): ``check.gating_forward`` and
``check.competitive_loss``.

Learner signatures
------------------
``my_gate(x, W, b) -> p``
    ``x`` (C, d_in) inputs, one row per case, ``W`` (d_in, n_experts) weights, ``b`` (n_experts,) bias. Returns
    the gate probabilities p (C, n_experts): a softmax over the experts of ``x @ W + b``, so every row sums to 1.

``my_loss(p, o, d) -> loss``
    ``p`` (C, n) gate probabilities, ``o`` (C, n, d_out) expert outputs, ``d`` (C, d_out) targets. Returns
    the competitive error of the paper (eq. 1.3), E = -log sum_i p_i exp(-1/2 ||d - o_i||^2), **averaged
    over the cases**, as a 0-d tensor that autograd can differentiate. It must stay finite when the errors
    are large, which needs ``torch.logsumexp``.

Each check compares with the reference implementation on small fixed inputs and, when the answer is
wrong, recomputes the usual mistakes to name the one that was made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moe_course import local_experts as _ref
from moe_course.check._core import as_tensor, call, close, compare_grads, expect_shape, fail, ok

__all__ = ["gating_forward", "competitive_loss"]


def _fixed(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * scale


def _first_match(got: torch.Tensor, variants: list[tuple[str, torch.Tensor]]) -> str | None:
    for message, wrong in variants:
        if tuple(wrong.shape) == tuple(got.shape) and close(got, wrong, atol=1e-5, rtol=1e-4):
            return message
    return None


# ----------------------------------------------------------------------------------------------------------
# check.gating_forward
# ----------------------------------------------------------------------------------------------------------

GATE_SIGNATURE = "my_gate(x, W, b) with x (N, d_in), W (d_in, n_experts), b (n_experts,)"


def _gate_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # 5 samples, 3 input features, 4 experts: every axis has its own size, so axis mix-ups show.
    x = _fixed((5, 3), seed=11)
    W = _fixed((3, 4), seed=12)
    b = torch.tensor([0.8, -0.6, 0.3, -1.1])
    return x, W, b


def _gate_mistakes(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    z = x @ W + b
    return [
        ("you took the softmax over the samples (dim=0), so each column sums to 1; the gate chooses among "
         "experts, so normalise each row: softmax over the last dimension (dim=-1)", z.softmax(dim=0)),
        ("you returned the logits x @ W + b; apply a softmax over the experts to turn them into probabilities",
         z),
        ("you used a sigmoid; sigmoids give independent numbers in (0, 1) that do not sum to 1. The gate needs "
         "a softmax over the experts", torch.sigmoid(z)),
        ("you forgot the bias b: the logits are x @ W + b", (x @ W).softmax(dim=-1)),
        ("you returned log-probabilities (log_softmax); return the probabilities themselves", z.log_softmax(-1)),
        ("you took the softmax over the samples and forgot the bias b", (x @ W).softmax(dim=0)),
    ]


def gating_forward(fn: Callable[..., Any]) -> None:
    """Check ``my_gate(x, W, b) -> p``: the softmax over experts of ``x @ W + b`` (see the module docstring)."""
    x, W, b = _gate_inputs()
    expected = (x @ W + b).softmax(dim=-1)
    mine = {"x": x.clone().requires_grad_(True), "W": W.clone().requires_grad_(True),
            "b": b.clone().requires_grad_(True)}
    got = as_tensor(call(fn, *mine.values(), what=GATE_SIGNATURE), "my_gate")
    if tuple(got.shape) == (4, 5):
        fail("my_gate returned shape (n_experts, cases) = (4, 5); return one row per case: shape (cases, n_experts)")
    expect_shape(got, (5, 4), "my_gate(x, W, b) with 5 cases and 4 experts")
    if not torch.isfinite(got).all():
        fail("my_gate returned nan or inf on small, ordinary inputs")
    if not close(got, expected):
        hint = _first_match(got, _gate_mistakes(x, W, b))
        if hint:
            fail(f"my_gate gives wrong probabilities: {hint}.")
        if not close(got.sum(dim=-1), torch.ones(5)):
            fail("the rows of p do not sum to 1; the gate probabilities of one input must add up to 1 over "
                 "the experts")
        fail("my_gate differs from softmax(x @ W + b, dim=-1), although each row sums to 1; check the logits "
             "(x @ W + b, with W of shape (d_in, n_experts))")
    theirs = {name: t.detach().clone().requires_grad_(True) for name, t in mine.items()}
    compare_grads("my_gate", got, (theirs["x"] @ theirs["W"] + theirs["b"]).softmax(dim=-1), mine, theirs)
    # Large logits: a softmax written as exp(z) / exp(z).sum() overflows to inf/inf = nan.
    big = x * 400.0
    expected_big = (big @ W + b).softmax(dim=-1)
    got_big = as_tensor(call(fn, big, W.clone(), b.clone(), what=GATE_SIGNATURE), "my_gate")
    if not torch.isfinite(got_big).all():
        fail("my_gate returns nan or inf when the logits are large (about 1000): exp overflows. Subtract each "
             "row's maximum logit before exp (the result does not change), or use torch.softmax(z, dim=-1)")
    if not close(got_big, expected_big):
        fail("my_gate is right on small inputs but wrong when the logits are large (about 1000); subtract the "
             "row maximum before exp, or use torch.softmax(z, dim=-1)")
    ok("gating_forward", "rows sum to 1, softmax over the experts, stable for large logits")


# ----------------------------------------------------------------------------------------------------------
# check.competitive_loss
# ----------------------------------------------------------------------------------------------------------

LOSS_SIGNATURE = "my_loss(p, o, d) with p (N, n), o (N, n, d_out), d (N, d_out)"


def _loss_inputs(scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # 4 cases, 3 experts, 2 output dimensions; errors of order 1 so that every mistake changes the value.
    p = _fixed((4, 3), seed=21, scale=1.5).softmax(dim=-1)
    o = _fixed((4, 3, 2), seed=22) * scale
    d = _fixed((4, 2), seed=23)
    return p, o, d


def _loss_mistakes(p: torch.Tensor, o: torch.Tensor, d: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    sq = (d.unsqueeze(1) - o).pow(2).sum(dim=-1)  # (N, n): ||d - o_i||^2
    n_cases, n_experts = p.shape
    reference = -(p * torch.exp(-0.5 * sq)).sum(-1).log().mean()
    return [
        ("this is the cooperative error ||d - sum_i p_i o_i||^2 (eq. 1.1), which blends the experts before "
         "comparing with d. The competitive error compares each expert with d on its own: "
         "-log sum_i p_i exp(-1/2 ||d - o_i||^2)", _ref.cooperative_loss(p, o, d)),
        ("you forgot the log: the error is -log sum_i p_i exp(-1/2 ||d - o_i||^2), not -sum_i p_i exp(...)",
         -(p * torch.exp(-0.5 * sq)).sum(-1).mean()),
        ("you forgot the 1/2 in the exponent: exp(-1/2 ||d - o_i||^2) (a Gaussian with unit variance)",
         -(p * torch.exp(-sq)).sum(-1).log().mean()),
        (f"you summed over the cases; return the mean over the cases (here {n_cases} of them, so your value is "
         f"{n_cases} times too large)", reference * n_cases),
        ("you left out the gate probabilities: each expert's term exp(-1/2 ||d - o_i||^2) must be weighted by "
         "its p_i inside the sum", -torch.exp(-0.5 * sq).sum(-1).log().mean()),
        ("you used the squared errors without the gate weights p_i (and without the -log sum exp); the "
         "competitive error is -log sum_i p_i exp(-1/2 ||d - o_i||^2)", sq.sum(-1).mean()),
        ("you used the squared errors without the gate weights p_i (and without the -log sum exp); the "
         "competitive error is -log sum_i p_i exp(-1/2 ||d - o_i||^2)", 0.5 * sq.sum(-1).mean()),
        ("you used the squared errors without the gate weights p_i (and without the -log sum exp); the "
         "competitive error is -log sum_i p_i exp(-1/2 ||d - o_i||^2)", sq.mean()),
        ("this is the weighted squared error sum_i p_i ||d - o_i||^2 (eq. 1.2 of the paper); the competitive "
         "error of eq. 1.3 is its Gaussian version -log sum_i p_i exp(-1/2 ||d - o_i||^2)",
         (p * sq).sum(-1).mean()),
        ("this is sum_i p_i * 1/2 ||d - o_i||^2, the weighted squared error (eq. 1.2) with a 1/2; the "
         "competitive error is -log sum_i p_i exp(-1/2 ||d - o_i||^2)", 0.5 * (p * sq).sum(-1).mean()),
        ("you used the norm ||d - o_i|| instead of the squared norm ||d - o_i||^2 in the exponent",
         -(p * torch.exp(-0.5 * sq.sqrt())).sum(-1).log().mean()),
        ("the sign is wrong: the error is MINUS the log-likelihood, -log sum_i p_i exp(...)", -reference),
        ("you averaged over the experts inside the log; the mixture sums p_i exp(...) over the experts "
         "(the p_i already sum to 1)", reference + torch.log(torch.tensor(float(n_experts)))),
    ]


def _scalar(value: torch.Tensor, n_cases: int) -> torch.Tensor:
    if tuple(value.shape) == (n_cases,):
        fail(f"my_loss returned one value per case (shape ({n_cases},)); return the mean over the cases, "
             "a single number (0-d tensor)")
    if value.numel() != 1:
        fail(f"my_loss should return a single number (the mean over the cases), got shape {tuple(value.shape)}")
    return value.reshape(())


def competitive_loss(fn: Callable[..., Any]) -> None:
    """Check ``my_loss(p, o, d) -> loss``: the mean over cases of -log sum_i p_i exp(-1/2 ||d - o_i||^2)."""
    p, o, d = _loss_inputs()
    expected = _ref.competitive_loss(p, o, d)
    mine = {name: t.clone().requires_grad_(True) for name, t in (("p", p), ("o", o), ("d", d))}
    got = as_tensor(call(fn, *mine.values(), what=LOSS_SIGNATURE), "my_loss")
    got = _scalar(got, p.shape[0])
    if not torch.isfinite(got):
        fail("my_loss returned nan or inf on small, ordinary inputs")
    if not close(got, expected):
        hint = _first_match(got.detach(), _loss_mistakes(p, o, d))
        if hint:
            fail(f"my_loss gave {float(got.detach()):.4f}, expected {float(expected):.4f}: {hint}.")
        fail(f"my_loss gave {float(got.detach()):.4f}, expected {float(expected):.4f}. The competitive error of "
             "one case is -log sum_i p_i exp(-1/2 ||d - o_i||^2) with the squared norm taken over the output "
             "dimension; return its mean over the cases")
    theirs = {name: t.detach().clone().requires_grad_(True) for name, t in mine.items()}
    compare_grads("my_loss", got, _ref.competitive_loss(*theirs.values()), mine, theirs)
    # Large errors: exp(-1/2 * 1250) underflows to 0, so -log(sum) = inf unless computed with logsumexp.
    p_far, o_far, d_far = _loss_inputs(scale=50.0)
    expected_far = _ref.competitive_loss(p_far, o_far, d_far)
    got_far = _scalar(as_tensor(call(fn, p_far, o_far, d_far, what=LOSS_SIGNATURE), "my_loss"), p.shape[0])
    if not torch.isfinite(got_far):
        fail("my_loss returns inf (or nan) when the errors are large (||d - o_i||^2 around 5000): exp underflows "
             "to 0 and log(0) = -inf. Compute it as -torch.logsumexp(torch.log(p) - 0.5 * sq_err, dim=-1).mean()")
    if not close(got_far, expected_far, rtol=1e-4, atol=1e-3):
        fail(f"my_loss is right for small errors but gives {float(got_far):.2f} instead of "
             f"{float(expected_far):.2f} for large ones; use torch.logsumexp over log p_i - 1/2 ||d - o_i||^2")
    ok("competitive_loss", f"{float(expected):.4f} on the test case, stable for large errors")
