"""The composable MoE layer: GroupedExperts equals the ModuleList experts, routers, policies, validation."""

from __future__ import annotations

import math

import pytest
import torch

import moe_course.experts as experts_mod
from moe_course.balancing import bias_update, importance_loss, sequence_aux_loss, switch_aux_loss
from moe_course.dispatch import DISPATCHERS, dispatch_dense, dispatch_grouped, sort_by_expert
from moe_course.experts import GroupedExperts, make_experts
from moe_course.model import ModelConfig, TinyLM
from moe_course.moe import MoE
from moe_course.params import count_model
from moe_course.routing import ExpertChoiceRouter, HashRouter, TopKRouter, expert_choice, sigmoid_topk


def _probe(y: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1, 1, y.numel()).reshape(y.shape)


@pytest.fixture(params=["auto", "off"])
def grouped_mm_mode(request, monkeypatch):
    """Run a test with grouped_mm where it applies, and with the per-expert loop fallback."""
    monkeypatch.setattr(experts_mod, "GROUPED_MM", request.param)
    return request.param


@pytest.mark.parametrize("k", [1, 2, 3])
def test_grouped_experts_equal_modulelist_forward_and_every_gradient(k, grouped_mm_mode):
    torch.manual_seed(k)
    listed = make_experts(6, 16, 32)
    grouped = GroupedExperts.from_experts(listed)
    x = torch.randn(20, 16)
    idx = torch.stack([torch.randperm(4)[:k] for _ in range(20)])  # experts 4 and 5 get no token
    w = torch.rand(20, k)
    outs = []
    for fn, bank in ((dispatch_dense, listed), (dispatch_grouped, grouped)):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xx, ww, idx, bank)
        (y * _probe(y)).sum().backward()
        outs.append((y.detach(), xx.grad, ww.grad))
    for a, b in zip(outs[0], outs[1], strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    for e, expert in enumerate(listed):  # every weight's gradient, the empty experts' exactly zero
        assert torch.allclose(grouped.w_gate.grad[e], expert.gate.weight.grad.t(), atol=1e-5)
        assert torch.allclose(grouped.w_up.grad[e], expert.up.weight.grad.t(), atol=1e-5)
        assert torch.allclose(grouped.w_down.grad[e], expert.down.weight.grad.t(), atol=1e-5)
    assert grouped.w_gate.grad[4:].abs().sum() == 0 and grouped.w_down.grad[5].abs().sum() == 0


def test_grouped_experts_accept_a_stride0_gradient_and_roundtrip_layouts():
    torch.manual_seed(0)
    grouped = GroupedExperts(3, 16, 32)
    y = grouped(torch.randn(7, 16), torch.tensor([3, 0, 4]))
    y.sum().backward()  # a stride-0 incoming gradient, which grouped_mm itself rejects
    assert grouped.w_up.grad.shape == (3, 16, 32)
    back = GroupedExperts.from_experts(grouped.to_experts())
    assert all(torch.equal(getattr(back, n), getattr(grouped, n)) for n in ("w_gate", "w_up", "w_down"))


def test_teaching_dispatchers_run_on_grouped_experts_through_slices():
    torch.manual_seed(0)
    grouped = GroupedExperts(5, 8, 16)
    x, idx, w = torch.randn(12, 8), torch.randint(0, 5, (12, 2)), torch.rand(12, 2)
    ref = dispatch_grouped(x, w, idx, grouped)
    for name in ("dense", "loop", "sorted"):
        assert torch.allclose(DISPATCHERS[name](x, w, idx, grouped), ref, atol=1e-5), name
    assert sum(p.numel() for p in grouped[0].parameters()) == 3 * 8 * 16
    with pytest.raises(IndexError, match="out of range"):
        grouped[5]


@pytest.mark.parametrize("kw", [dict(), dict(n_shared=1), dict(capacity_factor=1.0), dict(score="sigmoid")])
def test_moe_grouped_and_list_layouts_hold_the_same_function(kw):
    torch.manual_seed(0)
    a = MoE(16, 32, 8, 2, experts="list", **kw)
    torch.manual_seed(0)
    b = MoE(16, 32, 8, 2, **kw)  # grouped is the default: same random draws, same weights
    x = torch.randn(2, 9, 16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    assert torch.allclose(ya, yb, atol=1e-5)
    ya.mul(_probe(ya)).sum().backward()
    yb.mul(_probe(yb)).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
    assert torch.allclose(a.router.gate.weight.grad, b.router.gate.weight.grad, atol=1e-5)
    assert torch.allclose(a.experts[3].down.weight.grad.t(), b.experts.w_down.grad[3], atol=1e-5)
    assert count_model(a) == count_model(b)


def test_tinylm_grouped_equals_list_and_old_checkpoints_load(tmp_path):
    cfg = dict(block_size=16, n_layer=2, n_head=2, d_model=32, n_experts=4, top_k=2, expert_hidden=16, n_shared=1)
    torch.manual_seed(0)
    old = TinyLM(ModelConfig(experts="list", **cfg))
    torch.manual_seed(0)
    new = TinyLM(ModelConfig(**cfg))
    idx = torch.randint(0, 256, (2, 16))
    assert torch.allclose(old(idx)[0], new(idx)[0], atol=1e-5)
    assert count_model(old) == count_model(new)
    # a checkpoint saved with the ModuleList layout loads into the grouped layout
    reloaded = TinyLM(ModelConfig(**cfg))
    reloaded.load_state_dict(old.state_dict())
    assert torch.allclose(reloaded(idx)[0], old(idx)[0], atol=1e-5)
    broken = {k: v for k, v in old.state_dict().items() if "experts.3." not in k}
    with pytest.raises(RuntimeError, match="experts.3.gate.weight is missing"):
        TinyLM(ModelConfig(**cfg)).load_state_dict(broken)


def test_sort_by_expert_is_stable_and_counts_empty_experts():
    idx = torch.tensor([[2, 0], [0, 2], [2, 1]])
    order, token_of, counts = sort_by_expert(idx, 4)
    assert order.tolist() == [1, 2, 5, 0, 3, 4]
    assert token_of.tolist() == [0, 1, 2, 0, 1, 2]
    assert counts.tolist() == [2, 1, 3, 0]


def test_expert_choice_by_hand_and_balance():
    scores = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.1, 0.9], [0.5, 0.5]])
    w, tok = expert_choice(scores, 2)
    assert tok.tolist() == [[0, 1], [2, 3]] and torch.allclose(w, torch.tensor([[0.7, 0.6], [0.9, 0.5]]))
    with pytest.raises(ValueError, match="capacity"):
        expert_choice(scores, 0)
    torch.manual_seed(0)
    layer = MoE(16, 32, 4, 2, router="expert_choice")  # capacity factor k: c = T·2/4
    layer(torch.randn(3, 8, 16))
    r = layer.last_routing
    assert r.counts(4).tolist() == [12, 12, 12, 12]
    assert r.experts_per_token().sum() == 48 and int(r.experts_per_token().min()) >= 0


