"""check.dispatch_combine, check.sort_by_expert and check.capacity_mask: references pass; mistakes are named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe_course import check, dispatch
from moe_course.check import CheckError
from moe_course.dispatch import capacity_mask, dispatch_dense, dispatch_loop, dispatch_sorted

# ---------------------------------------------------------------------------------------------------------
# dispatch_combine: learner-style loops with one mistake switched on
# ---------------------------------------------------------------------------------------------------------


def make_dispatch(mistake: str | None = None):
    def dispatch(x, weights, indices, experts):
        out = torch.zeros_like(x)
        for e, expert in enumerate(experts):
            token, slot = torch.where(indices == e)
            if token.numel() == 0:
                if mistake == "crash_on_empty":
                    raise IndexError(f"expert {e} has no tokens")
                continue
            if mistake in ("first_only", "first_two"):
                keep = slot < (1 if mistake == "first_only" else 2)
                token, slot = token[keep], slot[keep]
            if mistake == "detached_x":
                y = expert(x.detach()[token])
            elif mistake == "frozen_experts":  # the expert's weights used as constants
                params = {name: p.detach() for name, p in expert.named_parameters()}
                y = torch.func.functional_call(expert, params, (x[token],))
            else:
                y = expert(x[token])
            if mistake == "wrong_slot":
                w = weights[token, 1 - slot] if weights.shape[1] == 2 else weights[token, slot]
            elif mistake == "first_slot_weight":
                w = weights[token, 0]
            elif mistake == "detached_gate":
                w = weights.detach()[token, slot]
            elif mistake == "doubled_weight_grad":  # right forward, gradient only "non-zero"
                w = (weights.detach() + 2 * (weights - weights.detach()))[token, slot]
            else:
                w = weights[token, slot]
            if mistake != "no_weights":
                y = y * w.unsqueeze(-1)
            if mistake == "overwrite":
                out = out.index_copy(0, token, y)
            elif mistake == "detach":
                out = out.index_add(0, token, y.detach())
            else:
                out = out.index_add(0, token, y)
        return out

    return dispatch


def numpy_dispatch(x, weights, indices, experts, leaf=False):
    """The dense mixture computed in NumPy and turned back into a tensor: right values, no autograd."""
    outs = np.stack([expert(x).detach().numpy() for expert in experts], axis=1)  # (T, N, d)
    gates = np.zeros((x.shape[0], len(experts)), dtype=outs.dtype)
    np.add.at(gates, (np.arange(x.shape[0])[:, None], indices.numpy()), weights.detach().numpy())
    return torch.tensor((gates[..., None] * outs).sum(axis=1), requires_grad=leaf)


def overwrite_by_slot(x, weights, indices, experts):
    out = torch.zeros_like(x)
    for j in range(indices.shape[1]):
        for t in range(x.shape[0]):
            out[t] = weights[t, j] * experts[int(indices[t, j])](x[t])
    return out


def split_without_minlength(x, weights, indices, experts):
    """The sorted dispatch, but counts from bincount without minlength: breaks when the last expert is idle."""
    k = indices.shape[1]
    order = indices.reshape(-1).argsort(stable=True)
    counts = torch.bincount(indices.reshape(-1)).tolist()
    token_of = order // k
    chunks = x[token_of].split(counts)
    ys = torch.cat([expert(chunk) for expert, chunk in zip(experts, chunks, strict=True)])
    ys = ys * weights.reshape(-1)[order].unsqueeze(-1)
    return torch.zeros_like(x).index_add(0, token_of, ys)


@pytest.mark.parametrize("fn", [dispatch_dense, dispatch_loop, dispatch_sorted, make_dispatch()])
def test_references_pass(fn, capsys):
    check.dispatch_combine(fn)
    assert "OK  dispatch_combine" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (make_dispatch("no_weights"), "forgot to multiply each expert's output by its routing weight"),
        (make_dispatch("overwrite"), "overwrote the output instead of accumulating"),
        (overwrite_by_slot, "overwrote the output instead of accumulating"),
        (make_dispatch("first_only"), "only each token's first choice"),
        (make_dispatch("wrong_slot"), "other slot's weight"),
        (make_dispatch("first_slot_weight"), "first choice's weight"),
        (make_dispatch("crash_on_empty"), "experts 1 and 4 receive no token"),
        (split_without_minlength, "experts 1 and 4 receive no token"),
        (make_dispatch("first_two"), "only the first two choices"),
        (make_dispatch("detach"), "no gradient reaches x, weights and the experts' parameters"),
        (make_dispatch("detached_gate"), "no gradient reaches weights "),
        (make_dispatch("detached_x"), "no gradient reaches x "),
        (make_dispatch("frozen_experts"), "no gradient reaches the experts' parameters"),
        (make_dispatch("doubled_weight_grad"), "gradient with respect to weights is not"),
        (numpy_dispatch, "autograd cannot differentiate"),
        (lambda *args: numpy_dispatch(*args, leaf=True), "new leaf tensor"),
    ],
)
def test_dispatch_mistakes_are_named(fn, message):
    with pytest.raises(CheckError, match=message):
        check.dispatch_combine(fn)


def test_dispatch_wrong_shape():
    with pytest.raises(CheckError, match="has shape"):
        check.dispatch_combine(lambda x, w, i, e: x.sum(dim=0))


def test_dispatch_check_leaves_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check.dispatch_combine(dispatch_loop)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------------------
# sort_by_expert: the permutation of sorted dispatch, with one mistake switched on
# ---------------------------------------------------------------------------------------------------------


def make_sort(mistake: str | None = None):
    def sort_by_expert(indices, n_experts):
        t, k = indices.shape
        flat = indices.t().reshape(-1) if mistake == "slot_major" else indices.reshape(-1)
        if mistake == "descending":
            order = flat.argsort(descending=True, stable=True)
        elif mistake == "unstable":  # grouped by expert, but later tokens first within an expert
            order = (flat * flat.numel() - torch.arange(flat.numel())).argsort()
        elif mistake == "default_argsort":  # torch's default sort is not stable (it reorders ties above 16 pairs)
            order = flat.argsort()
        elif mistake == "sort_indices":
            order = torch.sort(flat).indices
        elif mistake == "sorts_in_place":  # sorts the caller's tensor through a view
            order = flat.argsort(stable=True)
            indices.view(-1).copy_(flat[order].clone())
        else:
            order = flat.argsort(stable=True)
        token_of = order % k if mistake == "modulo" else order // k
        if mistake == "no_minlength":
            counts = torch.bincount(flat)
        elif mistake == "per_token":
            counts = torch.bincount(token_of, minlength=n_experts)
        elif mistake == "float_counts":
            counts = torch.bincount(flat, minlength=n_experts).float()
        else:
            counts = torch.bincount(flat, minlength=n_experts)
        if mistake == "expert_ids":
            order = flat.sort().values
        if mistake == "token_is_order":
            token_of = order
        return order, token_of, counts

    return sort_by_expert


def sort_loop(indices, n_experts):
    """A plain-Python reference: walk the experts, collect their pairs in token order."""
    t, k = indices.shape
    order = [t_ * k + j for e in range(n_experts) for t_ in range(t) for j in range(k) if indices[t_, j] == e]
    counts = [int((indices == e).sum()) for e in range(n_experts)]
    return torch.tensor(order), torch.tensor(order) // k, counts


@pytest.mark.parametrize("fn", [make_sort(), sort_loop, dispatch.sort_by_expert])
def test_sort_references_pass(fn, capsys):
    check.sort_by_expert(fn)
    assert "OK  sort_by_expert" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (make_sort("descending"), "descending order"),
        (make_sort("unstable"), "use a stable sort"),
        (make_sort("default_argsort"), "64 tokens.*changes their order within an expert; use a stable sort"),
        (make_sort("sort_indices"), "64 tokens.*use a stable sort"),
        (make_sort("sorts_in_place"), "changed its input indices .*in place"),
        (make_sort("modulo"), "order % k gives the slot"),
        (make_sort("token_is_order"), "divide by k"),
        (make_sort("no_minlength"), "bincount without minlength"),
        (make_sort("slot_major"), "flattened slot-major"),
        (make_sort("per_token"), "pairs per token"),
        (make_sort("float_counts"), "counts has dtype torch.float32"),
        (make_sort("expert_ids"), "not a permutation"),
        (lambda indices, n: indices.reshape(-1).argsort(stable=True), "should return a tuple"),
    ],
)
def test_sort_mistakes_are_named(fn, message):
    with pytest.raises(CheckError, match=message):
        check.sort_by_expert(fn)


# ---------------------------------------------------------------------------------------------------------
# capacity_mask
# ---------------------------------------------------------------------------------------------------------


def make_capacity(mistake: str | None = None):
    def mask(indices, n_experts, capacity):
        t, k = indices.shape
        if mistake == "token_major":
            order = indices.reshape(-1)
        elif mistake == "latest_tokens":
            order = indices.flip(0).t().reshape(-1)
        else:
            order = indices.t().reshape(-1)
        onehot = F.one_hot(order, n_experts)
        if mistake == "per_token":
            position = torch.arange(k).repeat_interleave(t)
        elif mistake == "global":
            position = torch.arange(t * k)
        else:
            position = ((onehot.cumsum(dim=0) - 1) * onehot).sum(dim=-1)
        if mistake == "inclusive_lt":  # the hint's inclusive cumsum (first arrival counts 1), compared with <
            keep = position + 1 < capacity
        elif mistake == "zero_based_le":  # 0-based places compared with <=
            keep = position <= capacity
        elif mistake == "plus_one":
            keep = position <= capacity
        elif mistake == "minus_one":
            keep = position < capacity - 1
        else:
            keep = position < capacity
        if mistake == "token_major":
            return keep.reshape(t, k)
        if mistake == "latest_tokens":
            return keep.reshape(k, t).t().flip(0)
        if mistake == "transposed":
            return keep.reshape(k, t)
        if mistake == "no_transpose_back":  # rank order reshaped straight to (T, k)
            return keep.reshape(t, k)
        if mistake == "int":
            return keep.reshape(k, t).t().long()
        return keep.reshape(k, t).t()

    return mask


def keep_last_arrivals(indices, n_experts, capacity):
    t, k = indices.shape
    order = indices.t().reshape(-1).flip(0)
    onehot = F.one_hot(order, n_experts)
    position = ((onehot.cumsum(dim=0) - 1) * onehot).sum(dim=-1)
    return (position < capacity).flip(0).reshape(k, t).t()


def loop_reference(indices, n_experts, capacity):
    keep = torch.zeros_like(indices, dtype=torch.bool)
    used = [0] * n_experts
    for j in range(indices.shape[1]):
        for t in range(indices.shape[0]):
            e = int(indices[t, j])
            if used[e] < capacity:
                keep[t, j] = True
                used[e] += 1
    return keep


@pytest.mark.parametrize("fn", [capacity_mask, make_capacity(), loop_reference])
def test_capacity_references_pass(fn, capsys):
    check.capacity_mask(fn)
    assert "OK  capacity_mask" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (make_capacity("token_major"), "first choice must claim a slot before any second choice"),
        (make_capacity("plus_one"), "capacity \\+ 1"),
        (make_capacity("minus_one"), "capacity - 1"),
        (make_capacity("inclusive_lt"), r"capacity - 1 assignments \(off by one\)\. The cumulative sum counts each "
                                        r"assignment itself .* count <= capacity"),
        (make_capacity("zero_based_le"), r"capacity \+ 1 assignments .* place < capacity"),
        (make_capacity("per_token"), "per token instead of per expert"),
        (make_capacity("global"), "one counter for all experts"),
        (make_capacity("latest_tokens"), "dropped the earliest tokens"),
        (keep_last_arrivals, "dropped the earliest assignments"),
        (make_capacity("transposed"), "transpose back"),
        (make_capacity("no_transpose_back"), r"reshaped the rank-order mask .* straight to \(T, k\).*"
                                             r"\.reshape\(k, t\)\.t\(\)"),
        (make_capacity("int"), "return a bool tensor"),
    ],
)
def test_capacity_mistakes_are_named(fn, message):
    with pytest.raises(CheckError, match=message):
        check.capacity_mask(fn)
