"""check.send_counts, check.rank_order and check.dispatch_bytes: references pass; plausible mistakes are named."""

from __future__ import annotations

import pytest
import torch

from moe_course import check
from moe_course.check import CheckError
from moe_course.check.parallel import _cases
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
        if mistake == "in_place":  # reshape(-1) of the contiguous indices is a view: //= changes the caller's
            flat //= per
            return torch.bincount(flat, minlength=world)
        if mistake == "reversed":
            return torch.bincount(world - 1 - flat // per, minlength=world)
        if mistake == "one_off":  # right except rank 1 of the 48-pair case
            counts = torch.bincount(flat // per, minlength=world)
            return counts + torch.tensor([0, 1, 0]) if flat.numel() == 48 else counts
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
    ("in_place", "send_counts on 6 tokens, 8 experts on 4 ranks, k=2 (rank 2 gets nothing) changed its input indices "
                 "(its values: indices[0][0] went from 7 to 3) in place"),
    ("reversed", "the counts are in reverse rank order ([4, 0, 4, 4], expected [4, 4, 0, 4])"),
    ("one_off", "send_counts on 24 tokens, 6 experts on 3 ranks, k=2 (48 pairs: 18, 17 and 13 for ranks 0, 1, 2, many "
                "ties): rank 1 should get 17 pairs, got 18"),
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
        elif mistake == "argsort_unstable":
            order = dest.argsort()
        elif mistake == "last_first_in_rank":  # ties broken the other way: a descending stable sort, reversed
            order = dest.argsort(descending=True, stable=True).flip(0)
        elif mistake == "column_major":
            order = (indices.t().reshape(-1) // (n_experts // world)).argsort(stable=True)
        elif mistake == "divide_by_world":
            order = (flat // world).argsort(stable=True)
        elif mistake == "in_place":
            flat //= n_experts // world
            order = flat.argsort(stable=True)
        else:
            order = dest.argsort(stable=True)
        inverse = order.argsort()
        if mistake == "inverse_is_order":
            inverse = order.argsort().argsort()
        elif mistake == "inverse_twice":
            inverse = inverse[inverse]
        elif mistake == "inverse_wrong":
            inverse = order.flip(0)
        elif mistake == "inverse_one_off" and n == 48:
            inverse = inverse.clone()
            inverse[[5, 6]] = inverse[[6, 5]]
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
    ("last_first_in_rank", "rank_order on 6 tokens, 8 experts on 4 ranks, k=2 (rank 2 gets nothing): order groups the "
                           "pairs by destination rank but not in token order inside a rank: the sort is unstable; use "
                           "argsort(stable=True). position 0 of order holds pair 9 (token 4's choice 1, for rank 0), "
                           "expected pair 1 (token 0's choice 1, for rank 0): ties (pairs for the same rank) must be "
                           "broken as the reference does, by pair number"),
    ("column_major", "you numbered the pairs column by column (indices.t().reshape(-1))"),
    ("divide_by_world", "rank_order on 6 tokens, 8 experts on 4 ranks, k=2 (rank 2 gets nothing): you divided the "
                        "expert id by the number of ranks (4)"),
    ("in_place", "rank_order on 6 tokens, 8 experts on 4 ranks, k=2 (rank 2 gets nothing) changed its input indices "
                 "(its values"),
    ("inverse_one_off", "rank_order on 24 tokens, 6 experts on 3 ranks, k=2 (48 pairs: 18, 17 and 13 for ranks 0, 1, "
                        "2, many ties): inverse does not undo order (pairs[order][inverse] must equal pairs): pair 5 "
                        "sits at position"),
])
def test_rank_order_names_mistakes(mistake, message):
    with pytest.raises(CheckError) as info:
        check.rank_order(order_variant(mistake))
    assert message in str(info.value)


def test_rank_order_names_a_real_unstable_sort():
    label, indices, n_experts, world = _cases()[-1]
    assert indices.numel() >= 32 and "many ties" in label  # shorter inputs are sorted stably even by argsort()
    dest = indices.reshape(-1) // (n_experts // world)
    if torch.equal(dest.argsort(), dest.argsort(stable=True)):
        pytest.skip("this build's default sort keeps these ties in order")
    with pytest.raises(CheckError) as info:
        check.rank_order(order_variant("argsort_unstable"))
    message = str(info.value)
    assert f"rank_order on {label}: order groups the pairs by destination rank but not in token order" in message
    assert "ties (pairs for the same rank) must be broken as the reference does" in message


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
        if mistake == "rank_zero":  # counts[0] equals counts[rank] in every case but the 48-pair one
            rows = int(counts.sum() - counts[0])
        if mistake == "mirrored_rank":
            rows = int(counts.sum() - counts[world - 1 - rank])
        if mistake == "previous_rank":
            rows = int(counts.sum() - counts[rank - 1])
        if mistake == "in_place":
            flat = indices.reshape(-1)
            flat //= per
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
    ("rank_zero", "dispatch_bytes on 24 tokens, 6 experts on 3 ranks, k=2 (48 pairs: 18, 17 and 13 for ranks 0, 1, 2, "
                  "many ties), seen from rank 2, d=8, 2 byte(s) per element: got 480, expected 560: you subtracted "
                  "counts[0], the rows for rank 0; the rows that stay home are this rank's, counts[rank] = counts[2]"),
    ("mirrored_rank", "dispatch_bytes on 6 tokens, 8 experts on 4 ranks, k=2 (rank 2 gets nothing), seen from rank 1, "
                      "d=64, 2 byte(s) per element: got 1536, expected 1024: you counted the rows that stay on this "
                      "rank too; rows for its own experts never leave it: subtract counts[rank] (or subtracted "
                      "counts[2] of rank 2, which receives nothing, instead of this rank's counts[1])"),
    ("previous_rank", "dispatch_bytes on 7 tokens, 4 experts on 2 ranks, k=1, seen from rank 0, d=48, 4 byte(s) per "
                      "element: got 576, expected 768: you subtracted counts[1], the rows for rank 1"),
    ("in_place", "seen from rank 1, d=64, 2 byte(s) per element changed its input indices (its values"),
])
def test_dispatch_bytes_names_mistakes(mistake, message):
    with pytest.raises(CheckError) as info:
        check.dispatch_bytes(bytes_variant(mistake))
    assert message in str(info.value)