def test_expert_choice_layer_matches_manual_and_leaks_the_future():
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, 1, router="expert_choice", capacity_factor=1.0)
    x = torch.randn(8, 8)
    y = layer(x)
    r = layer.router(x)
    manual = torch.zeros_like(x)
    for e in range(4):
        for j, t in enumerate(r.token_ids[e].tolist()):
            manual[t] += r.weights[e, j] * layer.experts[e](x[t])
    assert torch.allclose(y, manual, atol=1e-5)
    # causal leak: change only the LAST token of a sequence; an earlier token's output changes
    torch.manual_seed(1)
    lm = TinyLM(ModelConfig(block_size=16, n_layer=1, n_head=2, d_model=32, n_experts=4, top_k=1, expert_hidden=16,
                            router="expert_choice", aux_loss_coef=0.0))
    idx = torch.randint(0, 256, (1, 16))
    changed = [lm(torch.cat([idx[:, :-1], torch.tensor([[t]])], dim=1))[0][0, :-1] for t in range(32)]
    assert any(not torch.allclose(changed[0], c, atol=1e-6) for c in changed[1:])


def test_hash_router_routes_by_token_id_only():
    router = HashRouter(8, 256, k=2, seed=0)
    ids = torch.tensor([5, 9, 5])
    r = router(torch.randn(3, 4), ids)
    assert torch.equal(r.indices[0], r.indices[2]) and r.indices.shape == (3, 2)
    assert (r.indices[:, 0] != r.indices[:, 1]).all() and torch.allclose(r.weights, torch.full((3, 2), 0.5))
    with pytest.raises(ValueError, match="token_ids"):
        router(torch.randn(3, 4))
    lm = TinyLM(ModelConfig(block_size=8, n_layer=1, n_head=2, d_model=16, n_experts=4, top_k=1, expert_hidden=8,
                            router="hash", aux_loss_coef=0.0))
    _, loss = lm(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8)))
    assert math.isfinite(float(loss.detach()))


