"""The MoE feed-forward layer (notebook 02 onwards), composed of small parts; plus the soft mixture.

``MoE`` = router (which experts) + routed experts (the weights) + optional shared experts + a dispatcher
(sort tokens by expert, run the experts, weighted scatter-add back) + balancing policies (losses and
post-step updates). Each part is its own small module or function, so a new router or policy touches
nothing else (torchtitan's MoE is split the same way):

=====================  ================================================================================
``router``             :class:`~moe_course.routing.TopKRouter`, ``ExpertChoiceRouter`` or ``HashRouter``
``experts``            :class:`~moe_course.experts.GroupedExperts` (stacked weights, grouped GEMM; default)
                       or the teaching ``ModuleList`` of :class:`~moe_course.experts.SwiGLU`
``shared``             DeepSeekMoE's shared experts, one SwiGLU of width ``n_shared · d_hidden``, or None
``balancing``          ``nn.ModuleList`` of :mod:`moe_course.balancing` policies
=====================  ================================================================================

Its attributes ``experts``, ``n_experts``, ``top_k`` and ``shared`` are what :mod:`moe_course.params`
counts, and after each forward pass ``last_routing`` holds the router's decision for the load metrics.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_course.balancing import BalancingPolicy, BiasUpdate, RouterZLoss, SequenceAuxLoss, SwitchAuxLoss
from moe_course.dispatch import DISPATCHERS, capacity_mask, combine, expert_capacity, get_dispatcher
from moe_course.experts import GroupedExperts, SwiGLU, make_experts
from moe_course.routing import ExpertChoiceRouter, ExpertChoiceRouting, HashRouter, Routing, TopKRouter

ROUTERS = ("topk", "expert_choice", "hash")
EXPERT_LAYOUTS = ("grouped", "list")


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _nonneg_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def validate_moe_args(
    d_model: object, d_hidden: object, n_experts: object, top_k: object, n_shared: object = 0,
    capacity_factor: object = None, router: object = "topk", experts: object = "grouped",
    dispatch: object = None, **coefs: object,
) -> None:
    """Reject bad MoE settings at construction, naming the argument and the fix (shared by MoE and ModelConfig)."""
    _positive_int("d_model", d_model)
    _positive_int("d_hidden", d_hidden)
    _positive_int("n_experts", n_experts)
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__} {top_k!r}")
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}; lower top_k or add experts")
    _positive_int("n_shared", n_shared, minimum=0)
    if capacity_factor is not None:
        cf = capacity_factor
        if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not math.isfinite(cf) or cf <= 0:
            raise ValueError(f"capacity_factor must be None (dropless) or a finite number > 0, got {cf!r}")
    if isinstance(router, str) and router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; use one of {ROUTERS} or pass a router module")
    if experts not in EXPERT_LAYOUTS:
        raise ValueError(f"unknown experts layout {experts!r}; use 'grouped' (fast) or 'list' (teaching)")
    if dispatch is not None and dispatch not in DISPATCHERS:
        raise ValueError(f"unknown dispatch {dispatch!r}; choose one of {sorted(DISPATCHERS)} (or None: automatic)")
    if dispatch == "grouped" and experts != "grouped":
        raise ValueError("dispatch='grouped' needs experts='grouped'; use dispatch='sorted' for a ModuleList")
    for name, value in coefs.items():
        _nonneg_float(name, value)
    balanced_by_design = router in ("expert_choice", "hash") or isinstance(router, (ExpertChoiceRouter, HashRouter))
    if balanced_by_design and any(coefs.values()):
        raise ValueError(f"router={router!r} balances without losses or a bias: set "
                         f"{', '.join(coefs)} to 0")


class MoE(nn.Module):
    """Sparse MoE layer: ``y = Σ_{i ∈ topk(x)} w_i(x) · E_i(x)`` (+ shared experts, if any).

    Args:
        d_model: token width.
        d_hidden: hidden width of each routed expert (SwiGLU).
        n_experts: number of routed experts N.
        top_k: experts per token k (1 ≤ k ≤ N); for expert choice, the capacity factor defaults to k so the
            layer does the same work as token choice.
        n_shared: shared experts that every token passes through (DeepSeekMoE); built as one SwiGLU of
            width ``n_shared · d_hidden``, as in DeepSeek's reference code.
        capacity_factor: token choice: if set, each expert takes at most ceil(cf · T · k / N) assignments and
            the rest are dropped (the token's residual carries it). Expert choice: c = ceil(T · cf / N).
        dispatch: None (automatic: "grouped" for grouped experts, else "sorted"), "grouped", "sorted",
            "loop" or "dense"; all compute the same function.
        score, renormalize, noisy, n_groups, topk_groups: passed to :class:`~moe_course.routing.TopKRouter`.
        aux_loss_coef, z_loss_coef, seq_aux_loss_coef: weights of the Switch loss, the router z-loss and
            DeepSeek-V3's sequence-wise loss; their sum over the last training forward is ``self.aux_loss``.
        bias_update_rate: u of auxiliary-loss-free balancing (call :meth:`after_step` after each optimizer step).
        router: "topk" (default), "expert_choice", "hash", or a router module of your own.
        experts: "grouped" (stacked weights, grouped GEMM) or "list" (a ModuleList of SwiGLU, for teaching).
        vocab_size: token ids the hash router maps.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        n_experts: int,
        top_k: int,
        n_shared: int = 0,
        capacity_factor: float | None = None,
        dispatch: str | None = None,
        score: str = "softmax",
        renormalize: bool = True,
        noisy: bool = False,
        aux_loss_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        router: str | nn.Module | None = None,
        experts: str = "grouped",
        seq_aux_loss_coef: float = 0.0,
        bias_update_rate: float = 0.0,
        n_groups: int = 1,
        topk_groups: int = 1,
        vocab_size: int = 256,
    ) -> None:
        super().__init__()
        router = "topk" if router is None else router
        validate_moe_args(d_model, d_hidden, n_experts, top_k, n_shared, capacity_factor, router, experts, dispatch,
                          aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef,
                          seq_aux_loss_coef=seq_aux_loss_coef, bias_update_rate=bias_update_rate)
        self.d_model, self.n_experts, self.top_k = d_model, n_experts, top_k
        self.router = self._make_router(router, capacity_factor, score, renormalize, noisy, n_groups, topk_groups,
                                        vocab_size)
        self.takes_token_ids = isinstance(self.router, HashRouter)
        token_choice = not isinstance(self.router, ExpertChoiceRouter)
        if bias_update_rate and not hasattr(self.router, "expert_bias"):
            raise ValueError("bias_update_rate needs a router with an expert_bias buffer (TopKRouter)")
        self.experts = GroupedExperts(n_experts, d_model, d_hidden) if experts == "grouped" else \
            make_experts(n_experts, d_model, d_hidden)
        self.shared = SwiGLU(d_model, n_shared * d_hidden) if n_shared > 0 else None
        self.capacity_factor = capacity_factor if token_choice else None
        self.dispatch = dispatch or ("grouped" if experts == "grouped" else "sorted")
        self._dispatch = get_dispatcher(self.dispatch)
        policies: list[BalancingPolicy] = []
        if aux_loss_coef:
            policies.append(SwitchAuxLoss(aux_loss_coef, n_experts, normalize=score == "sigmoid"))
        if z_loss_coef:
            policies.append(RouterZLoss(z_loss_coef))
        if seq_aux_loss_coef:
            policies.append(SequenceAuxLoss(seq_aux_loss_coef, n_experts))
        if bias_update_rate:
            policies.append(BiasUpdate(bias_update_rate))
        self.balancing = nn.ModuleList(policies)
        self.step_counts: torch.Tensor | None = None  # (N,) assignments since the last after_step (not state)
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_routing: Routing | ExpertChoiceRouting | None = None
        self.last_dropped: float = 0.0

    def _make_router(self, router: str | nn.Module, capacity_factor: float | None, score: str, renormalize: bool,
                     noisy: bool, n_groups: int, topk_groups: int, vocab_size: int) -> nn.Module:
        if isinstance(router, nn.Module):
            return router
        if router == "expert_choice":
            return ExpertChoiceRouter(self.d_model, self.n_experts, capacity_factor or float(self.top_k))
        if router == "hash":
            return HashRouter(self.n_experts, vocab_size, self.top_k)
        return TopKRouter(self.d_model, self.n_experts, self.top_k, score, renormalize, noisy, n_groups, topk_groups)

    @property
    def aux_loss_coef(self) -> float:
        """Weight of the Switch auxiliary loss (0 when the layer has none)."""
        return next((p.coef for p in self.balancing if isinstance(p, SwitchAuxLoss)), 0.0)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:  # (B, S, d) or (T, d)
        shape = x.shape
        if not x.is_floating_point():
            raise TypeError(f"MoE expects floating-point token vectors, got dtype {x.dtype}; embed token ids "
                            "first (nn.Embedding) or call .float()")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoE expects last dimension {self.d_model}, got {tuple(shape)}")
        flat = x.reshape(-1, shape[-1])  # (T, d)
        routing = self.router(flat) if token_ids is None else self.router(flat, token_ids)
        if isinstance(routing, ExpertChoiceRouting):
            y = self._expert_choice(flat, routing)
        else:
            routing = self._apply_capacity(routing)
            y = self._dispatch(flat, routing.weights, routing.indices, self.experts)  # (T, d)
        if self.shared is not None:
            y = y + self.shared(flat)
        self.last_routing = routing.detach()
        aux = flat.new_zeros((), dtype=torch.float32)
        if self.training:
            for policy in self.balancing:
                term = policy.loss(routing, tuple(shape[:-1]))
                if term is not None:
                    aux = aux + term
            if any(isinstance(p, BiasUpdate) for p in self.balancing):
                counts = routing.counts(self.n_experts).detach()  # (N,), without a host sync on a GPU
                self.step_counts = counts if self.step_counts is None else self.step_counts + counts
        self.aux_loss = aux
        return y.reshape(shape)

    def _apply_capacity(self, routing: Routing) -> Routing:
        """Zero the weights of assignments past each expert's capacity (GShard priority order)."""
        if self.capacity_factor is None:
            self.last_dropped = 0.0
            return routing
        cap = expert_capacity(routing.indices.shape[0], self.n_experts, self.top_k, self.capacity_factor)
        keep = capacity_mask(routing.indices, self.n_experts, cap)
        self.last_dropped = float(1 - keep.float().mean())
        return Routing(routing.weights * keep, routing.indices, routing.logits, routing.scores)

    def _expert_choice(self, flat: torch.Tensor, routing: ExpertChoiceRouting) -> torch.Tensor:
        a = routing.sorted_assignments(self.n_experts)
        xs = flat.index_select(0, a.token)  # (N*c, d) expert e's tokens in rows e*c ... (e+1)*c
        if isinstance(self.experts, GroupedExperts):
            ys = self.experts(xs, a.counts)
        else:
            ys = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, xs.split(a.counts.tolist()),
                                                                    strict=True)])
        self.last_dropped = 0.0
        return combine(ys, a.weight, a.token, flat.shape[0])

    @torch.no_grad()
    def after_step(self) -> None:
        """Apply post-step policies (the routing-bias update) with this step's counts, then reset them."""
        if self.step_counts is None:
            return
        for policy in self.balancing:
            policy.after_step(self, self.step_counts)
        self.step_counts = None

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
