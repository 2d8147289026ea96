"""Checks for notebook 08 (capstone): ``check.equal_active_moe(fn)`` and ``check.type_expert_table(fn)``.

``equal_active_moe`` compares the learner's ``fn(dense, n_experts, top_k, n_shared) -> ModelConfig`` with
:func:`moe_course.capstone.equal_active_moe` field by field on several dense configs, then counts both models'
parameters with :func:`moe_course.params.count_model`: the MoE twin must have the dense model's active
parameters plus only its routers' ``d_model · n_experts`` per MoE layer. ``type_expert_table`` compares
``fn(types, indices, n_types, n_experts) -> (n_types, n_experts) counts`` with
:func:`moe_course.capstone.type_expert_table` on hand-made batches with a type that never occurs and an expert
that is never chosen first. When an answer is wrong, each check recomputes the usual mistakes and names the
one that matches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from moe_course.capstone import equal_active_moe as ref_equal_active_moe
from moe_course.capstone import type_expert_table as ref_type_expert_table
from moe_course.check._core import CheckError, as_tensor, call, fail, ok
from moe_course.model import ModelConfig, TinyLM
from moe_course.params import count_model

__all__ = ["equal_active_moe", "type_expert_table"]


# ----------------------------------------------------------------------------------------------------------
# equal_active_moe: dense config -> MoE config with expert_hidden = d_hidden // (top_k + n_shared)
# ----------------------------------------------------------------------------------------------------------

# Dense configs of different widths and shapes (one with non-default block_size, dropout and moe_every, so
# that a config rebuilt from the defaults shows), each with layouts whose wrong widths all differ.
DENSE_CASES = (
    (ModelConfig(ffn="dense", block_size=32, n_layer=2, n_head=2, d_model=32, d_hidden=96),
     ((8, 2, 0), (16, 3, 1))),
    (ModelConfig(ffn="dense", block_size=64, n_layer=3, n_head=4, d_model=48, d_hidden=120, dropout=0.1,
                 moe_every=2), ((6, 2, 1), (10, 4, 2))),
    (ModelConfig(ffn="dense", block_size=16, n_layer=1, n_head=2, d_model=16, d_hidden=64), ((4, 1, 1), (32, 6, 2))),
)
_SET_BY_FN = ("ffn", "n_experts", "top_k", "n_shared", "expert_hidden")


def _active(cfg: ModelConfig) -> tuple[int, int, int]:
    """(total, active, MoE layers) of a freshly built TinyLM of ``cfg`` (the counts do not depend on the seed)."""
    model = TinyLM(cfg)
    return (*count_model(model), len(model.moe_layers()))


def _width_mistakes(dense: ModelConfig, n: int, k: int, s: int) -> list[tuple[str, int]]:
    h = dense.d_hidden
    return [
        (f"forgot the shared experts: each token also uses the {s} shared expert(s), each as wide as a routed "
         f"one, so d_hidden is split over top_k + n_shared = {k + s} experts, not top_k = {k}", h // k),
        ("kept the *total* width equal (d_hidden // n_experts): the twin must match the dense model's *active* "
         "width, the experts one token uses (top_k + n_shared), so that both cost the same per token", h // n),
        ("made each expert as wide as the dense FFN: then a token uses top_k + n_shared times the dense width; "
         "split d_hidden over the top_k + n_shared experts a token uses", h),
    ]


def _call_equal_active(fn: Callable[..., Any], dense: ModelConfig, n: int, k: int, s: int, what: str) -> Any:
    try:
        return call(fn, dense, n, k, s, what=what)
    except CheckError as exc:
        if "must be an int" in str(exc):
            raise CheckError(f"{exc}. expert_hidden must be an int: use integer division, d_hidden // (top_k + "
                             "n_shared) (a / gives a float)") from exc
        raise


def equal_active_moe(fn: Callable[[ModelConfig, int, int, int], ModelConfig]) -> None:
    """Check ``fn(dense, n_experts, top_k, n_shared) -> ModelConfig``: the MoE twin with the same active width."""
    example = ""
    for dense, layouts in DENSE_CASES:
        for n, k, s in layouts:
            what = (f"fn(dense with d_hidden={dense.d_hidden}, d_model={dense.d_model}, n_layer={dense.n_layer}; "
                    f"n_experts={n}, top_k={k}, n_shared={s})")
            given = dataclasses.replace(dense)
            got = _call_equal_active(fn, given, n, k, s, what)
            if given != dense:
                changed = [f.name for f in dataclasses.fields(dense)
                           if getattr(given, f.name) != getattr(dense, f.name)]
                fail(f"{what} changed the dense config it was given ({', '.join(changed)}): return a new config, "
                     "e.g. dataclasses.replace(dense, ...), and leave the dense one as it is (it is still used)")
            if not isinstance(got, ModelConfig):
                fail(f"{what} should return a ModelConfig (e.g. dataclasses.replace(dense, ...)), got "
                     f"{type(got).__name__}")
            ref = ref_equal_active_moe(dense, n, k, s)
            if got.ffn != "moe":
                fail(f"{what} returned ffn={got.ffn!r}: set ffn='moe', or the model is built with dense FFNs and "
                     "ignores the experts")
            for name in ("n_experts", "top_k", "n_shared"):
                if getattr(got, name) != getattr(ref, name):
                    fail(f"{what} returned {name}={getattr(got, name)!r}, expected {getattr(ref, name)}: pass the "
                         f"{name} argument into the config")
            if got.expert_hidden != ref.expert_hidden:
                (_, active_d, _), (_, active_m, n_moe) = _active(dense), _active(got)
                router = n_moe * dense.d_model * n
                counts = (f" (active parameters {active_m:,} against the dense model's {active_d:,}, which with "
                          f"the routers' {n_moe}·{dense.d_model}·{n} should be {active_d + router:,})")
                for hint, wrong in _width_mistakes(dense, n, k, s):
                    if got.expert_hidden == wrong:
                        fail(f"{what} returned expert_hidden={got.expert_hidden}, expected {ref.expert_hidden}: it "
                             f"looks like you {hint}{counts}")
                fail(f"{what} returned expert_hidden={got.expert_hidden}, expected {ref.expert_hidden} = d_hidden // "
                     f"(top_k + n_shared){counts}")
            other = [f.name for f in dataclasses.fields(ref)
                     if f.name not in _SET_BY_FN and getattr(got, f.name) != getattr(ref, f.name)]
            if other:
                detail = ", ".join(f"{name}: {getattr(dense, name)!r} -> {getattr(got, name)!r}" for name in other)
                fail(f"{what} changed {', '.join(other)} ({detail}): keep every other field of the dense config "
                     "(d_hidden too: layers that moe_every leaves dense use it). dataclasses.replace(dense, ...) "
                     "keeps them; a new ModelConfig(...) falls back to the defaults")
            (_, active_d, _), (total_m, active_m, n_moe) = _active(dense), _active(got)
            router = n_moe * dense.d_model * n
            if active_m - active_d != router:
                fail(f"{what}: the twin has {active_m:,} active parameters, the dense model {active_d:,}; they "
                     f"should differ by exactly the routers' {n_moe}·{dense.d_model}·{n} = {router:,}")
            if not example:
                example = (f"e.g. d_hidden={dense.d_hidden}, {n} experts top-{k}: experts {ref.expert_hidden} wide, "
                           f"{active_m:,} active of {total_m:,} total parameters, the dense model's {active_d:,} + "
                           f"the routers' {router:,}")
    ok("equal_active_moe", "same active parameters as the dense model up to the router's d_model·N per MoE layer; "
       + example)


# ----------------------------------------------------------------------------------------------------------
# type_expert_table: counts[type, expert] of each token's first choice
# ----------------------------------------------------------------------------------------------------------


def _table_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, int, int]]:
    """(name, types (T,), indices (T, k), n_types, n_experts): each with the last type and expert unused first."""
    types1 = torch.tensor([0, 1, 1, 2, 0, 1, 2, 2, 0, 1])
    idx1 = torch.tensor([[0, 1], [2, 4], [2, 0], [1, 3], [0, 2], [3, 0], [1, 4], [1, 3], [0, 1], [2, 0]])
    types2 = torch.tensor([0, 2, 2, 3, 0, 3, 3])
    idx2 = torch.tensor([[4], [1], [1], [0], [4], [2], [0]])
    gen = torch.Generator().manual_seed(8)
    types3 = torch.randint(0, 8, (40,), generator=gen)  # 9 types: type 8 never occurs
    idx3 = torch.stack([torch.randperm(7, generator=gen)[:3] for _ in range(40)])  # 8 experts: 7 never chosen
    idx3[::5, 1] = 7  # ... except as a second choice, so that counting all k choices shows
    return [
        ("10 tokens, k=2, 4 types (type 3 never occurs), 5 experts (expert 4 never a first choice)",
         types1, idx1, 4, 5),
        ("7 tokens, k=1, 5 types (types 1 and 4 never occur), 6 experts (experts 3 and 5 never chosen)",
         types2, idx2, 5, 6),
        ("40 tokens, k=3, 9 types (type 8 never occurs), 8 experts (expert 7 never a first choice)",
         types3, idx3, 9, 8),
    ]


def _table_mistakes(types: torch.Tensor, indices: torch.Tensor, ref: torch.Tensor, n_types: int,
                    n_experts: int) -> list[tuple[str, torch.Tensor]]:
    r = ref.double()
    return [
        ("transposed the table: rows are token types (n_types), columns are experts (n_experts)", ref.T),
        ("counted all k choices of each token: count only its first choice, indices[:, 0]",
         ref_type_expert_table(types, indices, n_types, n_experts, first_choice_only=False)),
        ("counted the last choice indices[:, -1]; column 0 is each token's first choice",
         ref_type_expert_table(types, indices[:, -1:], n_types, n_experts)),
        ("wrote table[types, experts] += 1: with index tensors, repeated (type, expert) pairs are written once, not "
         "added up, so every cell is 0 or 1. Use table.index_put_((types, experts), ones, accumulate=True) or "
         "torch.bincount(types * n_experts + experts, minlength=n_types * n_experts)", (ref > 0).long()),
        ("normalised the table to probabilities (divided by the number of tokens): return the counts",
         r / r.sum()),
        ("normalised each row (P(expert | type)): return the counts; the notebook normalises later",
         r / r.sum(dim=1, keepdim=True).clamp_min(1)),
        ("normalised each column (P(type | expert)): return the counts",
         r / r.sum(dim=0, keepdim=True).clamp_min(1)),
    ]


_MINLENGTH = ("a type or an expert that never occurs must still get its (zero) row or column: size the table with "
              "n_types and n_experts, not with the largest value seen (torch.bincount(..., minlength=n_types * "
              "n_experts), or torch.zeros(n_types, n_experts))")


def type_expert_table(fn: Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]) -> None:
    """Check ``fn(types (T,), indices (T, k), n_types, n_experts) -> (n_types, n_experts)`` first-choice counts."""
    for name, types, indices, n_types, n_experts in _table_cases():
        what = f"fn({name})"
        try:
            got = as_tensor(fn(types.clone(), indices.clone(), n_types, n_experts), what)
        except (NotImplementedError, CheckError):
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with context for the learner
            reshape = isinstance(exc, RuntimeError) and "shape" in str(exc)
            hint = ". It looks like torch.bincount without minlength: " + _MINLENGTH if reshape else ""
            raise CheckError(f"{what} raised {type(exc).__name__}: {exc}{hint}") from exc
        ref = ref_type_expert_table(types, indices, n_types, n_experts)
        same_values = tuple(got.shape) == tuple(ref.shape) and torch.allclose(got.double(), ref.double())
        if same_values and (got.is_floating_point() or got.is_complex() or got.dtype == torch.bool):
            fail(f"{what} returned the right counts as {got.dtype}: return integer counts (torch.long, e.g. "
                 "torch.zeros(..., dtype=torch.long) or torch.bincount); random_router_table repeats each cell's "
                 "count with repeat_interleave, which needs integers")
        if same_values:
            continue
        for hint, wrong in _table_mistakes(types, indices, ref, n_types, n_experts):
            if tuple(got.shape) == tuple(wrong.shape) and torch.allclose(got.double(), wrong.double()):
                fail(f"{what}: it looks like you {hint}")
        if got.dim() != 2:
            fail(f"{what} has shape {tuple(got.shape)}: return a 2-D table of shape (n_types, n_experts) = "
                 f"{(n_types, n_experts)} (reshape a flat bincount)")
        if tuple(got.shape) == (n_experts, n_types):
            fail(f"{what} has shape {tuple(got.shape)}: the table is transposed, rows are token types and columns "
                 f"experts, shape (n_types, n_experts) = {(n_types, n_experts)}")
        if tuple(got.shape) != tuple(ref.shape):
            fail(f"{what} has shape {tuple(got.shape)}, expected (n_types, n_experts) = {(n_types, n_experts)}: "
                 + _MINLENGTH)
        fail(f"{what} returned\n{got.tolist()}\nexpected\n{ref.tolist()}\n(cell [t, e] = the number of tokens of "
             "type t whose first choice indices[:, 0] is expert e)")
    ok("type_expert_table", "rows = token types, columns = experts, each token counted once at its first choice; "
       "unused types and experts keep their zero rows and columns")
