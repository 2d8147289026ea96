"""Parameter accounting (notebooks 00, 02, 07, 09): total and active parameters, FLOPs and memory of MoE transformers.

Two views of the same question, "how big is this model, and how much of it runs per token?":

* :class:`MoEConfig` describes a decoder-only transformer by the numbers of its published configuration
  (``config.json``), and :data:`PUBLISHED` holds the famous MoE releases, read from the data file
  ``moe_course/data/published_models.json``. :func:`total_params`, :func:`active_params`,
  :func:`param_breakdown`, :func:`flops_per_token` and :func:`memory_bytes` work on such a config
  without building anything.
* :func:`count_model` counts a real ``torch.nn.Module`` of this course.

**Counting convention.** Like the model cards, both counts include the embeddings: the token embedding
and the output head (once if they are tied). *Active* parameters are those that one token touches in a
forward pass: everything that is not a routed expert, plus ``top_k`` routed experts and all shared
experts in every MoE layer. The input embedding is a table lookup, not a matrix product, so it is left
out of the FLOPs (see :func:`flops_per_token`) but kept in the parameter counts.

Normalisation weights and biases are counted too; they are tiny (well under 0.01 % of any model here).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from torch import nn

__all__ = [
    "PUBLISHED",
    "PUBLISHED_MODELS_PATH",
    "MoEConfig",
    "active_params",
    "active_params_from_config",
    "count_model",
    "flops_per_token",
    "get_published",
    "kv_attention_intensity",
    "kv_cache_bytes_per_token",
    "load_published",
    "memory_bytes",
    "moe_layer_indices",
    "param_breakdown",
    "published_table",
    "total_params",
    "total_params_from_config",
    "train_flops_per_token",
]

BREAKDOWN_KEYS = (
    "embeddings",
    "attention",
    "dense_ffn",
    "routed_experts",
    "shared_experts",
    "router",
    "norms",
)
_FFN_MATRICES = {"swiglu": 3, "gelu": 2}
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "fp4": 0.5, "int4": 0.5}


@dataclass(frozen=True)
class MoEConfig:
    """A decoder-only (MoE) transformer described by its published configuration numbers.

    Attention is grouped-query (``attention="gqa"``: ``n_heads`` query heads, ``n_kv_heads`` key/value
    heads of size ``head_dim``) or DeepSeek's multi-head latent attention (``attention="mla"``, using the
    ``q_lora_rank`` … ``v_head_dim`` fields). Each FFN is SwiGLU (3 matrices) or GELU (2 matrices).

    Which layers are MoE: the first ``first_k_dense`` layers are dense; after them, layer ``i`` is MoE
    when ``(i + 1) % moe_layer_every == 0`` (Llama 4 Maverick: every other layer, layers 1, 3, 5, …).
    ``moe_layers`` (explicit layer indices) overrides both. Dense layers use ``intermediate_size``.
    """

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    moe_intermediate_size: int
    n_routed_experts: int
    top_k: int
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head attention)
    head_dim: int | None = None  # None: d_model // n_heads
    attention: str = "gqa"  # "gqa" or "mla"
    # Multi-head latent attention (DeepSeek-V2/V3). q_lora_rank None: a plain d_model -> heads Q projection.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    attn_bias: str = "none"  # "none", "qkv" (Qwen1.5) or "all" (q, k, v and output; Phi-3.5-MoE)
    qk_norm: str = "none"  # "none", "head" (one head_dim weight for q and one for k) or "full" (OLMoE)
    ffn: str = "swiglu"  # "swiglu" (3 matrices) or "gelu" (2 matrices)
    n_shared_experts: int = 0
    shared_intermediate_size: int | None = None  # None: n_shared_experts * moe_intermediate_size
    shared_expert_gate: bool = False  # Qwen1.5-MoE: a d_model -> 1 sigmoid gate on the shared expert
    intermediate_size: int | None = None  # hidden size of the dense FFN layers
    first_k_dense: int = 0
    moe_layer_every: int = 1
    moe_layers: tuple[int, ...] | None = None
    tied_embeddings: bool = False
    router_bias: bool = False  # a learned per-expert bias (DeepSeek-V3's e_score_correction_bias)
    norms_per_layer: int = 2
    norm_bias: bool = False  # LayerNorm with a bias (2 vectors) instead of RMSNorm (1 vector)
    published_total: float | None = None  # the figures the model's authors give
    published_active: float | None = None
    source: str = ""
    release: str = ""  # year-month
    notes: str = ""

    def __post_init__(self) -> None:
        for field_name in ("vocab_size", "d_model", "n_layers", "n_heads", "moe_intermediate_size",
                           "n_routed_experts", "top_k", "moe_layer_every"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {field_name} must be a positive integer, got {value!r}")
        if self.top_k > self.n_routed_experts:
            raise ValueError(
                f"{self.name}: top_k={self.top_k} is larger than n_routed_experts={self.n_routed_experts}"
            )
        if self.attention not in ("gqa", "mla"):
            raise ValueError(f"{self.name}: attention must be 'gqa' or 'mla', got {self.attention!r}")
        if self.ffn not in _FFN_MATRICES:
            raise ValueError(f"{self.name}: ffn must be 'swiglu' or 'gelu', got {self.ffn!r}")
        if self.attn_bias not in ("none", "qkv", "all"):
            raise ValueError(f"{self.name}: attn_bias must be 'none', 'qkv' or 'all', got {self.attn_bias!r}")
        if self.qk_norm not in ("none", "head", "full"):
            raise ValueError(f"{self.name}: qk_norm must be 'none', 'head' or 'full', got {self.qk_norm!r}")
        if self.attention == "gqa":
            if self.kv_heads < 1 or self.n_heads % self.kv_heads:
                raise ValueError(
                    f"{self.name}: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}"
                )
            if self.head_dim is None and self.d_model % self.n_heads:
                raise ValueError(f"{self.name}: give head_dim; d_model={self.d_model} is not a multiple "
                                 f"of n_heads={self.n_heads}")
        elif min(self.kv_lora_rank, self.qk_nope_head_dim + self.qk_rope_head_dim, self.v_head_dim) < 1:
            raise ValueError(f"{self.name}: MLA needs kv_lora_rank, qk_*_head_dim and v_head_dim")
        if self.n_shared_experts < 0:
            raise ValueError(f"{self.name}: n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if not 0 <= self.first_k_dense <= self.n_layers:
            raise ValueError(f"{self.name}: first_k_dense must be between 0 and n_layers={self.n_layers}")
        if self.moe_layers is not None and any(not 0 <= i < self.n_layers for i in self.moe_layers):
            raise ValueError(f"{self.name}: moe_layers must be layer indices in [0, {self.n_layers})")
        if self.n_dense_layers and not self.intermediate_size:
            raise ValueError(f"{self.name}: {self.n_dense_layers} dense layers need an intermediate_size")

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_heads`` when ``n_kv_heads`` is not given)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        """Size of one attention head (``d_model // n_heads`` when ``head_dim`` is not given)."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def shared_size(self) -> int:
        """Total hidden size of the shared expert(s) of one MoE layer (0 without shared experts)."""
        if self.shared_intermediate_size is not None:
            return self.shared_intermediate_size
        return self.n_shared_experts * self.moe_intermediate_size

    @property
    def n_moe_layers(self) -> int:
        """How many layers hold experts."""
        return len(moe_layer_indices(self))

    @property
    def n_dense_layers(self) -> int:
        """How many layers have a dense FFN instead of experts."""
        return self.n_layers - self.n_moe_layers


def moe_layer_indices(cfg: MoEConfig) -> list[int]:
    """Indices (0-based) of the layers that hold experts."""
    if cfg.moe_layers is not None:
        return sorted(set(cfg.moe_layers))
    return [i for i in range(cfg.first_k_dense, cfg.n_layers) if (i + 1) % cfg.moe_layer_every == 0]


# ----------------------------------------------------------------------------------------------------
# Per-component counts
# ----------------------------------------------------------------------------------------------------


def _ffn(cfg: MoEConfig, hidden: int) -> int:
    """Weights of one FFN of hidden size ``hidden`` (no biases)."""
    return _FFN_MATRICES[cfg.ffn] * cfg.d_model * hidden


def _attention_layer(cfg: MoEConfig) -> int:
    """Weights (and biases) of one attention block, without its normalisation weights."""
    d = cfg.d_model
    if cfg.attention == "mla":
        h = cfg.n_heads
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            q = d * cfg.q_lora_rank + cfg.q_lora_rank * h * qk  # down to the latent, up to the heads
        else:
            q = d * h * qk
        kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # latent KV plus the shared RoPE key
        kv += cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # up to per-head K and V
        return q + kv + h * cfg.v_head_dim * d
    q_dim = cfg.n_heads * cfg.head_size
    kv_dim = cfg.kv_heads * cfg.head_size
    weights = d * q_dim + 2 * d * kv_dim + q_dim * d
    bias = 0
    if cfg.attn_bias in ("qkv", "all"):
        bias += q_dim + 2 * kv_dim
    if cfg.attn_bias == "all":
        bias += d
    return weights + bias


def _norms(cfg: MoEConfig) -> int:
    """All normalisation weights: per layer, the final norm, and those inside attention."""
    per_vector = 2 if cfg.norm_bias else 1
    count = (cfg.norms_per_layer * cfg.n_layers + 1) * cfg.d_model * per_vector
    if cfg.attention == "mla":
        count += cfg.n_layers * (cfg.kv_lora_rank + (cfg.q_lora_rank or 0))
    if cfg.qk_norm == "head":
        count += cfg.n_layers * 2 * cfg.head_size
    elif cfg.qk_norm == "full":
        count += cfg.n_layers * (cfg.n_heads + cfg.kv_heads) * cfg.head_size
    return count


def _router_layer(cfg: MoEConfig) -> int:
    """Router weights of one MoE layer (plus a correction bias and a shared-expert gate if present)."""
    count = cfg.d_model * cfg.n_routed_experts
    if cfg.router_bias:
        count += cfg.n_routed_experts
    if cfg.shared_expert_gate:
        count += cfg.d_model
    return count


def param_breakdown(cfg: MoEConfig, active: bool = False) -> dict[str, int]:
    """Where the parameters live: a count per component (keys in :data:`BREAKDOWN_KEYS`).

    With ``active=True`` the routed experts count only ``top_k`` of ``n_routed_experts`` per layer, so
    the values sum to :func:`active_params` instead of :func:`total_params`.
    """
    n_moe = cfg.n_moe_layers
    experts_per_layer = cfg.top_k if active else cfg.n_routed_experts
    dense_ffn = cfg.n_dense_layers * _ffn(cfg, cfg.intermediate_size) if cfg.n_dense_layers else 0
    return {
        "embeddings": cfg.vocab_size * cfg.d_model * (1 if cfg.tied_embeddings else 2),
        "attention": cfg.n_layers * _attention_layer(cfg),
        "dense_ffn": dense_ffn,
        "routed_experts": n_moe * experts_per_layer * _ffn(cfg, cfg.moe_intermediate_size),
        "shared_experts": n_moe * _ffn(cfg, cfg.shared_size) if cfg.shared_size else 0,
        "router": n_moe * _router_layer(cfg),
        "norms": _norms(cfg),
    }


def total_params(cfg: MoEConfig) -> int:
    """All parameters, embeddings included (the output head once more when it is not tied)."""
    return sum(param_breakdown(cfg).values())


def active_params(cfg: MoEConfig) -> int:
    """Parameters one token uses: all non-expert weights, ``top_k`` routed experts and the shared ones.

    Embeddings are included, as in the model cards.
    """
    return sum(param_breakdown(cfg, active=True).values())


def flops_per_token(cfg: MoEConfig, seq_len: int = 4096) -> int:
    """Forward-pass FLOPs for one token that attends to ``seq_len`` positions.

    ``2 * N_matmul + 2 * n_layers * seq_len * (qk_dim + v_dim)``, where

    * ``N_matmul`` is the number of active parameters that take part in a matrix product (all of
      :func:`active_params` except the input-embedding lookup and the normalisation weights; with tied
      embeddings the one matrix is the output head). Each weight costs one multiply and one add.
    * the second term is the attention itself: the scores ``q·k`` (``qk_dim = n_heads * qk head size``)
      and the weighted sum of values (``v_dim = n_heads * v head size``) against ``seq_len`` positions.
      This is the cost of the *last* token of a ``seq_len`` context; averaged over a causal sequence it is
      about half as much.

    Training (forward + backward) costs about three times the forward pass.
    """
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    parts = param_breakdown(cfg, active=True)
    matmul = sum(parts.values()) - parts["norms"]
    if not cfg.tied_embeddings:
        matmul -= cfg.vocab_size * cfg.d_model  # the input embedding is a lookup
    if cfg.attention == "mla":
        qk_dim = cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        v_dim = cfg.n_heads * cfg.v_head_dim
    else:
        qk_dim = v_dim = cfg.n_heads * cfg.head_size
    return 2 * matmul + 2 * cfg.n_layers * seq_len * (qk_dim + v_dim)


def memory_bytes(cfg: MoEConfig, bytes_per_param: float | str = 2.0, active: bool = False) -> int:
    """Bytes needed to hold the weights (all of them, or only the active ones with ``active=True``).

    ``bytes_per_param`` is a number or one of ``"fp32"``, ``"bf16"``, ``"fp16"``, ``"fp8"``, ``"int8"``,
    ``"fp4"``, ``"int4"``. Weights only: no KV cache, activations or optimizer state.
    """
    if isinstance(bytes_per_param, str):
        if bytes_per_param not in BYTES_PER_PARAM:
            raise ValueError(f"unknown dtype {bytes_per_param!r}; use one of {sorted(BYTES_PER_PARAM)}")
        bytes_per_param = BYTES_PER_PARAM[bytes_per_param]
    if bytes_per_param <= 0:
        raise ValueError(f"bytes_per_param must be positive, got {bytes_per_param}")
    count = active_params(cfg) if active else total_params(cfg)
    return math.ceil(count * bytes_per_param)



def kv_cache_bytes_per_token(cfg: MoEConfig, bytes_per_value: float = 2.0, as_mha: bool = False) -> int:
    """Bytes one token adds to the KV cache, over all layers; a decoding step reads them back for every past token.

    MHA and GQA cache a key and a value per KV head: 2 · kv_heads · head_size values per layer. MLA (DeepSeek-V2/V3)
    caches the compressed latent and the shared RoPE key, kv_lora_rank + qk_rope_head_dim values per layer (the
    up-projections are absorbed into the query and the output at inference; DeepSeek-V2, arXiv:2405.04434, §2.1).
    ``as_mha=True``: what the same model would cache with one key and value per query head (MLA: the decompressed
    per-head keys, nope + rope, and values), the baseline GQA and MLA shrink.
    """
    if isinstance(bytes_per_value, bool) or not isinstance(bytes_per_value, (int, float)) or not bytes_per_value > 0:
        raise ValueError(f"bytes_per_value must be a positive number (2 for bf16), got {bytes_per_value!r}")
    if cfg.attention == "mla":
        per_layer = (cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) if as_mha
                     else cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    else:
        per_layer = 2 * (cfg.n_heads if as_mha else cfg.kv_heads) * cfg.head_size
    return math.ceil(cfg.n_layers * per_layer * bytes_per_value)


def kv_attention_intensity(cfg: MoEConfig, bytes_per_value: float = 2.0, as_mha: bool = False) -> float:
    """FLOPs per byte of KV cache read when one new token attends to the cached ones (decoding, any batch).

    Per cached token and layer each query head does 2 FLOPs per key value (the score) and 2 per value (the
    weighted sum) and reads the cache once: GQA's group of heads/kv_heads query heads shares each key and value,
    so its intensity is that group size over bytes_per_value/2; MHA's is 1 in bf16. MLA with absorbed
    projections scores against and sums the shared latent directly: 128 heads × 2 × (512 + 64 + 512) FLOPs per
    576 cached values for DeepSeek-V3. ``as_mha``: the same model with a key and value per query head.
    """
    kv = kv_cache_bytes_per_token(cfg, bytes_per_value, as_mha) / cfg.n_layers  # bytes per cached token and layer
    if cfg.attention == "mla":
        k_dim, v_dim = ((cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim) if as_mha
                        else (cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank))
    else:
        k_dim = v_dim = cfg.head_size
    return cfg.n_heads * 2 * (k_dim + v_dim) / kv

# ----------------------------------------------------------------------------------------------------
# Counting a real model
# ----------------------------------------------------------------------------------------------------


def _is_moe_layer(module: nn.Module) -> bool:
    n_experts, top_k = getattr(module, "n_experts", None), getattr(module, "top_k", None)
    return (
        isinstance(getattr(module, "experts", None), nn.Module)
        and isinstance(n_experts, int)
        and isinstance(top_k, int)
        and not isinstance(n_experts, bool)
    )


def count_model(model: nn.Module) -> tuple[int, int]:
    """Return ``(total, active)`` parameter counts of a model of this course.

    An MoE layer is any submodule with an ``experts`` module (an ``nn.ModuleList`` of identical experts,
    or one module holding all experts' weights stacked) and integer ``n_experts`` and ``top_k``. Per
    token only ``top_k`` of its experts run, so ``active = total - (n_experts - top_k) * expert size``
    summed over MoE layers. Shared experts (an attribute ``shared``) and everything else count as active.
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for name, module in model.named_modules():
        if not _is_moe_layer(module):
            continue
        where = name or type(module).__name__
        n_experts, top_k, experts = module.n_experts, module.top_k, module.experts
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"{where}: top_k={top_k} must be between 1 and n_experts={n_experts}")
        if isinstance(experts, nn.ModuleList):
            if len(experts) != n_experts:
                raise ValueError(f"{where}: n_experts={n_experts} but the ModuleList holds {len(experts)}")
            sizes = {sum(p.numel() for p in expert.parameters()) for expert in experts}
            if len(sizes) != 1:
                raise ValueError(f"{where}: experts differ in size ({sorted(sizes)}); expected identical")
            per_expert = sizes.pop()
        else:
            stacked = sum(p.numel() for p in experts.parameters())
            if stacked % n_experts:
                raise ValueError(f"{where}: {stacked} expert weights do not split into {n_experts} experts")
            per_expert = stacked // n_experts
        inactive += (n_experts - top_k) * per_expert
    return total, total - inactive


# ----------------------------------------------------------------------------------------------------
# The notebook-00 exercise: Mixtral-style counts from a handful of config numbers
# ----------------------------------------------------------------------------------------------------


def train_flops_per_token(model: nn.Module) -> float:
    """Training FLOPs per token of a TinyLM: 6·N + 6·L·T·d, for model FLOPs utilisation (MFU).

    N = the active weights a token is multiplied by (:func:`count_model`'s active count without the position
    embedding table; the tied token embedding counts once, as the output head); 6·N is forward plus backward
    (Kaplan et al. 2020, arXiv:2001.08361, §2.1). Attention's score and value products add 12·L·T·d per token
    for a full T × T block (Chowdhery et al. 2022, PaLM, arXiv:2204.02311, appendix B), half that with a
    causal mask.
    """
    _, active = count_model(model)
    pos = getattr(model, "pos_emb", None)
    matmul = active - (pos.weight.numel() if pos is not None else 0)
    cfg = model.cfg
    return 6.0 * matmul + 6.0 * cfg.n_layer * cfg.block_size * cfg.d_model


def _mixtral_style(
    d_model: int,
    n_layers: int,
    vocab_size: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    ffn_hidden: int,
    n_experts: int,
    top_k: int,
    tied_embeddings: bool,
    experts_per_token: int,
) -> int:
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
    embeddings = vocab_size * d_model * (1 if tied_embeddings else 2)  # token table (+ output head)
    attention = d_model * n_heads * head_dim  # W_q
    attention += 2 * d_model * n_kv_heads * head_dim  # W_k and W_v: only n_kv_heads heads (GQA)
    attention += n_heads * head_dim * d_model  # W_o
    expert = 3 * d_model * ffn_hidden  # SwiGLU: gate, up and down
    router = d_model * n_experts
    norms = 2 * d_model  # RMSNorm before attention and before the MoE block
    per_layer = attention + experts_per_token * expert + router + norms
    return embeddings + n_layers * per_layer + d_model  # + the final RMSNorm


def total_params_from_config(
    d_model: int,
    n_layers: int,
    vocab_size: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    ffn_hidden: int,
    n_experts: int,
    top_k: int,
    tied_embeddings: bool = False,
) -> int:
    """Total parameters of a Mixtral-style MoE (GQA attention, SwiGLU experts, linear router, RMSNorm)."""
    return _mixtral_style(d_model, n_layers, vocab_size, n_heads, n_kv_heads, head_dim, ffn_hidden,
                          n_experts, top_k, tied_embeddings, experts_per_token=n_experts)


def active_params_from_config(
    d_model: int,
    n_layers: int,
    vocab_size: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    ffn_hidden: int,
    n_experts: int,
    top_k: int,
    tied_embeddings: bool = False,
) -> int:
    """Active parameters per token of a Mixtral-style MoE: like the total, but only ``top_k`` experts."""
    return _mixtral_style(d_model, n_layers, vocab_size, n_heads, n_kv_heads, head_dim, ffn_hidden,
                          n_experts, top_k, tied_embeddings, experts_per_token=top_k)


# ----------------------------------------------------------------------------------------------------
# Published models
# ----------------------------------------------------------------------------------------------------

PUBLISHED_MODELS_PATH = Path(__file__).parent / "data" / "published_models.json"
"""The published models' configurations (package data, so a pip install carries it; see data/README.md)."""

_CONFIG_FIELDS = {f.name for f in fields(MoEConfig)}


def load_published(path: str | Path = PUBLISHED_MODELS_PATH) -> dict[str, MoEConfig]:
    """Read published model configurations from JSON (``{"models": [{field: value, ...}, ...]}``), by release.

    Each entry holds :class:`MoEConfig` fields (``"comment"``, a note for maintainers, is ignored).
    """
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise ValueError(f"{path.name}: expected a top-level \"models\" list of model entries")
    configs: list[MoEConfig] = []
    for entry in models:
        entry = {k: v for k, v in entry.items() if k != "comment"}
        name = entry.get("name", "?")
        unknown = sorted(set(entry) - _CONFIG_FIELDS)
        if unknown:
            raise ValueError(f"{path.name}: {name} has unknown field(s) {unknown}; "
                             f"use MoEConfig's fields: {sorted(_CONFIG_FIELDS)}")
        if entry.get("moe_layers") is not None:
            entry["moe_layers"] = tuple(entry["moe_layers"])
        try:
            configs.append(MoEConfig(**entry))
        except TypeError as err:  # a required field is missing
            raise ValueError(f"{path.name}: {name}: {err}") from None
    names = [cfg.name for cfg in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path.name}: model names must be unique, got {names}")
    return {cfg.name: cfg for cfg in sorted(configs, key=lambda c: c.release)}


PUBLISHED: dict[str, MoEConfig] = load_published()
"""The published MoE models, by name, in order of release (from :data:`PUBLISHED_MODELS_PATH`)."""


def get_published(name: str) -> MoEConfig:
    """Look up a published model by name (case and spaces/dashes are ignored)."""

    def key(text: str) -> str:
        return "".join(ch for ch in text.lower() if ch.isalnum())

    for known, cfg in PUBLISHED.items():
        if key(known) == key(name):
            return cfg
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(PUBLISHED)}")


def published_table() -> list[dict[str, object]]:
    """One row per published model: our total/active counts next to the authors' figures."""
    rows: list[dict[str, object]] = []
    for cfg in PUBLISHED.values():
        rows.append(
            {
                "name": cfg.name,
                "release": cfg.release,
                "total": total_params(cfg),
                "active": active_params(cfg),
                "published_total": cfg.published_total,
                "published_active": cfg.published_active,
                "experts": f"{cfg.top_k}/{cfg.n_routed_experts}" + (f"+{cfg.n_shared_experts or 1}s"
                                                                     if cfg.shared_size else ""),
            }
        )
    return rows
