"""Expert parallelism over real gloo process groups: equal to the single-process MoE, and failures never hang.

Each test starts its ranks once and runs a batch of scenarios there; ranks start from a fork server that
imported torch once per session (a fresh interpreter per rank costs seconds on a busy CPU).
Tolerance: every output and gradient within 1e-5 of the single-process layer with the same weights (the
all-to-alls move values exactly; only the order of float additions differs).
"""

from __future__ import annotations

import pytest
import torch

from moe_course import parallel
from moe_course.moe import MoE
from moe_course.parallel import (
    ExpertParallelMoE,
    RankFailed,
    dispatch_bytes,
    expert_owner,
    launch,
    local_experts,
    rank_order,
    ranks_per_token,
    send_counts,
)

TOL = 1e-5
SMALL = {"d_model": 16, "d_hidden": 32}


def assert_equal_to_single_process(results: list[list[dict]], names: list[str]) -> None:
    for rank, per_rank in enumerate(results):
        assert [r["name"] for r in per_rank] == names
        for r in per_rank:
            assert len(r["errors"]) >= 6  # output, input, router and the three expert tensors at least
            for what, err in r["errors"].items():
                assert err <= TOL, f"rank {rank}, {r['name']}: {what} differs by {err:.2e}"


def test_two_ranks_match_single_process():
    scenarios = [
        {"name": "top-2, shared expert, uneven batches", "tokens": [7, 5],
         "moe": {**SMALL, "n_experts": 8, "top_k": 2, "n_shared": 1}},
        {"name": "top-1, rank 1 sends nothing and its experts receive nothing", "tokens": [6, 0],
         "moe": {**SMALL, "n_experts": 4, "top_k": 1}, "bias": [0.0, 0.0, -10.0, -10.0]},
        {"name": "training: Switch loss, z-loss, bias update (sigmoid)", "tokens": [9, 4], "train": True,
         "moe": {**SMALL, "n_experts": 4, "top_k": 2, "score": "sigmoid", "aux_loss_coef": 0.01,
                 "z_loss_coef": 0.001, "bias_update_rate": 0.01}},
        {"name": "training: sequence-wise loss on (B, S, d)", "tokens": [8, 4], "seq_len": 4, "train": True,
         "moe": {**SMALL, "n_experts": 4, "top_k": 2, "score": "sigmoid", "seq_aux_loss_coef": 0.1}},
        {"name": "capacity per source rank", "tokens": [8, 8],
         "moe": {**SMALL, "n_experts": 4, "top_k": 2, "capacity_factor": 1.0}},
    ]
    results = launch(parallel.compare_with_single_process, 2, scenarios, timeout_s=60)
    assert_equal_to_single_process(results, [s["name"] for s in scenarios])
    train = [r[2]["errors"] for r in results]
    assert all("aux_loss" in e and "bias" in e for e in train)
    empty = [r[1] for r in results]
    assert empty[1]["sent"] == [0, 0] and empty[1]["received"] == [0, 0]  # idle rank: no tokens, no work
    assert empty[0]["sent"] == [6, 0] and sum(empty[0]["received_per_expert"]) == 6
    # what one rank sends is what the other receives
    first = [r[0] for r in results]
    assert [first[0]["sent"][1], first[1]["sent"][0]] == [first[1]["received"][0], first[0]["received"][1]]


def test_four_ranks_match_single_process():
    scenarios = [
        {"name": "top-2 + shared; rank 1 sends nothing; rank 3's experts get nothing", "tokens": [6, 0, 5, 3],
         "moe": {**SMALL, "n_experts": 8, "top_k": 2, "n_shared": 1}, "bias": [0.0] * 6 + [-10.0] * 2},
        {"name": "top-1, no shared expert", "tokens": [4, 5, 3, 6], "moe": {**SMALL, "n_experts": 4, "top_k": 1}},
        {"name": "top-3 of 8", "tokens": [5, 3, 4, 2], "moe": {**SMALL, "n_experts": 8, "top_k": 3}},
    ]
    results = launch(parallel.compare_with_single_process, 4, scenarios, timeout_s=60)
    assert_equal_to_single_process(results, [s["name"] for s in scenarios])
    assert results[1][0]["sent"] == [0, 0, 0, 0]
    assert results[3][0]["received"] == [0, 0, 0, 0]
    assert all(sum(r[0]["received"]) > 0 for r in (results[0], results[2]))
    # the send and receive matrices are transposes of each other
    for i in range(3):
        sent = torch.tensor([r[i]["sent"] for r in results])
        received = torch.tensor([r[i]["received"] for r in results])
        assert torch.equal(sent.t(), received)


