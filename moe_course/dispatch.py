"""Token dispatch (notebook 03): send each token to its k experts, run them, and add the weighted results back.

Three implementations that compute the same function (tested equal in forward and backward):

* :func:`dispatch_dense`: every expert on every token, then mask by the routing weights (the reference;
  as slow as the soft mixture).
* :func:`dispatch_loop`: one boolean mask per expert, gather its tokens, scatter the result back.
* :func:`dispatch_sorted`: sort the (token, expert) pairs by expert so each expert sees one contiguous
  slice, run the experts on their slices, and scatter-add the weighted outputs (the layout used by grouped
  GEMM kernels and by expert parallelism's all-to-all).

:func:`dispatch_grouped` is the production path: the same sorted layout (:func:`sort_by_expert`), fed to
:class:`~moe_course.experts.GroupedExperts` in one grouped matrix multiply per projection.

Capacity (GShard, Switch Transformer): each expert takes at most
``ceil(capacity_factor · tokens · k / N)`` assignments; first choices claim slots before second choices,
and an assignment past capacity is dropped (the token then passes through the residual connection).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moe_course.routing import count_per_expert
from moe_course.validate import check_ids, check_int, check_tensor

Experts = Sequence[nn.Module]


def _check(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, n_experts: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"dispatch expects tokens of shape (T, d), got {tuple(x.shape)}; flatten (B, T)")
    if weights.shape != indices.shape or weights.shape[0] != x.shape[0]:
        raise ValueError(
            f"weights {tuple(weights.shape)} and indices {tuple(indices.shape)} must both be (T, k) "
            f"with T = {x.shape[0]} tokens"
        )
    # The values are checked on the CPU only: on a GPU, reading them would make the host wait (a sync) in every
    # layer; an out-of-range id there trips the device-side bounds check of the gather instead.
    check_ids("indices", indices, n_experts, "expert ids", "; pass the ids topk returned, not the weights")


def dispatch_dense(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: Experts) -> torch.Tensor:
    """Run every expert on every token, then keep only the routed ones. x: (T, d) -> (T, d)."""
    _check(x, weights, indices, len(experts))
    gates = torch.zeros(x.shape[0], len(experts), dtype=weights.dtype, device=x.device)
    gates = gates.scatter_add(1, indices, weights)  # (T, N), zero for experts not chosen
    outs = torch.stack([expert(x) for expert in experts], dim=1)  # (T, N, d)
    return (gates.unsqueeze(-1).to(outs.dtype) * outs).sum(dim=1)


def dispatch_loop(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: Experts) -> torch.Tensor:
    """For each expert: find its tokens with a mask, run it on them, add the weighted output back."""
    _check(x, weights, indices, len(experts))
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token, slot = torch.where(indices == e)  # which tokens chose e, and as which choice
        if token.numel() == 0:
            continue
        y = expert(x[token]) * weights[token, slot].unsqueeze(-1).to(x.dtype)
        out = out.index_add(0, token, y)
    return out


def dispatch_sorted(
    x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: Experts
) -> torch.Tensor:
    """Permute token copies into contiguous per-expert slices, run each expert once, scatter-add back."""
    _check(x, weights, indices, len(experts))
    order, token_of, counts = sort_by_expert(indices, len(experts))  # pairs grouped by expert, and their tokens
    xs = x[token_of]  # (T*k, d), expert 0's tokens first, then expert 1's, ...
    ys = torch.cat([expert(chunk) for expert, chunk in zip(experts, xs.split(counts.tolist()), strict=True)])
    ys = ys * weights.reshape(-1)[order].unsqueeze(-1).to(ys.dtype)
    return torch.zeros_like(x).index_add(0, token_of, ys)


def sort_by_expert(indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The permutation behind sorted dispatch, grouped GEMM and expert parallelism.

    indices: (T, k) -> order (T*k,) (stable argsort of the flat expert ids: pairs grouped by expert, token
    order kept inside an expert), token_of (T*k,) = order // k, counts (N,) pairs per expert.
    """
    check_int("n_experts", n_experts, 1)
    check_tensor("indices", indices, 2, "(T, k) expert ids", "; flatten (B, T, k) to (B*T, k)")
    check_ids("indices", indices, n_experts, "expert ids")
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    return order, order // indices.shape[1], count_per_expert(flat, n_experts)


