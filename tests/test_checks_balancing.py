"""Notebook 04's checks: switch_aux_loss, router_z_loss and expert_choice pass the reference, name each mistake."""

from __future__ import annotations

import math
import re

import pytest
import torch

from moe_course import check
from moe_course.balancing import router_z_loss, switch_aux_loss
from moe_course.check import CheckError
from moe_course.check.balancing import _ec_cases
from moe_course.routing import expert_choice, expert_choice_capacity


def _match(message: str) -> str:
    return re.escape(message)


def _counts(indices, n):
    return torch.bincount(indices.reshape(-1), minlength=n).to(torch.float32)


# ---------------------------------------------------------------------------------------------------------
# switch_aux_loss


def aux_reference(probs, indices, n):
    return switch_aux_loss(probs, indices, n)


def aux_one_hot(probs, indices, n):  # the same loss written with one_hot
    t, k = indices.shape
    f = torch.nn.functional.one_hot(indices, n).sum(dim=(0, 1)).float() / (t * k)
    return n * (f * probs.mean(dim=0)).sum()


def aux_f_over_t(probs, indices, n):
    return n * (_counts(indices, n) / indices.shape[0] * probs.mean(dim=0)).sum()


def aux_p_from_topk(probs, indices, n):
    t, k = indices.shape
    mask = torch.zeros_like(probs).scatter(1, indices, 1.0)
    return n * (_counts(indices, n) / (t * k) * (probs * mask).sum(dim=0) / t).sum()


def aux_p_from_renormalised_weights(probs, indices, n):
    t, k = indices.shape
    w = probs.gather(1, indices)
    w = w / w.sum(dim=-1, keepdim=True)
    p = torch.zeros_like(probs).scatter(1, indices, w).sum(dim=0) / t
    return n * (_counts(indices, n) / (t * k) * p).sum()


def aux_missing_n(probs, indices, n):
    t, k = indices.shape
    return (_counts(indices, n) / (t * k) * probs.mean(dim=0)).sum()


def aux_mean_over_experts(probs, indices, n):
    t, k = indices.shape
    return n * (_counts(indices, n) / (t * k) * probs.mean(dim=0)).mean()


def aux_f_is_p(probs, indices, n):
    p = probs.mean(dim=0)
    return n * (p * p).sum()


def aux_soft_counts(probs, indices, n):
    t, k = indices.shape
    mask = torch.zeros_like(probs).scatter(1, indices, 1.0)
    return n * ((probs * mask).sum(dim=0) / (t * k) * probs.mean(dim=0)).sum()


def aux_grad_through_f(probs, indices, n):  # right value, but f carries a (straight-through) gradient
    t, k = indices.shape
    mask = torch.zeros_like(probs).scatter(1, indices, 1.0)
    hard = _counts(indices, n) / (t * k)
    soft = (probs * mask).sum(dim=0) / (t * k)
    f = hard + soft - soft.detach()
    return n * (f * probs.mean(dim=0)).sum()


def aux_first_choice_only(probs, indices, n):
    f = torch.bincount(indices[:, 0], minlength=n).float() / indices.shape[0]
    return n * (f * probs.mean(dim=0)).sum()


def aux_item(probs, indices, n):
    return switch_aux_loss(probs, indices, n).item()


def aux_vector(probs, indices, n):
    t, k = indices.shape
    return n * _counts(indices, n) / (t * k) * probs.mean(dim=0)


def aux_floor_division(probs, indices, n):  # integer counts // (T·k): every fᵢ becomes 0
    t, k = indices.shape
    f = torch.bincount(indices.reshape(-1), minlength=n) // (t * k)
    return n * (f * probs.mean(dim=0)).sum()


