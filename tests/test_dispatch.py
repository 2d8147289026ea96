import pytest
import torch

from moe_course.dispatch import (
    capacity_mask,
    dispatch_dense,
    dispatch_loop,
    dispatch_sorted,
    expert_capacity,
    get_dispatcher,
)
from moe_course.experts import HAS_GROUPED_MM, make_experts


def _grads(fn, x, w, idx, experts):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    for p in experts.parameters():
        p.grad = None
    y = fn(x, w, idx, experts)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    pg = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in experts.parameters()]
    return y.detach(), x.grad, w.grad, pg


@pytest.mark.parametrize("k", [1, 2, 3])
def test_three_dispatchers_agree_forward_and_backward(k):
    torch.manual_seed(k)
    experts = make_experts(6, 8, 16)
    x = torch.randn(20, 8)
    # experts 4 and 5 receive no token at all
    idx = torch.stack([torch.randperm(4)[:k] for _ in range(20)])
    w = torch.rand(20, k)
    ref = _grads(dispatch_dense, x, w, idx, experts)
    for fn in (dispatch_loop, dispatch_sorted):
        out = _grads(fn, x, w, idx, experts)
        assert torch.allclose(out[0], ref[0], atol=1e-6)
        assert torch.allclose(out[1], ref[1], atol=1e-6)
        assert torch.allclose(out[2], ref[2], atol=1e-6)
        for a, b in zip(out[3], ref[3], strict=True):
            assert torch.allclose(a, b, atol=1e-6)
    # the unused experts get exactly zero gradient
    n_per_expert = len(list(experts[0].parameters()))
    assert all(g.abs().sum() == 0 for g in ref[3][4 * n_per_expert:])


def test_dispatch_hand_example():
    class Scale(torch.nn.Module):
        def __init__(self, s):
            super().__init__()
            self.s = s

        def forward(self, x):
            return self.s * x

    experts = [Scale(1.0), Scale(10.0), Scale(100.0)]
    x = torch.tensor([[1.0], [2.0]])
    idx = torch.tensor([[0, 2], [1, 0]])
    w = torch.tensor([[0.5, 0.5], [0.75, 0.25]])
    expected = torch.tensor([[0.5 * 1 + 0.5 * 100], [0.75 * 20 + 0.25 * 2]])
    for fn in (dispatch_dense, dispatch_loop, dispatch_sorted):
        assert torch.allclose(fn(x, w, idx, experts), expected)


def test_dispatch_errors():
    experts = make_experts(2, 4, 4)
    with pytest.raises(ValueError, match="flatten"):
        dispatch_sorted(torch.randn(2, 3, 4), torch.ones(6, 1), torch.zeros(6, 1, dtype=torch.long), experts)
    with pytest.raises(ValueError, match=r"\(T, k\)"):
        dispatch_loop(torch.randn(3, 4), torch.ones(3, 2), torch.zeros(3, 1, dtype=torch.long), experts)
    with pytest.raises(ValueError, match=r"must hold expert ids in \["):
        dispatch_dense(torch.randn(3, 4), torch.ones(3, 1), torch.full((3, 1), 2), experts)
    with pytest.raises(ValueError, match="unknown dispatch"):
        get_dispatcher("magic")


def test_expert_capacity_formula():
    assert expert_capacity(8, 4, 2, 1.0) == 4
    assert expert_capacity(10, 4, 1, 1.25) == 4  # ceil(3.125)
    assert expert_capacity(10, 4, 2, 1.0) == 5
    with pytest.raises(ValueError):
        expert_capacity(10, 4, 5, 1.0)
    with pytest.raises(ValueError):
        expert_capacity(10, 4, 2, 0.0)


def test_capacity_mask_first_choices_claim_slots_first():
    # 3 tokens all want expert 0 as their 2nd choice, token 2 wants it as 1st choice.
    idx = torch.tensor([[1, 0], [2, 0], [0, 1]])
    keep = capacity_mask(idx, 3, capacity=1)
    # expert 0's single slot goes to token 2's first choice, not token 0's second choice
    assert keep.tolist() == [[True, False], [True, False], [True, False]]
    keep2 = capacity_mask(idx, 3, capacity=2)
    assert keep2.tolist() == [[True, True], [True, False], [True, True]]


def test_capacity_mask_keeps_exactly_capacity_per_expert():
    torch.manual_seed(0)
    idx = torch.randint(0, 4, (100, 2))
    keep = capacity_mask(idx, 4, capacity=20)
    for e in range(4):
        assert int(((idx == e) & keep).sum()) == min(20, int((idx == e).sum()))


