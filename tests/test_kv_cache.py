"""TinyLM's KV cache: decoding token by token gives the full forward pass's logits, routing and samples; the plain
forward pass is bit-identical to the attention it had before the cache existed (the stored results rely on it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_course.model import KVCache, ModelConfig, TinyLM

SHAPE = dict(vocab_size=64, block_size=24, n_layer=3, n_head=2, d_model=16, d_hidden=32, expert_hidden=8)
CONFIGS = {
    "dense": ModelConfig(ffn="dense", **SHAPE),
    "moe top-2": ModelConfig(ffn="moe", n_experts=4, top_k=2, **SHAPE),
    "recipe": ModelConfig(ffn="moe", n_experts=8, top_k=2, n_shared=2, router_score="sigmoid", aux_loss_coef=0.0,
                          bias_update_rate=1e-3, **SHAPE),
    "hash": ModelConfig(ffn="moe", n_experts=4, top_k=1, router="hash", aux_loss_coef=0.0, **SHAPE),
    "moe every 2nd layer, list experts": ModelConfig(ffn="moe", n_experts=4, top_k=2, moe_every=2, experts="list",
                                                     **SHAPE),
}


def _model(cfg: ModelConfig, seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    model = TinyLM(cfg).eval()
    for layer in model.moe_layers():  # a non-zero routing bias, as after training with the bias update
        if hasattr(getattr(layer, "router", None), "expert_bias"):
            layer.router.expert_bias.normal_(0, 0.05)
    return model


def _tokens(batch: int, t: int, vocab: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("prefill", [1, 5])
def test_prefill_then_one_token_at_a_time_equals_the_full_forward(name, prefill):
    model = _model(CONFIGS[name])
    idx = _tokens(3, SHAPE["block_size"])
    with torch.no_grad():
        full, _ = model(idx)
        full_routing = [layer.last_routing.indices.reshape(3, -1, layer.top_k) for layer in model.moe_layers()]
        cache = model.new_cache(3)
        parts = [model.forward_cached(idx[:, :prefill], cache)]
        steps = [[layer.last_routing.indices.reshape(3, -1, layer.top_k) for layer in model.moe_layers()]]
        for t in range(prefill, idx.shape[1]):
            parts.append(model.forward_cached(idx[:, t:t + 1], cache))
            steps.append([layer.last_routing.indices.reshape(3, -1, layer.top_k) for layer in model.moe_layers()])
    cached = torch.cat(parts, dim=1)
    assert cached.shape == full.shape
    assert torch.allclose(cached, full, atol=1e-5, rtol=1e-5), float((cached - full).abs().max())
    assert cache.length == idx.shape[1]
    for i, routing in enumerate(full_routing):  # the same experts for every token, step by step
        assert torch.equal(torch.cat([s[i] for s in steps], dim=1), routing)


def test_chunks_of_several_tokens_use_the_offset_causal_mask():
    model = _model(CONFIGS["recipe"])
    idx = _tokens(2, 20)
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(2)
        cached = torch.cat([model.forward_cached(idx[:, a:b], cache) for a, b in ((0, 6), (6, 13), (13, 20))], dim=1)
    assert torch.allclose(cached, full, atol=1e-5, rtol=1e-5)


def _old_attention(attn, x):
    """CausalSelfAttention.forward as it was before the cache existed, copied verbatim."""
    b, t, d = x.shape
    q, k, v = attn.qkv(x).split(d, dim=-1)
    q, k, v = (z.view(b, t, attn.n_head, d // attn.n_head).transpose(1, 2) for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=attn.dropout if attn.training else 0.0)
    return attn.proj(y.transpose(1, 2).reshape(b, t, d))


def _old_forward(model, idx):
    """TinyLM.forward (without targets) as it was before the cache existed, with the old attention."""
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(idx.shape[1]))
    for block in model.blocks:
        x = x + _old_attention(block.attn, block.norm1(x))
        x = x + (block.ffn(block.norm2(x), token_ids=idx) if getattr(block.ffn, "takes_token_ids", False)
                 else block.ffn(block.norm2(x)))
    return model.head(model.norm(x))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_plain_forward_pass_is_bit_identical_to_the_one_before_the_cache(name):
    model = _model(CONFIGS[name])
    idx = _tokens(4, SHAPE["block_size"])
    with torch.no_grad():
        new, _ = model(idx)
        old = _old_forward(model, idx)
    assert torch.equal(new, old)


def test_the_training_step_is_bit_identical_too():
    losses, grads = [], []
    for forward in ("new", "old"):
        model = _model(CONFIGS["recipe"]).train()
        idx, targets = _tokens(4, 16), _tokens(4, 16, seed=2)
        if forward == "new":
            loss = model(idx, targets)[1]
        else:
            logits = _old_forward(model, idx)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)) + model.aux_loss()
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize("name", ["dense", "recipe"])
def test_generate_cached_samples_what_generate_samples(name):
    model = _model(CONFIGS[name])
    prompt = _tokens(2, 4)
    a = model.generate(prompt, 12, temperature=0.8, generator=torch.Generator().manual_seed(5))
    b = model.generate_cached(prompt, 12, temperature=0.8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_cache_shape_size_and_errors():
    model = _model(CONFIGS["dense"])
    cache = model.new_cache(2, max_len=10)
    assert isinstance(cache, KVCache) and len(cache.layers) == 3 and cache.batch == 2 and cache.max_len == 10
    assert cache.nbytes() == 3 * 2 * (2 * 2 * 10 * 8) * 4  # layers x (k, v) x (B, H, max_len, head_dim) x fp32
    model.forward_cached(_tokens(2, 7), cache)
    with pytest.raises(ValueError, match="7 cached \\+ 4 new tokens exceed the cache's 10 positions"):
        model.forward_cached(_tokens(2, 4), cache)
    with pytest.raises(ValueError, match="idx has 3 sequences but the cache was made for 2"):
        model.forward_cached(_tokens(3, 1), cache)
    with pytest.raises(ValueError, match="max_len must be an int in \\[1, block_size=24\\]"):
        model.new_cache(1, max_len=25)
    with pytest.raises(ValueError, match="exceed block_size 24"):
        model.generate_cached(_tokens(1, 20), 5)
    with pytest.raises(ValueError, match="batch must be a positive int"):
        KVCache(2, 0, 2, 8, 4)


def test_expert_choice_refuses_to_decode():
    model = _model(ModelConfig(ffn="moe", n_experts=4, top_k=2, router="expert_choice", aux_loss_coef=0.0, **SHAPE))
    with pytest.raises(ValueError, match="expert-choice routing picks tokens across the whole sequence"):
        model.forward_cached(_tokens(1, 3), model.new_cache(1))
