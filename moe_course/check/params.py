"""Checks for notebook 00's parameter-counting exercises: ``check.active_params(fn)`` and ``check.total_params(fn)``.

The learner writes ``fn(d_model, n_layers, vocab_size, n_heads, n_kv_heads, head_dim, ffn_hidden,
n_experts, top_k, tied_embeddings)`` for a Mixtral-style MoE. The check calls it (with keyword arguments)
on Mixtral 8x7B and on small configurations chosen so that each typical mistake gives a different number,
and names the mistake when the answer matches one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moe_course import params as _ref
from moe_course.check._core import as_count, call, fail, ok

__all__ = ["active_params", "total_params"]

# Mixtral 8x7B first (the number the notebook talks about), then small configurations that expose the
# mistakes Mixtral cannot: n_heads * head_dim != d_model, tied embeddings, k = 1 and k = 3.
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("Mixtral 8x7B", dict(d_model=4096, n_layers=32, vocab_size=32000, n_heads=32, n_kv_heads=8,
                          head_dim=128, ffn_hidden=14336, n_experts=8, top_k=2, tied_embeddings=False)),
    ("a small untied config", dict(d_model=64, n_layers=3, vocab_size=1000, n_heads=8, n_kv_heads=2,
                                   head_dim=16, ffn_hidden=96, n_experts=6, top_k=3, tied_embeddings=False)),
    ("a small tied config", dict(d_model=48, n_layers=2, vocab_size=500, n_heads=6, n_kv_heads=3,
                                 head_dim=8, ffn_hidden=80, n_experts=4, top_k=1, tied_embeddings=True)),
    ("a small tied config with k=2", dict(d_model=40, n_layers=5, vocab_size=300, n_heads=4, n_kv_heads=1,
                                          head_dim=12, ffn_hidden=56, n_experts=10, top_k=2,
                                          tied_embeddings=True)),
]


def _count(
    cfg: dict[str, Any],
    *,
    experts: int,
    router: bool = True,
    attention: bool = True,
    kv_heads: int | None = None,
    q_dim: int | None = None,
    ffn_matrices: int = 3,
    embedding_matrices: int | None = None,
    norms: bool = True,
    layers: int | None = None,
) -> int:
    """The Mixtral-style count, with switches that reproduce the usual mistakes."""
    d, hd = cfg["d_model"], cfg["head_dim"]
    q = cfg["n_heads"] * hd if q_dim is None else q_dim
    kv = (cfg["n_kv_heads"] if kv_heads is None else kv_heads) * hd
    if embedding_matrices is None:
        embedding_matrices = 1 if cfg["tied_embeddings"] else 2
    per_layer = (2 * d * q + 2 * d * kv) * attention
    per_layer += experts * ffn_matrices * d * cfg["ffn_hidden"] + d * cfg["n_experts"] * router + 2 * d * norms
    n_layers = cfg["n_layers"] if layers is None else layers
    return embedding_matrices * cfg["vocab_size"] * d + n_layers * per_layer + d * norms


def _mistakes(cfg: dict[str, Any], active: bool) -> list[tuple[str, int]]:
    """(explanation, wrong value) pairs for one configuration."""
    k = cfg["top_k"] if active else cfg["n_experts"]
    tied = cfg["tied_embeddings"]
    out: list[tuple[str, int]] = []
    if active:
        out.append(("counted all n_experts experts as active; a token only runs its top_k chosen experts, "
                    "so count top_k * (one expert) per layer", _count(cfg, experts=cfg["n_experts"])))
        out.append(("used one expert per token; count top_k experts per layer (Mixtral: 2)",
                    _count(cfg, experts=1)))
    else:
        out.append(("counted only the top_k active experts; the total holds all n_experts experts of "
                    "every layer", _count(cfg, experts=cfg["top_k"])))
    out += [
        ("forgot the router: a d_model x n_experts matrix in every layer", _count(cfg, experts=k, router=False)),
        ("forgot the attention weights (W_q, W_k, W_v, W_o in every layer)",
         _count(cfg, experts=k, attention=False)),
        ("sized K and V with n_heads; with grouped-query attention (GQA) W_k and W_v have only n_kv_heads "
         "heads: d_model x (n_kv_heads * head_dim) each", _count(cfg, experts=k, kv_heads=cfg["n_heads"])),
        ("made W_q and W_o d_model x d_model; they are d_model x (n_heads * head_dim), which need not equal "
         "d_model", _count(cfg, experts=k, q_dim=cfg["d_model"])),
        ("counted 2 matrices per expert; a SwiGLU expert has 3 (gate, up, down): 3 * d_model * ffn_hidden",
         _count(cfg, experts=k, ffn_matrices=2)),
        ("forgot the embeddings (vocab_size x d_model, plus the output head when untied)",
         _count(cfg, experts=k, embedding_matrices=0)),
        ("forgot the RMSNorm weights: 2 * d_model per layer plus d_model for the final norm",
         _count(cfg, experts=k, norms=False)),
        ("counted a single layer; multiply the per-layer weights by n_layers", _count(cfg, experts=k, layers=1)),
    ]
    if tied:
        out.append(("counted the output head separately although tied_embeddings=True: it is the embedding "
                    "matrix itself, count it once", _count(cfg, experts=k, embedding_matrices=2)))
    else:
        out.append(("counted the embedding matrix once; with tied_embeddings=False the output head is a "
                    "second vocab_size x d_model matrix", _count(cfg, experts=k, embedding_matrices=1)))
    return out


def _run(fn: Callable[..., Any], active: bool) -> int:
    name = "active_params" if active else "total_params"
    reference = _ref.active_params_from_config if active else _ref.total_params_from_config
    results = []
    for label, cfg in CONFIGS:
        expected = reference(**cfg)
        args = ", ".join(f"{key}={value}" for key, value in cfg.items())
        what = f"{name}({args})"
        got = as_count(call(fn, what=what, **cfg), what, expected)
        if got != expected:
            hints = [hint for hint, wrong in _mistakes(cfg, active) if wrong == got and wrong != expected]
            head = f"{name} on {label} ({args}) gave {got:,} but the answer is {expected:,}"
            if hints:
                fail(f"{head}. It looks like you " + "; or you ".join(hints) + ".")
            fail(f"{head} ({expected / 1e9:.4f}B expected, got {got / 1e9:.4f}B; off by {got - expected:+,}). "
                 "Count per layer: attention "
                 "(W_q, W_k, W_v, W_o), the experts, the router and 2 RMSNorms; then the embeddings and "
                 "the final norm.")
        results.append(got)
    return results[0]


def active_params(fn: Callable[..., Any]) -> None:
    """Check a learner's ``active_params(d_model=..., ..., tied_embeddings=...)`` for a Mixtral-style MoE."""
    mixtral = _run(fn, active=True)
    ok("active_params", f"Mixtral 8x7B -> {mixtral / 1e9:.2f}B active")


def total_params(fn: Callable[..., Any]) -> None:
    """Check a learner's ``total_params(d_model=..., ..., tied_embeddings=...)`` for a Mixtral-style MoE."""
    mixtral = _run(fn, active=False)
    ok("total_params", f"Mixtral 8x7B -> {mixtral / 1e9:.2f}B total")
