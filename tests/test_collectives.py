"""collectives.run sends a function's source to real gloo processes; send_tokens is the exchange it teaches."""

import pytest
import torch
import torch.distributed as dist

from moe_course import collectives
from moe_course.parallel import RankFailed


def hello(scale):
    """Each rank sends scale·rank + j to rank j (the notebook's first all-to-all)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    send = torch.tensor([scale * rank + j for j in range(world)])
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    return recv.tolist()


def exchange(x, dest, world):
    from moe_course.collectives import send_tokens  # the ranks see only this function's source

    return send_tokens(x, dest, world)


def test_run_sends_the_source_and_every_rank_receives_one_number_from_each():
    assert collectives.run(hello, 3, 10) == [[0, 10, 20], [1, 11, 21], [2, 12, 22]]


def test_send_tokens_delivers_rows_grouped_by_source_in_order():
    for world, seed, skip in ((2, 0, None), (3, 1, 2), (4, 3, 0)):
        inputs = collectives.exchange_inputs(world, seed, skip_rank=skip)
        got = collectives.run(exchange, world, world, args_by_rank=inputs)
        want = collectives.expected_received(inputs)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        if skip is not None:
            assert got[skip].shape == (0, 2)
        # every row arrives exactly once, at the rank it was sent to
        arrived = sorted(p for out in got for p in collectives.row_origins(out))
        assert arrived == sorted((r, i) for r, (x, _) in enumerate(inputs) for i in range(x.shape[0]))


def test_exchange_inputs_are_uneven_with_ties():
    inputs = collectives.exchange_inputs(3, 0)
    assert [x.shape[0] for x, _ in inputs] == [5, 7, 9]
    assert all(torch.bincount(d, minlength=3).max() > 1 for _, d in inputs)


def test_exchange_inputs_keep_row_ids_exact_in_every_dtype_and_can_leave_a_rank_empty():
    for dtype in (torch.float32, torch.float64, torch.int64, torch.int32):
        inputs = collectives.exchange_inputs(3, 1, d=3, dtype=dtype, empty_rank=1)
        assert [x.shape for x, _ in inputs] == [(5, 3), (0, 3), (9, 3)] and inputs[1][1].shape == (0,)
        assert all(x.dtype == dtype for x, _ in inputs)
        assert collectives.row_origins(inputs[2][0]) == [(2, i) for i in range(9)]
        assert not torch.equal(inputs[0][0][:, 0], inputs[0][0][:, 1])  # the columns differ
    big = collectives.exchange_inputs(3, 0, rows=40)
    assert [x.shape[0] for x, _ in big] == [40, 42, 44]


def test_run_refuses_what_cannot_travel():
    with pytest.raises(TypeError, match="defined with def"):
        collectives.run(lambda: 1, 2)
    with pytest.raises(ValueError, match="args_by_rank must hold one tuple per rank"):
        collectives.run(hello, 2, args_by_rank=[(1,)])


def test_a_failing_rank_is_named():
    with pytest.raises(RankFailed, match="(?s)rank [01] of 2 failed.*TypeError"):
        collectives.run(hello, 2, "not a number")


def uses_a_helper_from_another_cell(x):
    return helper_defined_elsewhere(x)  # noqa: F821 - the point: the ranks cannot see it


def test_a_helper_the_ranks_cannot_see_is_named_with_the_fix():
    with pytest.raises(RankFailed, match=r"helper_defined_elsewhere.*not defined.*on the ranks.*define or import it "
                                         r"inside uses_a_helper_from_another_cell\(\)"):
        collectives.run(uses_a_helper_from_another_cell, 2, 1)