def dispatch_grouped(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: nn.Module) -> torch.Tensor:
    """Sorted dispatch onto :class:`~moe_course.experts.GroupedExperts`: one grouped GEMM per projection."""
    _check(x, weights, indices, len(experts))
    order, token_of, counts = sort_by_expert(indices, len(experts))
    xs = x.index_select(0, token_of)  # (T*k, d); backward is one index_add (4x faster than x[token_of] on CPU)
    return combine(experts(xs, counts), weights.reshape(-1).index_select(0, order), token_of, x.shape[0])


def combine(ys: torch.Tensor, weight: torch.Tensor, token: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Weighted scatter-add of expert outputs back to their tokens: (A, d), (A,), (A,) -> (T, d).

    Accumulates in the routing weights' precision (fp32), also when the experts ran in bf16 on a GPU.
    """
    check_int("n_tokens", n_tokens, 0)
    check_ids("token", token, n_tokens, "token positions")
    ys = ys.to(weight.dtype) * weight.unsqueeze(-1)
    return ys.new_zeros(n_tokens, ys.shape[-1]).index_add_(0, token, ys)  # in place: no second (T, d) buffer


DISPATCHERS: dict[str, Callable[..., torch.Tensor]] = {
    "dense": dispatch_dense,
    "loop": dispatch_loop,
    "sorted": dispatch_sorted,
    "grouped": dispatch_grouped,
}


def get_dispatcher(name: str) -> Callable[..., torch.Tensor]:
    """Look up a dispatch implementation by name."""
    try:
        return DISPATCHERS[name]
    except KeyError:
        raise ValueError(f"unknown dispatch {name!r}; choose one of {sorted(DISPATCHERS)}") from None


def _whole(value: object, name: str, minimum: int) -> int:
    """``value`` as an int >= minimum (ints only: not bool, not float), or a ValueError/TypeError naming it."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}; pass a whole number "
                        f"(e.g. {name}={max(minimum, 1)})")
    value = operator.index(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def expert_capacity(n_tokens: int, n_experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor · tokens · k / N) (Switch Transformer, eq. 4).

    ``n_tokens`` may be 0 (an empty batch needs no slots); sizes, k and the factor are validated.
    """
    n_tokens = _whole(n_tokens, "n_tokens", 0)
    n_experts = _whole(n_experts, "n_experts", 1)
    k = _whole(k, "k", 1)
    if k > n_experts:
        raise ValueError(f"k must be between 1 and n_experts={n_experts}, got k={k}; route to at most "
                         "n_experts experts per token")
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, numbers.Real):
        raise TypeError(f"capacity_factor must be a number, got {type(capacity_factor).__name__}; "
                        "e.g. capacity_factor=1.25")
    if not math.isfinite(capacity_factor) or capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor}; 1.0 gives each "
                         "expert exactly its even share of the T*k assignments, 1.25 leaves 25% slack")
    return math.ceil(capacity_factor * n_tokens * k / n_experts)


def capacity_mask(indices: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Which (token, slot) assignments fit: (T, k) bool.

    Priority follows GShard: every token's first choice claims a slot before any second choice, and within
    one choice rank tokens go in order.
    """
    n_experts = _whole(n_experts, "n_experts", 1)
    capacity = _whole(capacity, "capacity", 0)
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2:
        shape = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"indices must be a (T, k) tensor of expert ids, got {shape}; flatten (B, T, k) to "
                         "(B*T, k)")
    if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
        raise TypeError(f"indices must hold integer expert ids (torch.long, as topk returns), got "
                        f"{indices.dtype}; do not pass the routing weights")
    indices = indices.long()
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n_experts):
        raise ValueError(f"indices must be expert ids in [0, {n_experts}) for n_experts={n_experts}, got "
                         f"{int(indices.min())}..{int(indices.max())}")
    t, k = indices.shape
    by_rank = indices.t().reshape(-1)  # (k*T,): all first choices, then all second choices, ...
    onehot = F.one_hot(by_rank, n_experts)  # (k*T, N)
    position = ((onehot.cumsum(dim=0) - 1) * onehot).sum(dim=-1)  # place in its expert's queue
    keep = position < capacity
    return keep.reshape(k, t).t()
