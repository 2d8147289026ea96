"""The MoE feed-forward layer: a router picks k of N expert FFNs per token; plus the soft mixture.

:class:`MoE` is what the transformer's feed-forward slot holds (notebooks 02-08). Its attributes
``experts``, ``n_experts``, ``top_k`` and ``shared`` are what :mod:`moe_course.params` counts, and after
each forward pass ``last_routing`` holds the router's decision for the load metrics.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_course.balancing import router_z_loss, switch_aux_loss
from moe_course.dispatch import capacity_mask, expert_capacity, get_dispatcher
from moe_course.experts import SwiGLU, make_experts
from moe_course.routing import Routing, TopKRouter


class MoE(nn.Module):
    """Sparse MoE layer: ``y = Σ_{i ∈ topk(x)} w_i(x) · E_i(x)`` (+ shared experts, if any).

    Args:
        d_model: token width.
        d_hidden: hidden width of each routed expert (SwiGLU).
        n_experts: number of routed experts N.
        top_k: experts per token k (1 ≤ k ≤ N).
        n_shared: shared experts that every token passes through (DeepSeekMoE); built as one SwiGLU of
            width ``n_shared · d_hidden``, as in DeepSeek's reference code.
        capacity_factor: if set, each expert takes at most ceil(cf · T · k / N) assignments; the rest are
            dropped (the token's residual carries it).
        dispatch: "sorted" (default), "loop" or "dense"; all compute the same function.
        score, renormalize, noisy: passed to :class:`~moe_course.routing.TopKRouter`.
        aux_loss_coef, z_loss_coef: weights of the Switch load-balancing loss and the router z-loss; the
            weighted sum of the last forward pass is in ``self.aux_loss``.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        n_experts: int,
        top_k: int,
        n_shared: int = 0,
        capacity_factor: float | None = None,
        dispatch: str = "sorted",
        score: str = "softmax",
        renormalize: bool = True,
        noisy: bool = False,
        aux_loss_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        router: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.router = router or TopKRouter(d_model, n_experts, top_k, score, renormalize, noisy)
        self.experts = make_experts(n_experts, d_model, d_hidden)
        self.shared = SwiGLU(d_model, n_shared * d_hidden) if n_shared > 0 else None
        self.capacity_factor = capacity_factor
        self.dispatch = dispatch
        self._dispatch = get_dispatcher(dispatch)
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_routing: Routing | None = None
        self.last_dropped: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) or (T, d)
        shape = x.shape
        if x.shape[-1] != self.router.gate.in_features:
            raise ValueError(f"MoE expects last dimension {self.router.gate.in_features}, got {tuple(shape)}")
        flat = x.reshape(-1, shape[-1])  # (tokens, d)
        routing = self.router(flat)
        weights = routing.weights
        if self.capacity_factor is not None:
            cap = expert_capacity(flat.shape[0], self.n_experts, self.top_k, self.capacity_factor)
            keep = capacity_mask(routing.indices, self.n_experts, cap)
            weights = weights * keep
            self.last_dropped = float(1 - keep.float().mean())
        y = self._dispatch(flat, weights, routing.indices, self.experts)
        if self.shared is not None:
            y = y + self.shared(flat)
        self.last_routing = Routing(
            weights=weights.detach(), indices=routing.indices.detach(),
            logits=routing.logits.detach(), scores=routing.scores.detach(),
        )
        aux = flat.new_zeros(())
        if self.training and self.aux_loss_coef:
            aux = aux + self.aux_loss_coef * switch_aux_loss(routing.scores, routing.indices, self.n_experts)
        if self.training and self.z_loss_coef:
            aux = aux + self.z_loss_coef * router_z_loss(routing.logits)
        self.aux_loss = aux
        return y.reshape(shape)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, top_k={self.top_k}, dispatch={self.dispatch!r}"


class SoftMixture(nn.Module):
    """Every expert runs on every token, mixed by a softmax gate: ``y = Σ_i softmax(x·W_g)_i · E_i(x)``.

    The 1991 mixture placed in a transformer: exact but its cost grows linearly with N (notebook 02).
    """

    def __init__(self, d_model: int, d_hidden: int, n_experts: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.top_k = n_experts  # every expert is active: params.count_model counts it so
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.experts = make_experts(n_experts, d_model, d_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d)
        gates = self.gate(x).softmax(dim=-1)  # (..., N)
        outs = torch.stack([expert(x) for expert in self.experts], dim=-2)  # (..., N, d)
        return (gates.unsqueeze(-1) * outs).sum(dim=-2)
