"""Expert parallelism over ``torch.distributed`` (notebook 07): experts spread over ranks, tokens moved by all-to-alls.

With W ranks and E routed experts, rank r holds experts ``[r·E/W, (r+1)·E/W)`` (a contiguous slice of the
stacked :class:`~moe_course.experts.GroupedExperts` tensors) and its own batch of tokens. One forward pass of
:class:`ExpertParallelMoE` on every rank (GShard, Lepikhin et al. 2020, arXiv:2006.16668; torchtitan's
expert-parallel MoE is organised the same way):

1. **route** its own tokens with the (replicated) router;
2. **sort** the T·k (token, expert) pairs by destination rank (stable), count the pairs per destination, and
   exchange the counts (a tiny ``all_to_all_single``) so every rank knows how many rows it will receive;
3. **dispatch**: ``all_to_all_single`` with uneven splits sends each rank its rows (plus their local expert ids);
4. **compute** the local experts on what arrived, grouped by local expert (one grouped GEMM per projection);
5. **combine**: a second all-to-all sends the results back, and each rank adds them to its tokens, weighted
   by the routing weights (shared experts, replicated, run locally).

Both all-to-alls are differentiable (:class:`_AllToAll`, a small ``autograd.Function`` around
``dist.all_to_all_single``: the backward pass of a dispatch is a combine and vice versa), so gradients reach
the input, the router and every expert. Balancing sees the whole batch: the routing-bias update uses the
global counts (an all-reduce) and the auxiliary losses are split into per-rank shares that add up to the
single-process value.

:func:`launch` spawns W local processes (gloo on CPU, NCCL on CUDA), runs a function of this module on each,
and returns their results; ``python -m moe_course.parallel`` runs a demo, also under ``torchrun``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_course.balancing import BiasUpdate, RouterZLoss, SequenceAuxLoss, SwitchAuxLoss, sequence_aux_loss
from moe_course.dispatch import capacity_mask, combine, expert_capacity, sort_by_expert
from moe_course.experts import GroupedExperts
from moe_course.moe import MoE
from moe_course.routing import ExpertChoiceRouter, Routing
from moe_course.validate import check_int

__all__ = [
    "ExpertParallelMoE",
    "LaunchFailed",
    "RankFailed",
    "all_to_all",
    "dispatch_bytes",
    "expert_owner",
    "fail_on_rank",
    "experts_per_rank",
    "launch",
    "local_experts",
    "rank_order",
    "ranks_per_token",
    "send_counts",
]

PHASES = ("router", "dispatch", "experts", "combine")
"""The parts of a forward pass that :attr:`ExpertParallelMoE.last_stats` times."""


# --------------------------------------------------------------------------------------------------------
# placement and the send-side permutation (pure functions: the notebook's exercises)


def _check_rank(rank: object, world: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__} {rank!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")


def experts_per_rank(n_experts: int, world: int) -> int:
    """E / W, the experts each rank holds; W must divide E."""
    check_int("n_experts", n_experts, 1)
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int (the number of ranks), got {world!r}")
    if n_experts % world:
        raise ValueError(f"n_experts={n_experts} must be divisible by world={world} so every rank holds the same "
                         "number of experts; change the number of ranks or of experts")
    return n_experts // world


def local_experts(rank: int, world: int, n_experts: int) -> range:
    """The global ids of the experts rank ``rank`` holds: ``[rank·E/W, (rank+1)·E/W)`` (contiguous layout)."""
    per = experts_per_rank(n_experts, world)
    _check_rank(rank, world)
    return range(rank * per, (rank + 1) * per)


def expert_owner(expert_ids: torch.Tensor, n_experts: int, world: int) -> torch.Tensor:
    """The rank that holds each expert: ``expert_id // (E/W)`` (contiguous, not round-robin ``e % W``)."""
    per = experts_per_rank(n_experts, world)
    if not isinstance(expert_ids, torch.Tensor):
        raise TypeError(f"expert ids must be a torch.Tensor, got {type(expert_ids).__name__}")
    if expert_ids.dtype == torch.bool or expert_ids.is_floating_point() or expert_ids.is_complex():
        raise TypeError(f"expert ids (indices) must be integers (torch.long), got dtype {expert_ids.dtype}")
    if expert_ids.device.type == "cpu" and expert_ids.numel() and \
            not (0 <= int(expert_ids.min()) and int(expert_ids.max()) < n_experts):  # on a GPU: no sync
        raise ValueError(f"expert ids (indices) must lie in [0, n_experts={n_experts}), got "
                         f"{int(expert_ids.min())}..{int(expert_ids.max())}; pass the router's number of experts")
    return expert_ids // per


def send_counts(indices: torch.Tensor, n_experts: int, world: int) -> torch.Tensor:
    """(T, k) expert ids -> (W,) long: how many (token, expert) pairs this rank sends to each rank."""
    dest = expert_owner(indices.reshape(-1), n_experts, world)  # (T*k,)
    return torch.bincount(dest, minlength=world)


def rank_order(indices: torch.Tensor, n_experts: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, k) -> order (T*k,), inverse (T*k,): pairs sorted by destination rank, and the way back.

    Pair p = t·k + j is token t's j-th choice. ``order`` is a *stable* argsort of the destination ranks
    (rank 0's pairs first, token order kept inside a rank), so ``pairs[order]`` is the send buffer, cut into
    W contiguous chunks by :func:`send_counts`. ``inverse`` undoes it: ``pairs[order][inverse] == pairs``.
    """
    order = expert_owner(indices.reshape(-1), n_experts, world).argsort(stable=True)
    return order, _inverse(order)


def ranks_per_token(indices: torch.Tensor, n_experts: int, world: int) -> torch.Tensor:
    """(T, k) expert ids -> (T,): how many different ranks each token's k experts live on."""
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2:
        got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"indices must be a 2-D tensor (T tokens, k choices), got {got}; add a choice axis "
                         "with indices[:, None] for k = 1")
    hit = torch.zeros(indices.shape[0], world, dtype=torch.bool, device=indices.device)
    return hit.scatter_(1, expert_owner(indices, n_experts, world), True).sum(dim=1)


def dispatch_bytes(indices: torch.Tensor, n_experts: int, world: int, rank: int, d_model: int,
                   bytes_per_element: int) -> int:
    """Bytes of token rows this rank sends to other ranks in one dispatch all-to-all (own rows stay home)."""
    experts_per_rank(n_experts, world)
    _check_rank(rank, world)
    check_int("d_model", d_model, 1)
    check_int("bytes_per_element", bytes_per_element, 1)
    counts = send_counts(indices, n_experts, world)
    return int(counts.sum() - counts[rank]) * d_model * bytes_per_element


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes ``order``: ``v[order][_inverse(order)] == v``."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


# --------------------------------------------------------------------------------------------------------
# collectives


_RECORDS: dict[str, Any] | None = None
"""While :func:`record_collectives` runs: its settings and the records of this rank's all-to-alls."""


def _bytes_written() -> int | None:
    """Bytes this process has written so far (Linux's /proc/self/io ``wchar``; None elsewhere).

    gloo sends over TCP with write calls, so the difference around a collective counts what it put on the
    sockets, headers included: a count made by the kernel, not from the split sizes.
    """
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))
    except (OSError, StopIteration, ValueError):
        return None