def _deepseek_v3_gate(scores, bias, topk, n_groups, topk_groups):
    """DeepSeek-V3 inference/model.py ``Gate.forward``, sigmoid branch, transcribed (route_scale 1)."""
    original = scores
    scores = scores + bias
    scores = scores.view(scores.size(0), n_groups, -1)
    group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
    indices = group_scores.topk(topk_groups, dim=-1)[1]
    mask = scores.new_ones(scores.size(0), n_groups, dtype=bool).scatter_(1, indices, False)
    scores = scores.masked_fill_(mask.unsqueeze(-1), float("-inf")).flatten(1)
    indices = torch.topk(scores, topk, dim=-1)[1]
    weights = original.gather(1, indices)
    return weights / weights.sum(dim=-1, keepdim=True), indices


def test_group_limited_routing_matches_deepseek_v3_gate():
    torch.manual_seed(0)
    logits, bias = torch.randn(50, 16), 0.1 * torch.randn(16)
    w, i = sigmoid_topk(logits, 4, bias, n_groups=4, topk_groups=2)
    rw, ri = _deepseek_v3_gate(logits.sigmoid(), bias, 4, 4, 2)
    assert torch.equal(i, ri) and torch.allclose(w, rw)
    groups = i // 4  # each token's experts lie in at most 2 groups
    assert max(len(set(row)) for row in groups.tolist()) <= 2
    with pytest.raises(ValueError, match="score='sigmoid'"):
        TopKRouter(8, 16, 2, n_groups=4, topk_groups=2)


def test_balancing_losses_by_hand():
    # uniform routing: Switch loss 1, importance loss 0
    scores = torch.full((4, 4), 0.25)
    idx = torch.tensor([[0], [1], [2], [3]])
    assert float(switch_aux_loss(scores, idx, 4)) == pytest.approx(1.0)
    assert float(importance_loss(scores)) == pytest.approx(0.0)
    # importance (1.5, 0.5): mean 1, population variance 0.25 -> CV² 0.25
    assert float(importance_loss(torch.tensor([[1.0, 0.0], [0.5, 0.5]]))) == pytest.approx(0.25)
    # sequence-wise: one sequence, 2 tokens, 2 experts, k=1; s' = s / Σ s
    s = torch.tensor([[[0.6, 0.2], [0.2, 0.2]]])
    i = torch.tensor([[[0], [1]]])
    p = torch.tensor([(0.75 + 0.5) / 2, (0.25 + 0.5) / 2])
    f = torch.tensor([1.0, 1.0])  # N/(k·S) · count = 2/2 · 1
    assert float(sequence_aux_loss(s, i, 2)) == pytest.approx(float((f * p).sum()))
    assert math.isfinite(float(switch_aux_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long), 4)))


