"""A small decoder-only transformer LM (nanoGPT-sized) whose feed-forward block is pluggable (notebooks 02-09).

``ModelConfig.ffn`` picks a dense SwiGLU FFN or an :class:`~moe_course.moe.MoE` layer; any other layer
(a different router, shared experts, the expert-parallel layer of notebook 07) is swapped in by passing
``ffn_factory``: a function ``layer_index -> nn.Module`` mapping (B, T, d) to (B, T, d).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_course.experts import GroupedExperts, SwiGLU
from moe_course.moe import MoE, validate_moe_args
from moe_course.routing import ExpertChoiceRouter
from moe_course.validate import check_ids, check_int, check_number, check_tensor


@dataclass
class ModelConfig:
    """Shape of a :class:`TinyLM`. Byte-level by default (vocab 256)."""

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    ffn: str = "moe"  # "dense" or "moe"
    d_hidden: int = 256  # dense FFN hidden width (SwiGLU)
    n_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 128  # hidden width of each routed expert (SwiGLU)
    n_shared: int = 0
    capacity_factor: float | None = None
    router_score: str = "softmax"
    dispatch: str | None = None  # None: "grouped" for grouped experts, "sorted" for a ModuleList
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    moe_every: int = 1  # MoE in layers where layer % moe_every == moe_every - 1, dense FFN elsewhere
    dropout: float = 0.0
    router: str = "topk"  # "topk" (token choice), "expert_choice" or "hash"
    experts: str = "grouped"  # "grouped" (stacked weights, grouped GEMM) or "list" (ModuleList, teaching)
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3 sequence-wise balance loss
    bias_update_rate: float = 0.0  # u of auxiliary-loss-free balancing (DeepSeek-V3)
    n_groups: int = 1  # group-limited routing (DeepSeek-V3): expert groups ...
    topk_groups: int = 1  # ... of which each token may use this many
    noisy_router: bool = False  # Shazeer et al. 2017's trainable noise on the router logits (token choice only)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_hidden", "moe_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head} (each head of "
                             "ModelConfig gets d_model / n_head dimensions); change d_model or n_head")
        if self.ffn not in ("dense", "moe"):
            raise ValueError(f"unknown ffn {self.ffn!r}: ModelConfig.ffn must be 'dense' or 'moe' (or pass "
                             "ffn_factory to TinyLM)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise TypeError(f"ModelConfig.dropout must be a number in [0, 1), got {type(self.dropout).__name__} "
                            f"{self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.ffn == "moe":
            self._check_moe_settings()
            validate_moe_args(
                self.d_model, self.expert_hidden, self.n_experts, self.top_k, self.n_shared, self.capacity_factor,
                self.router, self.experts, self.dispatch, aux_loss_coef=self.aux_loss_coef,
                z_loss_coef=self.z_loss_coef, seq_aux_loss_coef=self.seq_aux_loss_coef,
                bias_update_rate=self.bias_update_rate,
            )
            self._check_groups()

    def _check_moe_settings(self) -> None:
        """MoE settings that TinyLM would otherwise reject only when it builds the layers, or silently ignore."""
        if isinstance(self.expert_hidden, bool) or not isinstance(self.expert_hidden, int) or self.expert_hidden < 1:
            raise ValueError(f"ModelConfig.expert_hidden must be an int >= 1 (each routed expert's hidden "
                             f"width), got {self.expert_hidden!r}")
        if not isinstance(self.router, str):
            raise TypeError(f"ModelConfig.router must be a str ('topk', 'expert_choice' or 'hash'), got "
                            f"{type(self.router).__name__}; pass a router module to MoE(router=...) instead")
        if self.router_score not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown router score {self.router_score!r}: ModelConfig.router_score must be "
                             "'softmax' or 'sigmoid'")
        if self.router_score != "softmax" and self.router != "topk":
            raise ValueError(f"ModelConfig.router_score={self.router_score!r} only applies to router='topk'; "
                             f"router={self.router!r} has its own scores: leave router_score='softmax'")
        if self.moe_every > self.n_layer:
            raise ValueError(f"ModelConfig.moe_every={self.moe_every} > n_layer={self.n_layer} leaves no MoE layer: "
                             "use moe_every <= n_layer, or ffn='dense' for a dense model")
        if not isinstance(self.noisy_router, bool):
            raise TypeError(f"ModelConfig.noisy_router must be True or False, got {self.noisy_router!r}")
        if self.noisy_router and self.router != "topk":
            raise ValueError(f"ModelConfig.noisy_router adds noise to token-choice logits: router={self.router!r} "
                             "has none; use router='topk' or noisy_router=False")
        for name in ("n_groups", "topk_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")

    def _check_groups(self) -> None:
        """Group-limited routing (DeepSeek-V3): the checks TopKRouter would make when TinyLM builds it."""
        g, tg, n, k = self.n_groups, self.topk_groups, self.n_experts, self.top_k
        if g == 1 and tg == 1:
            return
        if self.router != "topk":
            raise ValueError(f"ModelConfig.n_groups/topk_groups limit token-choice routing: router={self.router!r} "
                             "ignores them; use router='topk' or leave n_groups=topk_groups=1")
        if n % g:
            raise ValueError(f"ModelConfig.n_groups={g} must divide n_experts={n} (equal groups of experts)")
        if tg > g:
            raise ValueError(f"ModelConfig.topk_groups must be between 1 and n_groups={g}, got {tg}")
        if g > 1 and self.router_score != "sigmoid":
            raise ValueError("ModelConfig.n_groups > 1 (group-limited routing) follows DeepSeek-V3: set "
                             "router_score='sigmoid'")
        if k > tg * (n // g):
            raise ValueError(f"ModelConfig.top_k={k} experts cannot fit in topk_groups={tg} groups of {n // g} "
                             "experts; raise topk_groups or lower top_k")

    def to_dict(self) -> dict:
        return asdict(self)


class LayerKVCache:
    """One attention layer's keys and values of the tokens decoded so far, in preallocated buffers.

    ``k`` and ``v`` have shape (B, H, max_len, head_dim); the first ``length`` positions are filled.
    :meth:`append` writes the new tokens' keys and values and returns everything written so far.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.shape != v.shape or k.dim() != 4:
            raise ValueError(f"k and v must be equal (B, H, max_len, head_dim) buffers, got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        self.k, self.v = k, v
        self.length = 0

    @property
    def max_len(self) -> int:
        """How many positions the buffers hold."""
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Store (B, H, t, hd) new keys and values; return all keys, all values and the earlier length."""
        past, t = self.length, k.shape[2]
        if k.shape[:2] != self.k.shape[:2] or k.shape[3] != self.k.shape[3]:
            raise ValueError(f"new keys of shape {tuple(k.shape)} do not fit a cache of shape {tuple(self.k.shape)} "
                             "(batch, heads and head size must match)")
        if past + t > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions: {past} are used and {t} more do not fit")
        self.k[:, :, past:past + t] = k
        self.v[:, :, past:past + t] = v
        self.length = past + t
        return self.k[:, :, :past + t], self.v[:, :, :past + t], past


class KVCache:
    """The key/value cache of a whole :class:`TinyLM`: one :class:`LayerKVCache` per block.

    Autoregressive decoding computes each token's keys and values once and keeps them: a new token then
    costs one row of every matrix product instead of re-running the whole prefix. Make one with
    :meth:`TinyLM.new_cache` and pass it to :meth:`TinyLM.forward_cached`.
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, head_dim: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        for name, value in (("n_layer", n_layer), ("batch", batch), ("n_head", n_head), ("head_dim", head_dim),
                            ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        shape = (batch, n_head, max_len, head_dim)
        self.layers = [LayerKVCache(torch.zeros(shape, device=device, dtype=dtype),
                                    torch.zeros(shape, device=device, dtype=dtype)) for _ in range(n_layer)]

    @property
    def length(self) -> int:
        """Tokens cached so far (the position of the next token)."""
        return self.layers[0].length

    @property
    def batch(self) -> int:
        """Sequences decoded side by side."""
        return self.layers[0].k.shape[0]

    @property
    def max_len(self) -> int:
        """Positions each layer can hold."""
        return self.layers[0].max_len

    def nbytes(self) -> int:
        """Bytes the cache's buffers occupy (keys and values of every layer, all positions)."""
        return sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size() for c in self.layers)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache) -> torch.Tensor:
    """Causal attention of t new tokens (q, k, v: (B, H, t, hd)) over the cached tokens and themselves.

    The new keys and values are appended to ``cache``. New token i (at position past + i) attends to positions
    0 ... past + i: with an empty cache this is the plain causal mask, a single new token sees everything.
    """
    k_all, v_all, past = cache.append(k, v)
    t = q.shape[2]
    if past == 0:
        return F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True)
    if t == 1:
        return F.scaled_dot_product_attention(q, k_all, v_all)
    mask = torch.ones(t, past + t, dtype=torch.bool, device=q.device).tril(diagonal=past)  # (t, past + t)
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with PyTorch's fused scaled-dot-product kernel."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        if cache is not None:  # decoding: attend to the cached keys and values of the earlier tokens too
            return self.proj(cached_attention(q, k, v, cache).transpose(1, 2).reshape(b, t, d))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, ffn: nn.Module) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None,
                cache: LayerKVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache)
        if getattr(self.ffn, "takes_token_ids", False):  # hash routing routes by token id
            return x + self.ffn(self.norm2(x), token_ids=token_ids)
        return x + self.ffn(self.norm2(x))


