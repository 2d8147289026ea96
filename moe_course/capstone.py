"""Notebook 08's "look inside" tools: the equal-active MoE twin of a dense model, and where each byte is routed.

========================  ===============================================================================
``equal_active_moe``      the MoE config with the same active FFN width as a dense config (DeepSeekMoE)
``type_expert_table``     token type × expert count table of one batch (from :mod:`moe_course.analysis`)
``route_text``            run a TinyLM on any text and keep every byte's experts and weights, per MoE layer
========================  ===============================================================================

The routed text drawn and its explorer: :mod:`moe_course.plots.capstone`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moe_course.analysis import _eval_mode, type_expert_table
from moe_course.corpus import label_token_types
from moe_course.model import ModelConfig
from moe_course.routing import Routing

__all__ = [
    "DEFAULT_CODE",
    "equal_active_moe",
    "route_text",
    "RoutedText",
    "train_flops_per_token_of",
    "type_expert_table",
]

DEFAULT_CODE = '''def mean_square(values, scale=2.5):
    """Return the scaled mean of the squares."""
    # an empty list has no mean
    if not values:
        return 0.0
    total = sum(v * v for v in values)
    label = "mean square"
    print(f"{label}: {total / len(values):.3f}")
    return scale * total / len(values)
'''
"""The explorer's starting text: a def, a docstring, a comment, strings, numbers, keywords and operators."""


# ---------------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------------