def aux_floor_mean(probs, indices, n):  # Pᵢ = probs.sum(0) // T
    t, k = indices.shape
    return n * (_counts(indices, n) / (t * k) * (probs.sum(dim=0) // t)).sum()


def aux_normalises_probs_in_place(probs, indices, n):  # autograd refuses: a leaf that requires grad
    probs.div_(probs.sum(dim=-1, keepdim=True))
    return switch_aux_loss(probs, indices, n)


def aux_detaches_probs_in_place(probs, indices, n):  # "f carries no gradient" done with detach_()
    loss = switch_aux_loss(probs, indices, n)
    probs.detach_()
    return loss


def aux_squeezes_indices_in_place(probs, indices, n):  # squeeze_() changes the caller's (T, 1) indices
    t = indices.shape[0]
    indices.squeeze_(-1)
    return switch_aux_loss(probs, indices.reshape(t, -1), n)


def aux_no_minlength(probs, indices, n):  # right: experts bincount leaves out have fᵢ = 0
    t, k = indices.shape
    f = torch.bincount(indices.reshape(-1)).float() / (t * k)
    return n * (f * probs.mean(dim=0)[: f.numel()]).sum()


def test_switch_aux_loss_reference_passes(capsys):
    check.switch_aux_loss(aux_reference)
    check.switch_aux_loss(aux_one_hot)
    check.switch_aux_loss(aux_no_minlength)
    assert capsys.readouterr().out.count("OK  switch_aux_loss") == 3


def test_switch_aux_loss_is_one_under_uniform_routing():
    probs = torch.full((8, 4), 0.25)
    indices = torch.tensor([[0, 1], [2, 3]] * 4)
    assert switch_aux_loss(probs, indices, 4).item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (aux_f_over_t, "counted fᵢ over the T tokens instead of the T·k assignments"),
        (aux_p_from_topk, "took Pᵢ from the top-k weights"),
        (aux_p_from_renormalised_weights, "took Pᵢ from the renormalised top-k weights"),
        (aux_missing_n, "left out the factor N"),
        (aux_mean_over_experts, "left out the factor N"),
        (aux_f_is_p, "used Pᵢ in place of fᵢ"),
        (aux_soft_counts, "a soft count"),
        (aux_grad_through_f, "fᵢ must carry no gradient"),
        (aux_first_choice_only, "only each token's first choice"),
        (aux_item, "no gradient reaches the router probabilities"),
        (aux_vector, "should return one number"),
        (aux_floor_division, "divided with floor division (// or rounding_mode='floor')"),
        (aux_floor_mean, "divided with floor division (// or rounding_mode='floor')"),
        (aux_normalises_probs_in_place, "switch_aux_loss on 12 tokens x 5 experts, k=2 changed its input probs "
                                        "(its values: probs["),
        (aux_detaches_probs_in_place, "changed its input probs (its requires_grad, from True to False) in place: "
                                      "requires_grad_() and detach_() change the caller's tensor"),
        (aux_squeezes_indices_in_place, "switch_aux_loss on 9 tokens x 4 experts, k=1 changed its input indices (its "
                                        "shape, from (9, 1) to (9,)) in place"),
    ],
)
def test_switch_aux_loss_mistakes_are_named(fn, message):
    with pytest.raises(CheckError, match=_match(message)):
        check.switch_aux_loss(fn)


# ---------------------------------------------------------------------------------------------------------
# router_z_loss


def z_reference(logits):
    return router_z_loss(logits)


def z_by_hand(logits):  # the stable formula written out
    m = logits.amax(dim=-1, keepdim=True)
    lse = m.squeeze(-1) + (logits - m).exp().sum(dim=-1).log()
    return lse.square().mean()


def z_max(logits):
    return logits.amax(dim=-1).square().mean()


def z_no_square(logits):
    return torch.logsumexp(logits, dim=-1).mean()


def z_sum(logits):
    return torch.logsumexp(logits, dim=-1).square().sum()


def z_over_tokens(logits):
    return torch.logsumexp(logits, dim=0).square().mean()


def z_squared_logits(logits):
    return logits.square().mean()


def z_square_of_mean(logits):
    return torch.logsumexp(logits, dim=-1).mean().square()


def z_naive(logits):
    return logits.exp().sum(dim=-1).log().square().mean()


def z_detached(logits):
    return torch.logsumexp(logits.detach(), dim=-1).square().mean()


def z_floor_mean(logits):
    return torch.logsumexp(logits, dim=-1).square().sum() // logits.shape[0]


def z_shifts_logits_in_place(logits):  # the max trick done in place: autograd refuses (a leaf)
    logits.sub_(logits.amax(dim=-1, keepdim=True).detach())
    return torch.logsumexp(logits, dim=-1).square().mean()


def z_shifts_data_in_place(logits):  # the same through .data, which autograd does not see
    logits.data -= logits.data.amax(dim=-1, keepdim=True)
    return torch.logsumexp(logits, dim=-1).square().mean()


