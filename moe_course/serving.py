"""Serving an MoE (notebook 09): what decoding reads from memory, how batching changes it, and how fast it runs.

Decoding one token multiplies every weight it uses once: 2 FLOPs per weight, 1 weight read per 2 FLOPs. At
batch 1 that is far below what a GPU can compute per byte it reads, so decoding waits for memory, and the
weights read per token decide its speed. An MoE token reads only its k experts per layer; a batch of B tokens
reads every expert that *any* of them uses, which grows towards all N. These functions count it.

===============================  =================================================================================
``H100_SXM``, ``pcie_bytes_per_s``  the hardware figures the estimates use, with their sources
``serving_row``                  a published config: weights' memory, FLOPs per token, weight bytes read per token
``expected_distinct_experts``    N·(1 − (1 − k/N)^B): experts B tokens touch under uniform routing (the exercise)
``distinct_from_share``          the same for measured per-expert shares p_e: Σ_e 1 − (1 − p_e)^B
``measured_distinct_experts``    on routing traces: B independent sequences, or B consecutive tokens of one
``token_share``                  the share of tokens that use each expert (sums to k)
``bytes_per_token``              weight bytes read per decoded token, from one step's routing (the exercise)
``model_weight_bytes``           a TinyLM's bytes: one routed expert's, and everything read once per step
``moe_layer_roofline``           one MoE layer at decode on a roofline: bytes, FLOPs, time
``time_decode``                  tokens/s of KV-cache decoding, and the time split into attention, router, experts
``placement_load``               expert parallelism: the busiest GPU's load, with hot experts copied (redundant experts)
``serving_probe``                everything the stored experiment ``serving_traces`` measures on a trained model
===============================  =================================================================================
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from moe_course.model import TinyLM
from moe_course.offload import batch_trace, cache_counts, hit_rate_curve, prefetch_recall, random_trace, record_routing
from moe_course.params import MoEConfig, active_params, flops_per_token, param_breakdown, total_params
from moe_course.validate import check_ids, check_int, check_number, check_tensor

__all__ = [
    "H100_SXM",
    "Accelerator",
    "DecodeTiming",
    "busiest_gpu",
    "bytes_per_token",
    "dense_twin",
    "distinct_from_share",
    "expected_distinct_experts",
    "measured_distinct_experts",
    "model_weight_bytes",
    "moe_layer_roofline",
    "pcie_bytes_per_s",
    "placement_load",
    "serving_probe",
    "serving_row",
    "time_decode",
    "token_share",
]


# ---------------------------------------------------------------------------------------------------------
# Hardware
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accelerator:
    """The figures of one accelerator that a roofline needs."""

    name: str
    memory_bytes_per_s: float  # HBM bandwidth
    peak_flops: float  # dense bf16 tensor-core peak
    memory_bytes: float
    source: str
    peak_fp8_flops: float = 0.0  # dense fp8 tensor-core peak (0: none)

    @property
    def ridge(self) -> float:
        """FLOPs per byte read at which compute and memory take equally long (the roofline's ridge point)."""
        return self.peak_flops / self.memory_bytes_per_s


H100_SXM = Accelerator(
    "H100 SXM", 3.35e12, 989e12, 80e9,
    "NVIDIA H100 data sheet: 80 GB HBM3 at 3.35 TB/s; tensor cores with 2:4 sparsity 1,979 TFLOPS bf16 and "
    "3,958 TFLOPS fp8, half of that dense",
    peak_fp8_flops=1979e12,
)

_PCIE_GT_S = {3: 8e9, 4: 16e9, 5: 32e9}  # transfers per second per lane (PCI-SIG); 128b/130b encoding from 3.0 on


def pcie_bytes_per_s(generation: int, lanes: int = 16) -> float:
    """Peak bytes per second of a PCIe link in one direction: lanes · rate · 128/130 / 8 (4.0 x16: 31.5 GB/s).

    Real host-to-device copies reach less (pinned memory helps); estimates built on this are upper bounds.
    """
    if isinstance(generation, bool) or not isinstance(generation, int):
        raise TypeError(f"generation must be an int, one of {sorted(_PCIE_GT_S)}, got {generation!r}")
    check_int("lanes", lanes, 1)
    if generation not in _PCIE_GT_S:
        raise ValueError(f"PCIe generation must be one of {sorted(_PCIE_GT_S)}, got {generation!r}")
    return lanes * _PCIE_GT_S[generation] * 128 / 130 / 8


# ---------------------------------------------------------------------------------------------------------
# Distinct experts per batch
# ---------------------------------------------------------------------------------------------------------


def _check_nk(n_experts: object, k: object) -> None:
    check_int("n_experts", n_experts, 1)
    check_int("k", k, 1)
    if k > n_experts:
        raise ValueError(f"k={k} experts per token cannot exceed n_experts={n_experts}")


def _batch_tensor(batch: object, low: float = 0.0, name: str = "batch") -> torch.Tensor:
    """``batch`` (an int, a float, a sequence or a tensor of batch sizes) as float64, each finite and >= low."""
    if isinstance(batch, (str, bytes, bool)) or (isinstance(batch, torch.Tensor) and batch.dtype == torch.bool):
        raise TypeError(f"{name} must be a number or a tensor of batch sizes, got {type(batch).__name__} {batch!r}")
    try:
        b = torch.as_tensor(batch, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a number or a tensor of batch sizes, got {type(batch).__name__} "
                        f"{batch!r}") from None
    if not bool(torch.isfinite(b).all()) or bool((b < low).any()):
        raise ValueError(f"{name} must hold finite batch sizes >= {low:g}, got {b.tolist()}")
    return b


def expected_distinct_experts(n_experts: int, k: int, batch: Any) -> torch.Tensor:
    """Expected number of distinct experts that ``batch`` tokens use together: N · (1 − (1 − k/N)^B).

    Each token picks k of N experts uniformly at random and independently of the others, so a given expert is
    missed by one token with probability 1 − k/N and by all B tokens with (1 − k/N)^B. ``batch``: an int or a
    tensor of batch sizes; returns float64 of the same shape.
    """
    _check_nk(n_experts, k)
    b = _batch_tensor(batch)
    return n_experts * (1 - (1 - k / n_experts) ** b)


def _share_tensor(share: object) -> torch.Tensor:
    """``share`` (N,) as float64: finite, >= 0, one value per expert."""
    if isinstance(share, (str, bytes)):
        raise TypeError(f"share must be a 1-D tensor of per-expert shares, got {type(share).__name__}")
    p = torch.as_tensor(share, dtype=torch.float64)
    if p.dim() != 1 or not p.numel():
        raise ValueError(f"share must be a 1-D tensor of per-expert shares, got shape {tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError(f"share must hold finite shares >= 0, got {p.tolist()}")
    return p


def distinct_from_share(share: Any, batch: Any) -> torch.Tensor:
    """Expected distinct experts of B independent tokens when a token uses expert e with probability p_e:
    Σ_e 1 − (1 − p_e)^B. ``share`` (N,) sums to k; with p_e = k/N it is :func:`expected_distinct_experts`."""
    p = _share_tensor(share)
    b = _batch_tensor(batch)
    if bool((p > 1).any()):
        raise ValueError(f"share must hold per-expert probabilities in [0, 1], got {p.tolist()}")
    return (1 - (1 - p) ** b.unsqueeze(-1)).sum(-1)


def token_share(trace: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(N,) float64: the share of tokens that use each expert (the trace's (..., k) choices; sums to k)."""
    check_int("n_experts", n_experts, 1)
    trace = torch.as_tensor(trace)
    check_ids("trace", trace, n_experts, "expert ids")
    if trace.dim() == 0:
        raise ValueError("trace must be a (..., k) tensor of expert ids, got a scalar")
    tokens = trace.reshape(-1, trace.shape[-1])
    counts = torch.bincount(tokens.reshape(-1).long(), minlength=n_experts).double()
    return counts / max(tokens.shape[0], 1)


def measured_distinct_experts(trace: torch.Tensor, batch_sizes: Sequence[int], n_experts: int,
                              mode: str = "sequences") -> list[float]:
    """Mean number of distinct experts per step on a trace (S, T, k) of S sequences, for each batch size B.

    ``mode="sequences"``: a batch holds B of the sequences at the same position, as when B requests decode
    together (the S sequences split into S // B disjoint groups, every position counted). ``"consecutive"``:
    B consecutive tokens of one sequence (a prompt being prefilled, or draft tokens being verified).
    """
    check_int("n_experts", n_experts, 1)
    trace = torch.as_tensor(trace)
    if trace.dim() != 3:
        raise ValueError(f"trace must be (S, T, k), got shape {tuple(trace.shape)}")
    check_ids("trace", trace, n_experts, "expert ids")
    trace = trace.long()
    if mode not in ("sequences", "consecutive"):
        raise ValueError(f"mode must be 'sequences' or 'consecutive', got {mode!r}")
    s, t, _ = trace.shape
    onehot = torch.zeros(s, t, n_experts, dtype=torch.bool).scatter_(2, trace, True)  # (S, T, N)
    out = []
    for b in batch_sizes:
        limit = s if mode == "sequences" else t
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= limit:
            raise ValueError(f"batch size {b!r} must be an int between 1 and {limit} for mode {mode!r}")
        if mode == "sequences":
            g = s // b
            used = onehot[:g * b].reshape(g, b, t, n_experts).any(dim=1)  # (groups, T, N)
        else:
            w = t // b
            used = onehot[:, :w * b].reshape(s, w, b, n_experts).any(dim=2)  # (S, windows, N)
        out.append(float(used.sum(-1).double().mean()))
    return out


# ---------------------------------------------------------------------------------------------------------
# Bytes read per decoded token
# ---------------------------------------------------------------------------------------------------------


def bytes_per_token(indices: Sequence[torch.Tensor], expert_bytes: float, other_bytes: float) -> float:
    """Weight bytes read per token in one decoding step of a batch: (other + Σ_layers distinct_l · expert) / B.

    ``indices``: per MoE layer, the (B, k) experts each of the B tokens of the step chose. Each distinct expert of
    a layer is read once and serves every token routed to it; ``other_bytes`` (attention, norms, routers, shared
    experts, the output head: everything that is not a routed expert) is read once per step whatever the routing.
    Experts of different layers are different weights, so each layer counts its own.
    """
    if isinstance(indices, torch.Tensor) or not isinstance(indices, Sequence):
        raise TypeError(f"indices must be a list with one (B, k) tensor per MoE layer, got {type(indices).__name__}; "
                        "wrap a single layer's choices as [indices]")
    if len(indices) == 0:
        raise ValueError("indices is empty: give one (B, k) tensor per MoE layer")
    for i, layer in enumerate(indices):
        check_tensor(f"indices[{i}]", layer, 2, "(B, k)")
    check_number("expert_bytes", expert_bytes, 0)
    check_number("other_bytes", other_bytes, 0)
    batch = {int(i.shape[0]) for i in indices}
    if len(batch) != 1:
        raise ValueError(f"every layer must route the same B tokens, got batch sizes {sorted(batch)}")
    b = batch.pop()
    if b == 0:
        raise ValueError("the batch is empty (B = 0): no token was decoded, so there is no per-token cost")
    distinct = sum(int(torch.unique(i).numel()) for i in indices)
    return (other_bytes + distinct * expert_bytes) / b


def _routed_expert_params(model: torch.nn.Module) -> list[int]:
    """Parameters of one routed expert, per MoE layer."""
    out = []
    for layer in model.moe_layers():
        stacked = sum(p.numel() for p in layer.experts.parameters())
        out.append(stacked // layer.n_experts)
    return out


def model_weight_bytes(model: torch.nn.Module, bytes_per_param: float = 4.0) -> dict[str, Any]:
    """A TinyLM's weight bytes for decoding: ``expert`` (one routed expert, per MoE layer), ``n_experts`` (per
    layer), ``other`` (everything read once per step: attention, norms, routers, shared experts, dense FFNs and
    the tied output head; the position table is a lookup of one row, so it is left out) and ``total``."""
    check_number("bytes_per_param", bytes_per_param, positive=True)
    if not isinstance(model, TinyLM):
        raise TypeError(f"model must be a moe_course TinyLM, got {type(model).__name__}")
    expert = _routed_expert_params(model)
    routed = sum(p.numel() for layer in model.moe_layers() for p in layer.experts.parameters())
    total = sum(p.numel() for p in model.parameters())
    pos = getattr(model, "pos_emb", None)
    other = total - routed - (pos.weight.numel() if pos is not None else 0)
    return {"expert": [e * bytes_per_param for e in expert], "n_experts": [m.n_experts for m in model.moe_layers()],
            "other": other * bytes_per_param, "total": total * bytes_per_param}


def serving_row(cfg: MoEConfig, bytes_per_param: float = 2.0, batch_sizes: Sequence[int] = (1, 64)) -> dict[str, Any]:
    """A published MoE at decode: weights' memory, forward FLOPs per token, weight bytes read per token.

    Bytes read per token at batch B under uniform routing: every weight that is not a routed expert once per step
    (the input embedding is a lookup, so only the output head's matrix counts), plus each MoE layer's
    N·(1 − (1 − k/N)^B) distinct experts, divided by B. At B = 1 this is the active weights (minus the lookup).
    """
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg must be a moe_course.params.MoEConfig (e.g. get_published(name)), got "
                        f"{type(cfg).__name__}")
    check_number("bytes_per_param", bytes_per_param, positive=True)
    for b in batch_sizes:
        check_int("batch_sizes", b, 1)
    parts = param_breakdown(cfg)
    expert = parts["routed_experts"] // (cfg.n_moe_layers * cfg.n_routed_experts)
    lookup = 0 if cfg.tied_embeddings else cfg.vocab_size * cfg.d_model
    other = total_params(cfg) - parts["routed_experts"] - lookup
    read = {b: (other + cfg.n_moe_layers * float(expected_distinct_experts(cfg.n_routed_experts, cfg.top_k, b))
                * expert) * bytes_per_param / b for b in batch_sizes}
    return {"name": cfg.name, "total": total_params(cfg), "active": active_params(cfg),
            "memory": total_params(cfg) * bytes_per_param, "flops": flops_per_token(cfg, seq_len=0),
            "expert_params": expert, "n_moe_layers": cfg.n_moe_layers, "read_per_token": read}


def moe_layer_roofline(batch: Any, n_experts: int, k: int, expert_params: int, bytes_per_param: float = 2.0,
                       accelerator: Accelerator = H100_SXM) -> dict[str, torch.Tensor]:
    """The routed experts of one MoE layer decoding ``batch`` tokens, under uniform routing, on a roofline.

    bytes = distinct(B) · expert_params · bytes_per_param (each used expert's weights read once), FLOPs =
    2 · B · k · expert_params; the step takes max(bytes / bandwidth, FLOPs / peak). Returns float64 tensors:
    ``bytes``, ``flops``, ``intensity`` (FLOPs per byte), ``seconds``, ``seconds_per_token`` and ``memory_bound``.
    """
    b = _batch_tensor(batch, 1.0)
    check_int("expert_params", expert_params, 1)
    check_number("bytes_per_param", bytes_per_param, positive=True)
    if not isinstance(accelerator, Accelerator):
        raise TypeError(f"accelerator must be an Accelerator (e.g. H100_SXM), got {type(accelerator).__name__}")
    distinct = expected_distinct_experts(n_experts, k, b)
    nbytes = distinct * expert_params * bytes_per_param
    flops = 2 * b * k * expert_params
    t_mem, t_comp = nbytes / accelerator.memory_bytes_per_s, flops / accelerator.peak_flops
    seconds = torch.maximum(t_mem, t_comp)
    return {"bytes": nbytes, "flops": flops, "intensity": flops / nbytes, "seconds": seconds,
            "seconds_per_token": seconds / b, "memory_bound": t_mem >= t_comp}


def placement_load(share: Any, n_gpus: int, redundant: int = 0) -> dict[str, Any]:
    """Spread N experts over ``n_gpus`` GPUs (expert parallelism) and measure the busiest GPU's load.

    ``share`` (N,): the share of tokens per expert (load is proportional to it). Returns ``contiguous``, the
    busiest GPU's load over the mean when GPU g holds experts g·N/G ... (g+1)·N/G − 1 (placement by id), and
    ``balanced``, the same after copying the ``redundant`` hottest experts once each (a copy takes half of its
    expert's tokens) and placing all N + redundant replicas greedily, heaviest first, on the least loaded GPU with
    a free slot and no copy of the same expert, every GPU holding (N + redundant) / G of them. DeepSeek-V3 does the
    same in spirit (arXiv:2412.19437 §3.4: 32 redundant experts for prefilling, one extra per GPU, chosen from
    online load statistics); its exact placement algorithm is not given there, so this greedy one is ours.
    """
    p = _share_tensor(share)
    check_int("n_gpus", n_gpus, 1)
    check_int("redundant", redundant, 0)
    n = p.numel()
    if n % n_gpus or (n + redundant) % n_gpus or not 0 <= redundant <= n:
        raise ValueError(f"n_gpus={n_gpus} must divide n_experts={n} and n_experts + redundant={n + redundant}")
    mean = float(p.sum()) / n_gpus
    contiguous = float(p.reshape(n_gpus, n // n_gpus).sum(1).max()) / mean
    hot = p.argsort(descending=True, stable=True)[:redundant].tolist()
    replicas = [(float(p[e]) / (2 if e in hot else 1), e) for e in range(n)] + [(float(p[e]) / 2, e) for e in hot]
    slots = (n + redundant) // n_gpus
    load, held = [0.0] * n_gpus, [set() for _ in range(n_gpus)]
    for weight, e in sorted(replicas, key=lambda r: (-r[0], r[1])):
        g = min((g for g in range(n_gpus) if len(held[g]) < slots and e not in held[g]), key=lambda g: (load[g], g))
        load[g] += weight
        held[g].add(e)
    return {"contiguous": contiguous, "balanced": max(load) / mean, "gpus": [sorted(h) for h in held],
            "copied": hot}



def busiest_gpu(gpus: Sequence[Sequence[int]], load: Any) -> torch.Tensor:
    """The busiest GPU's load over the mean for a placement, on loads it need not have been chosen on.

    ``gpus[g]``: the experts GPU g holds (from :func:`placement_load`; an expert on several GPUs splits its load
    evenly among them); ``load`` (..., N): load per expert, a share of tokens or each step's pair counts.
    Returns (...,): max over GPUs / mean over GPUs (1.0 where nothing was routed).
    """
    load = torch.as_tensor(load, dtype=torch.float64)
    if load.dim() < 1 or not bool(torch.isfinite(load).all()) or bool((load < 0).any()):
        raise ValueError("load must be (..., N): one finite value >= 0 per expert (a share or a count)")
    if isinstance(gpus, (str, bytes)) or not all(isinstance(held, Sequence) for held in gpus):
        raise TypeError("gpus must be a list of lists of expert ids, one list per GPU (placement_load's 'gpus')")
    n = load.shape[-1]
    copies = torch.zeros(n, dtype=torch.float64)
    for held in gpus:
        for e in held:
            check_int("expert id in gpus", e, 0, n - 1, f" (load has {n} experts)")
            copies[e] += 1
    if bool((copies == 0).any()):
        missing = (copies == 0).nonzero().flatten().tolist()
        raise ValueError(f"gpus must hold every expert at least once; missing {missing}")
    per_gpu = torch.stack([(load[..., list(held)] / copies[list(held)]).sum(-1) for held in gpus], dim=-1)  # (..., G)
    mean = per_gpu.mean(-1)
    return torch.where(mean > 0, per_gpu.max(-1).values / mean.clamp(min=1e-300), torch.ones_like(mean))

# ---------------------------------------------------------------------------------------------------------
# Decoding speed on this machine
# ---------------------------------------------------------------------------------------------------------


def dense_twin(cfg: Any) -> Any:
    """The dense ModelConfig with an MoE config's active FFN width: d_hidden = (top_k + n_shared) · expert_hidden."""
    if cfg.ffn != "moe":
        return cfg
    return replace(cfg, ffn="dense", d_hidden=(cfg.top_k + cfg.n_shared) * cfg.expert_hidden, aux_loss_coef=0.0,
                   bias_update_rate=0.0, router_score="softmax", n_shared=0, z_loss_coef=0.0, seq_aux_loss_coef=0.0)


@dataclass
class DecodeTiming:
    """KV-cache decoding of one model at one batch size."""

    batch: int
    tokens_per_s: float  # decoded tokens (all sequences) per second, median over the repeats
    seconds_per_step: float
    split: dict[str, list[float]]  # part -> seconds per step in each layer ("attention", "router", "experts" or
    # "ffn"), measured with hooks in a separate run; "other" (embeddings, norms, head, Python) has one entry


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.inference_mode()
def _decode_seconds(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int,
                    watch: Any = None) -> float:
    """Seconds of ``new_tokens`` greedy KV-cache decoding steps after prefilling ``prompt`` (not timed).

    ``watch(model)``, if given, is called after the prefill and returns forward hooks to remove at the end.
    """
    device = prompt.device
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + new_tokens)
    nxt = model.forward_cached(prompt, cache)[:, -1].argmax(-1, keepdim=True)
    hooks = watch(model) if watch is not None else []
    try:
        _sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            nxt = model.forward_cached(nxt, cache)[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        return time.perf_counter() - start
    finally:
        for hook in hooks:
            hook.remove()


def _split_seconds(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> dict[str, list[float]]:
    """Per layer, seconds per decoding step in attention, the router and the experts (dense: the FFN)."""
    device = prompt.device
    n = len(model.blocks)
    spent = {name: [0.0] * n for name in ("attention", "router", "ffn")}
    started: dict[tuple[str, int], float] = {}

    def watch(model: torch.nn.Module) -> list[Any]:
        hooks = []

        def timed(module: torch.nn.Module, name: str, i: int) -> None:
            def pre(*_: Any) -> None:
                _sync(device)
                started[name, i] = time.perf_counter()

            def post(*_: Any) -> None:
                _sync(device)
                spent[name][i] += time.perf_counter() - started[name, i]

            hooks.extend([module.register_forward_pre_hook(pre), module.register_forward_hook(post)])

        for i, block in enumerate(model.blocks):
            timed(block.attn, "attention", i)
            timed(block.ffn, "ffn", i)
            if hasattr(block.ffn, "router"):
                timed(block.ffn.router, "router", i)
        return hooks

    total = _decode_seconds(model, prompt, new_tokens, watch)
    out: dict[str, list[float]] = {"attention": [s / new_tokens for s in spent["attention"]]}
    if model.moe_layers():
        out["router"] = [s / new_tokens for s in spent["router"]]
        out["experts"] = [(f - r) / new_tokens for f, r in zip(spent["ffn"], spent["router"], strict=True)]
    else:
        out["ffn"] = [s / new_tokens for s in spent["ffn"]]
    inside = sum(sum(v) for v in out.values())
    out["other"] = [total / new_tokens - inside]
    return out


def _check_decode(models: object, batch_sizes: Sequence[int], prompt_len: int, new_tokens: int, repeats: int,
                  data: torch.Tensor | None) -> None:
    """time_decode's arguments, before any model runs."""
    if not isinstance(models, Mapping) or not models:
        raise ValueError(f"models must be a non-empty dict of name -> TinyLM, got {models!r}")
    for name, model in models.items():
        if not isinstance(model, TinyLM):
            raise TypeError(f"models[{name!r}] must be a TinyLM, got {type(model).__name__}")
    if isinstance(batch_sizes, (int, str)) or not isinstance(batch_sizes, Sequence) or not batch_sizes:
        raise TypeError(f"batch_sizes must be a non-empty list of ints, got {batch_sizes!r}")
    for b in batch_sizes:
        check_int("batch_sizes", b, 1)
    check_int("prompt_len", prompt_len, 1)
    check_int("new_tokens", new_tokens, 1)
    check_int("repeats", repeats, 1)
    block = min(m.cfg.block_size for m in models.values())
    if prompt_len + new_tokens > block:
        raise ValueError(f"prompt_len + new_tokens = {prompt_len + new_tokens} exceed block_size={block}; decode "
                         "fewer tokens")
    if data is not None:
        check_tensor("data", data, 1, "(n,) token ids")
        if len(data) <= prompt_len:
            raise ValueError(f"data must hold more than prompt_len={prompt_len} tokens, got {len(data)}")


def time_decode(models: Mapping[str, torch.nn.Module], batch_sizes: Sequence[int], prompt_len: int = 16,
                new_tokens: int = 64, repeats: int = 3, data: torch.Tensor | None = None, seed: int = 0,
                split: bool = True, threads: int | None = 1) -> dict[str, list[DecodeTiming]]:
    """Tokens/s of greedy KV-cache decoding for each model and batch size, measured round-robin.

    Each repeat decodes ``new_tokens`` steps for B sequences after prefilling ``prompt_len`` tokens (random
    windows of ``data``, else random bytes; the prefill is not timed); the models take turns, so a burst of load
    from other processes slows them alike, and the median of the repeats is kept. With ``split``, one more run
    per model and batch times each layer's attention, router and experts with forward hooks (which add a little
    overhead of their own, so the split is a share, not an exact addition to the tokens/s run). On the CPU the
    timing runs on ``threads`` torch threads (default 1; None: leave the setting): on a machine whose cores other
    programs share, two threads that wait for each other can run many times slower than one.
    """
    _check_decode(models, batch_sizes, prompt_len, new_tokens, repeats, data)
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    saved = torch.get_num_threads()
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    try:
        return _time_decode(models, batch_sizes, prompt_len, new_tokens, repeats, data, seed, split)
    finally:
        torch.set_num_threads(saved)


def _time_decode(models: Mapping[str, torch.nn.Module], batch_sizes: Sequence[int], prompt_len: int,
                 new_tokens: int, repeats: int, data: torch.Tensor | None, seed: int,
                 split: bool) -> dict[str, list[DecodeTiming]]:
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    vocab = first.cfg.vocab_size
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[DecodeTiming]] = {name: [] for name in models}
    for b in batch_sizes:
        if data is not None:
            starts = torch.randint(len(data) - prompt_len, (b,), generator=gen)
            prompt = data[starts[:, None] + torch.arange(prompt_len)].long()
        else:
            prompt = torch.randint(vocab, (b, prompt_len), generator=gen)
        prompt = prompt.to(device)
        samples: dict[str, list[float]] = {name: [] for name in models}
        for model in models.values():  # warm-up: first calls allocate and pick kernels
            model.eval()
            _decode_seconds(model, prompt, min(4, new_tokens))
        for _ in range(repeats):
            for name, model in models.items():
                samples[name].append(_decode_seconds(model, prompt, new_tokens))
        for name, model in models.items():
            seconds = statistics.median(samples[name])
            parts = _split_seconds(model, prompt, new_tokens) if split else {}
            out[name].append(DecodeTiming(b, b * new_tokens / seconds, seconds / new_tokens, parts))
    return out


# ---------------------------------------------------------------------------------------------------------
# The stored experiment
# ---------------------------------------------------------------------------------------------------------

CACHE_POLICIES = ("lru", "belady", "static", "lru_prefetch", "random_lru", "lru_warm", "belady_warm",
                  "lru_prefetch_warm")
"""The expert caches :func:`serving_probe` counts: cold (empty at each window's start) unless named ``_warm`` or
``static`` (both start with the C most popular experts); ``belady_warm`` may also stream an expert without caching
it, which makes it optimal among all policies that start warm and do not prefetch."""

PROBE_SIZES: dict[str, dict[str, Any]] = {
    "smoke": dict(sequences=8, cache_sequences=4, batches=(1, 2, 4), consecutive=(1, 2, 4), grid_batches=(1, 2),
                  sample=2, decode_batches=(1, 2), prompt_len=4, new_tokens=4, repeats=1),
    "cpu": dict(sequences=256, cache_sequences=64, batches=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                consecutive=(1, 2, 4, 8, 16, 32, 64, 128), grid_batches=(1, 2, 4, 8, 16, 32, 64), sample=16,
                decode_batches=(1, 4, 16, 64), prompt_len=16, new_tokens=64, repeats=3),
    "gpu": dict(sequences=512, cache_sequences=64, batches=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
                consecutive=(1, 2, 4, 8, 16, 32, 64, 128, 256), grid_batches=(1, 2, 4, 8, 16, 32, 64), sample=16,
                decode_batches=(1, 16, 64, 256), prompt_len=32, new_tokens=128, repeats=3),
}
"""How much each size of ``serving_traces`` measures: validation windows routed, sequences simulated per cache,
batch sizes, the trace sample stored for the notebook, and the decoding benchmark."""


def _windows(data: torch.Tensor, n: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(data) - length, (n,), generator=gen)
    return data[starts[:, None] + torch.arange(length)].long()


@torch.no_grad()
def serving_probe(model: torch.nn.Module, corpus: Any, size: str = "cpu") -> dict[str, Any]:
    """What notebook 09 reads from the stored ``serving_traces`` result, measured on a trained TinyLM.

    Routes ``sequences`` random validation windows of block_size bytes and records, per MoE layer: the share of
    tokens per expert; distinct experts per step for batches of independent sequences and of consecutive tokens;
    expert-cache hit rates for every capacity C = 1 ... N (LRU, Belady's MIN, a static cache of the C most
    popular experts, LRU with speculative prefetch of k experts, and LRU on uniform random routing); the LRU hit
    rate of batches decoded side by side for each (B, C); the recall of speculative prefetch 1 and 2 layers ahead
    for every number of prefetched experts; and a small sample of the traces. Then it checks the KV cache
    against the full forward pass and times decoding against a dense twin with the same active width.
    """
    if size not in PROBE_SIZES:
        raise ValueError(f"size must be one of {', '.join(map(repr, PROBE_SIZES))}, got {size!r}")
    opts = PROBE_SIZES[size]
    device = next(model.parameters()).device
    block = model.cfg.block_size
    windows = _windows(corpus.val, opts["sequences"], block)
    layers = model.moe_layers()
    n, k = layers[0].n_experts, layers[0].top_k
    indices: list[list[torch.Tensor]] = [[] for _ in layers]
    guesses: dict[int, list[list[torch.Tensor]]] = {a: [[] for _ in layers] for a in (1, 2)}
    for chunk in windows.split(32):
        rec = record_routing(model, chunk.to(device), ahead=(1, 2))
        for i in range(len(layers)):
            indices[i].append(rec.indices[i])
            for a in (1, 2):
                if rec.guesses[a][i] is not None:
                    guesses[a][i].append(rec.guesses[a][i])
    traces = [torch.cat(parts) for parts in indices]  # per layer (S, T, k)
    ranked = {a: [torch.cat(g) if g else None for g in guesses[a]] for a in (1, 2)}
    capacities = list(range(1, n + 1))
    sims = opts["cache_sequences"]
    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"n_experts": n, "top_k": k, "block_size": block, "sequences": opts["sequences"],
                           "cache_sequences": sims, "capacities": capacities}
    share = [token_share(t, n) for t in traces]
    out["share"] = [s.tolist() for s in share]
    out["batches"] = [b for b in opts["batches"] if b <= windows.shape[0]]
    out["distinct"] = [measured_distinct_experts(t, out["batches"], n) for t in traces]
    out["consecutive"] = [b for b in opts["consecutive"] if b <= block]
    out["distinct_consecutive"] = [measured_distinct_experts(t, out["consecutive"], n, "consecutive")
                                   for t in traces]
    counts: dict[str, list[list[list[int]] | None]] = {name: [] for name in CACHE_POLICIES}
    for i, t in enumerate(traces):
        t = t[:sims]
        popular = share[i].argsort(descending=True, stable=True).tolist()
        warm = [popular[:c] for c in capacities]  # every warm policy starts with the C most popular experts
        guess = None if ranked[1][i] is None else ranked[1][i][:sims, :, :k]
        runs = {"lru": cache_counts(t, capacities, "lru"), "belady": cache_counts(t, capacities, "belady"),
                "static": cache_counts(t, capacities, "static", keep=warm),
                "lru_prefetch": None if guess is None else cache_counts(t, capacities, "lru", prefetch=guess),
                "random_lru": cache_counts(random_trace(t.shape[1], n, k, gen, sequences=sims), capacities, "lru"),
                "lru_warm": cache_counts(t, capacities, "lru", keep=warm),
                "belady_warm": cache_counts(t, capacities, "belady", keep=warm, bypass=True),
                "lru_prefetch_warm": None if guess is None else cache_counts(t, capacities, "lru", prefetch=guess,
                                                                             keep=warm)}
        for name, stats in runs.items():
            counts[name].append(None if stats is None else [[c.hits, c.requests, c.loads, c.prefetched]
                                                            for c in stats])
    out["cache"] = counts  # [policy][layer][capacity] = [hits, requests, loads, prefetched] over sims windows
    out["cache_steps"] = sims * block  # decoding steps per layer behind those counts (one token each)
    for name in ("lru", "belady", "static", "lru_prefetch", "random_lru"):  # the hit rates, as before
        out[name] = [None if per_layer is None else [h / r if r else 0.0 for h, r, _, _ in per_layer]
                     for per_layer in counts[name]]
    out["grid_batches"] = [b for b in opts["grid_batches"] if b <= sims]
    out["grid_lru"] = [[hit_rate_curve(batch_trace(t[:sims], b), capacities, "lru") for b in out["grid_batches"]]
                       for t in traces]  # [layer][batch][capacity]
    out["prefetch_recall"] = {str(a): [None if ranked[a][i] is None else
                                       [prefetch_recall(ranked[a][i], traces[i], m) for m in capacities]
                                       for i in range(len(layers))] for a in (1, 2)}
    out["trace_sample"] = [t[:opts["sample"]].tolist() for t in traces]
    out["prefetch_sample"] = [None if g is None else g[:opts["sample"], :, :k].tolist() for g in ranked[1]]
    half = opts["sequences"] // 2  # placement is chosen on one half of the windows and scored on the other
    out["share_halves"] = [[token_share(t[:half], n).tolist(), token_share(t[half:], n).tolist()] for t in traces]
    weights = model_weight_bytes(model)
    out["weight_bytes"] = {"expert": weights["expert"][0], "other": weights["other"], "total": weights["total"]}
    # the KV cache reproduces the full forward pass on these windows
    x = windows[:4].to(device)
    model.eval()
    full = model(x)[0]
    cache = model.new_cache(x.shape[0])
    step = torch.cat([model.forward_cached(x[:, :8], cache)]
                     + [model.forward_cached(x[:, j:j + 1], cache) for j in range(8, x.shape[1])], dim=1)
    out["kv_max_abs_diff"] = float((step - full).abs().max())
    # decoding speed against a dense twin of the same active width (fresh weights)
    torch.manual_seed(0)
    twin = TinyLM(dense_twin(model.cfg)).to(device).eval()
    timing = time_decode({"moe": model, "dense": twin}, opts["decode_batches"], opts["prompt_len"],
                         opts["new_tokens"], opts["repeats"], data=corpus.val)
    out["decode"] = {name: [{"batch": d.batch, "tokens_per_s": d.tokens_per_s, "seconds_per_step": d.seconds_per_step,
                             "split": d.split} for d in runs] for name, runs in timing.items()}
    out["decode_threads"] = 1 if device.type == "cpu" else None
    return out