@contextmanager
def record_collectives(sync: bool = False) -> Iterator[list[dict[str, Any]]]:
    """Record each differentiable all-to-all this rank runs inside the block, forward and backward.

    A record: ``name`` (``dispatch``/``combine``), ``pass`` (``forward``/``backward``), ``payload_bytes`` (rows
    for other ranks × their bytes, from the splits), ``wire_bytes`` (what the process wrote during the call,
    counted by the kernel; None off Linux or on NCCL, whose bytes bypass the sockets), ``seconds`` (the call)
    and ``wait_s``: with ``sync``, every rank first waits in a barrier, so ``wait_s`` is the time spent waiting
    for the slowest rank to arrive and ``seconds`` the exchange alone. Every rank must use the same ``sync``.
    """
    global _RECORDS
    if _RECORDS is not None:
        raise RuntimeError("record_collectives is already active on this rank: do not nest it")
    _RECORDS = {"sync": bool(sync), "records": []}
    try:
        yield _RECORDS["records"]
    finally:
        _RECORDS = None


def _exchange_rows(out: torch.Tensor, x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                   group: dist.ProcessGroup, name: str, which: str) -> None:
    """``dist.all_to_all_single`` of rows, recorded while :func:`record_collectives` is active."""
    if _RECORDS is None:
        dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
        return
    wait = 0.0
    if _RECORDS["sync"]:
        start = time.perf_counter()
        dist.barrier(group=group)
        wait = time.perf_counter() - start
    rank = dist.get_rank(group)
    written, start = _bytes_written(), time.perf_counter()
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    seconds, after = time.perf_counter() - start, _bytes_written()
    row = math.prod(x.shape[1:]) * x.element_size()  # bytes per row (x may hold no rows)
    _RECORDS["records"].append({
        "name": name, "pass": which, "seconds": seconds, "wait_s": wait,
        "payload_bytes": (sum(input_splits) - input_splits[rank]) * row,
        "wire_bytes": None if written is None or after is None or dist.get_backend(group) != "gloo"
        else after - written})


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits whose backward is the reverse all-to-all (splits swapped).

    The gradient of a row is wanted where the row came from: rank i sent ``input_splits[j]`` rows to rank j,
    so the backward pass sends the gradients of those rows from j back to i, the same exchange read the other
    way round. Written out here rather than taken from ``torch.distributed._functional_collectives``, whose
    backward hangs on torch 2.4 (no autograd kernel for ``wait_tensor``).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: dist.ProcessGroup, name: str) -> torch.Tensor:
        ctx.splits, ctx.group, ctx.name = (output_splits, input_splits), group, name
        out = x.new_empty((sum(output_splits), *x.shape[1:]))  # (sum(output_splits), ...)
        _exchange_rows(out, x.contiguous(), output_splits, input_splits, group, name, "forward")
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        output_splits, input_splits = ctx.splits
        grad_x = grad.new_empty((sum(input_splits), *grad.shape[1:]))  # (sum(input_splits), ...)
        _exchange_rows(grad_x, grad.contiguous(), input_splits, output_splits, ctx.group, ctx.name, "backward")
        return grad_x, None, None, None, None


def all_to_all(x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
               group: dist.ProcessGroup | None = None, name: str = "all_to_all") -> torch.Tensor:
    """Differentiable ``all_to_all_single`` with uneven splits: rows ``input_splits[j]`` go to rank j.

    Blocking (the call returns once the rows have arrived, so the timings below stay honest); the backward
    pass is the reverse all-to-all of the gradient. ``name`` labels it in :func:`record_collectives`.
    """
    if sum(input_splits) != x.shape[0]:
        raise ValueError(f"input_splits sum to {sum(input_splits)} but x has {x.shape[0]} rows; "
                         "pass one count per rank that adds up to the rows of x")
    group = group or dist.group.WORLD
    return _AllToAll.apply(x, [int(n) for n in output_splits], [int(n) for n in input_splits], group, name)


