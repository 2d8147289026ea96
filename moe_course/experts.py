"""Expert feed-forward networks (notebook 02): the dense FFN of GPT-2, the SwiGLU FFN of Mixtral and DeepSeek, and
all routed experts held as stacked tensors (:class:`GroupedExperts`) for one grouped matrix multiply per projection."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence

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


class ExpertSlice:
    """Expert ``e`` of a :class:`GroupedExperts`, usable like one SwiGLU module: ``experts[e](x)``.

    Its weights are views into the stacked tensors, so gradients reach the shared parameters; it lets the
    teaching dispatchers of notebook 03 and parameter counting (``experts[0].parameters()``) work unchanged.
    """

    def __init__(self, owner: GroupedExperts, index: int) -> None:
        self.owner, self.index = owner, index

    def parameters(self) -> Iterator[torch.Tensor]:
        """The expert's three weight matrices (views of the stacked parameters)."""
        e = self.index
        return iter((self.owner.w_gate[e], self.owner.w_up[e], self.owner.w_down[e]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        e, o = self.index, self.owner
        return (F.silu(x @ o.w_gate[e]) * (x @ o.w_up[e])) @ o.w_down[e]

    def __repr__(self) -> str:
        return f"ExpertSlice({self.index} of {self.owner.n_experts})"


class GroupedExperts(nn.Module):
    """All routed SwiGLU experts as three stacked tensors, run with one grouped GEMM per projection.

    ``w_gate``, ``w_up``: (E, d, h); ``w_down``: (E, h, d) (torchtitan's ``GroupedExperts`` layout, weights
    stored input-major so a token row multiplies them directly). :meth:`forward` takes tokens already sorted
    by expert plus the number of tokens per expert, and computes ``down(silu(x·W_gate) * (x·W_up))`` for each
    expert's contiguous slice. Initialised like :func:`make_experts` (same distribution, same order of
    random draws), so a layer built with either holds the same function.
    """

    def __init__(self, n_experts: int, d_model: int, d_hidden: int) -> None:
        super().__init__()
        for name, value in (("n_experts", n_experts), ("d_model", d_model), ("d_hidden", d_hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GroupedExperts: {name} must be a positive int, got {value!r}")
        self.n_experts, self.d_model, self.d_hidden = n_experts, d_model, d_hidden
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_hidden, d_model))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default init, drawn per expert in make_experts' order (gate, up, down)."""
        for e in range(self.n_experts):
            for w in (self.w_gate, self.w_up, self.w_down):
                linear_weight = torch.empty(w.shape[2], w.shape[1])  # (out, in), as nn.Linear holds it
                nn.init.kaiming_uniform_(linear_weight, a=math.sqrt(5))  # nn.Linear.reset_parameters
                w[e].copy_(linear_weight.t())

    @torch.no_grad()
    def normal_(self, std: float) -> None:
        """Normal init of all weights, drawn per expert in ModuleList order (TinyLM's GPT-2 init)."""
        for e in range(self.n_experts):
            for w in (self.w_gate, self.w_up, self.w_down):
                w[e].copy_(torch.empty(w.shape[2], w.shape[1]).normal_(std=std).t())

    @torch.no_grad()
    def normal_down_(self, std: float) -> None:
        """Re-draw the down projections (GPT-2's scaled init of residual projections), per expert."""
        for e in range(self.n_experts):
            self.w_down[e].copy_(torch.empty(self.d_model, self.d_hidden).normal_(std=std).t())

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:  # noqa: ANN002
        """Accept checkpoints of the ModuleList layout (``experts.3.gate.weight``): stack them on load."""
        if prefix + "w_gate" not in state_dict and prefix + "0.gate.weight" in state_dict:
            for name, key in (("w_gate", "gate"), ("w_up", "up"), ("w_down", "down")):
                keys = [f"{prefix}{e}.{key}.weight" for e in range(self.n_experts)]
                missing = [k for k in keys if k not in state_dict]
                if missing:
                    raise RuntimeError(f"old-layout expert weights incomplete: {missing[0]} is missing; the "
                                       f"checkpoint holds fewer than n_experts={self.n_experts} experts")
                state_dict[prefix + name] = torch.stack([state_dict.pop(k).t() for k in keys])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __len__(self) -> int:
        return self.n_experts

    def __getitem__(self, index: int) -> ExpertSlice:
        if not -self.n_experts <= index < self.n_experts:
            raise IndexError(f"expert index {index} out of range for {self.n_experts} experts")
        return ExpertSlice(self, index % self.n_experts)

    def __iter__(self) -> Iterator[ExpertSlice]:  # type: ignore[override]
        return (ExpertSlice(self, e) for e in range(self.n_experts))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (A, d) tokens sorted by expert; counts: (E,) tokens per expert -> (A, d)."""
        dtype = x.dtype
        if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")  # bf16 under the course's CUDA autocast
        if use_grouped_mm(dtype, x.device, self.w_gate):
            x = x.to(dtype)
            offsets = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's slice; no host sync
            hidden = F.silu(F.grouped_mm(x, self.w_gate.to(dtype), offs=offsets))
            hidden = hidden * F.grouped_mm(x, self.w_up.to(dtype), offs=offsets)  # (A, h)
            return _GradContiguous.apply(F.grouped_mm(hidden, self.w_down.to(dtype), offs=offsets))
        # fallback: each expert (a view of its slice of the stacked weights) on its slice of the tokens
        return torch.cat([self[e](xe) for e, xe in enumerate(x.split(counts.tolist()))])

    @classmethod
    def from_experts(cls, experts: Sequence[nn.Module]) -> GroupedExperts:
        """Stack a ModuleList of :class:`SwiGLU` experts into one GroupedExperts with the same weights."""
        first = experts[0]
        grouped = cls(len(experts), first.gate.in_features, first.gate.out_features)
        with torch.no_grad():
            for e, expert in enumerate(experts):
                grouped.w_gate[e].copy_(expert.gate.weight.t())
                grouped.w_up[e].copy_(expert.up.weight.t())
                grouped.w_down[e].copy_(expert.down.weight.t())
        return grouped.to(first.gate.weight.device)

    def to_experts(self) -> nn.ModuleList:
        """The same weights as a ModuleList of :class:`SwiGLU` modules (the teaching layout)."""
        experts = make_experts(self.n_experts, self.d_model, self.d_hidden)
        with torch.no_grad():
            for e, expert in enumerate(experts):
                expert.gate.weight.copy_(self.w_gate[e].t())
                expert.up.weight.copy_(self.w_up[e].t())
                expert.down.weight.copy_(self.w_down[e].t())
        return experts.to(self.w_gate.device)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}"


class _GradContiguous(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm rejects stride-0 grads)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad.contiguous()


HAS_GROUPED_MM = hasattr(F, "grouped_mm")
"""Whether this torch has ``torch.nn.functional.grouped_mm`` (2.13 and 2.14 have it; 2.4 runs a per-expert loop)."""

GROUPED_MM = os.environ.get("MOE_GROUPED_MM", "auto")
"""``auto`` (use grouped_mm where it applies), ``on`` or ``off``: lets benchmarks compare the two paths."""


def use_grouped_mm(dtype: torch.dtype, device: torch.device, weight: torch.Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` applies: it exists, and the device/dtype/strides suit it.

    CPU: fp32 (torch >= 2.9), row strides a multiple of 16 bytes. CUDA: bf16 on SM >= 80 (Ampere, Hopper).
    """
    if GROUPED_MM == "off" or not HAS_GROUPED_MM:
        return False
    size = torch.finfo(dtype).bits // 8
    if (weight.shape[1] * size) % 16 or (weight.shape[2] * size) % 16:
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return dtype == torch.float32
    return False