# ---------------------------------------------------------------------------------------------------------
# The production path (dispatch_grouped on GroupedExperts) against the plain computation, bit for bit


def _plain_grouped(x, weights, indices, experts):
    """dispatch_grouped as first written: bincount, weights[order], an out-of-place index_add."""
    import torch.nn.functional as F

    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    token_of, counts = order // indices.shape[1], torch.bincount(flat, minlength=len(experts))
    xs = x.index_select(0, token_of)
    offsets = counts.cumsum(0).to(torch.int32)
    hidden = F.silu(F.grouped_mm(xs, experts.w_gate, offs=offsets)) * F.grouped_mm(xs, experts.w_up, offs=offsets)
    ys = F.grouped_mm(hidden, experts.w_down, offs=offsets) * weights.reshape(-1)[order].unsqueeze(-1)
    return ys.new_zeros(x.shape[0], ys.shape[-1]).index_add(0, token_of, ys)


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="this torch has no F.grouped_mm (2.4 has not): nothing fast to compare")
@pytest.mark.parametrize("k", [1, 2, 4])
def test_grouped_fast_path_equals_the_plain_computation_bit_for_bit(k):
    from moe_course.dispatch import dispatch_grouped
    from moe_course.experts import GroupedExperts, use_grouped_mm

    torch.manual_seed(k)
    experts = GroupedExperts(6, 8, 16)
    assert use_grouped_mm(torch.float32, torch.device("cpu"), experts.w_gate)
    x = torch.randn(40, 8)
    logits = torch.randn(40, 6)
    logits[:, 5] = -10.0  # expert 5 gets no tokens: an empty group
    w, idx = logits.softmax(-1).topk(k, dim=-1)
    fast = _grads(dispatch_grouped, x, w, idx, experts)
    plain = _grads(_plain_grouped, x, w, idx, experts)
    for a, b in zip(fast[:3], plain[:3], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(fast[3], plain[3], strict=True):
        assert torch.equal(a, b)


def test_count_per_expert_is_bincount_without_reading_the_ids():
    from moe_course.dispatch import count_per_expert, sort_by_expert

    ids = torch.tensor([[3, 0], [3, 1], [0, 3]])
    assert torch.equal(count_per_expert(ids, 5), torch.bincount(ids.reshape(-1), minlength=5))
    assert count_per_expert(ids, 5).dtype == torch.long
    assert count_per_expert(torch.zeros(0, 2, dtype=torch.long), 3).tolist() == [0, 0, 0]
    assert torch.equal(sort_by_expert(ids, 5)[2], count_per_expert(ids, 5))
    # shapes only, no values: what a GPU can do without waiting (bincount must read the largest id first)
    meta = torch.empty(6, 2, dtype=torch.long, device="meta")
    assert count_per_expert(meta, 4).shape == (4,)
    # Routing.counts (the training loop's and the bias update's counts) goes the same sync-free way
    from moe_course.routing import Routing

    w = torch.ones(6, 2, device="meta")
    assert Routing(w, meta, torch.empty(6, 4, device="meta"), torch.empty(6, 4, device="meta")).counts(4).shape == (4,)


def test_dispatch_check_reads_expert_ids_on_the_cpu_only():
    from moe_course.dispatch import _check

    with pytest.raises(ValueError, match=r"must hold expert ids in \["):
        _check(torch.zeros(2, 4), torch.ones(2, 1), torch.tensor([[0], [7]]), 3)
    meta = dict(device="meta")  # like CUDA: the values are not read back (no sync); shapes are still checked
    _check(torch.empty(2, 4, **meta), torch.empty(2, 1, **meta), torch.empty(2, 1, dtype=torch.long, **meta), 3)
    with pytest.raises(ValueError, match="must both be"):
        _check(torch.empty(2, 4, **meta), torch.empty(2, 2, **meta), torch.empty(2, 1, dtype=torch.long, **meta), 3)


def test_moe_bias_counts_equal_the_routing_counts():
    from moe_course.moe import MoE

    torch.manual_seed(0)
    layer = MoE(8, 8, 6, 2, score="sigmoid", bias_update_rate=1e-3).train()
    layer(torch.randn(3, 10, 8))
    assert torch.equal(layer.step_counts, layer.last_routing.counts(6))


def test_count_per_expert_takes_int32_ids_like_bincount():
    from moe_course.dispatch import count_per_expert

    ids = torch.tensor([2, 2, 0], dtype=torch.int32)
    assert count_per_expert(ids, 3).tolist() == torch.bincount(ids, minlength=3).tolist() == [1, 0, 2]