def _once_per_destination(rows: torch.Tensor, dest: torch.Tensor, n_rows: int, n_dest: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct (row, destination) pairs among ``zip(rows, dest)``, sorted by destination, rows in order."""
    present = torch.zeros(n_rows, n_dest, dtype=torch.bool, device=rows.device)
    present[rows, dest] = True
    row, to = present.nonzero(as_tuple=True)  # row-major: rows in order
    order = to.argsort(stable=True)
    return row[order], to[order]


def _to_other_nodes(per_rank: Sequence[int], rank: int, ranks_per_node: int) -> int:
    """The sum of ``per_rank`` over the ranks outside ``rank``'s node (nodes of ``ranks_per_node`` ranks)."""
    node = rank // ranks_per_node
    return int(sum(n for r, n in enumerate(per_rank) if r // ranks_per_node != node))


def _exchange(send: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Each rank sends one number to every rank (send[j] to rank j) and receives one from each."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=group)
    return recv


def _all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t, group=group)
    return t


# --------------------------------------------------------------------------------------------------------
# the layer


_GLOBAL_POLICIES = (SwitchAuxLoss, RouterZLoss, SequenceAuxLoss, BiasUpdate)
"""Balancing policies the layer computes over all ranks' tokens (global counts by all-reduce)."""


class ExpertParallelMoE(nn.Module):
    """One rank's part of an expert-parallel MoE layer: the full router, E/W experts, the shared experts.

    Build it from a single-process :class:`~moe_course.moe.MoE` with :meth:`from_moe` on every rank, so all
    ranks hold the same router and together exactly the layer's experts. Call it on the rank's own tokens,
    (T, d) or (B, S, d); every rank must call it together (it runs collectives).

    Capacity (``capacity_factor``) applies per source rank, as GShard's groups: each rank's tokens get
    ``ceil(cf · T_rank · k / E)`` slots per expert, in GShard's priority order; dropped pairs are not sent.
    After a forward pass ``last_stats`` holds the counts, the bytes sent and the time of each phase.
    """

    def __init__(self, moe: MoE, rank: int, world: int, group: dist.ProcessGroup | None = None,
                 ranks_per_node: int | None = None) -> None:
        super().__init__()
        if ranks_per_node is not None:
            check_int("ranks_per_node", ranks_per_node, 1)
            if world % ranks_per_node:
                raise ValueError(f"ranks_per_node={ranks_per_node} must divide the world size {world} (whole nodes)")
            if moe.capacity_factor is not None:
                raise ValueError("node-deduplicated dispatch (ranks_per_node) has no capacity limit: build the MoE "
                                 "with capacity_factor=None")
        if not isinstance(moe, MoE):
            raise TypeError(f"moe must be a moe_course.moe.MoE layer to split across ranks, got {type(moe).__name__}")
        if isinstance(moe.router, ExpertChoiceRouter):
            raise ValueError("ExpertParallelMoE needs a token-choice router (topk or hash): expert choice picks "
                             "tokens from the whole batch, which no single rank sees")
        if not isinstance(moe.experts, GroupedExperts):
            raise ValueError("ExpertParallelMoE slices GroupedExperts: build the MoE with experts='grouped'")
        unknown = [type(p).__name__ for p in moe.balancing if not isinstance(p, _GLOBAL_POLICIES)]
        if unknown:
            raise ValueError(f"ExpertParallelMoE does not know how to compute {unknown} across ranks; it supports "
                             f"{[c.__name__ for c in _GLOBAL_POLICIES]}")
        lo, hi = local_experts(rank, world, moe.n_experts)[0], local_experts(rank, world, moe.n_experts)[-1] + 1
        self.rank, self.world, self.group = rank, world, group
        self.ranks_per_node = ranks_per_node
        self.d_model, self.n_experts, self.top_k = moe.d_model, moe.n_experts, moe.top_k
        self.n_local, self.first_expert = hi - lo, lo
        self.capacity_factor = moe.capacity_factor
        self.takes_token_ids = moe.takes_token_ids
        self.router = copy.deepcopy(moe.router)
        self.shared = copy.deepcopy(moe.shared)
        self.balancing = copy.deepcopy(moe.balancing)
        with torch.random.fork_rng(devices=[]):  # GroupedExperts draws an init we overwrite at once
            self.experts = GroupedExperts(self.n_local, moe.d_model, moe.experts.d_hidden)
        with torch.no_grad():
            for name in ("w_gate", "w_up", "w_down"):
                getattr(self.experts, name).copy_(getattr(moe.experts, name)[lo:hi])
        self.experts.to(moe.experts.w_gate.device)
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.aux_loss_total: float = 0.0
        self.step_counts: torch.Tensor | None = None
        self.last_routing: Routing | None = None
        self.last_stats: dict[str, Any] = {}

    @classmethod
    def from_moe(cls, moe: MoE, rank: int, world: int, group: dist.ProcessGroup | None = None,
                 ranks_per_node: int | None = None) -> ExpertParallelMoE:
        """Rank ``rank``'s part of ``moe``: its router and shared experts, and experts [r·E/W, (r+1)·E/W).

        ``ranks_per_node``: dispatch as DeepSeek-V3 does across nodes of that many ranks (:meth:`_by_node`).
        """
        return cls(moe, rank, world, group, ranks_per_node)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE must run inside a process group (torch.distributed is not "
                               "initialised): call it on every rank, e.g. from a function started with launch(fn, "
                               "world)")
        shape = x.shape
        if shape[-1] != self.d_model:
            raise ValueError(f"ExpertParallelMoE expects last dimension {self.d_model}, got {tuple(shape)}")
        flat = x.reshape(-1, self.d_model)  # (T, d)
        t, k, w = flat.shape[0], self.top_k, self.world
        clock = [time.perf_counter()]

        # 1. route (every rank holds the same router)
        routing = self.router(flat) if token_ids is None else self.router(flat, token_ids)
        keep = torch.ones_like(routing.indices, dtype=torch.bool)  # (T, k)
        if self.capacity_factor is not None:
            cap = expert_capacity(t, self.n_experts, k, self.capacity_factor)
            keep = capacity_mask(routing.indices, self.n_experts, cap)
        clock.append(time.perf_counter())
        if self.ranks_per_node is not None:
            y, stats = self._by_node(flat, routing)
            if self.shared is not None:
                y = y + self.shared(flat)
            self.last_routing = routing.detach()
            self._balance(routing, tuple(shape[:-1]))
            self.last_stats = {"tokens": t, **stats}
            return y.reshape(shape)

        # 2. sort pairs by destination rank; exchange counts; 3. send the rows
        kept = keep.reshape(-1).nonzero().squeeze(1)  # (A,) pair numbers p = t*k + j that are sent
        experts = routing.indices.reshape(-1)[kept]  # (A,) global expert ids
        dest = expert_owner(experts, self.n_experts, w)  # (A,) the rank holding each pair's expert
        order = dest.argsort(stable=True)
        pair = kept[order]  # (A,) pairs in send order
        token_of = pair // k
        send = torch.bincount(dest, minlength=w)  # (W,)
        recv = _exchange(send, self.group)  # (W,) rows each rank sends us
        send_list, recv_list = send.tolist(), recv.tolist()
        xs = flat.index_select(0, token_of)  # (A, d) rank-contiguous send buffer
        xr = all_to_all(xs, recv_list, send_list, self.group, "dispatch")  # (R, d) grouped by source rank
        local_ids = torch.empty(sum(recv_list), dtype=torch.long, device=flat.device)
        dist.all_to_all_single(local_ids, (experts[order] - dest[order] * self.n_local).contiguous(),
                               recv_list, send_list, group=self.group)
        clock.append(time.perf_counter())

        # 4. run the local experts, grouped by local expert, then restore the received order
        by_expert, _, counts = sort_by_expert(local_ids[:, None], self.n_local)  # order, _, (E/W,) rows each
        yr = self.experts(xr.index_select(0, by_expert), counts).index_select(0, _inverse(by_expert))
        clock.append(time.perf_counter())

        # 5. send the results back and add them to their tokens, weighted
        ys = all_to_all(yr, send_list, recv_list, self.group, "combine")  # (A, d) in send order
        y = combine(ys, routing.weights.reshape(-1)[pair], token_of, t)
        clock.append(time.perf_counter())
        if self.shared is not None:
            y = y + self.shared(flat)

        self.last_routing = routing.detach()
        self._balance(routing, tuple(shape[:-1]))
        size = flat.element_size() * self.d_model
        self.last_stats = {
            "tokens": t, "sent_pairs": send_list, "received_pairs": recv_list,
            "received_per_expert": counts.tolist(), "dropped": float(1 - keep.float().mean()) if t else 0.0,
            "dispatch_bytes": (sum(send_list) - send_list[self.rank]) * size,
            "combine_bytes": (sum(recv_list) - recv_list[self.rank]) * size,
            "metadata_bytes": (sum(send_list) - send_list[self.rank]) * local_ids.element_size() + 2 * send.numel()
            * send.element_size(),  # local expert ids of the rows sent away, and the counts (both ways)
            "seconds": {p: clock[i + 1] - clock[i] for i, p in enumerate(PHASES)},
        }
        return y.reshape(shape)

    def _by_node(self, flat: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, dict[str, Any]]:
        """DeepSeek-V3's dispatch over nodes of G ranks: each token crosses to a node once, then fans out.

        Stage 1 (between nodes, InfiniBand on a real cluster): every token goes once to each node holding one
        of its experts, to the rank there with the same position in its node (a "rail" peer), with its k
        expert ids and routing weights (ids of experts elsewhere: -1). Stage 2 (inside the node, NVLink): that
        rank forwards the row once to each rank of its node holding its experts. There each pair runs its
        expert, weighted, and the rows' pairs are summed; the sums return inside the node and are summed per
        token and node, and those return across nodes and are summed per token. Equal to the single-process
        layer (tested); every row that crosses a node boundary carries one token for one node, not one pair.
        """
        t, k, g = flat.shape[0], self.top_k, self.ranks_per_node
        n_nodes, slot = self.world // g, self.rank % g
        experts = routing.indices  # (T, k)
        owner = expert_owner(experts, self.n_experts, self.world)  # (T, k) rank of each pair
        pair_node = owner // g  # (T, k)
        # stage 1: one row per (token, node), sorted by node, to the rail peer n·G + slot
        hop_t, hop_n = _once_per_destination(torch.arange(t, device=flat.device).repeat_interleave(k),
                                             pair_node.reshape(-1), t, n_nodes)  # (H,), (H,)
        mine = pair_node[hop_t] == hop_n[:, None]  # (H, k) which of the token's pairs live on that node
        send1 = torch.zeros(self.world, dtype=torch.long, device=flat.device)
        send1[torch.arange(n_nodes, device=flat.device) * g + slot] = torch.bincount(hop_n, minlength=n_nodes)
        recv1 = _exchange(send1, self.group)
        s1, r1 = send1.tolist(), recv1.tolist()
        x1 = all_to_all(flat.index_select(0, hop_t), r1, s1, self.group, "dispatch (between nodes)")  # (R1, d)
        w1 = all_to_all(routing.weights[hop_t] * mine, r1, s1, self.group, "weights (between nodes)")  # (R1, k)
        ids1 = torch.empty(sum(r1), k, dtype=torch.long, device=flat.device)
        dist.all_to_all_single(ids1, torch.where(mine, experts[hop_t], -1).contiguous(), r1, s1, group=self.group)
        # stage 2: one row per (arrived row, rank of this node holding one of its experts)
        on = torch.where(ids1 >= 0, expert_owner(ids1.clamp(min=0), self.n_experts, self.world), -1)  # (R1, k)
        rows, cols = (on >= 0).nonzero(as_tuple=True)
        fwd_h, fwd_r = _once_per_destination(rows, on[rows, cols], ids1.shape[0], self.world)  # (F,), (F,)
        here = on[fwd_h] == fwd_r[:, None]  # (F, k) which slots that rank computes
        send2 = torch.bincount(fwd_r, minlength=self.world)
        recv2 = _exchange(send2, self.group)
        s2, r2 = send2.tolist(), recv2.tolist()
        x2 = all_to_all(x1.index_select(0, fwd_h), r2, s2, self.group, "dispatch (inside nodes)")  # (R2, d)
        w2 = all_to_all(w1[fwd_h] * here, r2, s2, self.group, "weights (inside nodes)")  # (R2, k)
        local = torch.where(here, ids1[fwd_h] - fwd_r[:, None] * self.n_local, -1)
        ids2 = torch.empty(sum(r2), k, dtype=torch.long, device=flat.device)
        dist.all_to_all_single(ids2, local.contiguous(), r2, s2, group=self.group)
        # the experts: one row per pair, grouped by local expert; weighted sums per arrived row
        pr, pj = (ids2 >= 0).nonzero(as_tuple=True)  # (P,) pairs computed here
        by_expert, _, counts = sort_by_expert(ids2[pr, pj][:, None], self.n_local)
        yp = self.experts(x2.index_select(0, pr[by_expert]), counts).index_select(0, _inverse(by_expert))  # (P, d)
        y2 = combine(yp, w2[pr, pj], pr, x2.shape[0])  # (R2, d)
        # back: inside the node (sum per stage-1 row), then across nodes (sum per token)
        ys2 = all_to_all(y2, s2, r2, self.group, "combine (inside nodes)")  # (F, d)
        y1 = ys2.new_zeros(x1.shape[0], ys2.shape[-1]).index_add(0, fwd_h, ys2)  # (R1, d)
        ys1 = all_to_all(y1, s1, r1, self.group, "combine (between nodes)")  # (H, d)
        y = ys1.new_zeros(t, ys1.shape[-1]).index_add(0, hop_t, ys1)  # (T, d)
        pairs = torch.bincount(owner.reshape(-1), minlength=self.world).tolist()
        stats = {
            "sent_pairs": pairs, "received_pairs": r2, "received_per_expert": counts.tolist(),
            "dropped": 0.0, "between_nodes_rows": s1, "inside_node_rows": s2,
            "pairs_to_other_nodes": _to_other_nodes(pairs, self.rank, g),
            "rows_to_other_nodes": _to_other_nodes(s1, self.rank, g),
        }
        return y.to(flat.dtype), stats

    def _balance(self, routing: Routing, batch_shape: tuple[int, ...]) -> None:
        """Aux-loss shares (sum over ranks = the single-process loss) and the step's counts for the bias."""
        aux = routing.scores.new_zeros((), dtype=torch.float32)
        if self.training and len(self.balancing):
            t, k, n = routing.indices.shape[0], self.top_k, self.n_experts
            counts = routing.counts(n).to(routing.scores.dtype)
            total = _all_reduce(torch.cat([counts, counts.new_tensor([t])]), self.group)
            global_counts, t_all = total[:n], float(total[n])
            for policy in self.balancing:
                if isinstance(policy, SwitchAuxLoss) and t_all:  # N · Σ f_i P_i with global f and P
                    f = global_counts / (t_all * k)
                    scores = routing.scores
                    if policy.normalize:  # sigmoid scores, normalised per token as the single-process loss does
                        scores = scores / scores.sum(dim=-1, keepdim=True)
                    aux = aux + policy.coef * n * (f * scores.sum(dim=0)).sum() / t_all
                elif isinstance(policy, RouterZLoss) and t_all:
                    aux = aux + policy.coef * torch.logsumexp(routing.logits.float(), -1).square().sum() / t_all
                elif isinstance(policy, SequenceAuxLoss):
                    seqs = batch_shape[0] if len(batch_shape) == 2 else 1  # each rank holds whole sequences
                    all_seqs = float(_all_reduce(counts.new_tensor([seqs]), self.group)[0])
                    if t:
                        per_seq = sequence_aux_loss(routing.scores.reshape(seqs, -1, n),
                                                    routing.indices.reshape(seqs, -1, k), n)
                        aux = aux + policy.coef * per_seq * seqs / all_seqs
            if any(isinstance(p, BiasUpdate) for p in self.balancing):
                c = routing.counts(n).detach()
                self.step_counts = c if self.step_counts is None else self.step_counts + c
        self.aux_loss = aux
        self.aux_loss_total = float(_all_reduce(aux, self.group)) if self.training and len(self.balancing) else 0.0

    @torch.no_grad()
    def after_step(self) -> None:
        """The routing-bias update with the global counts of this step (all-reduced), then reset them."""
        if self.step_counts is None:
            return
        counts = _all_reduce(self.step_counts, self.group)
        for policy in self.balancing:
            policy.after_step(self, counts)
        self.step_counts = None

    def extra_repr(self) -> str:
        return (f"rank={self.rank}/{self.world}, experts=[{self.first_expert}, {self.first_expert + self.n_local}) "
                f"of {self.n_experts}, top_k={self.top_k}")


# --------------------------------------------------------------------------------------------------------
# the launcher


class RankFailed(RuntimeError):
    """A worker process failed, died or timed out; ``rank`` names it (the first one found)."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank


class LaunchFailed(RuntimeError):
    """The process machinery itself failed (a broken queue or pipe), not the function run on the ranks."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"the process machinery failed (not the function run on the ranks): {cause}. Run it "
                         "again; if it fails twice, restart the kernel")
        self.cause = cause  # what broke, without the advice: a check words its own


def _pack(value: Any) -> bytes:  # noqa: ANN401
    """``value`` as plain bytes, tensors by value: nothing a reader must fetch from the process that sent it.

    torch.multiprocessing would pass a tensor's storage by file descriptor, served by the sender; a rank that
    put its result and exited could not serve it, and the parent failed (FileNotFoundError, EOFError).
    """
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _receive(results: Any, timeout: float) -> tuple[int, str, Any]:  # noqa: ANN401
    """The next (rank, status, value) message of a rank; :class:`LaunchFailed` if the queue itself breaks."""
    try:
        rank, status, packed = results.get(timeout=timeout)  # queue.Empty passes through to the caller
        return rank, status, pickle.loads(packed)  # noqa: S301 - bytes our own ranks packed
    except (OSError, EOFError, pickle.UnpicklingError) as err:
        raise LaunchFailed(f"{type(err).__name__}: {err}") from err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, backend: str, timeout_s: float) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))