def default_ffn(cfg: ModelConfig, layer: int) -> nn.Module:
    """The feed-forward block ``cfg`` asks for at this layer."""
    if cfg.ffn == "moe" and layer % cfg.moe_every == cfg.moe_every - 1:
        return MoE(
            cfg.d_model, cfg.expert_hidden, cfg.n_experts, cfg.top_k, n_shared=cfg.n_shared,
            capacity_factor=cfg.capacity_factor, dispatch=cfg.dispatch, score=cfg.router_score,
            aux_loss_coef=cfg.aux_loss_coef, z_loss_coef=cfg.z_loss_coef, router=cfg.router, experts=cfg.experts,
            seq_aux_loss_coef=cfg.seq_aux_loss_coef, bias_update_rate=cfg.bias_update_rate,
            n_groups=cfg.n_groups, topk_groups=cfg.topk_groups, vocab_size=cfg.vocab_size, noisy=cfg.noisy_router,
        )
    return SwiGLU(cfg.d_model, cfg.d_hidden)


class TinyLM(nn.Module):
    """Token + position embeddings, ``n_layer`` blocks, final norm, tied output head."""

    def __init__(self, cfg: ModelConfig, ffn_factory: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        make = ffn_factory or (lambda layer: default_ffn(cfg, layer))
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, make(i)) for i in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying (nanoGPT, GPT-2)
        self.apply(self._init)
        grouped = {name + ".w_down": m for name, m in self.named_modules() if isinstance(m, GroupedExperts)}
        for name, p in self.named_parameters():  # scaled init of residual projections (GPT-2)
            if name in grouped:
                grouped[name].normal_down_(0.02 / math.sqrt(2 * cfg.n_layer))
            elif name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, GroupedExperts):  # same draws, in the same order, as a ModuleList of SwiGLU
            module.normal_(0.02)

    def moe_layers(self) -> list[nn.Module]:
        """The feed-forward blocks that route (have ``last_routing``), in layer order."""
        return [b.ffn for b in self.blocks if hasattr(b.ffn, "last_routing")]

    @torch.no_grad()
    def after_step(self) -> None:
        """Post-optimizer-step balancing updates (DeepSeek-V3's routing bias) in every MoE layer."""
        for layer in self.moe_layers():
            if hasattr(layer, "after_step"):
                layer.after_step()

    def aux_loss(self) -> torch.Tensor:
        """Sum of the balancing losses the MoE layers computed in the last forward pass."""
        losses = [m.aux_loss for m in self.moe_layers() if isinstance(getattr(m, "aux_loss", None), torch.Tensor)]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids -> logits (B, T, vocab); with targets also the loss (CE + balancing terms)."""
        self._check_idx(idx)
        b, t = idx.shape
        if t > self.cfg.block_size:
            raise ValueError(f"idx has sequence length {t}, which exceeds block_size {self.cfg.block_size}")
        if targets is not None:
            check_tensor("targets", targets, 2, "(B, T) token ids")
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have idx's shape {tuple(idx.shape)} (idx shifted by one), got "
                                 f"{tuple(targets.shape)}")
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, d)
        for block in self.blocks:
            x = block(x, idx)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits, None
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        return logits, ce + self.aux_loss().to(ce.device)

    def _check_idx(self, idx: object, min_len: int = 0) -> None:
        """idx: a (B, T) tensor of token ids in [0, vocab_size), T >= min_len."""
        check_tensor("idx", idx, 2, "(B, T) token ids", "; give one sequence as idx[None]")
        check_ids("idx", idx, self.cfg.vocab_size, "token ids", f" (vocab_size={self.cfg.vocab_size})")
        if idx.shape[1] < min_len:
            raise ValueError(f"idx must hold at least {min_len} token per sequence (a prompt), got shape "
                             f"{tuple(idx.shape)}")

    def _check_sampling(self, idx: object, max_new_tokens: object, temperature: object) -> None:
        self._check_idx(idx, 1)
        check_int("max_new_tokens", max_new_tokens, 0)
        check_number("temperature", temperature, 0)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations of idx (B, T) autoregressively."""
        self._check_sampling(idx, max_new_tokens, temperature)
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.cfg.block_size:])
            probs = (logits[:, -1] / max(temperature, 1e-6)).softmax(dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx

    def new_cache(self, batch: int, max_len: int | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences of up to ``max_len`` tokens (default: block_size)."""
        check_int("batch", batch, 1)
        max_len = self.cfg.block_size if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= self.cfg.block_size:
            raise ValueError(f"max_len must be an int in [1, block_size={self.cfg.block_size}] (the position table "
                             f"has block_size rows), got {max_len!r}")
        weight = self.tok_emb.weight
        return KVCache(self.cfg.n_layer, batch, self.cfg.n_head, self.cfg.d_model // self.cfg.n_head, max_len,
                       device=weight.device if device is None else device, dtype=dtype or weight.dtype)

    def forward_cached(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run the new tokens idx (B, t) at positions cache.length ... cache.length + t - 1; return logits (B, t, V).

        Each block's attention appends the new keys and values to ``cache`` and attends to all cached ones, so
        prefilling a prompt and then feeding one token at a time gives the logits of :meth:`forward` on the whole
        sequence (up to floating-point rounding; tested). Token-choice routing decides per token, so the MoE
        layers route exactly as in the full pass, and ``last_routing`` holds the new tokens' routing. Two
        exceptions: a capacity limit drops by batch, so its drops differ, and expert choice picks tokens across
        the batch (the future leaks, notebook 04), so it refuses to decode.
        """
        self._check_idx(idx)
        if not isinstance(cache, KVCache) or len(cache.layers) != len(self.blocks):
            raise ValueError("cache must be a KVCache of this model (make one with model.new_cache(batch))")
        b, t = idx.shape
        if b != cache.batch:
            raise ValueError(f"idx has {b} sequences but the cache was made for {cache.batch}")
        start = cache.length
        if start + t > cache.max_len:
            raise ValueError(f"{start} cached + {t} new tokens exceed the cache's {cache.max_len} positions "
                             f"(block_size {self.cfg.block_size}: learned positions stop there)")
        if any(isinstance(getattr(m, "router", None), ExpertChoiceRouter) for m in self.moe_layers()):
            raise ValueError("expert-choice routing picks tokens across the whole sequence, so it cannot decode one "
                             "token at a time like the full forward pass; use token-choice routing")
        pos = torch.arange(start, start + t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, t, d)
        for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
            x = block(x, idx, layer_cache)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate_cached(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """:meth:`generate` with a KV cache: the prompt is prefilled once, then each step runs one new token.

        Same samples as :meth:`generate` for the same generator while the whole text fits in ``block_size``
        (beyond it :meth:`generate` slides its window, which changes every position; this raises instead).
        """
        self._check_sampling(idx, max_new_tokens, temperature)
        b, t = idx.shape
        if t + max_new_tokens > self.cfg.block_size:
            raise ValueError(f"prompt ({t}) + max_new_tokens ({max_new_tokens}) exceed block_size "
                             f"{self.cfg.block_size}: the cache holds learned positions up to block_size; use "
                             "generate() (it re-runs a sliding window) for longer continuations")
        cache = self.new_cache(b, t + max_new_tokens, device=idx.device)
        logits = self.forward_cached(idx, cache)
        for step in range(max_new_tokens):
            probs = (logits[:, -1] / max(temperature, 1e-6)).softmax(dim=-1)
            new = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, new], dim=1)
            if step + 1 < max_new_tokens:
                logits = self.forward_cached(new, cache)
        return idx