def test_bias_update_sign_and_it_is_no_parameter():
    b = bias_update(torch.zeros(4), torch.tensor([9, 1, 5, 5]), 1e-3)  # mean 5
    assert torch.allclose(b, torch.tensor([-1e-3, 1e-3, 0.0, 0.0]))
    torch.manual_seed(0)
    lm = TinyLM(ModelConfig(block_size=8, n_layer=1, n_head=2, d_model=16, n_experts=4, top_k=2, expert_hidden=8,
                            router_score="sigmoid", aux_loss_coef=0.0, bias_update_rate=0.01))
    names = {n for n, _ in lm.named_parameters()}
    assert not any("expert_bias" in n for n in names)
    lm(torch.randint(0, 256, (4, 8)), torch.randint(0, 256, (4, 8)))
    counts = lm.moe_layers()[0].step_counts.clone()
    lm.after_step()
    bias = lm.moe_layers()[0].router.expert_bias
    assert torch.allclose(bias, 0.01 * torch.sign(counts.float().mean() - counts.float()))
    assert lm.moe_layers()[0].step_counts is None


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(d_model=0), "d_model must be an int >= 1"),
        (dict(n_experts=-2), "n_experts must be an int >= 1"),
        (dict(top_k=2.0), "top_k must be an int"),
        (dict(top_k=True), "top_k must be an int"),
        (dict(top_k=9), "lower top_k or add experts"),
        (dict(capacity_factor=0.0), "capacity_factor must be None"),
        (dict(capacity_factor=float("nan")), "capacity_factor must be None"),
        (dict(n_shared=-1), "n_shared must be an int >= 0"),
        (dict(aux_loss_coef=-0.1), "aux_loss_coef must be a finite number >= 0"),
        (dict(router="random"), "unknown router"),
        (dict(experts="stacked"), "unknown experts layout"),
        (dict(dispatch="fast"), "unknown dispatch"),
        (dict(router="expert_choice", aux_loss_coef=0.01), "balances without losses"),
    ],
)
def test_moe_rejects_bad_settings_at_construction(kw, message):
    base = dict(d_model=8, d_hidden=16, n_experts=8, top_k=2)
    base.update(kw)
    with pytest.raises((ValueError, TypeError), match=message):
        MoE(**base)
    cfg = dict(d_model=8 if "d_model" not in kw else kw["d_model"], n_head=1 if kw.get("d_model", 8) else 1,
               n_experts=base["n_experts"], top_k=base["top_k"], expert_hidden=16)
    for key in ("capacity_factor", "n_shared", "aux_loss_coef", "router", "experts", "dispatch"):
        if key in kw:
            cfg[key] = kw[key]
    if kw.get("d_model") == 0:
        message = "d_model must be a positive int"
    with pytest.raises((ValueError, TypeError), match=message):
        ModelConfig(**cfg)


def test_expert_choice_router_rejects_bad_capacity():
    with pytest.raises(ValueError, match="capacity_factor must be a positive finite"):
        ExpertChoiceRouter(8, 4, capacity_factor=-1.0)


def test_mask_top_skips_each_tokens_best_experts():
    torch.manual_seed(0)
    router = TopKRouter(8, 6, 2)
    x = torch.randn(10, 8)
    best = router(x).indices
    router.mask_top = 1
    masked = router(x)
    assert not (masked.indices == best[:, :1]).any()  # the first choice is gone ...
    assert torch.equal(masked.indices[:, 0], best[:, 1])  # ... so the second choice moves up
    router.mask_top = 5
    with pytest.raises(ValueError, match="mask_top"):
        router(x)


def test_switch_loss_on_sigmoid_scores_uses_normalised_scores():
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, 2, score="sigmoid", aux_loss_coef=1.0).train()
    x = torch.randn(12, 8)
    layer(x)
    r = layer.router(x)
    normed = r.scores / r.scores.sum(dim=-1, keepdim=True)
    assert torch.allclose(layer.aux_loss, switch_aux_loss(normed, r.indices, 4))
    soft = MoE(8, 16, 4, 2, aux_loss_coef=1.0).train()
    soft(x)
    rs = soft.router(x)
    assert torch.allclose(soft.aux_loss, switch_aux_loss(rs.scores, rs.indices, 4))  # softmax: unchanged


def test_moe_rejects_non_float_tokens():
    layer = MoE(8, 16, 4, 2)
    with pytest.raises(TypeError, match="floating-point token vectors"):
        layer(torch.randint(0, 5, (3, 8)))
