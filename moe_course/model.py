"""A small decoder-only transformer LM (nanoGPT-sized) whose feed-forward block is pluggable.

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

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_hidden", "moe_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.ffn not in ("dense", "moe"):
            raise ValueError(f"unknown ffn {self.ffn!r}; use 'dense' or 'moe' (or pass ffn_factory)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.ffn == "moe":
            validate_moe_args(
                self.d_model, self.expert_hidden, self.n_experts, self.top_k, self.n_shared, self.capacity_factor,
                self.router, self.experts, self.dispatch, aux_loss_coef=self.aux_loss_coef,
                z_loss_coef=self.z_loss_coef, seq_aux_loss_coef=self.seq_aux_loss_coef,
                bias_update_rate=self.bias_update_rate,
            )

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with PyTorch's fused scaled-dot-product kernel."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
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

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
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
            n_groups=cfg.n_groups, topk_groups=cfg.topk_groups, vocab_size=cfg.vocab_size,
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
        b, t = idx.shape
        if t > self.cfg.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, d)
        for block in self.blocks:
            x = block(x, idx)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits, None
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        return logits, ce + self.aux_loss().to(ce.device)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations of idx (B, T) autoregressively."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.cfg.block_size:])
            probs = (logits[:, -1] / max(temperature, 1e-6)).softmax(dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx
