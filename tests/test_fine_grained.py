"""moe_course.fine_grained: the configuration helper keeps expert parameters; the forward pass is eqs. 9-11."""

from __future__ import annotations

import pytest
import torch

from moe_course.experts import make_experts
from moe_course.fine_grained import (
    comparison_configs,
    fine_grained_config,
    n_combinations,
    param_table,
    shared_moe_forward,
)
from moe_course.model import ModelConfig
from moe_course.moe import MoE


def test_combinations_of_the_paper() -> None:
    assert n_combinations(8, 2) == 28
    assert n_combinations(32, 8) == 10_518_300
    assert n_combinations(256, 8) == 409_663_695_276_000  # DeepSeek-V3's routed experts


def test_config_arithmetic() -> None:
    cfg = fine_grained_config(8, 2, m=4, n_shared=1, expert_hidden=128)
    assert (cfg.n_routed, cfg.top_k, cfg.n_shared, cfg.expert_hidden) == (31, 7, 1, 32)
    assert cfg.active_experts == 8
    assert cfg.combinations == n_combinations(31, 7)
    two_b = fine_grained_config(16, 2, m=4, n_shared=1, expert_hidden=1024)  # DeepSeekMoE 2B: 1 + 63, top-7
    assert (two_b.n_routed, two_b.top_k) == (63, 7)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(n_experts=8, top_k=2, m=3, n_shared=0, expert_hidden=128), "m=3 must divide expert_hidden=128"),
    (dict(n_experts=8, top_k=2, m=1, n_shared=2, expert_hidden=128), "n_shared=2 must be < m·top_k=2"),
    (dict(n_experts=2, top_k=3, m=1, n_shared=0, expert_hidden=8), "top_k=3 must be <= n_experts=2"),
    (dict(n_experts=8, top_k=2, m=0, n_shared=0, expert_hidden=8), "m must be an int >= 1"),
])
def test_config_rejects_bad_layouts(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fine_grained_config(**kwargs)


def test_comparison_models_have_equal_expert_parameters() -> None:
    base = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=16, n_experts=8, top_k=2,
                       expert_hidden=16)
    configs = comparison_configs(base, m=4, n_shared=1)
    assert list(configs) == ["GShard 8 top-2", "fine 32 top-8", "DeepSeekMoE 1+31 top-7", "dense (width 32)"]
    rows = param_table(configs)
    gshard, fine, ds, dense = rows
    router_extra = 2 * 16 * (32 - 8)  # layers * d_model * extra router columns
    assert fine["total"] - gshard["total"] == router_extra
    assert fine["active"] - gshard["active"] == router_extra
    assert ds["total"] - gshard["total"] == 2 * 16 * (31 - 8)
    assert dense["active"] == gshard["active"] - 2 * 16 * 8  # the dense twin has no router
    assert (gshard["combinations"], fine["combinations"]) == (28, 10_518_300)


def test_shared_moe_forward_matches_the_layer_without_renormalisation() -> None:
    torch.manual_seed(0)
    x = torch.randn(11, 8)
    gate = torch.randn(6, 8)
    experts, shared = make_experts(6, 8, 12), make_experts(1, 8, 12)
    y = shared_moe_forward(x, gate, experts, shared, k=3)
    probs = (x @ gate.T).softmax(-1)
    w, idx = probs.topk(3, dim=-1)
    expected = shared[0](x) + sum(w[:, j:j + 1] * torch.stack([experts[int(e)](x[t]) for t, e in enumerate(idx[:, j])])
                                  for j in range(3))
    torch.testing.assert_close(y, expected)
    # the package layer renormalises the k gates (Mixtral, DeepSeek-V3); with k = N the two agree
    layer = MoE(8, 12, 6, 6, n_shared=1, experts="list")
    with torch.no_grad():
        layer.shared.load_state_dict(shared[0].state_dict())
        for mine, ref in zip(layer.experts, experts, strict=True):
            mine.load_state_dict(ref.state_dict())
        layer.router.gate.weight.copy_(gate)
    torch.testing.assert_close(layer(x), shared_moe_forward(x, gate, experts, shared, k=6), atol=1e-5, rtol=1e-4)


def test_expert_similarity_single_experts_match_the_analysis_and_blocks_sum_experts() -> None:
    from moe_course.analysis import expert_output_similarity
    from moe_course.fine_grained import expert_similarity
    from moe_course.model import TinyLM

    torch.manual_seed(0)
    base = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=16, n_experts=8, top_k=2,
                       expert_hidden=16)
    model = TinyLM(comparison_configs(base, m=4, n_shared=0)["fine 32 top-8"])
    data = torch.randint(0, 64, (400,))
    assert expert_similarity(model, data, n_tokens=64) == pytest.approx(expert_output_similarity(model, data, 64))
    # group = 32: one block per layer is too few; group = 16: two blocks, each the sum of 16 experts
    with pytest.raises(ValueError, match="too few for two blocks of group=32"):
        expert_similarity(model, data, group=32)
    sims = expert_similarity(model, data, group=16, n_tokens=64)
    layer = model.moe_layers()[0]
    inputs = []
    hook = layer.register_forward_hook(lambda mod, args, out: inputs.append(args[0].reshape(-1, 16)))
    gen = torch.Generator().manual_seed(1234)
    starts = torch.randint(len(data) - 16, (4,), generator=gen)
    with torch.no_grad():
        model.eval()
        model(data[starts[:, None] + torch.arange(16)].long())
        hook.remove()
        a = sum(layer.experts[e](inputs[0]) for e in range(16))
        b = sum(layer.experts[e](inputs[0]) for e in range(16, 32))
    expected = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean()
    assert sims[0] == pytest.approx(float(expected))
    model.train()
    expert_similarity(model, data, group=16, n_tokens=64)
    assert model.training  # the model's training flag is restored
    with pytest.raises(ValueError, match="group must be an int >= 1"):
        expert_similarity(model, data, group=0)