@pytest.mark.parametrize("how, message", [("raise", "deliberate failure on rank 1"), ("exit", "exit code 7"),
                                          ("hang", "timed out")])
def test_failing_rank_is_named_and_does_not_hang(how, message):
    """A hang ends at launch's 3 s timeout: the test returning at all shows it (no wall-clock bound here)."""
    with pytest.raises(RankFailed, match="rank 1 of 2 (failed|died|timed out)") as info:
        launch(parallel.fail_on_rank, 2, 1, how, timeout_s=3)
    assert info.value.rank == 1
    assert message in str(info.value)


def test_placement_and_send_side_helpers():
    assert list(local_experts(1, 4, 8)) == [2, 3]
    assert expert_owner(torch.tensor([0, 1, 2, 7]), 8, 4).tolist() == [0, 0, 1, 3]
    idx = torch.tensor([[3, 0], [1, 2], [0, 3]])  # 4 experts on 2 ranks: experts 0, 1 on rank 0
    assert send_counts(idx, 4, 2).tolist() == [3, 3]
    order, inverse = rank_order(idx, 4, 2)
    assert order.tolist() == [1, 2, 4, 0, 3, 5]  # stable: token order kept within each rank
    pairs = torch.arange(6)
    assert torch.equal(pairs[order][inverse], pairs)
    assert dispatch_bytes(idx, 4, 2, rank=0, d_model=8, bytes_per_element=4) == 3 * 8 * 4
    assert ranks_per_token(idx, 4, 2).tolist() == [2, 2, 2]
    assert ranks_per_token(torch.tensor([[0, 1], [2, 3], [0, 3]]), 4, 2).tolist() == [1, 1, 2]
    with pytest.raises(ValueError, match="divisible by world"):
        send_counts(idx, 4, 3)


def test_layer_rejects_bad_setups():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="token-choice router"):
        ExpertParallelMoE.from_moe(MoE(8, 16, 4, 2, router="expert_choice"), 0, 2)
    with pytest.raises(ValueError, match="experts='grouped'"):
        ExpertParallelMoE.from_moe(MoE(8, 16, 4, 2, experts="list"), 0, 2)
    with pytest.raises(ValueError, match="divisible by world"):
        ExpertParallelMoE.from_moe(MoE(8, 16, 6, 2), 0, 4)
    custom = MoE(8, 16, 4, 2)
    custom.balancing.append(torch.nn.Identity())
    with pytest.raises(ValueError, match="across ranks"):
        ExpertParallelMoE.from_moe(custom, 0, 2)
    with pytest.raises(ValueError, match="backend"):
        launch(parallel.fail_on_rank, 2, 0, "raise", backend="mpi")
    with pytest.raises(ValueError, match="start_method"):
        launch(parallel.fail_on_rank, 2, 0, "raise", start_method="thread")


def test_from_moe_slices_the_experts():
    torch.manual_seed(0)
    moe = MoE(8, 16, 8, 2, n_shared=1)
    part = ExpertParallelMoE.from_moe(moe, 2, 4)
    assert part.n_local == 2 and part.first_expert == 4
    assert torch.equal(part.experts.w_up, moe.experts.w_up[4:6])
    assert torch.equal(part.router.gate.weight, moe.router.gate.weight)
    assert part.router.gate.weight.data_ptr() != moe.router.gate.weight.data_ptr()  # a copy, as on another rank
    assert torch.equal(part.shared.down.weight, moe.shared.down.weight)


