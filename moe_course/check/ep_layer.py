"""Check of notebook 07's ★★★ exercise: the learner writes an expert-parallel layer's forward pass.

``fn(x, indices, weights, experts, world) -> y`` runs on every rank of a real gloo group: ``x`` (T, d) this rank's
tokens, ``indices`` (T, k) their experts (contiguous layout: expert e on rank e // (E/W)), ``weights`` (T, k) their
routing weights, ``experts`` this rank's :class:`~moe_course.experts.GroupedExperts` (E/W of them); ``y`` (T, d) is
sum_j weights[t, j] * expert_{indices[t, j]}(x[t]). Each rank compares its output and the gradients of ``x``,
``weights`` and its experts' weights with a single-process computation over the whole batch (a loop over experts,
independent of the package's dispatch), on 2 and 3 ranks with uneven batches, a rank without tokens, an expert
without rows and k = 1, 2 and 3, and in float32 with 160 tokens per rank, whose sorts hold many ties (an answer
may sort unstably, as long as its rows and their expert ids travel in the same order).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from moe_course.check._core import CheckError, fail, ok
from moe_course.check.collectives import TIMEOUT_S, _explain_failure
from moe_course.collectives import _call_source, _source
from moe_course.experts import GroupedExperts
from moe_course.parallel import LaunchFailed, RankFailed, launch

__all__ = ["expert_parallel_forward"]

CASES = (  # (what, tokens per rank, n_experts, k, experts given no rows, dtype)
    ("2 ranks, 4 experts, top-2, uneven batches", (7, 5), 4, 2, (), "float64"),
    ("3 ranks, 6 experts, top-2, rank 1 has no tokens, expert 4 gets nothing", (9, 0, 6), 6, 2, (4,), "float64"),
    ("3 ranks, 3 experts (one per rank), top-1", (5, 8, 4), 3, 1, (), "float64"),
    ("2 ranks, 8 experts, top-3, rank 1's experts get nothing", (6, 9), 8, 3, (4, 5, 6, 7), "float64"),
    ("2 ranks, 4 experts, top-2, float32, 160 tokens each (many ties in every sort)", (160, 160), 4, 2, (), "float32"),
)
D, H = 8, 12
TOL = {"float64": 1e-9, "float32": 1e-5}
"""Largest difference from the float64 reference, relative to the reference's largest value (at least 1)."""


