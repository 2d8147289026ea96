"""check.send_counts, check.rank_order and check.dispatch_bytes: references pass; plausible mistakes are named."""

from __future__ import annotations

import pytest
import torch

from moe_course import check
from moe_course.check import CheckError
from moe_course.parallel import dispatch_bytes, rank_order, send_counts

# ---------------------------------------------------------------------------------------------------------
# send_counts
# ---------------------------------------------------------------------------------------------------------


def counts_variant(mistake: str | None):
    def fn(indices, n_experts, world):
        flat = indices.reshape(-1)
        per = n_experts // world
        if mistake == "per_expert":
            return torch.bincount(flat, minlength=n_experts)
        if mistake == "round_robin":
            return torch.bincount(flat % world, minlength=world)
        if mistake == "no_minlength":
            return torch.bincount(flat // per)
        if mistake == "divide_by_world":
            return torch.bincount(flat // world, minlength=world)[:world]
        if mistake == "tokens":
            hit = torch.zeros(indices.shape[0], world, dtype=torch.long).scatter(1, indices // per, 1)
            return hit.sum(0)
        if mistake == "float":
            return torch.bincount(flat // per, minlength=world).float()
        return torch.bincount(flat // per, minlength=world)

    return fn


def test_send_counts_accepts_reference_and_learner_style(capsys):
    check.send_counts(send_counts)
    check.send_counts(counts_variant(None))
    check.send_counts(lambda idx, e, w: torch.stack([((idx // (e // w)) == r).sum() for r in range(w)]))
    assert capsys.readouterr().out.count("OK  send_counts") == 3


@pytest.mark.parametrize("mistake, message", [
    ("per_expert", "counts per expert"),
    ("round_robin", "round-robin"),
    ("no_minlength", "without minlength"),
    ("divide_by_world", "divided the expert id by the number of ranks"),
    ("tokens", "counted tokens, not (token, expert) pairs"),
    ("float", "dtype torch.float32"),
])
def test_send_counts_names_mistakes(mistake, message):
    with pytest.raises(CheckError, match=None) as info:
        check.send_counts(counts_variant(mistake))
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# rank_order
# ---------------------------------------------------------------------------------------------------------


def order_variant(mistake: str | None):
    def fn(indices, n_experts, world):
        flat = indices.reshape(-1)
        dest = flat // (n_experts // world)
        n = flat.numel()
        if mistake == "by_expert":
            order = flat.argsort(stable=True)
        elif mistake == "unstable":  # grouped by rank, but the last pairs first inside each rank
            order = (dest * n + (n - 1 - torch.arange(n))).argsort()
        elif mistake == "round_robin":
            order = (flat % world).argsort(stable=True)
        elif mistake == "descending":
            order = (-dest).argsort(stable=True)
        elif mistake == "ranks_not_positions":
            order = dest.sort().values
        else:
            order = dest.argsort(stable=True)
        inverse = order.argsort()
        if mistake == "inverse_is_order":
            inverse = order.argsort().argsort()
        elif mistake == "inverse_twice":
            inverse = inverse[inverse]
        elif mistake == "inverse_wrong":
            inverse = order.flip(0)
        return order, inverse

    return fn


def test_rank_order_accepts_reference_and_scatter_inverse(capsys):
    check.rank_order(rank_order)
    check.rank_order(order_variant(None))
    assert capsys.readouterr().out.count("OK  rank_order") == 2


@pytest.mark.parametrize("mistake, message", [
    ("by_expert", "you sorted by expert id"),
    ("unstable", "the sort is unstable"),
    ("round_robin", "round-robin"),
    ("descending", "puts the last rank first"),
    ("ranks_not_positions", "not a permutation"),
    ("inverse_is_order", "inverse equals order"),
    ("inverse_twice", "applied the inverse permutation twice"),
    ("inverse_wrong", "inverse does not undo order"),
])
def test_rank_order_names_mistakes(mistake, message):
    with pytest.raises(CheckError) as info:
        check.rank_order(order_variant(mistake))
    assert message in str(info.value)


def test_rank_order_rejects_wrong_return_type():
    with pytest.raises(CheckError, match="should return a tuple"):
        check.rank_order(lambda idx, e, w: idx.reshape(-1).argsort())


# ---------------------------------------------------------------------------------------------------------
# dispatch_bytes
# ---------------------------------------------------------------------------------------------------------


def bytes_variant(mistake: str | None):
    def fn(indices, n_experts, world, rank, d_model, bytes_per_element):
        per = n_experts // world
        counts = torch.bincount(indices.reshape(-1) // per, minlength=world)
        rows = int(counts.sum() - counts[rank])
        if mistake == "own_rank":
            rows = int(counts.sum())
        if mistake == "round_robin":
            rr = torch.bincount(indices.reshape(-1) % world, minlength=world)
            rows = int(rr.sum() - rr[rank])
        if mistake == "tokens":
            hit = torch.zeros(indices.shape[0], world, dtype=torch.long).scatter(1, indices // per, 1).sum(0)
            rows = int(hit.sum() - hit[rank])
        if mistake == "elements":
            return rows * d_model
        if mistake == "no_d":
            return rows * bytes_per_element
        if mistake == "both":
            return 2 * rows * d_model * bytes_per_element
        if mistake == "string":
            return f"{rows * d_model * bytes_per_element} bytes"
        return rows * d_model * bytes_per_element

    return fn


def test_dispatch_bytes_accepts_reference(capsys):
    check.dispatch_bytes(dispatch_bytes)
    check.dispatch_bytes(bytes_variant(None))
    check.dispatch_bytes(lambda *a: torch.tensor(dispatch_bytes(*a)))
    assert capsys.readouterr().out.count("OK  dispatch_bytes") == 3


@pytest.mark.parametrize("mistake, message", [
    ("own_rank", "rows that stay on this rank"),
    ("elements", "returned elements, not bytes"),
    ("both", "counted both all-to-alls"),
    ("round_robin", "round-robin"),
    ("tokens", "counted tokens, not (token, expert) pairs"),
    ("no_d", "forgot d_model"),
    ("string", "should return a number of bytes"),
])
def test_dispatch_bytes_names_mistakes(mistake, message):
    with pytest.raises(CheckError) as info:
        check.dispatch_bytes(bytes_variant(mistake))
    assert message in str(info.value)