def test_command_line_demo_runs_and_reports_each_rank(capsys):
    assert parallel.main(["--world", "2", "--tokens", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["rank 0", "rank 1"]
    assert all(float(line.rsplit(" ", 1)[1]) <= TOL for line in lines)


def _all_to_all_and_its_gradient(splits):
    """One rank's part: send rows by ``splits[rank]``, weight what arrives, return output and input gradient."""
    import torch
    import torch.distributed as dist

    from moe_course.parallel import all_to_all

    rank, world = dist.get_rank(), dist.get_world_size()
    row = lambda i, n: torch.arange(n, dtype=torch.float64).unsqueeze(1) + 100 * i + torch.tensor([0.0, 0.5])  # noqa: E731
    x = row(rank, sum(splits[rank])).requires_grad_()  # (rows sent by this rank, 2)
    received = [splits[i][rank] for i in range(world)]
    out = all_to_all(x, received, splits[rank])
    weight = torch.arange(out.numel(), dtype=torch.float64).reshape(out.shape) + 1000 * rank
    (out * weight).sum().backward()
    return out.detach().tolist(), x.grad.tolist()


@pytest.mark.parametrize("splits", [
    [[2, 3], [1, 0]],                       # uneven; rank 1 sends nothing to itself
    [[0, 0, 0], [2, 1, 3], [1, 0, 2]],      # rank 0 sends nothing at all
])
def test_all_to_all_moves_rows_and_sends_gradients_back(splits):
    """Independent of the collective: rows and gradients computed by hand from the split matrix."""
    from moe_course.collectives import run

    world = len(splits)
    got = run(_all_to_all_and_its_gradient, world, splits)
    starts = [[sum(splits[i][:j]) for j in range(world)] for i in range(world)]  # where block i→j starts on i
    for j, (out, _) in enumerate(got):
        want = [[r + 100 * i, r + 100 * i + 0.5] for i in range(world)
                for r in range(starts[i][j], starts[i][j] + splits[i][j])]
        assert out == want, f"rank {j} received {out}, expected the blocks of ranks 0..{world - 1} in order"
    for i, (_, grad) in enumerate(got):
        want = []
        for j in range(world):  # the gradient of a row sent to j is the weight j put on it
            offset = sum(splits[src][j] for src in range(i))
            want += [[1000.0 * j + 2 * (offset + r), 1000.0 * j + 2 * (offset + r) + 1] for r in range(splits[i][j])]
        assert grad == want, f"rank {i}'s input gradient {grad} != {want}"


def test_a_profiled_step_runs_all_four_all_to_alls_and_counts_their_bytes_on_the_wire():
    """Training steps (input with a gradient): dispatch and combine, forward and backward, each recorded with the
    bytes the kernel saw the rank write; with one rank's experts starved, the idle rank waits for the busy one."""
    size = {"d_model": 64, "d_hidden": 256, "n_experts": 4, "top_k": 2}
    settings = [{"moe_kwargs": size, "tokens_per_rank": 256, "repeats": 2, "warmup": 1},
                {"moe_kwargs": size, "tokens_per_rank": 1024, "repeats": 3, "warmup": 1,
                 "bias": [10.0, 10.0, 0.0, 0.0]}]  # every token to experts 0 and 1, both on rank 0
    volume = [{**size, "top_k": k} for k in (1, 2)]
    results = launch(parallel.run_all, 2, [(parallel.profile_layers, (settings,)),
                                           (parallel.communication_volume, (volume, 96))], timeout_s=120)
    for profiles, volumes in results:
        for p in profiles:
            records = p["collectives"]
            assert [(r["name"], r["pass"]) for r in records] == [
                ("dispatch", "forward"), ("combine", "forward"), ("combine", "backward"), ("dispatch", "backward")]
            assert records[0]["payload_bytes"] == p["dispatch_bytes"]
            assert records[1]["payload_bytes"] == p["combine_bytes"]
            assert records[3]["payload_bytes"] == p["combine_bytes"]  # the gradients of the rows that came back
            parts = p["step_parts"]
            assert parts["total"] == pytest.approx(parts["waiting"] + parts["all-to-all"] + parts["compute"])
            assert min(parts.values()) >= 0 and p["seconds"]["step"] > 0
            for r in records:
                if r["wire_bytes"] is not None:  # Linux: the kernel's count, a few header bytes above the rows
                    assert 0 <= r["wire_bytes"] - r["payload_bytes"] < 1024, r
        for v in volumes:
            if v["wire_bytes"] is not None:
                rows = v["dispatch_bytes"] + v["combine_bytes"]
                assert 0 <= v["wire_bytes"] - rows < 2048 and rows > 0
    busy, idle = (results[r][0][1] for r in (0, 1))
    assert sum(idle["received_pairs"]) == 0 and sum(busy["received_pairs"]) == 2 * 2048
    assert idle["step_parts"]["waiting"] > busy["step_parts"]["waiting"]  # the straggler sets both ranks' pace


def test_record_collectives_cannot_nest():
    with parallel.record_collectives(), pytest.raises(RuntimeError, match="already active"):
        with parallel.record_collectives():
            pass
    with parallel.record_collectives() as records:  # and it was left clean
        assert records == []


def test_node_deduplicated_dispatch_equals_the_single_process_layer():
    """DeepSeek-V3's dispatch over nodes (a token crosses to a node once, then fans out inside it): outputs and
    every gradient equal the single-process layer, for 4 nodes of 1, 2 nodes of 2 and 1 node of 4 ranks."""
    scenarios = []
    for g in (1, 2, 4):
        scenarios += [
            {"name": f"G={g}: top-4, shared expert, a rank without tokens", "tokens": [9, 7, 0, 12],
             "ranks_per_node": g, "moe": {**SMALL, "n_experts": 8, "top_k": 4, "n_shared": 1}},
            {"name": f"G={g}: training, Switch loss and bias update", "tokens": [8, 4, 6, 5], "ranks_per_node": g,
             "train": True, "moe": {**SMALL, "n_experts": 8, "top_k": 2, "score": "sigmoid",
                                    "aux_loss_coef": 0.01, "bias_update_rate": 0.01}},
            {"name": f"G={g}: node 1's experts starved", "tokens": [6, 6, 6, 6], "ranks_per_node": g,
             "moe": {**SMALL, "n_experts": 8, "top_k": 2}, "bias": [0.0] * 4 + [-10.0] * 4},
        ]
    results = launch(parallel.compare_with_single_process, 4, scenarios, timeout_s=60)
    assert_equal_to_single_process(results, [s["name"] for s in scenarios])


def test_node_deduplicated_dispatch_sends_one_row_per_token_and_node():
    """Counted independently: the rows that cross nodes (the kernel's byte count of the between-nodes stage)
    against the plain layer's pairs; with k = 8 on 2 nodes every token crosses at most once, not ~4 times."""
    size = {"d_model": 32, "d_hidden": 32, "n_experts": 16, "top_k": 8, "score": "sigmoid"}
    results = launch(parallel.node_dispatch_volume, 4, size, 64, 2, timeout_s=60)
    for r in results:
        assert r["max_diff"] < 1e-5
        rows, pairs = r["by_node"]["rows_to_other_nodes"], r["plain"]["pairs_to_other_nodes"]
        assert rows <= r["tokens"] < pairs  # at most one row per token to the other node; 8 pairs spread over 2
        between = {c["name"]: c for c in r["by_node"]["records"]}["dispatch (between nodes)"]
        assert between["payload_bytes"] == rows * r["d_model"] * r["element_size"]
        if between["wire_bytes"] is not None:
            assert 0 <= between["wire_bytes"] - between["payload_bytes"] < 1024
    with pytest.raises(ValueError, match="must divide the world size"):
        ExpertParallelMoE(MoE(16, 32, 8, 2), 0, 4, ranks_per_node=3)
    with pytest.raises(ValueError, match="capacity_factor=None"):
        ExpertParallelMoE(MoE(16, 32, 8, 2, capacity_factor=1.0), 0, 4, ranks_per_node=2)


def test_the_overlapped_forward_equals_the_layer_and_every_arm_is_timed():
    """Micro-batches whose exchanges are in flight while the previous one computes give the unsplit layer's
    output (with a shared expert, on 3 ranks, uneven loads); the stand-in arm sleeps as long as the experts took."""
    size = {"d_model": 16, "d_hidden": 32, "n_experts": 6, "top_k": 2, "n_shared": 1}
    for world, chunks in ((2, 4), (3, 3)):
        results = launch(parallel.overlap_profile, world, size, 48, chunks, 0, 2, 1, timeout_s=120)
        for r in results:
            assert r["max_diff"] <= TOL and r["chunks"] == chunks and r["tokens"] == 48
            assert list(r["seconds"]) == list(parallel.OVERLAP_ARMS)
            assert all(0 < s < 10 for s in r["seconds"].values())
            assert len(r["compute_s"]) == chunks and min(r["compute_s"]) > 0
            assert r["seconds"]["one after another, experts elsewhere"] >= sum(r["compute_s"])  # it waited


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"chunks": 5}, "chunks=5 must divide tokens_per_rank=48"),
    ({"moe_kwargs": {**SMALL, "n_experts": 4, "capacity_factor": 1.0}}, "without capacity"),
])
def test_overlap_profile_names_a_bad_setting(kwargs, message):
    args = {"moe_kwargs": {**SMALL, "n_experts": 4}, "tokens_per_rank": 48, "chunks": 4, **kwargs}
    with pytest.raises(RankFailed, match=message):
        launch(parallel.overlap_profile, 2, args["moe_kwargs"], args["tokens_per_rank"], args["chunks"])