def _worker(rank: int, world: int, port: int, backend: str, timeout_s: float, threads: int,
            results: Any, fn: Callable[..., Any], packed_args: bytes) -> None:  # noqa: ANN401
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    try:
        _init(rank, world, backend, timeout_s)
        results.put((rank, "ready", _pack(None)))
        out = _pack(fn(*pickle.loads(packed_args)))  # noqa: S301 - packed by the parent; an unpicklable result is an error
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - reported to the parent, which names this rank
        results.put((rank, "error", _pack(traceback.format_exc())))
    finally:
        results.close()
        results.join_thread()  # the message is on the pipe before the group goes: torch 2.4's destroy holds the GIL
        if dist.is_initialized():
            dist.destroy_process_group()


def _context(start_method: str | None) -> Any:  # noqa: ANN401
    """A multiprocessing context. Default: a fork server that imported torch and this module once (fast
    starts, and safe: it forks a clean single-threaded process), else spawn (Windows)."""
    methods = torch.multiprocessing.get_all_start_methods()
    method = start_method or ("forkserver" if "forkserver" in methods else "spawn")
    if method not in methods:
        raise ValueError(f"start_method must be one of {methods}, got {start_method!r}")
    ctx = torch.multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["torch", "torch.distributed", __name__])
    return ctx


