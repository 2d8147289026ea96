"""Routers: which k experts does each token go to, and with what weight?

Three scoring rules from the papers:

* softmax over all experts, keep the top k, renormalise over them (Mixtral; equal to a softmax over the k
  largest logits). Without renormalisation: Switch Transformer (k = 1); Qwen's MoE configs expose this
  choice as ``norm_topk_prob`` (the Hugging Face class defaults to False, the released Qwen3 MoE models set True).
* sigmoid scores per expert, top-k chosen on ``score + bias`` but weighted by the plain score, renormalised
  (DeepSeek-V3; the bias is the auxiliary-loss-free balancing term of notebook 06).
* noisy top-k gating (Shazeer et al. 2017): H = x·W_g + ε·softplus(x·W_noise), keep the top k, softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """What a router decided for a batch of T tokens over N experts."""

    weights: torch.Tensor  # (T, k) combine weights of the chosen experts
    indices: torch.Tensor  # (T, k) chosen expert ids; column 0 is each token's first choice
    logits: torch.Tensor  # (T, N) raw router logits (for the z-loss)
    scores: torch.Tensor  # (T, N) per-expert probabilities/affinities (for balancing losses, metrics)


def _check_k(k: int, n_experts: int) -> None:
    if not 1 <= k <= n_experts:
        raise ValueError(
            f"top-k must be between 1 and the number of experts ({n_experts}), got k={k}; "
            "lower k or add experts"
        )


def softmax_topk(
    logits: torch.Tensor, k: int, renormalize: bool = True, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, keep the k largest, optionally renormalise them to sum to 1.

    logits: (T, N) -> weights (T, k), indices (T, k). A ``bias`` (N,) shifts only which experts are
    chosen (top-k of ``probs + bias``); the weights stay the plain probabilities.
    """
    _check_k(k, logits.shape[-1])
    probs = logits.softmax(dim=-1)
    if bias is None:
        weights, indices = probs.topk(k, dim=-1)
    else:
        indices = (probs + bias).topk(k, dim=-1).indices
        weights = probs.gather(-1, indices)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def sigmoid_topk(
    logits: torch.Tensor,
    k: int,
    bias: torch.Tensor | None = None,
    renormalize: bool = True,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing: sigmoid affinities; choose top-k of ``score + bias``; weight by the score.

    The bias only changes *which* experts are chosen, never the weights (arXiv:2412.19437, eqs. 13-16).
    """
    _check_k(k, logits.shape[-1])
    scores = logits.sigmoid()
    choice = scores if bias is None else scores + bias
    indices = choice.topk(k, dim=-1).indices
    weights = scores.gather(-1, indices)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * scale, indices


def noisy_topk_logits(
    clean: torch.Tensor, noise_logits: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """H = clean + ε·softplus(noise_logits) with ε ~ N(0, 1) (Shazeer et al. 2017, eq. 4)."""
    eps = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    return clean + eps * F.softplus(noise_logits)


def keep_topk_softmax(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(KeepTopK(H, k)): logits outside the top k set to -inf before the softmax."""
    _check_k(k, h.shape[-1])
    top, indices = h.topk(k, dim=-1)
    return top.softmax(dim=-1), indices


class TopKRouter(nn.Module):
    """A linear router over N experts that keeps k per token.

    ``score``: "softmax" (Mixtral/Switch/Qwen) or "sigmoid" (DeepSeek-V3). ``noisy`` adds the trainable
    noise of Shazeer et al. (2017) while training. ``expert_bias`` (a buffer, zeros) shifts only the
    choice of experts; notebook 06 updates it to balance load without an auxiliary loss.
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        k: int,
        score: str = "softmax",
        renormalize: bool = True,
        noisy: bool = False,
    ) -> None:
        super().__init__()
        _check_k(k, n_experts)
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown router score {score!r}; use 'softmax' or 'sigmoid'")
        self.n_experts, self.k, self.score, self.renormalize = n_experts, k, score, renormalize
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.noise = nn.Linear(d_model, n_experts, bias=False) if noisy else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)
        self.register_buffer("expert_bias", torch.zeros(n_experts))

    def forward(self, x: torch.Tensor) -> Routing:  # x: (T, d)
        if x.dim() != 2 or x.shape[-1] != self.gate.in_features:
            raise ValueError(
                f"router expects tokens of shape (T, {self.gate.in_features}), got {tuple(x.shape)}"
            )
        logits = self.gate(x)  # (T, N)
        if self.noise is not None and self.training:
            logits = noisy_topk_logits(logits, self.noise(x))
        if self.score == "sigmoid":
            weights, indices = sigmoid_topk(logits, self.k, self.expert_bias, self.renormalize)
            scores = logits.sigmoid()
        else:
            bias = self.expert_bias if self.expert_bias.any() else None
            weights, indices = softmax_topk(logits, self.k, self.renormalize, bias)
            scores = logits.softmax(dim=-1)
        return Routing(weights=weights, indices=indices, logits=logits, scores=scores)
