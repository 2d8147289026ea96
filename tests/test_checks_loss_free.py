"""check.bias_update, check.biased_topk, check.group_limited_topk: the references pass; mistakes are named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_course import check
from moe_course.balancing import bias_update
from moe_course.check import CheckError
from moe_course.routing import group_limited_mask, sigmoid_topk

# ---------------------------------------------------------------------------------------------------------
# bias_update
# ---------------------------------------------------------------------------------------------------------


def _counts(bias, routing):
    return torch.bincount(routing.indices.reshape(-1), minlength=bias.shape[0]).to(bias.dtype)


def bias_reference(bias, routing, u):
    return bias_update(bias, routing.counts(bias.shape[0]), u)


def bias_in_place(bias, routing, u):
    c = _counts(bias, routing)
    bias += u * torch.sign(c.mean() - c)
    return bias


def sign_reversed(bias, routing, u):
    c = _counts(bias, routing)
    return bias + u * torch.sign(c - c.mean())


def from_scores(bias, routing, u):
    s = routing.scores.sum(dim=0)
    return bias + u * torch.sign(s.mean() - s)


def from_scores_detached(bias, routing, u):
    s = routing.scores.detach().mean(dim=0)
    return bias + u * torch.sign(s.mean() - s)


def weighted_counts(bias, routing, u):
    c = torch.zeros_like(bias).index_add(0, routing.indices.reshape(-1), routing.weights.detach().reshape(-1))
    return bias + u * torch.sign(c.mean() - c)


def gradient_step(bias, routing, u):
    b = bias.clone().requires_grad_(True)
    opt = torch.optim.SGD([b], lr=u)
    c = _counts(bias, routing)
    (b * (c - c.mean())).sum().backward()
    opt.step()
    return b.detach()


def as_parameter(bias, routing, u):
    return nn.Parameter(bias_reference(bias, routing, u))


def requires_grad(bias, routing, u):
    return bias_reference(bias, routing, u) + 0.0 * routing.scores.sum()


def only_delta(bias, routing, u):
    c = _counts(bias, routing)
    return u * torch.sign(c.mean() - c)


def ties_move(bias, routing, u):
    c = _counts(bias, routing)
    return bias + torch.where(c < c.mean(), u, -u)


def test_bias_update_reference_passes(capsys):
    check.bias_update(bias_reference)
    check.bias_update(bias_in_place)  # an in-place update, as the layer's buffer gets, is fine
    assert capsys.readouterr().out.startswith("OK  bias_update")


@pytest.mark.parametrize(("fn", "message"), [
    (sign_reversed, "reversed the sign"),
    (from_scores, "scores instead of their counts"),
    (from_scores_detached, "scores instead of their counts"),
    (weighted_counts, "weighted the counts by the combine weights"),
    (gradient_step, "gradient step"),
    (as_parameter, "nn.Parameter"),
    (requires_grad, "requires grad"),
    (only_delta, "returned only the change"),
    (ties_move, "sign(0) = 0"),
    (lambda b, r, u: None, "returned None"),
    (lambda b, r, u: b, "expected"),
])
def test_bias_update_rejects(fn, message):
    with pytest.raises(CheckError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check.bias_update(fn)


def test_bias_update_rule_of_the_package():
    b = bias_update(torch.zeros(3), torch.tensor([5, 1, 3]), 0.1)
    assert b.tolist() == pytest.approx([-0.1, 0.1, 0.0])


# ---------------------------------------------------------------------------------------------------------
# biased_topk
# ---------------------------------------------------------------------------------------------------------


def _renorm(w):
    return w / w.sum(-1, keepdim=True)


def topk_reference(logits, bias, k):
    return sigmoid_topk(logits, k, bias)


def topk_written_out(logits, bias, k):
    s = logits.sigmoid()
    idx = (s + bias).topk(k, dim=-1).indices
    return _renorm(s.gather(-1, idx)), idx


def bias_in_weights(logits, bias, k):
    c = logits.sigmoid() + bias
    idx = c.topk(k, dim=-1).indices
    return _renorm(c.gather(-1, idx)), idx


def not_renormalised(logits, bias, k):
    s = logits.sigmoid()
    idx = (s + bias).topk(k, dim=-1).indices
    return s.gather(-1, idx), idx


def bias_ignored(logits, bias, k):
    return sigmoid_topk(logits, k)


def bias_on_logits(logits, bias, k):
    idx = (logits + bias).sigmoid().topk(k, dim=-1).indices
    return _renorm(logits.sigmoid().gather(-1, idx)), idx


def softmax_gate(logits, bias, k):
    p = logits.softmax(-1)
    idx = (p + bias).topk(k, dim=-1).indices
    return _renorm(p.gather(-1, idx)), idx


def bias_gets_gradient(logits, bias, k):
    w, idx = topk_reference(logits, bias.detach(), k)
    return w + 0.01 * (bias.gather(0, idx.reshape(-1)).reshape(idx.shape) - bias.detach().gather(
        0, idx.reshape(-1)).reshape(idx.shape)) * 100, idx


def detached(logits, bias, k):
    w, i = topk_reference(logits.detach(), bias.detach(), k)
    return w, i


def straight_through(logits, bias, k):
    w, i = topk_reference(logits, bias, k)
    return w.detach() + (w - w.detach()) * 2, i


def test_biased_topk_reference_passes(capsys):
    check.biased_topk(topk_reference)
    check.biased_topk(topk_written_out)
    assert capsys.readouterr().out.count("OK  biased_topk") == 2


@pytest.mark.parametrize(("fn", "message"), [
    (bias_in_weights, "added the bias to the combine weights"),
    (not_renormalised, "did not renormalise"),
    (bias_ignored, "ignored the bias when choosing"),
    (bias_on_logits, "before the sigmoid"),
    (softmax_gate, "used a softmax"),
    (bias_gets_gradient, "gradient reaches the bias"),
    (detached, "autograd"),
    (straight_through, "gradient with respect to the logits"),
])
def test_biased_topk_rejects(fn, message):
    with pytest.raises(CheckError, match=message):
        check.biased_topk(fn)


# ---------------------------------------------------------------------------------------------------------
# group_limited_topk
# ---------------------------------------------------------------------------------------------------------


def group_reference(logits, bias, k, n_groups, topk_groups):
    return sigmoid_topk(logits, k, bias, n_groups=n_groups, topk_groups=topk_groups)


def group_written_out(logits, bias, k, n_groups, topk_groups):
    s = logits.sigmoid()
    choice = s + bias
    t, n = choice.shape
    group_scores = choice.view(t, n_groups, -1).topk(2, dim=-1).values.sum(-1)  # (T, G)
    keep = torch.zeros_like(group_scores).scatter(1, group_scores.topk(topk_groups, dim=-1).indices, 1.0)
    choice = choice.masked_fill(keep.repeat_interleave(n // n_groups, dim=1) == 0, float("-inf"))
    idx = choice.topk(k, dim=-1).indices
    return _renorm(s.gather(-1, idx)), idx


def _group_variant(score="top2", fill=float("-inf"), use_bias=True, layout="contiguous"):
    def fn(logits, bias, k, n_groups, topk_groups):
        s = logits.sigmoid()
        choice = s + bias
        t, n = choice.shape
        source = choice if use_bias else s
        grouped = source.view(t, n_groups, -1) if layout == "contiguous" else \
            source.view(t, -1, n_groups).transpose(1, 2)
        if score == "max":
            gs = grouped.amax(-1)
        elif score == "sum":
            gs = grouped.sum(-1)
        else:
            gs = grouped.topk(2, dim=-1).values.sum(-1)
        outside = torch.ones_like(gs, dtype=torch.bool).scatter(1, gs.topk(topk_groups, dim=-1).indices, False)
        mask = outside.repeat_interleave(n // n_groups, 1) if layout == "contiguous" else \
            outside.repeat(1, n // n_groups)
        idx = choice.masked_fill(mask, fill).topk(k, dim=-1).indices
        return _renorm(s.gather(-1, idx)), idx
    return fn


def groups_ignored(logits, bias, k, n_groups, topk_groups):
    return sigmoid_topk(logits, k, bias)


def test_group_limited_reference_passes(capsys):
    check.group_limited_topk(group_reference)
    check.group_limited_topk(group_written_out)
    assert capsys.readouterr().out.count("OK  group_limited_topk") == 2


@pytest.mark.parametrize(("fn", "message"), [
    (_group_variant(score="max"), r"single best expert \(max\)"),
    (_group_variant(score="sum"), "sum of all its experts"),
    (_group_variant(use_bias=False), "unbiased scores"),
    (_group_variant(layout="round-robin"), "round-robin"),
    (_group_variant(fill=0.0), "fill with -inf"),
    (groups_ignored, "did not limit the tokens"),
])
def test_group_limited_rejects(fn, message):
    with pytest.raises(CheckError, match=message):
        check.group_limited_topk(fn)


def test_group_mask_of_the_package_uses_top2_sums():
    # group 0 = experts 0-1 (0.9 + 0.0), group 1 = experts 2-3 (0.5 + 0.5): top-2 sum prefers group 1, max group 0
    choice = torch.tensor([[0.9, 0.0, 0.5, 0.5]])
    assert group_limited_mask(choice, 2, 1, biased=True).tolist() == [[True, True, False, False]]
    assert group_limited_mask(choice, 2, 1, biased=False).tolist() == [[False, False, True, True]]