def equal_active_moe(dense: ModelConfig, n_experts: int, top_k: int, n_shared: int = 0,
                     **overrides: Any) -> ModelConfig:
    """The MoE twin of ``dense`` with the same active FFN width: each token uses top_k + n_shared experts.

    Each expert (routed or shared) is ``dense.d_hidden / (top_k + n_shared)`` wide, so a token passes through
    exactly the dense FFN's hidden width, and the total grows with ``n_experts``. This is how DeepSeekMoE
    ("DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts Language Models", Dai et al.
    2024, arXiv:2401.06066) compares layouts: the active parameters stay fixed while experts are split.
    The only extra active parameters are the router's, ``d_model · n_experts`` per MoE layer. Every other
    field of ``dense`` is kept (``d_hidden`` too: layers left dense by ``moe_every`` use it); ``overrides``
    (e.g. ``router_score="sigmoid"``, ``bias_update_rate=1e-3``) are applied last.
    """
    if not isinstance(dense, ModelConfig) or dense.ffn != "dense":
        got = dense.ffn if isinstance(dense, ModelConfig) else type(dense).__name__
        raise ValueError(f"dense must be a ModelConfig with ffn='dense', got {got!r}: equal_active_moe splits a "
                         "dense model's FFN width into experts")
    for name, value, low in (("n_experts", n_experts, 1), ("top_k", top_k, 1), ("n_shared", n_shared, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if top_k > n_experts:
        raise ValueError(f"top_k={top_k} is larger than n_experts={n_experts}: a token cannot use more routed "
                         "experts than there are; lower top_k or add experts")
    per_token = top_k + n_shared
    if dense.d_hidden % per_token:
        below = dense.d_hidden - dense.d_hidden % per_token
        fits = [k for k in range(1, min(dense.d_hidden, 64) + 1) if dense.d_hidden % k == 0]
        raise ValueError(
            f"dense.d_hidden={dense.d_hidden} is not divisible by top_k + n_shared = {top_k} + {n_shared} = "
            f"{per_token}, so the experts cannot split the active width evenly: use a dense width of "
            f"{below or per_token} or {below + per_token}, or top_k + n_shared in {fits}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"overrides {unknown} are not ModelConfig fields")
    fields = dict(ffn="moe", n_experts=n_experts, top_k=top_k, n_shared=n_shared,
                  expert_hidden=dense.d_hidden // per_token)
    return dataclasses.replace(dense, **{**fields, **overrides})


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------


def train_flops_per_token_of(cfg: ModelConfig) -> float:
    """Training FLOPs per token of ``TinyLM(cfg)`` from its configuration: 6·N_active + 6·L·T·d.

    N_active counts the weights one token is multiplied by: per layer the attention's q, k, v and output
    projections (4·d²) and two RMSNorm weights (2·d); a dense SwiGLU FFN (3·d·d_hidden) or, in an MoE layer
    (every ``moe_every``-th), the router (d·N) and the SwiGLU experts the token uses, top_k routed and
    n_shared shared ones (3·d·expert_hidden each); then the final norm (d) and the output head tied to the token
    embedding (V·d, counted once; the position embedding is a lookup, no multiply). 6 per weight is forward plus
    backward (Kaplan et al. 2020, §2.1); 6·L·T·d is attention's scores and weighted sum under a causal mask, half
    PaLM's 12·L·H·Q·T for a full T × T block (app. B) and Kaplan et al.'s attention term (Table 1, x3).
    Equal to :func:`moe_course.params.train_flops_per_token` of the built model (tested).
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}; pass model.cfg for a built TinyLM")
    if cfg.ffn == "moe" and cfg.router != "topk":
        raise ValueError(f"cfg.router={cfg.router!r}: this count is for token-choice top-k routing ('topk')")
    d, n_layer = cfg.d_model, cfg.n_layer
    active = cfg.vocab_size * d + d  # tied embedding / output head, final norm
    for layer in range(n_layer):
        active += 4 * d * d + 2 * d
        if cfg.ffn == "moe" and layer % cfg.moe_every == cfg.moe_every - 1:
            active += d * cfg.n_experts + 3 * d * cfg.expert_hidden * (cfg.top_k + cfg.n_shared)
        else:
            active += 3 * d * cfg.d_hidden
    return 6.0 * active + 6.0 * n_layer * cfg.block_size * d


# ---------------------------------------------------------------------------------------------------------
# Routing a text
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RoutedText:
    """Where a model routed each byte of a text, per MoE layer (T = number of bytes)."""

    bytes: list[int]  # (T,) the text's UTF-8 bytes
    types: torch.Tensor  # (T,) long: TokenType of each byte (corpus.label_token_types)
    experts: list[torch.Tensor]  # per MoE layer, (T, k) long: chosen experts, column 0 the first choice
    weights: list[torch.Tensor]  # per MoE layer, (T, k) float: their combine weights
    n_experts: list[int]  # per MoE layer, its number of routed experts
    blocks: list[int]  # per MoE layer, the index of the transformer block that holds it


@torch.no_grad()
def route_text(model: torch.nn.Module, text: str | bytes) -> RoutedText:
    """Run ``model`` (in eval mode, its mode restored after) on the UTF-8 bytes of ``text`` and keep the routing.

    Text longer than ``model.cfg.block_size`` is cut into consecutive windows, each run on its own (so a
    window's first byte sees no earlier context, as at the start of a training window).
    """
    if not isinstance(text, (str, bytes, bytearray)):
        raise TypeError(f"text must be a str (or UTF-8 bytes), got {type(text).__name__} {text!r:.40}; e.g. "
                        "route_text(model, DEFAULT_CODE)")
    if not callable(getattr(model, "moe_layers", None)):
        raise TypeError(f"model must be a TinyLM (it has moe_layers()), got {type(model).__name__}")
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if not data:
        raise ValueError("text is empty: give route_text at least one character (e.g. DEFAULT_CODE)")
    layers = model.moe_layers()
    if not layers:
        raise ValueError("model has no MoE layers (a dense model routes nothing): pass a TinyLM with ffn='moe'")
    if max(data) >= model.cfg.vocab_size:
        raise ValueError(f"text has byte value {max(data)} but the model's vocab_size is {model.cfg.vocab_size}; "
                         "use a byte-level model (vocab_size=256) or ASCII text")
    ids = torch.tensor(list(data), dtype=torch.long)  # (T,)
    device = next(model.parameters()).device
    block = model.cfg.block_size
    experts: list[list[torch.Tensor]] = [[] for _ in layers]
    weights: list[list[torch.Tensor]] = [[] for _ in layers]
    with _eval_mode(model):
        for start in range(0, len(ids), block):
            model(ids[None, start:start + block].to(device))  # (1, <= block_size)
            for i, layer in enumerate(layers):
                routing = layer.last_routing
                if not isinstance(routing, Routing):
                    raise ValueError(f"MoE layer {i} uses {type(routing).__name__}: route_text needs token-choice "
                                     "routing (each token picks its experts); expert choice picks tokens instead")
                experts[i].append(routing.indices.long().cpu())
                weights[i].append(routing.weights.float().cpu())
    blocks = getattr(model, "blocks", None)
    block_ids = ([j for j, b in enumerate(blocks) if any(b.ffn is layer for layer in layers)] if blocks is not None
                 else list(range(len(layers))))
    return RoutedText(
        bytes=list(data),
        types=torch.from_numpy(label_token_types(data).astype(np.int64)),
        experts=[torch.cat(e) for e in experts],
        weights=[torch.cat(w) for w in weights],
        n_experts=[int(layer.n_experts) for layer in layers],
        blocks=block_ids,
    )
