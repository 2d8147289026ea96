"""Expert feed-forward networks: the dense FFN of GPT-2 and the SwiGLU FFN of Mixtral and DeepSeek."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """Dense GPT-style FFN: Linear(d, h) -> GELU -> Linear(h, d). Two matrices."""

    def __init__(self, d_model: int, d_hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_hidden, bias=bias)
        self.down = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        return self.down(F.gelu(self.up(x)))


class SwiGLU(nn.Module):
    """SwiGLU FFN (Shazeer 2020), the expert of Mixtral and DeepSeek: down(silu(gate(x)) * up(x)).

    Three matrices, so a SwiGLU with hidden size h has 3·d·h weights.
    """

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_hidden, bias=False)  # w1 in Mixtral's naming
        self.up = nn.Linear(d_model, d_hidden, bias=False)  # w3
        self.down = nn.Linear(d_hidden, d_model, bias=False)  # w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        return self.down(F.silu(self.gate(x)) * self.up(x))


def make_experts(n_experts: int, d_model: int, d_hidden: int, kind: str = "swiglu") -> nn.ModuleList:
    """A list of ``n_experts`` identical (independently initialised) expert FFNs."""
    if n_experts < 1:
        raise ValueError(f"n_experts must be at least 1, got {n_experts}")
    if kind == "swiglu":
        return nn.ModuleList(SwiGLU(d_model, d_hidden) for _ in range(n_experts))
    if kind == "gelu":
        return nn.ModuleList(FeedForward(d_model, d_hidden) for _ in range(n_experts))
    raise ValueError(f"unknown expert kind {kind!r}; use 'swiglu' or 'gelu'")
