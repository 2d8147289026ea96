"""check.bias_update, check.biased_topk, check.group_limited_topk: the references pass; mistakes are named."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from moe_course import check
from moe_course.balancing import bias_update
from moe_course.check import CheckError
from moe_course.check.loss_free import _group_cases, _topk_cases
from moe_course.routing import group_limited_mask, sigmoid_topk

# ---------------------------------------------------------------------------------------------------------
# bias_update
# ---------------------------------------------------------------------------------------------------------


def _counts(bias, routing):
    return torch.bincount(routing.indices.reshape(-1), minlength=bias.shape[0]).to(bias.dtype)


def bias_reference(bias, routing, u):
    return bias_update(bias, routing.counts(bias.shape[0]), u)


def no_minlength(bias, routing, u):
    c = torch.bincount(routing.indices.reshape(-1)).to(bias.dtype)
    return bias + u * torch.sign(c.mean() - c)


def no_minlength_mean_of_n(bias, routing, u):  # the mean right, the counts still short
    c = torch.bincount(routing.indices.reshape(-1)).to(bias.dtype)
    return bias + u * torch.sign(routing.indices.numel() / bias.shape[0] - c)


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


def bias_add_in_place(bias, routing, u):
    c = _counts(bias, routing)
    return bias.add_(u * torch.sign(c.mean() - c))


def reassigns_routing_indices(bias, routing, u):  # a field of the caller's Routing replaced
    routing.indices = routing.indices.reshape(-1)
    c = torch.bincount(routing.indices, minlength=bias.shape[0]).to(bias.dtype)
    return bias + u * torch.sign(c.mean() - c)


def mean_by_floor_division(bias, routing, u):
    c = torch.bincount(routing.indices.reshape(-1), minlength=bias.shape[0])
    return bias + u * torch.sign(c.sum() // c.numel() - c)


def mean_rounded(bias, routing, u):
    c = _counts(bias, routing)
    return bias + u * torch.sign(round(c.mean().item()) - c)


def first_choice_only(bias, routing, u):
    c = torch.bincount(routing.indices[:, 0], minlength=bias.shape[0]).to(bias.dtype)
    return bias + u * torch.sign(c.mean() - c)


def one_expert_off(bias, routing, u):  # right except expert 4 of the 9-token case
    new = bias_reference(bias, routing, u)
    return new + torch.eye(bias.shape[0])[4] * 0.5 if routing.indices.shape == (9, 2) else new


def test_bias_update_reference_passes(capsys):
    check.bias_update(bias_reference)
    assert capsys.readouterr().out.startswith("OK  bias_update")


@pytest.mark.parametrize(("fn", "message"), [
    (sign_reversed, "reversed the sign"),
    (no_minlength, "bias_update on 9 tokens, k=2, 6 experts, u=1e-3 raised RuntimeError (The size of tensor a (6) "
                   "must match the size of tensor b (5)"),
    (no_minlength, "the counts have fewer entries than there are experts: torch.bincount stops at the last expert "
                   "used"),
    (no_minlength_mean_of_n, "minlength=n_experts"),
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
    (bias_in_place, "bias_update on 9 tokens, k=2, 6 experts, u=1e-3 changed its input bias (its values: bias[0] went "
                    "from 0.1 to 0.099) in place"),
    (bias_add_in_place, "changed its input bias (its values"),
    (reassigns_routing_indices, "changed its input routing.indices (its shape, from (9, 2) to (18,)) in place: assign "
                                "to local variables, not to the fields or items of an input"),
    (mean_by_floor_division, "bias_update on 10 tokens, k=2, 6 experts, u=0.02, mean count 20/6: it looks like you "
                             "rounded the mean count to an integer (// or round()): c̄ = T·k/N = 20/6 = 3.33 is a "
                             "fraction, so an expert with 3 assignments is below it"),
    (mean_rounded, "mean count 20/6: it looks like you rounded the mean count to an integer"),
    (first_choice_only, "bias_update on 9 tokens, k=2, 6 experts, u=1e-3: it looks like you counted only each token's "
                        "first choice"),
    (one_expert_off, "bias_update on 9 tokens, k=2, 6 experts, u=1e-3: expert 4 (5 assignments, mean c̄ = 3) got 0.499, "
                     "expected -0.001"),
])
def test_bias_update_rejects(fn, message):
    with pytest.raises(CheckError, match=re.escape(message)):
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


def weights_from_topk_values(logits, bias, k):
    s = logits.sigmoid()
    return _renorm(s.topk(k, dim=-1).values), (s + bias).topk(k, dim=-1).indices


def sigmoid_in_place(logits, bias, k):  # autograd refuses sigmoid_ on a leaf; the check names the input
    s = logits.sigmoid_()
    idx = (s + bias).topk(k, dim=-1).indices
    return _renorm(s.gather(-1, idx)), idx


def detaches_bias_in_place(logits, bias, k):  # "no gradient into the bias", done with detach_()
    return topk_reference(logits, bias.detach_(), k)


def indices_sorted_alone(logits, bias, k):  # the weights stay in topk's order: pairs broken
    w, i = topk_reference(logits, bias, k)
    return w, i.sort(dim=-1).values


def token_two_wrong(logits, bias, k):  # one expert of token 2 replaced in the k=3 case
    w, i = topk_reference(logits, bias, k)
    if i.shape == (6, 3):
        i = i.clone()
        i[2, 0] = next(e for e in range(8) if e not in i[2])
    return w, i


def _swap_a_tie(logits, bias, indices, allowed):
    """indices with, in the first token that has one, a chosen expert swapped for an allowed, unchosen, tied one."""
    s = logits.sigmoid()
    choice, indices = s + bias, indices.clone()
    for t in range(indices.shape[0]):
        for j, e in enumerate(indices[t].tolist()):
            tied = [f for f in range(choice.shape[1]) if f not in indices[t] and allowed[t, f]
                    and choice[t, f] == choice[t, e]]
            if tied:
                indices[t, j] = tied[0]
                return _renorm(s.gather(-1, indices)), indices
    raise AssertionError("no tie to swap")


def topk_swaps_a_tie(logits, bias, k):
    w, i = topk_reference(logits, bias, k)
    return (w, i) if logits.shape != (10, 8) else _swap_a_tie(logits, bias, i, torch.ones(10, 8, dtype=torch.bool))


def topk_stable_sort(logits, bias, k):  # ties: the lowest expert ids first
    s = logits.sigmoid()
    idx = (s + bias).sort(dim=-1, descending=True, stable=True).indices[:, :k]
    return _renorm(s.gather(-1, idx)), idx


def topk_last_of_ascending(logits, bias, k):  # ties: the highest expert ids first
    s = logits.sigmoid()
    idx = (s + bias).argsort(dim=-1, stable=True).flip(-1)[:, :k]
    return _renorm(s.gather(-1, idx)), idx


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
    (weights_from_topk_values, re.escape("took the weights from s.topk(k), the k largest unbiased scores")),
    (sigmoid_in_place, r"biased_topk on 7 tokens x 5 experts, k=2 changed its input logits \(its values"),
    (detaches_bias_in_place, r"changed its input bias \(its requires_grad, from True to False\) in place"),
    (indices_sorted_alone, r"biased_topk on 7 tokens x 5 experts, k=2: token \d has the right experts and the right "
                           r"weights, but not paired"),
    (token_two_wrong, r"biased_topk on 6 tokens x 8 experts, k=3: wrong experts chosen\. Token 2 should get experts"),
    (topk_swaps_a_tie, r"many tied scores\): token \d+ got experts .*They differ only among experts with equal biased "
                       "scores s \\+ b \\(ties\\); ties must be broken as the reference does"),
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


def group_sigmoid_in_place(logits, bias, k, n_groups, topk_groups):
    s = logits.sigmoid_()
    return group_reference(s.logit(), bias, k, n_groups, topk_groups)


def group_swaps_a_tie(logits, bias, k, n_groups, topk_groups):
    w, i = group_reference(logits, bias, k, n_groups, topk_groups)
    if "tied" not in _case_of(logits):
        return w, i
    outside = group_limited_mask(logits.sigmoid() + bias, n_groups, topk_groups, biased=True)
    return _swap_a_tie(logits, bias, i, ~outside)


def _case_of(logits):
    return next(label for label, lg, *_ in _group_cases() if torch.equal(lg, logits.detach()))


def group_stable_sort(logits, bias, k, n_groups, topk_groups):  # groups and experts: the lowest ids first
    s = logits.sigmoid()
    choice = s + bias
    t, n = choice.shape
    gs = choice.view(t, n_groups, -1).sort(dim=-1, descending=True, stable=True).values[..., :2].sum(-1)
    best = gs.sort(dim=-1, descending=True, stable=True).indices[:, :topk_groups]
    outside = torch.ones(t, n_groups, dtype=torch.bool).scatter(1, best, False).repeat_interleave(n // n_groups, 1)
    idx = choice.masked_fill(outside, float("-inf")).sort(dim=-1, descending=True, stable=True).indices[:, :k]
    return _renorm(s.gather(-1, idx)), idx


def group_k_groups(logits, bias, k, n_groups, topk_groups):  # k where topk_groups belongs (equal in one case)
    return group_reference(logits, bias, k, n_groups, min(k, n_groups))


def group_token_wrong(logits, bias, k, n_groups, topk_groups):  # token 5 of the first case takes a masked expert
    w, i = group_reference(logits, bias, k, n_groups, topk_groups)
    if logits.shape == (10, 12):
        i = i.clone()
        i[5, 0] = next(e for e in range(12) if e not in i[5] and (e // 3) not in (i[5] // 3))
    return w, i


@pytest.mark.parametrize(("fn", "message"), [
    (group_sigmoid_in_place, r"group_limited_topk on 10 tokens, 12 experts in 4 groups, top-2 groups, k=3 changed its "
                             r"input logits \(its values"),
    (group_swaps_a_tie, r"tied expert and group scores\): token \d+ got experts .*They differ only among experts "
                        r"with equal biased scores s \+ b or group scores \(ties\); ties must be broken as the "
                        "reference does"),
    (group_k_groups, r"group_limited_topk on 10 tokens, 12 experts in 4 groups, top-2 groups, k=3: it looks like you "
                     r"did not limit the tokens to their best groups \(or kept too many, e\.g\. k groups instead of "
                     r"topk_groups\)"),
    (group_token_wrong, r"top-2 groups, k=3: wrong experts chosen\. Token 5 should get experts"),
])
def test_group_limited_rejects_more(fn, message):
    with pytest.raises(CheckError, match=message):
        check.group_limited_topk(fn)


def _same_sets(a, b):
    return torch.equal(a.sort(-1).values, b.sort(-1).values)


@pytest.mark.parametrize("fn", [topk_stable_sort, topk_last_of_ascending])
def test_biased_topk_sort_based_tie_breaks_are_named(fn):
    label, logits, bias, k = _topk_cases()[-1]
    assert "many tied scores" in label
    if _same_sets(fn(logits, bias, k)[1], topk_reference(logits, bias, k)[1]):
        pytest.skip("this build's topk breaks these ties like this selection does")
    with pytest.raises(CheckError, match="ties must be broken as the reference does: choose with torch.topk"):
        check.biased_topk(fn)


def test_group_limited_sort_based_tie_break_is_named():
    label, logits, bias, k, g, tg = _group_cases()[-1]
    assert "tied expert and group scores" in label
    if _same_sets(group_stable_sort(logits, bias, k, g, tg)[1], group_reference(logits, bias, k, g, tg)[1]):
        pytest.skip("this build's topk breaks these ties like a stable sort")
    with pytest.raises(CheckError, match=r"or group scores \(ties\); ties must be broken as the reference does"):
        check.group_limited_topk(group_stable_sort)


def test_group_mask_of_the_package_uses_top2_sums():
    # group 0 = experts 0-1 (0.9 + 0.0), group 1 = experts 2-3 (0.5 + 0.5): top-2 sum prefers group 1, max group 0
    choice = torch.tensor([[0.9, 0.0, 0.5, 0.5]])
    assert group_limited_mask(choice, 2, 1, biased=True).tolist() == [[True, True, False, False]]
    assert group_limited_mask(choice, 2, 1, biased=False).tolist() == [[False, False, True, True]]


# --- bias_training_loop (★★★) -------------------------------------------------------------------------


def _bias_loop(variant: str = "right"):
    """A learner's training loop, right or with one mistake."""
    def loop(model, batches, u, lr):
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        pending = {}
        for x, y in batches:
            if variant == "late":
                with torch.no_grad():
                    for i, layer in enumerate(model.moe_layers()):
                        if i in pending:
                            layer.router.expert_bias += u * torch.sign(pending[i].mean() - pending[i])
            _, loss = model(x, y)
            if variant != "no zero_grad":
                opt.zero_grad()
            loss.backward()
            if variant != "no step":
                opt.step()
            with torch.no_grad():
                for i, layer in enumerate(model.moe_layers()):
                    idx = layer.last_routing.indices
                    if variant == "top-1":
                        idx = idx[:, :1]
                    c = torch.bincount(idx.reshape(-1), minlength=layer.n_experts).float()
                    if variant == "late":
                        pending[i] = c
                        continue
                    if variant == "first layer" and i:
                        continue
                    step = {"reversed": torch.sign(c - c.mean()), "proportional": (c.mean() - c) / c.mean(),
                            "greater-or-equal": torch.where(c >= c.mean(), -1.0, 1.0),
                            "tokens mean": torch.sign(idx.shape[0] / layer.n_experts - c)}.get(
                        variant, torch.sign(c.mean() - c))
                    if variant == "rebound":
                        bias = layer.router.expert_bias
                        bias = bias + u * step  # a new tensor on a local name: the buffer never changes  # noqa: F841
                        continue
                    layer.router.expert_bias += u * step
                    if variant == "in-place batches":
                        x.zero_()
    return loop


