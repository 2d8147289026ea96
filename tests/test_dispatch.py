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
from moe_course.experts import make_experts


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
    with pytest.raises(ValueError, match="must lie in"):
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