def _err(value: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest difference of ``value`` from ``ref``, relative to ref's largest magnitude (at least 1)."""
    if not ref.numel():
        return 0.0
    return float((value.detach().double() - ref).abs().max() / ref.abs().max().clamp(min=1.0))


def _case_data(tokens: tuple[int, ...], n_experts: int, k: int, starved: tuple[int, ...], seed: int
               ) -> dict[str, torch.Tensor]:
    """The whole batch, built alike on every rank: tokens, routing and all experts' weights (float64)."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(tokens)
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    logits = torch.randn(n, n_experts, generator=gen, dtype=torch.float64)
    logits[:, list(starved)] = -1e9  # these experts are never chosen
    top, indices = logits.softmax(-1).topk(k, dim=-1)
    weights = top / top.sum(-1, keepdim=True) * 0.9  # not summing to 1: a forgotten weight shows
    experts = GroupedExperts(n_experts, D, H).double()
    with torch.no_grad():
        for w in (experts.w_gate, experts.w_up, experts.w_down):
            w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float64) * 0.5)
    return {"x": x, "indices": indices, "weights": weights,
            **{name: getattr(experts, name).detach() for name in ("w_gate", "w_up", "w_down")}}


def _expert(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert as GroupedExperts stores it: (n, d) @ (d, h) ... -> (n, d)."""
    return (torch.nn.functional.silu(x @ w_gate) * (x @ w_up)) @ w_down


def _reference(data: dict[str, torch.Tensor], probe: torch.Tensor) -> dict[str, torch.Tensor]:
    """Single process, a loop over experts: the output and the gradients of x, weights and every expert."""
    x = data["x"].clone().requires_grad_()
    weights = data["weights"].clone().requires_grad_()
    ws = {name: data[name].clone().requires_grad_() for name in ("w_gate", "w_up", "w_down")}
    y = torch.zeros_like(x)
    for e in range(ws["w_gate"].shape[0]):
        t, j = (data["indices"] == e).nonzero(as_tuple=True)
        if len(t):
            out = _expert(x[t], ws["w_gate"][e], ws["w_up"][e], ws["w_down"][e])
            y = y.index_add(0, t, out * weights[t, j].unsqueeze(-1))
    (y * probe).sum().backward()
    return {"y": y.detach(), "x": x.grad, "weights": weights.grad, **{n: w.grad for n, w in ws.items()}}


def _run_rank(source: str, name: str, case: tuple, seed: int) -> dict[str, Any]:
    """On one rank: build the case, call the learner's function, back-propagate, compare with the reference."""
    what, tokens, n_experts, k, starved, dtype = case
    rank, world = dist.get_rank(), dist.get_world_size()
    data = _case_data(tokens, n_experts, k, starved, seed)
    low = getattr(torch, dtype)
    data = {n: v.to(low).double() if v.is_floating_point() else v for n, v in data.items()}  # values the rank holds
    tol = TOL[dtype]
    start, end = sum(tokens[:rank]), sum(tokens[:rank + 1])
    probe = torch.cos(torch.arange(sum(tokens) * D, dtype=torch.float64) * 1.3).reshape(-1, D)
    ref = _reference(data, probe)
    n_local = n_experts // world
    lo, hi = rank * n_local, (rank + 1) * n_local
    experts = GroupedExperts(n_local, D, H).to(low)
    with torch.no_grad():
        for wname in ("w_gate", "w_up", "w_down"):
            getattr(experts, wname).copy_(data[wname][lo:hi])
    x = data["x"][start:end].to(low).requires_grad_()
    indices = data["indices"][start:end].clone()
    weights = data["weights"][start:end].to(low).requires_grad_()
    kept = {"x": x.detach().clone(), "indices": indices.clone(), "weights": weights.detach().clone()}
    y = _call_source(source, name, [(x, indices, weights, experts, world)] * world, ())
    report: dict[str, Any] = {"type": type(y).__name__}
    if not isinstance(y, torch.Tensor):
        return report
    report.update(shape=tuple(y.shape), dtype=str(y.dtype).replace("torch.", ""))
    if y.shape != (end - start, D):
        return report
    report["tol"] = tol
    report["output_err"] = _err(y, ref["y"][start:end])
    report["unweighted"] = bool(y.numel()) and _err(y, _unweighted(data, start, end)) <= tol
    report["mistake"] = next((m for m in MISTAKES if report["output_err"] > tol and y.numel()
                              and _err(y, _simulate(data, tokens, m)[start:end]) <= tol), None)
    report["requires_grad"] = y.requires_grad
    if y.requires_grad:  # every rank runs its backward pass: the reverse exchanges need all of them
        (y * probe[start:end]).sum().backward()
    grads = {"x": (x.grad, ref["x"][start:end]), "weights": (weights.grad, ref["weights"][start:end]),
             **{n: (getattr(experts, n).grad, ref[n][lo:hi]) for n in ("w_gate", "w_up", "w_down")}}
    for n in ("w_gate", "w_up", "w_down"):  # experts that received nothing may have no gradient: zero
        g, r = grads[n]
        grads[n] = (torch.zeros_like(r) if g is None else g, r)
    report["grad_err"] = {n: None if g is None else _err(g, r) for n, (g, r) in grads.items()}
    report["changed"] = [n for n, v in (("x", x.detach()), ("indices", indices), ("weights", weights.detach()))
                         if not torch.equal(v, kept[n])]
    return report


MISTAKES = {
    "interleaved": "expert e lives on rank e // (E/W), as its local expert e % (E/W) (the contiguous layout), not "
                   "on rank e % W",
    "not_grouped": "the rows that arrive are grouped by source rank; group them by local expert (a stable argsort "
                   "of their local expert ids) before experts(rows, counts), which runs expert 0 on the first "
                   "counts[0] rows, and so on",
    "not_undone": "the expert outputs come out grouped by local expert; put them back in the order the rows "
                  "arrived (the inverse of the grouping permutation) before sending them back",
}


def _simulate(data: dict[str, torch.Tensor], tokens: tuple[int, ...], mistake: str) -> torch.Tensor:
    """The whole batch's output when every rank makes ``mistake`` (one of :data:`MISTAKES`), in one process."""
    idx, world, n_experts = data["indices"], len(tokens), data["w_gate"].shape[0]
    n_local, k = n_experts // world, idx.shape[1]
    starts = [sum(tokens[:r]) for r in range(world)]
    sent = []  # per source rank: its pairs (global token, j) in send order, and their destinations
    for src in range(world):
        pairs = [(starts[src] + p // k, p % k) for p in range(tokens[src] * k)]
        e = idx[starts[src]:starts[src] + tokens[src]].reshape(-1)
        dest = e % world if mistake == "interleaved" else e // n_local
        order = dest.argsort(stable=True).tolist()
        sent.append(([pairs[i] for i in order], dest[order].tolist()))
    value: dict[tuple[int, int], torch.Tensor] = {}
    for r in range(world):
        arrived = [pair for s_pairs, s_dest in sent for pair, d in zip(s_pairs, s_dest, strict=True) if d == r]
        ids = torch.tensor([int(idx[t, j]) // world if mistake == "interleaved" else int(idx[t, j]) % n_local
                            for t, j in arrived], dtype=torch.long)
        counts = torch.bincount(ids, minlength=n_local).cumsum(0)
        grouped = ids.argsort(stable=True).tolist()
        rows = grouped if mistake != "not_grouped" else list(range(len(ids)))  # arrival slot in each position
        out = []
        for pos, slot in enumerate(rows):  # the expert experts(rows, counts) applies at position pos
            e = r * n_local + int(torch.searchsorted(counts, pos, right=True))
            t = arrived[slot][0]
            out.append(_expert(data["x"][t:t + 1], data["w_gate"][e], data["w_up"][e], data["w_down"][e])[0])
        by_slot = [None] * len(ids)
        for pos, slot in enumerate(rows):
            by_slot[slot] = out[pos]
        back = [out[i] for i in range(len(ids))] if mistake == "not_undone" else by_slot
        for pair, v in zip(arrived, back, strict=True):
            value[pair] = v
    y = torch.zeros_like(data["x"])
    for (t, j), v in value.items():
        y[t] += data["weights"][t, j] * v
    return y


def _unweighted(data: dict[str, torch.Tensor], start: int, end: int) -> torch.Tensor:
    x, idx = data["x"][start:end], data["indices"][start:end]
    y = torch.zeros_like(x)
    for e in range(data["w_gate"].shape[0]):
        t, _ = (idx == e).nonzero(as_tuple=True)
        if len(t):
            y = y.index_add(0, t, _expert(x[t], data["w_gate"][e], data["w_up"][e], data["w_down"][e]))
    return y


def expert_parallel_forward(fn: Callable[..., torch.Tensor]) -> None:
    """Run ``fn(x, indices, weights, experts, world)`` on 2 and 3 gloo processes; compare outputs and gradients."""
    source, name = _source(fn)
    for seed, case in enumerate(CASES):
        what = case[0]
        try:
            reports = launch(_run_rank, len(case[1]), source, name, case, seed, timeout_s=TIMEOUT_S)
        except RankFailed as err:
            raise CheckError(_explain_failure(err, what)) from None
        except LaunchFailed as err:
            raise CheckError(f"case '{what}': not your answer: the processes failed ({err.cause}); rerun the check, "
                             "and restart the kernel if it fails again") from None
        for rank, rep in enumerate(reports):
            _judge(what, rank, rep, case)
    ok("expert_parallel_forward", "outputs and gradients of x, weights and the experts equal one process, on 2 and "
                                  "3 ranks")


def _judge(what: str, rank: int, rep: dict[str, Any], case: tuple) -> None:
    """Fail with the learner's mistake on one rank of one case, or return."""
    tokens = case[1][rank]
    if rep["type"] != "Tensor":
        fail(f"case '{what}': rank {rank} returned {rep['type']}, expected a tensor y of shape (T, d)")
    if rep["dtype"] != case[5]:
        fail(f"case '{what}': rank {rank} returned {rep['dtype']} for {case[5]} inputs; build every buffer from x "
             "(x.new_empty, torch.zeros_like(x)) so the output keeps the input's dtype")
    if rep["shape"] != (tokens, D):
        fail(f"case '{what}': rank {rank} returned shape {rep['shape']}, expected ({tokens}, {D}): one row per token "
             "of this rank, the weighted sum of its experts' outputs (add each returned row to its token, index_add)")
    if rep["changed"]:
        fail(f"case '{what}': rank {rank} changed its input {rep['changed'][0]} in place; leave the inputs unchanged")
    if rep["output_err"] > rep["tol"]:
        if rep["unweighted"]:
            fail(f"case '{what}': rank {rank}'s rows are the experts' outputs summed without the routing weights: "
                 "multiply each returned row by weights[t, j] before adding it to token t")
        if rep["mistake"]:
            fail(f"case '{what}': rank {rank}'s output is what you get when {MISTAKES[rep['mistake']]}")
        fail(f"case '{what}': rank {rank}'s output differs from one process by {rep['output_err']:.2e} (relative). "
             "Expert e lives "
             "on rank e // (E/W) as local expert e % (E/W); send each (token, expert) pair's row there, group what "
             "arrives by local expert before calling experts(rows, counts), undo that grouping, send the results "
             "back with the splits swapped and add each to its token: pair p = t·k + j belongs to token p // k")
    if not rep["requires_grad"] and tokens:
        fail(f"case '{what}': rank {rank}'s output has no gradient: dist.all_to_all_single is not differentiable; "
             "send rows with moe_course.parallel.all_to_all, whose backward pass is the reverse exchange")
    for name, err in rep["grad_err"].items():
        if err is None and tokens and name in ("x", "weights"):
            fail(f"case '{what}': no gradient reached {name} on rank {rank}: "
                 + ("send rows with moe_course.parallel.all_to_all (differentiable), not dist.all_to_all_single"
                    if name == "x" else "multiply by weights itself, not weights.detach() or a copy made with "
                    "torch.tensor"))
        if err is not None and err > rep["tol"]:
            fail(f"case '{what}': the gradient of {name} on rank {rank} differs from one process by {err:.2e} "
                 "(relative)"
                 + (": the rows that came back must be the ones each pair sent, in the order they were sent"
                    if name != "weights" else ""))
