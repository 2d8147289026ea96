import pytest
import torch

from moe_course.experts import FeedForward, SwiGLU, make_experts
from moe_course.model import ModelConfig, TinyLM
from moe_course.moe import MoE, SoftMixture


def tiny(**kw):
    base = dict(block_size=16, n_layer=2, n_head=2, d_model=16, n_experts=4, top_k=2, expert_hidden=8, d_hidden=16)
    base.update(kw)
    return ModelConfig(**base)


def test_swiglu_formula_and_param_count():
    torch.manual_seed(0)
    e = SwiGLU(6, 10)
    x = torch.randn(3, 6)
    ref = e.down(torch.nn.functional.silu(e.gate(x)) * e.up(x))
    assert torch.allclose(e(x), ref)
    assert sum(p.numel() for p in e.parameters()) == 3 * 6 * 10
    assert sum(p.numel() for p in FeedForward(6, 10).parameters()) == 2 * 6 * 10
    with pytest.raises(ValueError, match="unknown expert kind"):
        make_experts(2, 4, 4, kind="relu")


def test_moe_layer_matches_manual_computation_and_shared_expert_adds():
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, 2, n_shared=1)
    x = torch.randn(2, 3, 8)
    y = moe(x)
    flat = x.reshape(-1, 8)
    r = moe.router(flat)
    manual = torch.stack([
        sum(r.weights[t, j] * moe.experts[int(r.indices[t, j])](flat[t]) for j in range(2)) + moe.shared(flat[t])
        for t in range(6)
    ])
    assert torch.allclose(y.reshape(-1, 8), manual, atol=1e-6)
    assert moe.last_routing.indices.shape == (6, 2)


def test_moe_capacity_drops_and_soft_mixture_is_full_softmax():
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, 1, capacity_factor=0.5)
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0] = 1.0  # skew everything toward expert 0 for positive-sum tokens
    moe(torch.randn(32, 8).abs())
    assert moe.last_dropped >= 0.5
    soft = SoftMixture(8, 16, 3)
    x = torch.randn(5, 8)
    g = soft.gate(x).softmax(-1)
    manual = sum(g[:, i : i + 1] * soft.experts[i](x) for i in range(3))
    assert torch.allclose(soft(x), manual, atol=1e-6)


def test_moe_bad_input():
    moe = MoE(8, 16, 4, 2)
    with pytest.raises(ValueError, match="last dimension 8"):
        moe(torch.randn(3, 7))
    with pytest.raises(ValueError):
        MoE(8, 16, 4, 5)


def test_model_config_errors():
    with pytest.raises(ValueError, match="top_k=9"):
        tiny(top_k=9)
    with pytest.raises(ValueError, match="divisible"):
        tiny(n_head=3)
    with pytest.raises(ValueError, match="unknown ffn"):
        tiny(ffn="sparse")


def test_tinylm_forward_loss_and_pluggable_ffn():
    torch.manual_seed(0)
    model = TinyLM(tiny())
    idx = torch.randint(0, 256, (2, 16))
    logits, loss = model(idx, torch.randint(0, 256, (2, 16)))
    assert logits.shape == (2, 16, 256)
    assert loss.item() == pytest.approx(5.545, abs=0.1)  # ≈ ln 256 at initialisation (+ small aux)
    assert len(model.moe_layers()) == 2
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(0, 256, (1, 17)))
    dense = TinyLM(tiny(ffn="dense"))
    assert dense.moe_layers() == []
    custom = TinyLM(tiny(), ffn_factory=lambda layer: torch.nn.Identity())
    assert all(isinstance(b.ffn, torch.nn.Identity) for b in custom.blocks)
    alternating = TinyLM(tiny(moe_every=2))
    assert [type(b.ffn).__name__ for b in alternating.blocks] == ["SwiGLU", "MoE"]


def test_causality():
    torch.manual_seed(0)
    model = TinyLM(tiny()).eval()
    a = torch.randint(0, 256, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 256
    la, _ = model(a)
    lb, _ = model(b)
    assert torch.allclose(la[0, :10], lb[0, :10], atol=1e-5)
    assert not torch.allclose(la[0, 10:], lb[0, 10:])


def test_generate_length():
    torch.manual_seed(0)
    model = TinyLM(tiny()).eval()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 8)