def test_router_z_loss_reference_passes(capsys):
    check.router_z_loss(z_reference)
    check.router_z_loss(z_by_hand)
    assert capsys.readouterr().out.count("OK  router_z_loss") == 2


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (z_max, "used the largest logit instead of logsumexp"),
        (z_no_square, "did not square the logsumexp"),
        (z_sum, "summed over the tokens instead of averaging"),
        (z_over_tokens, "logsumexp over the tokens (dim=0)"),
        (z_squared_logits, "penalised the squared logits themselves"),
        (z_square_of_mean, "squared the mean logsumexp"),
        (z_naive, "exp(100) overflows float32"),
        (z_detached, "no gradient reaches the logits"),
        (z_floor_mean, "router_z_loss on 7 tokens x 5 experts: got 7.0000, expected 7.4189. It looks like you "
                       "divided the sum by T with floor division"),
        (z_shifts_logits_in_place, "router_z_loss on 7 tokens x 5 experts changed its input logits (its values: "
                                   "logits[0][0] went from"),
        (z_shifts_data_in_place, "changed its input logits (its values"),
    ],
)
def test_router_z_loss_mistakes_are_named(fn, message):
    with pytest.raises(CheckError, match=_match(message)):
        check.router_z_loss(fn)


# ---------------------------------------------------------------------------------------------------------
# expert_choice


def ec_reference(logits, cf):
    t, n = logits.shape
    return expert_choice(logits.softmax(dim=-1), expert_choice_capacity(t, n, cf))


def ec_topk_dim0(logits, cf):  # the same thing, transposed afterwards
    t, n = logits.shape
    w, i = logits.softmax(dim=-1).topk(math.ceil(t * cf / n), dim=0)
    return w.t(), i.t()


def ec_token_choice_axis(logits, cf):
    t, n = logits.shape
    return logits.softmax(dim=-1).topk(min(n, math.ceil(t * cf / n)), dim=-1)


def ec_not_transposed(logits, cf):
    t, n = logits.shape
    return logits.softmax(dim=-1).topk(math.ceil(t * cf / n), dim=0)


def ec_no_capacity_factor(logits, cf):
    t, n = logits.shape
    return logits.softmax(dim=-1).t().topk(math.ceil(t / n), dim=-1)


def ec_floor(logits, cf):
    t, n = logits.shape
    return logits.softmax(dim=-1).t().topk(int(t * cf / n), dim=-1)


def ec_softmax_over_tokens(logits, cf):
    t, n = logits.shape
    return logits.softmax(dim=0).t().topk(math.ceil(t * cf / n), dim=-1)


def ec_raw_logits(logits, cf):
    t, n = logits.shape
    return logits.t().topk(math.ceil(t * cf / n), dim=-1)


def ec_lowest(logits, cf):
    t, n = logits.shape
    return logits.softmax(dim=-1).t().topk(math.ceil(t * cf / n), dim=-1, largest=False)


def ec_detached(logits, cf):
    return ec_reference(logits.detach(), cf)


def ec_swapped(logits, cf):
    w, i = ec_reference(logits, cf)
    return i, w


def ec_round(logits, cf):
    t, n = logits.shape
    return logits.softmax(dim=-1).t().topk(round(t * cf / n), dim=-1)