def launch(fn: Callable[..., Any], world: int, *args: Any, backend: str = "gloo", timeout_s: float = 120.0,
           start_timeout_s: float = 180.0, threads: int = 1, start_method: str | None = None) -> list[Any]:
    """Run ``fn(*args)`` on ``world`` spawned processes joined in a process group; return the results by rank.

    ``fn`` must be importable (a module-level function, e.g. of this module) and its arguments and result
    picklable. Inside it, ``dist.get_rank()`` says which rank it is. ``start_timeout_s`` bounds the start
    (spawn, import, joining the group); ``timeout_s`` bounds each collective and the run of ``fn`` after all
    ranks joined. A rank that raises, dies or hangs stops the others, and :class:`RankFailed` names it (the
    first one that failed). Backends: "gloo" (CPU) or "nccl" (one CUDA device per rank). ``start_method``:
    None (a preloaded fork server where available, else spawn), "forkserver", "spawn" or "fork". Arguments
    and results travel as plain bytes (tensors by value), so a rank may exit as soon as it has sent its result;
    a broken queue or pipe raises :class:`LaunchFailed`, not :class:`RankFailed`.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (CUDA), got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < 1:
        raise ValueError("backend='nccl' needs CUDA devices; use backend='gloo' on a CPU machine")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if not callable(fn):
        raise TypeError(f"fn must be a module-level function to run on every rank, got {type(fn).__name__}")
    check_int("threads", threads, 1)
    for name, value in (("timeout_s", timeout_s), ("start_timeout_s", start_timeout_s)):
        if not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    try:
        packed_args = _pack(args)  # by value: no tensor storage moved to shared memory or served by file descriptor
    except (pickle.PicklingError, TypeError, AttributeError) as err:
        raise TypeError(f"the arguments of launch must be picklable to travel to the ranks ({err}); pass plain "
                        "data, tensors or module-level functions") from None
    ctx = _context(start_method)
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, backend, timeout_s, threads, results, fn,
                                               packed_args), daemon=True) for r in range(world)]
    try:
        for p in procs:
            p.start()
    except OSError as err:
        for p in procs:
            if p.pid is not None:
                p.terminate()
        raise LaunchFailed(f"starting the ranks raised {type(err).__name__}: {err}") from err
    ready: set[int] = set()
    done: dict[int, Any] = {}
    deadline = time.monotonic() + start_timeout_s
    try:
        while len(done) < world:
            try:
                rank, status, value = _receive(results, 0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in done]
                if dead:
                    raise RankFailed(dead[0], f"rank {dead[0]} of {world} died (exit code "
                                     f"{procs[dead[0]].exitcode}) before returning a result") from None
                if time.monotonic() > deadline:
                    if len(ready) < world:
                        late = [r for r in range(world) if r not in ready]
                        raise RankFailed(late[0], f"rank {late[0]} of {world} did not start: ranks {late} had not "
                                         f"joined the process group after {start_timeout_s:g} s") from None
                    _raise_hung(procs, results, done, timeout_s)
                continue
            if status == "error":
                _raise_first_failure(procs, results, done, rank, value)
            if status == "ready":
                ready.add(rank)
                if len(ready) == world:
                    deadline = time.monotonic() + timeout_s
            else:
                done[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5 if len(done) == world else 0.1)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        results.close()
    return [done[r] for r in range(world)]


_PEER_ERRORS = ("Connection reset", "Connection closed", "Broken pipe", "Timed out", "timed out", "Timeout")


def _raise_first_failure(procs: list, results: Any, done: dict[int, Any], rank: int,  # noqa: ANN401
                         trace: str) -> None:
    """Raise RankFailed for the rank that caused a failure, not one that lost its peer in a collective.

    When a rank dies, the others fail a moment later with "connection reset"; so look one second longer
    for a rank that died or failed for its own reason, and name it.
    """
    errors = {rank: trace}
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        try:
            r, status, value = _receive(results, 0.1)
            if status == "error":
                errors.setdefault(r, value)
        except queue.Empty:
            pass
    world = len(procs)
    for r, p in enumerate(procs):
        if r not in errors and p.exitcode not in (None, 0):
            raise RankFailed(r, f"rank {r} of {world} died (exit code {p.exitcode}) before returning a result; "
                             f"then rank {rank} failed:\n{trace}")
    own = [r for r, t in errors.items() if not any(e in t.strip().splitlines()[-1] for e in _PEER_ERRORS)]
    silent = [r for r in range(world) if r not in errors and r not in done]
    if not own and silent:  # everyone who spoke lost a peer: the silent rank hangs
        raise RankFailed(silent[0], f"rank {silent[0]} of {world} timed out: it returned nothing while ranks "
                         f"{sorted(errors)} failed waiting for it in a collective:\n{trace.strip().splitlines()[-1]}")
    first = own[0] if own else rank
    raise RankFailed(first, f"rank {first} of {world} failed:\n{errors[first]}")


def _raise_hung(procs: list, results: Any, done: dict[int, Any], timeout_s: float) -> None:  # noqa: ANN401
    """Past the deadline: the ranks waiting for a hung peer fail with the group's timeout; name the others."""
    waiting = {}
    end = time.monotonic() + min(10.0, max(2.0, timeout_s))
    while time.monotonic() < end and len(done) + len(waiting) < len(procs):
        try:
            r, status, value = _receive(results, 0.2)
            if status == "error":
                waiting[r] = value
            elif status == "ok":
                done[r] = value
        except queue.Empty:
            pass
    silent = [r for r in range(len(procs)) if r not in done and r not in waiting]
    culprit = silent[0] if silent else min(waiting)
    note = f"; ranks {sorted(waiting)} failed waiting for it in a collective" if waiting and silent else ""
    raise RankFailed(culprit, f"rank {culprit} of {len(procs)} timed out: it returned nothing within "
                     f"{timeout_s:g} s{note}")


def fail_on_rank(bad_rank: int, how: str) -> int:
    """Misbehave on one rank (``how``: "raise", "exit" or "hang"); the others wait in a barrier. For tests."""
    if dist.get_rank() == bad_rank:
        if how == "raise":
            raise ValueError(f"deliberate failure on rank {bad_rank}")
        if how == "exit":
            os._exit(7)
        time.sleep(3600)
    dist.barrier()
    return dist.get_rank()


# --------------------------------------------------------------------------------------------------------
# functions the notebook and the tests run on every rank


