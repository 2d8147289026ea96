"""moe_course.serving: distinct experts, bytes per token, the roofline and decode timing, on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from moe_course.model import ModelConfig, TinyLM
from moe_course.offload import random_trace
from moe_course.params import get_published, param_breakdown, total_params
from moe_course.serving import (
    H100_SXM,
    bytes_per_token,
    dense_twin,
    distinct_from_share,
    expected_distinct_experts,
    measured_distinct_experts,
    model_weight_bytes,
    moe_layer_roofline,
    pcie_bytes_per_s,
    placement_load,
    serving_row,
    time_decode,
    token_share,
)


def test_expected_distinct_by_hand():
    # N=8, k=2: one token misses an expert with 3/4, two tokens with 9/16 -> 8 * 7/16 = 3.5
    got = expected_distinct_experts(8, 2, torch.tensor([0, 1, 2]))
    assert got.dtype == torch.float64 and got.tolist() == [0.0, 2.0, 3.5]
    assert float(expected_distinct_experts(4, 4, 3)) == 4.0
    with pytest.raises(ValueError, match="k=5 experts per token cannot exceed n_experts=4"):
        expected_distinct_experts(4, 5, 1)
    with pytest.raises(ValueError, match="batch must hold finite batch sizes >= 0"):
        expected_distinct_experts(4, 2, torch.tensor([-1]))


def test_the_formula_matches_uniform_random_routing():
    traces = random_trace(50, 16, 2, torch.Generator().manual_seed(0), sequences=64)  # (64, 50, 2)
    batches = [1, 4, 16, 64]
    measured = measured_distinct_experts(traces, batches, 16)
    formula = expected_distinct_experts(16, 2, torch.tensor(batches)).tolist()
    assert measured[0] == 2.0
    for m, f in zip(measured, formula, strict=True):
        assert m == pytest.approx(f, rel=0.03)


def test_distinct_from_share():
    uniform = torch.full((8,), 2 / 8)
    assert torch.allclose(distinct_from_share(uniform, torch.tensor([1, 5])), expected_distinct_experts(8, 2, [1, 5]))
    always_two = torch.tensor([1.0, 1.0, 0, 0, 0, 0, 0, 0])  # every token uses experts 0 and 1
    assert distinct_from_share(always_two, torch.tensor([1, 100])).tolist() == [2.0, 2.0]


def test_measured_distinct_by_hand():
    trace = torch.tensor([[[0], [1]], [[0], [2]]])  # 2 sequences, 2 steps, k = 1
    assert measured_distinct_experts(trace, [1, 2], 3) == [1.0, 1.5]  # side by side: step 0 {0}, step 1 {1, 2}
    assert measured_distinct_experts(trace, [2], 3, "consecutive") == [2.0]  # {0, 1} and {0, 2}
    with pytest.raises(ValueError, match="between 1 and 2"):
        measured_distinct_experts(trace, [3], 3)
    assert token_share(trace, 3).tolist() == [0.5, 0.25, 0.25]


def test_bytes_per_token_by_hand():
    layer0 = torch.tensor([[0, 1], [1, 2], [0, 2]])  # 3 distinct
    layer1 = torch.tensor([[0, 1], [0, 1], [3, 0]])  # 3 distinct (0, 1, 3)
    assert bytes_per_token([layer0, layer1], 10.0, 100.0) == pytest.approx((100 + 6 * 10) / 3)
    assert bytes_per_token([torch.tensor([[5, 2]])], 7.0, 50.0) == 64.0  # batch 1: the active weights
    with pytest.raises(ValueError, match="the batch is empty"):
        bytes_per_token([torch.zeros(0, 2, dtype=torch.long)], 1.0, 1.0)
    with pytest.raises(ValueError, match="same B tokens"):
        bytes_per_token([layer0, layer0[:2]], 1.0, 1.0)


def test_model_weight_bytes_of_a_tiny_model():
    cfg = ModelConfig(ffn="moe", vocab_size=32, block_size=8, n_layer=2, n_head=2, d_model=8, n_experts=4, top_k=2,
                      expert_hidden=4, n_shared=1)
    model = TinyLM(cfg)
    got = model_weight_bytes(model, bytes_per_param=2)
    assert got["expert"] == [3 * 8 * 4 * 2] * 2 and got["n_experts"] == [4, 4]
    total = sum(p.numel() for p in model.parameters())
    assert got["total"] == 2 * total
    assert got["other"] == 2 * (total - 2 * 4 * 3 * 8 * 4 - 8 * 8)  # minus routed experts and the position table


def test_serving_row_of_mixtral_reads_its_active_weights_at_batch_one():
    cfg = get_published("Mixtral 8x7B")
    row = serving_row(cfg, bytes_per_param=2, batch_sizes=(1, 10_000))
    assert row["memory"] == 2 * total_params(cfg)
    lookup = cfg.vocab_size * cfg.d_model  # the input embedding is read one row at a time
    assert row["read_per_token"][1] == pytest.approx(2 * (row["active"] - lookup))
    parts = param_breakdown(cfg)
    per_step_all = (total_params(cfg) - lookup) * 2  # at a huge batch every expert is read once per step
    assert row["read_per_token"][10_000] == pytest.approx(per_step_all / 10_000, rel=1e-6)
    assert row["expert_params"] == 3 * 4096 * 14336 and parts["routed_experts"] == 32 * 8 * row["expert_params"]


def test_roofline_by_hand():
    out = moe_layer_roofline(torch.tensor([1.0]), 8, 2, expert_params=100, bytes_per_param=2)
    assert out["bytes"].item() == 400 and out["flops"].item() == 400 and out["intensity"].item() == 1.0
    assert bool(out["memory_bound"]) and out["seconds"].item() == pytest.approx(400 / 3.35e12)
    huge = moe_layer_roofline(torch.tensor([1e6]), 8, 2, expert_params=100)
    assert not bool(huge["memory_bound"])  # 8 experts read, 2e8 FLOPs: compute-bound
    assert H100_SXM.ridge == pytest.approx(989e12 / 3.35e12)


def test_pcie_bandwidth():
    assert pcie_bytes_per_s(4) == pytest.approx(31.5e9, rel=1e-3)
    assert pcie_bytes_per_s(3) == pytest.approx(pcie_bytes_per_s(4) / 2)
    with pytest.raises(ValueError, match="generation"):
        pcie_bytes_per_s(2)


def test_dense_twin_has_the_active_width():
    cfg = ModelConfig(ffn="moe", n_experts=16, top_k=2, expert_hidden=64, n_shared=2, router_score="sigmoid",
                      aux_loss_coef=0.0, bias_update_rate=1e-3)
    twin = dense_twin(cfg)
    assert twin.ffn == "dense" and twin.d_hidden == 256 and twin.d_model == cfg.d_model
    assert dense_twin(twin) is twin


def test_time_decode_reports_speed_and_split_and_restores_threads():
    shape = dict(vocab_size=32, block_size=16, n_layer=2, n_head=2, d_model=16)
    torch.manual_seed(0)
    moe = TinyLM(ModelConfig(ffn="moe", n_experts=4, top_k=2, expert_hidden=8, **shape))
    dense = TinyLM(dense_twin(moe.cfg))
    threads = torch.get_num_threads()
    out = time_decode({"moe": moe, "dense": dense}, [1, 2], prompt_len=3, new_tokens=4, repeats=1)
    assert torch.get_num_threads() == threads
    assert [t.batch for t in out["moe"]] == [1, 2]
    for name, runs in out.items():
        for t in runs:
            assert t.tokens_per_s > 0 and t.seconds_per_step > 0
            assert len(t.split["attention"]) == 2 and len(t.split["other"]) == 1
            assert ("experts" in t.split) == (name == "moe") and ("ffn" in t.split) == (name == "dense")


def test_placement_load_by_hand():
    share = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.3, 0.2, 0.3, 0.2], dtype=torch.float64)  # sums to k = 2
    # by id, 4 GPUs of 2 experts: loads 0.7, 0.3, 0.5, 0.5 around a mean of 0.5 -> 1.4
    # greedy, heaviest first: 0.4 | 0.3 | 0.3 | 0.3, then 0.2s on the three lightest and 0.1 on GPU 0 -> all 0.5
    out = placement_load(share, 4)
    assert out["contiguous"] == pytest.approx(1.4) and out["balanced"] == pytest.approx(1.0)
    assert out["gpus"] == [[0, 3], [1, 2], [4, 5], [6, 7]] and out["copied"] == []
    skewed = torch.tensor([1.2, 0.2, 0.2, 0.2, 0.1, 0.1], dtype=torch.float64)  # one hot expert, 3 GPUs
    plain, copied = placement_load(skewed, 3), placement_load(skewed, 3, redundant=3)
    # 2 slots per GPU: the last light expert must join the hot one, 1.3 against a mean of 2/3
    assert plain["balanced"] == pytest.approx(1.3 / (2.0 / 3))
    # copies of experts 0, 1, 2 (3 slots per GPU): the halves 0.6 and 0.6 go to two GPUs, the rest fills up to 0.8
    assert copied["copied"] == [0, 1, 2] and copied["balanced"] == pytest.approx(0.8 / (2.0 / 3))
    assert all(len(g) == 3 for g in copied["gpus"]) and sum(0 in g for g in copied["gpus"]) == 2
    with pytest.raises(ValueError, match="must divide"):
        placement_load(share, 3)


def test_busiest_gpu_scores_a_placement_on_new_loads_and_splits_copies():
    from moe_course.serving import busiest_gpu, placement_load

    gpus = [[0, 1], [2, 3]]
    assert float(busiest_gpu(gpus, [3.0, 1.0, 1.0, 1.0])) == pytest.approx(4 / 3)  # (3 + 1) over the mean 3
    steps = torch.tensor([[2.0, 0, 0, 2], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert busiest_gpu(gpus, steps).tolist() == pytest.approx([1.0, 1.0, 1.0])  # an empty step counts as even
    copied = [[0, 1], [0, 2, 3]]  # expert 0 on both GPUs: each takes half of its load
    assert float(busiest_gpu(copied, [4.0, 0.0, 1.0, 1.0])) == pytest.approx(4 / 3)  # (2 + 1 + 1) / 3
    share = torch.tensor([0.4, 0.3, 0.2, 0.1])
    placed = placement_load(share, 2)
    assert float(busiest_gpu(placed["gpus"], share)) == pytest.approx(placed["balanced"])  # in sample: the same
    with pytest.raises(ValueError, match="every expert"):
        busiest_gpu([[0, 1], [2]], share)
