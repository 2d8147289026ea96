"""Checks for notebook 08 (capstone): ``check.equal_active_moe(fn)`` and ``check.type_expert_table(fn)``.

``equal_active_moe`` compares the learner's ``fn(dense, n_experts, top_k, n_shared) -> ModelConfig`` with
:func:`moe_course.capstone.equal_active_moe` field by field on several dense configs, then counts both models'
parameters with :func:`moe_course.params.count_model`: the MoE twin must have the dense model's active
parameters plus only its routers' ``d_model · n_experts`` per MoE layer. ``type_expert_table`` compares
``fn(types, indices, n_types, n_experts) -> (n_types, n_experts) counts`` with
:func:`moe_course.capstone.type_expert_table` on hand-made batches with a type that never occurs and an expert
that is never chosen first. When an answer is wrong, each check recomputes the usual mistakes and names the
one that matches, or the field, cell or case that is wrong. Every check fails naming the input when the learner's
function changed one (a config, or the types and indices) in place.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from moe_course.capstone import equal_active_moe as ref_equal_active_moe
from moe_course.capstone import train_flops_per_token_of as ref_flops
from moe_course.capstone import type_expert_table as ref_type_expert_table
from moe_course.check._core import CheckError, as_tensor, call, call_unchanged, fail, fn_name, ok
from moe_course.model import ModelConfig, TinyLM
from moe_course.params import count_model

__all__ = ["equal_active_moe", "train_flops_per_token", "type_expert_table"]


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
            what = (f"{fn_name(fn)}(dense with d_hidden={dense.d_hidden}, d_model={dense.d_model}, "
                    f"n_layer={dense.n_layer}; n_experts={n}, top_k={k}, n_shared={s})")
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
    dense = DENSE_CASES[0][0]  # d_hidden 96 does not split over top_k + n_shared = 2 + 3 = 5 experts
    what = f"{fn_name(fn)}(dense with d_hidden={dense.d_hidden}; n_experts=8, top_k=2, n_shared=3)"
    try:
        got = fn(dataclasses.replace(dense), 8, 2, 3)
    except ValueError:
        pass
    except Exception as exc:  # noqa: BLE001 - any other error is the learner's mistake, named below
        fail(f"{what} raised {type(exc).__name__}: {exc}; raise a ValueError that says d_hidden does not divide")
    else:
        width = getattr(got, "expert_hidden", got)
        fail(f"{what} returned expert_hidden={width!r}, but 96 hidden units do not split into 5 equal experts: "
             "5 experts of that width hold a different active width than the dense FFN, so the twin would not be "
             "a twin. Raise a ValueError when d_hidden % (top_k + n_shared) != 0")
    ok("equal_active_moe", "same active parameters as the dense model up to the router's d_model·N per MoE layer; "
       + example + "; an uneven split raises ValueError")


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
        what = f"{fn_name(fn)}({name})"
        inputs = {"types": types.clone(), "indices": indices.clone(), "n_types": n_types, "n_experts": n_experts}
        try:
            got = as_tensor(call_unchanged(fn, inputs, what=what), what)
        except CheckError as exc:
            if isinstance(exc.__cause__, RuntimeError) and "shape" in str(exc.__cause__):
                raise CheckError(f"{exc}. It looks like torch.bincount without minlength: {_MINLENGTH}") from exc
            raise
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
        t, e = ((got.double() - ref.double()).abs() > 1e-9).nonzero()[0].tolist()
        fail(f"{what}: cell [type {t}, expert {e}] holds {got[t, e].item():g}, expected {int(ref[t, e])} (the "
             f"number of tokens of type {t} whose first choice indices[:, 0] is expert {e}). The table returned:\n"
             f"{got.tolist()}\nexpected\n{ref.tolist()}")
    ok("type_expert_table", "rows = token types, columns = experts, each token counted once at its first choice; "
       "unused types and experts keep their zero rows and columns")


# ----------------------------------------------------------------------------------------------------------
# train_flops_per_token: ModelConfig -> 6·N_active + 6·L·T·d
# ----------------------------------------------------------------------------------------------------------

FLOPS_CASES = (
    ("the dense twin cpu-dense", ModelConfig(ffn="dense", block_size=128, n_layer=4, n_head=4, d_model=128,
                                              d_hidden=256)),
    ("the top-2 MoE cpu-moe", ModelConfig(ffn="moe", block_size=128, n_layer=4, n_head=4, d_model=128, n_experts=8,
                                          top_k=2, expert_hidden=128)),
    ("the recipe cpu-best", ModelConfig(ffn="moe", block_size=128, n_layer=4, n_head=4, d_model=128, n_experts=16,
                                        top_k=2, expert_hidden=64, n_shared=2, router_score="sigmoid",
                                        aux_loss_coef=0.0, bias_update_rate=1e-3)),
    ("an MoE in every 2nd of 3 layers, 1 shared + 6 routed experts top-1",
     ModelConfig(ffn="moe", block_size=32, n_layer=3, n_head=4, d_model=48, d_hidden=96, n_experts=6, top_k=1,
                 expert_hidden=32, n_shared=1, moe_every=2)),
    ("an MoE in every 3rd of 5 layers, a block of 33 tokens (odd)",
     ModelConfig(ffn="moe", block_size=33, n_layer=5, n_head=2, d_model=32, d_hidden=64, n_experts=4, top_k=2,
                 expert_hidden=32, moe_every=3)),
    ("a top-2 MoE over a 1,000-token vocabulary (not byte-level)",
     ModelConfig(ffn="moe", vocab_size=1000, block_size=16, n_layer=2, n_head=2, d_model=32, d_hidden=64,
                 n_experts=4, top_k=2, expert_hidden=24)),
)


def _flops_mistakes(cfg: ModelConfig) -> list[tuple[str, float]]:
    """(what the learner probably did, the number it gives) for the usual mistakes, computed from ``cfg``."""
    d, n_layer, t, v = cfg.d_model, cfg.n_layer, cfg.block_size, cfg.vocab_size
    ref = ref_flops(cfg)
    attn = 6.0 * n_layer * t * d
    n_active = (ref - attn) / 6.0
    moe_layers = sum(1 for i in range(n_layer) if cfg.ffn == "moe" and i % cfg.moe_every == cfg.moe_every - 1)
    expert = 3 * d * cfg.expert_hidden
    out = []
    if moe_layers:  # first: a mistake that also hits the dense twin was named there already, with its own value
        out += [
            ("counted the MoE layer's experts at the dense FFN's width (3·d·d_hidden for the experts a token runs); "
             "an MoE layer costs the router d·N plus 3·d·expert_hidden for each of the top_k routed and n_shared "
             "shared experts", ref + 6.0 * moe_layers * (3 * d * cfg.d_hidden - (cfg.top_k + cfg.n_shared) * expert)),
            ("used the dense width d_hidden for each expert; an expert's width is expert_hidden",
             ref + 6.0 * moe_layers * (cfg.top_k + cfg.n_shared) * 3 * d * (cfg.d_hidden - cfg.expert_hidden)),
        ]
    if v != 256:
        out.append((f"used a byte-level vocabulary of 256; this model's is cfg.vocab_size = {v} (the tied head "
                    "costs V·d)", ref + 6.0 * (256 - v) * d))
    out += [
        ("counted the forward pass only (2 FLOPs per weight); training also runs the backward pass, which costs "
         "twice the forward: 6 per weight, and 6·L·T·d for attention", 2.0 * n_active + 2.0 * n_layer * t * d),
        ("left out attention's scores and weighted sum (6·L·T·d): they multiply activations, not weights, but "
         "they are FLOPs every token pays", 6.0 * n_active),
        ("counted attention over the full T × T block (12·L·T·d); with a causal mask a token attends to half "
         "of it on average: 6·L·T·d", 6.0 * n_active + 12.0 * n_layer * t * d),
        ("counted the position embedding: it is a table lookup, no token is multiplied by it",
         ref + 6.0 * t * d),
        ("counted the output head and the token embedding separately: they are one tied matrix, and only the "
         "head multiplies (the embedding is a lookup)", ref + 6.0 * v * d),
    ]
    if moe_layers:
        out += [
            ("counted all N experts (the total parameters): a token only runs its top_k routed experts (and the "
             "shared ones), which is what active means",
             ref + 6.0 * moe_layers * (cfg.n_experts - cfg.top_k) * expert),
            ("left out the router (d_model · n_experts per MoE layer): every token multiplies by it to get its "
             "scores", ref - 6.0 * moe_layers * d * cfg.n_experts),
            ("counted each expert as two matrices (d·h each): SwiGLU experts have three, gate, up and down",
             ref - 6.0 * moe_layers * (cfg.top_k + cfg.n_shared) * d * cfg.expert_hidden),
        ]
        if cfg.n_shared:
            out.append(("left out the shared experts: every token runs them besides its top_k routed ones",
                        ref - 6.0 * moe_layers * cfg.n_shared * expert))
        if cfg.moe_every > 1:
            dense_layers = n_layer - moe_layers
            moe_ffn = d * cfg.n_experts + (cfg.top_k + cfg.n_shared) * expert
            out.append(("made every layer an MoE layer: only layers with layer % moe_every == moe_every - 1 "
                        "are, the others keep a dense SwiGLU of width d_hidden",
                        ref + 6.0 * dense_layers * (moe_ffn - 3 * d * cfg.d_hidden)))
            ratio = n_layer / cfg.moe_every
            for wrong in sorted({math.ceil(ratio), round(ratio)} - {moe_layers}):
                out.append((f"counted {wrong} MoE layers, from layer 0 (layer % moe_every == 0) or by rounding "
                            f"n_layer / moe_every = {ratio:g} up or to the nearest; the MoE layers are those with "
                            f"layer % moe_every == moe_every - 1, floor(n_layer / moe_every) = {moe_layers} of them",
                            ref + 6.0 * (wrong - moe_layers) * (moe_ffn - 3 * d * cfg.d_hidden)))
    if t % 2:
        out.append((f"used floor division for the average context: a token attends to T/2 = {t / 2:g} positions on "
                    f"average, not T // 2 = {t // 2}, so attention costs 12·L·d·T/2 = 6·L·T·d",
                    ref - attn + 12.0 * n_layer * d * (t // 2)))
    return out


def train_flops_per_token(fn: Callable[[ModelConfig], float]) -> None:
    """Check ``fn(cfg) -> float``: training FLOPs per token, 6·N_active + 6·L·T·d, from the config alone."""
    example = ""
    for name, cfg in FLOPS_CASES:
        what = f"{fn_name(fn)}({name})"
        given = dataclasses.replace(cfg)
        got = call(fn, given, what=what)
        if given != cfg:
            changed = [f.name for f in dataclasses.fields(cfg) if getattr(given, f.name) != getattr(cfg, f.name)]
            fail(f"{what} changed the config it was given ({', '.join(changed)}): only read it")
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            fail(f"{what} should return a number (FLOPs per token), got {type(got).__name__}")
        ref = ref_flops(cfg)
        if abs(got - ref) <= 1e-9 * ref:
            if cfg.n_shared and not example:
                total, active = count_model(TinyLM(cfg))
                example = (f"{name}: {ref / 1e6:.2f} MFLOPs per token; it holds {total:,} parameters, of which a "
                           f"token uses {active:,} (the position table among them, a lookup)")
            continue
        for hint, wrong in _flops_mistakes(cfg):
            if abs(got - wrong) <= 1e-9 * abs(wrong):
                fail(f"{what} returned {got:,.0f}, expected {ref:,.0f}: it looks like you {hint}")
        fail(f"{what} returned {got:,.0f}, expected {ref:,.0f} = 6·N_active + 6·L·T·d (N_active: attention 4·d² "
             "and two norms 2·d per layer, the FFN a token runs, the router, the final norm and the tied head V·d)")
    ok("train_flops_per_token", example)