def ec_integer_division(logits, cf):
    t, n = logits.shape
    return logits.softmax(dim=-1).t().topk(int(t * cf) // n, dim=-1)


def ec_exp_in_place(logits, cf):  # autograd refuses exp_ on a leaf; the check names the input
    t, n = logits.shape
    e = logits.exp_()
    return (e / e.sum(dim=-1, keepdim=True)).t().topk(math.ceil(t * cf / n), dim=-1)


def ec_softmax_written_out(logits, cf):  # right: ties stay ties, topk picks the same tokens
    t, n = logits.shape
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp()
    return (e / e.sum(dim=-1, keepdim=True)).t().topk(math.ceil(t * cf / n), dim=-1)


def ec_one_wrong_token(logits, cf):  # expert 2 of the 14-token case takes a token it should not
    w, i = ec_reference(logits, cf)
    if logits.shape[0] == 14:
        i = i.clone()
        i[2, 0] = next(t for t in range(14) if t not in i[2])
    return w, i


def _selected(scores, order, c):
    return scores.gather(-1, order[:, :c]), order[:, :c]


def ec_stable_sort(logits, cf):  # ties: the lowest token ids first
    t, n = logits.shape
    s = logits.softmax(dim=-1).t()
    return _selected(s, s.sort(dim=-1, descending=True, stable=True).indices, math.ceil(t * cf / n))


def ec_unstable_argsort(logits, cf):
    t, n = logits.shape
    s = logits.softmax(dim=-1).t()
    return _selected(s, s.argsort(dim=-1, descending=True), math.ceil(t * cf / n))


def ec_last_of_ascending(logits, cf):  # ties: the highest token ids first
    t, n = logits.shape
    s = logits.softmax(dim=-1).t()
    return _selected(s, s.argsort(dim=-1, stable=True).flip(-1), math.ceil(t * cf / n))


def ec_swaps_a_tie(logits, cf):
    """The reference's tokens, but each expert swaps one chosen token for a tied one the reference left out."""
    w, i = ec_reference(logits, cf)
    s, i = logits.softmax(dim=-1).t(), i.clone()
    for e in range(i.shape[0]):
        chosen = set(i[e].tolist())
        for j in range(i.shape[1]):
            tied = [t for t in range(s.shape[1]) if t not in chosen and s[e, t] == s[e, i[e, j]]]
            if tied:
                i[e, j] = tied[0]
                break
    return w, i


def test_expert_choice_reference_passes(capsys):
    check.expert_choice(ec_reference)
    check.expert_choice(ec_topk_dim0)
    check.expert_choice(ec_softmax_written_out)
    assert capsys.readouterr().out.count("OK  expert_choice") == 3


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (ec_token_choice_axis, "which is token choice"),
        (ec_not_transposed, "transpose it"),
        (ec_no_capacity_factor, "without the capacity factor"),
        (ec_floor, "round T·cf/N"),
        (ec_softmax_over_tokens, "softmax over the tokens (dim=0)"),
        (ec_raw_logits, "used the raw logits as weights"),
        (ec_lowest, "c lowest-scoring tokens"),
        (ec_detached, "carry no gradient"),
        (ec_swapped, "order (weights, token_ids)"),
        (ec_round, "expert_choice on 14 tokens x 4 experts, capacity factor 1.5 (T·cf/N = 5.25): each expert took 5 "
                   "tokens; round T·cf/N = 14·1.5/4 = 5.25 up: c = ceil(T·cf/N) = 6"),
        (ec_integer_division, "each expert took 5 tokens; round T·cf/N = 11·1.5/3 = 5.5 up"),
        (ec_exp_in_place, "expert_choice on 12 tokens x 4 experts, capacity factor 2 changed its input logits (its "
                          "values"),
        (ec_one_wrong_token, "expert_choice on 14 tokens x 4 experts, capacity factor 1.5 (T·cf/N = 5.25): wrong "
                             "(token, weight) pairs for expert 2"),
        (ec_swaps_a_tie, "ties must be broken as the reference does"),
    ],
)
def test_expert_choice_mistakes_are_named(fn, message):
    with pytest.raises(CheckError, match=_match(message)):
        check.expert_choice(fn)


@pytest.mark.parametrize("fn", [ec_stable_sort, ec_unstable_argsort, ec_last_of_ascending])
def test_expert_choice_sort_based_tie_breaks_are_named(fn):
    _, logits, cf = _ec_cases()[-1]
    assert "tied scores" in _ec_cases()[-1][0]
    if torch.equal(fn(logits, cf)[1].sort(-1).values, ec_reference(logits, cf)[1].sort(-1).values):
        pytest.skip("this build's topk breaks these ties like this selection does")
    with pytest.raises(CheckError, match=_match("3 different tokens repeated 12 times (tied scores): expert ")) as info:
        check.expert_choice(fn)
    assert "They differ only among tokens with equal scores" in str(info.value)
    assert "ties must be broken as the reference does: take each expert's tokens with torch.topk" in str(info.value)


def test_unfinished_stubs_raise_not_implemented():
    def stub(*args):
        raise NotImplementedError()

    for c in (check.switch_aux_loss, check.router_z_loss, check.expert_choice):
        with pytest.raises(NotImplementedError):
            c(stub)