def rank_device() -> torch.device:
    """This rank's device: its CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reference_layer(moe_kwargs: dict[str, Any], seed: int) -> MoE:
    torch.manual_seed(seed)
    return MoE(**moe_kwargs).to(rank_device())


def _check_layer_bias(bias: Sequence[float] | None, moe_kwargs: dict[str, Any]) -> None:
    """A routing bias has one value per expert of the layer that ``moe_kwargs`` builds."""
    n = moe_kwargs.get("n_experts")
    if bias is not None and len(bias) != n:
        raise ValueError(f"bias has {len(bias)} values but the layer has n_experts={n}; give one bias per expert")


def _check_scenario(sc: dict[str, Any], world: int) -> None:
    """A scenario of :func:`compare_with_single_process`: one token count (an int >= 0) per rank."""
    tokens = sc.get("tokens")
    name = sc.get("name", "")
    if not isinstance(tokens, (list, tuple)) or len(tokens) != world:
        raise ValueError(f"scenario {name!r}: tokens must list one token count per rank ({world} ranks), got "
                         f"{tokens!r}")
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in tokens):
        raise ValueError(f"scenario {name!r}: tokens must be ints >= 0 (tokens on each rank), got {list(tokens)}")
    _check_layer_bias(sc.get("bias"), sc.get("moe", {}))


def _probe(shape: tuple[int, ...], offset: int) -> torch.Tensor:
    n = math.prod(shape)
    return torch.cos(torch.arange(offset, offset + n, dtype=torch.float64) * 1.7 + 0.3).reshape(shape).float()


def compare_with_single_process(scenarios: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """On every rank: run each scenario on the expert-parallel layer and on the single-process MoE; compare.

    A scenario: ``moe`` (MoE keyword arguments), ``tokens`` (tokens per rank, one number per rank),
    ``seed``, optional ``bias`` (a routing bias that steers tokens, e.g. away from one rank's experts) and
    ``train`` (aux losses and one bias update). Each rank builds the same layer and the same full batch,
    keeps its own slice, and returns the largest differences of the output, the input gradient, the
    router's, the shared experts' and its experts' gradients, plus its send and receive counts.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    for sc in scenarios:
        _check_scenario(sc, world)
    out = []
    for sc in scenarios:
        moe = _reference_layer(sc["moe"], sc.get("seed", 0))
        if "bias" in sc:
            moe.router.expert_bias.copy_(torch.tensor(sc["bias"], dtype=torch.float32))  # copy_ moves it
        moe.train(sc.get("train", False))
        tokens = list(sc["tokens"])
        gen = torch.Generator().manual_seed(sc.get("seed", 0) + 1)
        x_all = torch.randn(sum(tokens), moe.d_model, generator=gen).to(rank_device())
        start = sum(tokens[:rank])
        seq = sc.get("seq_len")  # (B, S, d) batches: each rank holds whole sequences
        d = moe.d_model

        def shaped(t: torch.Tensor, seq: int | None = seq, d: int = d) -> torch.Tensor:
            return t.reshape(-1, seq, d) if seq else t

        # single process, whole batch (with capacity: each rank's tokens alone, as GShard's groups)
        x_ref = x_all.clone().requires_grad_(True)
        if moe.capacity_factor is None:
            y_ref = moe(shaped(x_ref)).reshape(-1, moe.d_model)
        else:
            y_ref = torch.cat([moe(chunk) for chunk in x_ref.split(tokens)])
        probe = _probe(tuple(y_ref.shape), 0).to(y_ref.device)
        ((y_ref * probe).sum() + moe.aux_loss).backward()
        # this rank's part
        ep = ExpertParallelMoE.from_moe(moe, rank, world, ranks_per_node=sc.get("ranks_per_node"))
        ep.train(sc.get("train", False)).zero_grad()
        x = x_all[start:start + tokens[rank]].clone().requires_grad_(True)
        y = ep(shaped(x)).reshape(-1, moe.d_model)
        ((y * probe[start:start + tokens[rank]]).sum() + ep.aux_loss).backward()
        lo, hi = ep.first_expert, ep.first_expert + ep.n_local

        def err(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0

        router_grad = _all_reduce(ep.router.gate.weight.grad, None)
        errors = {
            "output": err(y, y_ref[start:start + tokens[rank]]),
            "grad_input": err(x.grad, x_ref.grad[start:start + tokens[rank]]),
            "grad_router": err(router_grad, moe.router.gate.weight.grad),
            **{f"grad_{n}": err(getattr(ep.experts, n).grad, getattr(moe.experts, n).grad[lo:hi])
               for n in ("w_gate", "w_up", "w_down")},
        }
        if ep.shared is not None:
            errors["grad_shared"] = max(err(_all_reduce(a.grad, None), b.grad)
                                        for a, b in zip(ep.shared.parameters(), moe.shared.parameters(), strict=True))
        if sc.get("train", False):
            errors["aux_loss"] = abs(ep.aux_loss_total - float(moe.aux_loss.detach()))
            moe.after_step()
            ep.after_step()
            errors["bias"] = err(ep.router.expert_bias, moe.router.expert_bias)
        out.append({"name": sc.get("name", ""), "errors": errors, "sent": ep.last_stats["sent_pairs"],
                    "received": ep.last_stats["received_pairs"],
                    "received_per_expert": ep.last_stats["received_per_expert"]})
    return out


def profile_layer(moe_kwargs: dict[str, Any], tokens_per_rank: int, seed: int = 0, bias: Sequence[float] | None = None,
                  repeats: int = 5, warmup: int = 2, dtype: str = "float32") -> dict[str, Any]:
    """On every rank: time training steps of the expert-parallel layer; report counts, bytes and where time goes.

    A step is forward + backward with an input that needs its gradient, so all four all-to-alls run (dispatch
    and combine, each again in the backward pass). ``seconds``: the forward phases and the whole ``step``, the
    fastest of ``repeats`` runs after ``warmup`` (other programs only make a run slower). ``step_parts``: the
    fastest of ``repeats`` more steps with a barrier before each all-to-all (:func:`record_collectives`), split
    into ``waiting`` (for the slowest rank, in those barriers), ``all-to-all`` (the four exchanges) and
    ``compute`` (the rest: router, sorting, experts, the small count exchanges); ``collectives`` lists its four.
    """
    check_int("tokens_per_rank", tokens_per_rank, 1)
    check_int("repeats", repeats, 1)
    check_int("warmup", warmup, 0)
    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype) \
            or not getattr(torch, dtype).is_floating_point:
        raise ValueError(f"dtype must name a torch floating-point dtype, e.g. 'float32' or 'bfloat16', got {dtype!r}")
    _check_layer_bias(bias, moe_kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    moe = _reference_layer(moe_kwargs, seed)
    if bias is not None:
        moe.router.expert_bias.copy_(torch.tensor(bias, dtype=torch.float32))
    ep = ExpertParallelMoE.from_moe(moe, rank, world).to(getattr(torch, dtype))
    gen = torch.Generator().manual_seed(seed + 1 + rank)  # every rank has its own tokens
    x = torch.randn(tokens_per_rank, moe.d_model, generator=gen).to(rank_device(), getattr(torch, dtype))
    x.requires_grad_()  # as inside a model: the backward pass sends the input's gradient back through a dispatch

    def step() -> float:
        x.grad = None
        ep.zero_grad(set_to_none=True)
        dist.barrier()
        start = time.perf_counter()
        ep(x).float().square().mean().backward()
        return time.perf_counter() - start

    best: dict[str, float] = {}
    for i in range(warmup + repeats):
        seconds = step()
        if i >= warmup:
            for name, s in {**ep.last_stats["seconds"], "step": seconds}.items():
                best[name] = min(best.get(name, math.inf), s)
    stats = dict(ep.last_stats)
    parts: dict[str, float] | None = None
    for _ in range(repeats):
        with record_collectives(sync=True) as records:
            total = step()
        waiting, moving = sum(r["wait_s"] for r in records), sum(r["seconds"] for r in records)
        if parts is None or total < parts["total"]:
            parts = {"total": total, "waiting": waiting, "all-to-all": moving, "compute": total - waiting - moving}
            stats["collectives"] = records
    stats["seconds"] = best
    stats["step_parts"] = parts
    stats["element_size"] = x.element_size()
    return stats


def profile_layers(settings: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`profile_layer` for each dict of its keyword arguments, in one process group."""
    return [profile_layer(**s) for s in settings]


def balance_with_bias(moe_kwargs: dict[str, Any], tokens_per_rank: int, bias: Sequence[float], steps: int,
                      seed: int = 0) -> list[int]:
    """On every rank: start from a skewed routing bias and apply the bias update (global counts) ``steps``
    times, each after a forward pass on fresh tokens; return the rows this rank received at each step."""
    check_int("tokens_per_rank", tokens_per_rank, 1)
    check_int("steps", steps, 0)
    _check_layer_bias(bias, moe_kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    moe = _reference_layer(moe_kwargs, seed)
    moe.router.expert_bias.copy_(torch.tensor(bias, dtype=torch.float32))
    ep = ExpertParallelMoE.from_moe(moe, rank, world).train()
    gen = torch.Generator().manual_seed(seed + 1 + rank)
    received = []
    for _ in range(steps + 1):
        with torch.no_grad():
            ep(torch.randn(tokens_per_rank, moe.d_model, generator=gen).to(rank_device()))
        received.append(sum(ep.last_stats["received_pairs"]))
        ep.after_step()
    return received


OVERLAP_ARMS = ("whole batch", "exchanges only", "experts only", "one after another", "overlapped",
                "one after another, experts elsewhere", "overlapped, experts elsewhere")
"""What :func:`overlap_profile` times, in this order."""


def _plan(ep: ExpertParallelMoE, flat: torch.Tensor) -> dict[str, Any]:
    """Route one micro-batch and exchange its counts: everything its dispatch needs, no rows moved yet."""
    routing = ep.router(flat)
    experts = routing.indices.reshape(-1)  # (T*k,) every pair is sent (no capacity)
    dest = expert_owner(experts, ep.n_experts, ep.world)
    order = dest.argsort(stable=True)  # (T*k,) pairs in send order
    send = torch.bincount(dest, minlength=ep.world)
    recv = _exchange(send, ep.group)
    return {"flat": flat, "token_of": order // ep.top_k, "weights": routing.weights.reshape(-1)[order],
            "local_ids": (experts[order] - dest[order] * ep.n_local).contiguous(),
            "send": send.tolist(), "recv": recv.tolist()}


def _start(ep: ExpertParallelMoE, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int],
           in_splits: list[int], overlap: bool) -> Any:  # noqa: ANN401
    """Start an all-to-all of rows; with ``overlap`` return its handle (``wait()`` later), else wait and return None."""
    work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=ep.group, async_op=True)
    if overlap:
        return work
    work.wait()
    return None


def _dispatch(ep: ExpertParallelMoE, p: dict[str, Any], overlap: bool) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
    """Send one planned micro-batch's rows and their local expert ids: (rows (R, d), ids (R,), handles)."""
    xs = p["flat"].index_select(0, p["token_of"])  # (A, d) rank-contiguous send buffer
    xr = xs.new_empty((sum(p["recv"]), ep.d_model))  # (R, d)
    ids = p["local_ids"].new_empty(sum(p["recv"]))  # (R,)
    return xr, ids, [_start(ep, xr, xs, p["recv"], p["send"], overlap),
                     _start(ep, ids, p["local_ids"], p["recv"], p["send"], overlap)]


def _pipelined_forward(ep: ExpertParallelMoE, micro_batches: Sequence[torch.Tensor], overlap: bool,
                       stand_in: Sequence[float] | None = None, experts: bool = True
                       ) -> tuple[torch.Tensor, list[float]]:
    """The layer's forward over micro-batches; with ``overlap`` the dispatch of micro-batch i + 1 and the combine
    of micro-batch i are in flight (``async_op=True``) while the experts of micro-batch i compute.

    ``stand_in``: instead of computing, each micro-batch's experts sleep that many seconds (compute on a device
    the CPU only waits for; the output is then not the layer's). ``experts=False``: the exchanges alone. Returns
    the output (T, d) and the seconds each micro-batch's compute took (local experts and shared experts).
    """
    plans = [_plan(ep, flat) for flat in micro_batches]
    pending = _dispatch(ep, plans[0], overlap)
    outs, works, seconds = [], [], []
    for i, p in enumerate(plans):
        xr, ids, arrived = pending
        for work in arrived:
            if work is not None:
                work.wait()
        if i + 1 < len(plans):
            pending = _dispatch(ep, plans[i + 1], overlap)  # in flight while this micro-batch computes
        begin = time.perf_counter()
        if stand_in is not None:
            time.sleep(stand_in[i])
            yr = xr
        elif experts:
            by_expert, _, counts = sort_by_expert(ids[:, None], ep.n_local)
            yr = ep.experts(xr.index_select(0, by_expert), counts).index_select(0, _inverse(by_expert))
        else:
            yr = xr
        ys = yr.new_empty((sum(p["send"]), ep.d_model))  # (A, d) results back in send order
        works.append(_start(ep, ys, yr, p["send"], p["recv"], overlap))
        shared = ep.shared(p["flat"]) if ep.shared is not None and experts and stand_in is None else None
        seconds.append(time.perf_counter() - begin)
        outs.append((ys, shared))
    ys_all = []
    for p, work, (ys, shared) in zip(plans, works, outs, strict=True):
        if work is not None:
            work.wait()
        y = combine(ys, p["weights"], p["token_of"], p["flat"].shape[0])
        ys_all.append(y if shared is None else y + shared)
    return torch.cat(ys_all), seconds


def overlap_profile(moe_kwargs: dict[str, Any], tokens_per_rank: int, chunks: int = 4, seed: int = 0,
                    repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """On every rank: time the layer's forward split into ``chunks`` micro-batches, exchanges blocking or
    overlapped with the experts of the previous micro-batch; with the experts computed here or elsewhere.

    ``seconds`` (fastest of ``repeats`` after ``warmup``, every rank starting together; the arms alternate so
    that load from other programs falls on all of them alike): :data:`OVERLAP_ARMS`. "experts elsewhere"
    replaces each micro-batch's compute by sleeping as long as it took in the fastest "one after another" run,
    as a rank whose experts run on an accelerator waits for them; its exchanges need only the CPU's time.
    ``max_diff``: the overlapped output against the unsplit layer's.
    """
    check_int("tokens_per_rank", tokens_per_rank, 1)
    check_int("chunks", chunks, 1)
    check_int("repeats", repeats, 1)
    check_int("warmup", warmup, 0)
    if tokens_per_rank % chunks:
        raise ValueError(f"chunks={chunks} must divide tokens_per_rank={tokens_per_rank} (equal micro-batches)")
    if moe_kwargs.get("capacity_factor") is not None:
        raise ValueError("overlap_profile times the layer without capacity: leave capacity_factor out of moe_kwargs")
    rank, world = dist.get_rank(), dist.get_world_size()
    moe = _reference_layer(moe_kwargs, seed)
    ep = ExpertParallelMoE.from_moe(moe, rank, world).eval()
    gen = torch.Generator().manual_seed(seed + 1 + rank)
    x = torch.randn(tokens_per_rank, moe.d_model, generator=gen).to(rank_device())
    micro = list(x.split(tokens_per_rank // chunks))
    best = dict.fromkeys(OVERLAP_ARMS, math.inf)
    compute = [math.inf] * chunks
    stand_in = [0.0] * chunks

    def timed(arm: str) -> float:
        dist.barrier()
        begin = time.perf_counter()
        if arm == "whole batch":
            ep(x)
        elif arm == "experts only":  # the rows this rank receives, already here: no exchange
            ep.experts(xr_sorted, counts)
            if ep.shared is not None:
                ep.shared(x)
        else:
            _, secs = _pipelined_forward(ep, micro, overlap=arm.startswith("overlapped"),
                                         stand_in=stand_in if arm.endswith("elsewhere") else None,
                                         experts=arm != "exchanges only")
            if arm == "one after another":
                compute[:] = [min(a, b) for a, b in zip(compute, secs, strict=True)]
        dist.barrier()
        return time.perf_counter() - begin

    with torch.no_grad():
        y = ep(x)
        xr, ids, _ = _dispatch(ep, _plan(ep, x), overlap=False)  # the rows "experts only" computes on
        by_expert, _, counts = sort_by_expert(ids[:, None], ep.n_local)
        xr_sorted = xr.index_select(0, by_expert)
        for i in range(warmup + repeats):
            for arm in OVERLAP_ARMS:
                if arm.endswith("elsewhere"):
                    stand_in[:] = compute
                seconds = timed(arm)
                if i >= warmup:
                    best[arm] = min(best[arm], seconds)
        y_overlapped, _ = _pipelined_forward(ep, micro, overlap=True)
    return {"seconds": best, "compute_s": compute, "chunks": chunks, "tokens": tokens_per_rank,
            "max_diff": float((y - y_overlapped).abs().max())}


def overlap_seeds(moe_kwargs: dict[str, Any], tokens_per_rank: int, chunks: int = 4, seeds: Sequence[int] = range(5),
                  world: int = 2, progress: bool = False) -> dict[str, Any]:
    """:func:`overlap_profile` once per seed, each in its own launch (new tokens, weights and processes).

    ``runs``: per seed, each arm's seconds on the slowest rank (a forward pass ends when its slowest rank
    ends); ``max_diff``: the largest difference of an overlapped output from the unsplit layer's, over all.
    """
    from tqdm.auto import tqdm

    runs, worst = [], 0.0
    for seed in tqdm(list(seeds), desc="seeds", disable=not progress):
        per_rank = launch(overlap_profile, world, moe_kwargs, tokens_per_rank, chunks, seed, timeout_s=300)
        runs.append({arm: max(r["seconds"][arm] for r in per_rank) for arm in OVERLAP_ARMS})
        worst = max([worst] + [r["max_diff"] for r in per_rank])
    return {"runs": runs, "max_diff": worst, "seeds": list(seeds), "world": world, "chunks": chunks,
            "tokens_per_rank": tokens_per_rank, "moe": dict(moe_kwargs)}


def run_all(calls: Sequence[tuple[Callable[..., Any], tuple]]) -> list[Any]:
    """Run several functions of the package in one process group (one spawn): ``[fn(*args) for fn, args]``."""
    return [fn(*args) for fn, args in calls]


def communication_volume(settings: Sequence[dict[str, Any]], tokens_per_rank: int, seed: int = 0
                         ) -> list[dict[str, Any]]:
    """On every rank, for each MoE setting: one forward pass; the pairs and bytes each all-to-all carried.

    Bytes are those of the token rows handed to the collective for other ranks (``split sizes × d ×
    element size``); rows for the rank's own experts are copied locally and not counted. ``wire_bytes``: what
    the two exchanges wrote to the sockets, counted by the kernel (:func:`record_collectives`; None off Linux).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for s in settings:
        moe = _reference_layer(s, seed)
        ep = ExpertParallelMoE.from_moe(moe, rank, world)
        gen = torch.Generator().manual_seed(seed + 1 + rank)
        x = torch.randn(tokens_per_rank, moe.d_model, generator=gen).to(rank_device())
        with torch.no_grad(), record_collectives() as records:
            ep(x)
        st = ep.last_stats
        wire = [r["wire_bytes"] for r in records]
        out.append({"wire_bytes": None if None in wire else sum(wire),
                    "d_model": moe.d_model, "top_k": moe.top_k, "tokens": st["tokens"], "sent": st["sent_pairs"],
                    "received": st["received_pairs"], "dispatch_bytes": st["dispatch_bytes"],
                    "combine_bytes": st["combine_bytes"], "metadata_bytes": st["metadata_bytes"],
                    "element_size": x.element_size()})
    return out


def node_dispatch_volume(moe_kwargs: dict[str, Any], tokens_per_rank: int, ranks_per_node: int, seed: int = 0
                         ) -> dict[str, Any]:
    """On every rank: one forward pass of the plain layer and of the node-deduplicated one on the same tokens.

    Returns, for each (``plain``, ``by_node``), the rank's all-to-all records (:func:`record_collectives`: payload
    from the splits and bytes the kernel counted written) and its rows bound for other nodes: the plain layer
    sends one row per (token, expert) pair there (``pairs_to_other_nodes``), the node layer one per (token,
    node) (``rows_to_other_nodes``); ``max_diff``: the largest difference of the two outputs.
    """
    check_int("tokens_per_rank", tokens_per_rank, 0)
    rank, world = dist.get_rank(), dist.get_world_size()
    moe = _reference_layer(moe_kwargs, seed)
    gen = torch.Generator().manual_seed(seed + 1 + rank)
    x = torch.randn(tokens_per_rank, moe.d_model, generator=gen).to(rank_device())
    out: dict[str, Any] = {}
    ys = []
    for name, g in (("plain", None), ("by_node", ranks_per_node)):
        ep = ExpertParallelMoE.from_moe(moe, rank, world, ranks_per_node=g)
        with torch.no_grad(), record_collectives() as records:
            ys.append(ep(x))
        st = ep.last_stats
        if g is None:
            st = {**st, "pairs_to_other_nodes": _to_other_nodes(st["sent_pairs"], rank, ranks_per_node)}
        out[name] = {"records": records, **{key: st[key] for key in ("pairs_to_other_nodes", "rows_to_other_nodes")
                                            if key in st}}
    out["max_diff"] = float((ys[0] - ys[1]).abs().max()) if x.numel() else 0.0
    out["tokens"], out["element_size"], out["d_model"] = tokens_per_rank, x.element_size(), moe.d_model
    return out


# --------------------------------------------------------------------------------------------------------
# command line: python -m moe_course.parallel [--world W]   or   torchrun --nproc-per-node W -m moe_course.parallel

DEMO = {"d_model": 32, "d_hidden": 64, "n_experts": 8, "top_k": 2, "n_shared": 1}


def _demo(tokens: int) -> dict[str, Any]:
    world = dist.get_world_size()
    (result,) = compare_with_single_process([{"name": "demo", "moe": DEMO, "tokens": [tokens] * world, "seed": 0}])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the equivalence demo: locally spawned ranks, or the ranks torchrun started."""
    parser = argparse.ArgumentParser(prog="python -m moe_course.parallel", description=main.__doc__)
    parser.add_argument("--world", type=int, default=2, help="ranks to spawn (ignored under torchrun)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    args = parser.parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if args.backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group(args.backend, timeout=timedelta(seconds=120))
        results = [None] * world
        dist.all_gather_object(results, _demo(args.tokens))
        dist.destroy_process_group()
        if rank:
            return 0
    else:
        from moe_course import parallel  # spawned ranks import the function from the package, not __main__

        results = launch(parallel._demo, args.world, args.tokens, backend=args.backend)
    for r, res in enumerate(results):
        worst = max(res["errors"].values())
        print(f"rank {r}: sent {res['sent']}, received {res['received']} pairs; largest difference from the "
              f"single-process layer {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