def test_bias_training_loop_accepts_the_reference(capsys):
    check.bias_training_loop(_bias_loop())
    assert capsys.readouterr().out.startswith("OK  bias_training_loop")


@pytest.mark.parametrize(("variant", "message"), [
    ("reversed", "wrong way"),
    ("proportional", "exactly ±u"),
    ("late", "one step late"),
    ("top-1", "first choice"),
    ("first layer", "only the first MoE layer"),
    ("no zero_grad", "zero_grad"),
    ("no step", "optimizer.step()"),
    ("greater-or-equal", "expert_bias is"),  # an expert exactly at the mean must keep its bias (top-4 of 4)
    ("in-place batches", "changed its input batches"),
    ("tokens mean", "k·T / N"),
    ("rebound", "never changed the router's bias"),
])
def test_bias_training_loop_names_each_mistake(variant, message):
    with pytest.raises(check.CheckError, match=re.escape(message)):
        check.bias_training_loop(_bias_loop(variant))


def test_bias_training_loop_rejects_a_trained_bias():
    def as_parameter(model, batches, u, lr):
        for layer in model.moe_layers():
            bias = layer.router.expert_bias
            del layer.router.expert_bias
            layer.router.expert_bias = torch.nn.Parameter(bias.clone())
        _bias_loop()(model, batches, u, lr)

    with pytest.raises(check.CheckError, match="nn.Parameter"):
        check.bias_training_loop(as_parameter)
