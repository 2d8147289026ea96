"""One training loop for notebooks 02-09 and the command line: ``python -m moe_course.train --preset NAME``.

It trains a :class:`~moe_course.model.TinyLM` on the byte-level standard-library corpus, shows a tqdm
progress bar, validates every ``eval_every`` steps, records loss and per-layer expert load in a
:class:`History`, uses mixed precision on CUDA, and saves checkpoints that load (weights, configs, history)
and resume (optimizer, step, batch sampler and RNG states: the resumed run is bit-identical on the CPU).
The command line changes any config field with ``--set KEY=VALUE`` and ends with one ``summary`` line.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moe_course.corpus import get_batch, load_corpus, train_bytes
from moe_course.device import pick_device, seed_everything
from moe_course.model import ModelConfig, TinyLM
from moe_course.params import count_model
from moe_course.validate import check_int, check_output_path


@dataclass
class TrainConfig:
    """Optimisation settings. ``steps`` × ``batch_size`` × ``block_size`` tokens are seen in total."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0
    amp: bool = True  # bf16/fp16 autocast, used on CUDA only

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "warmup", "seed"):
            value, low = getattr(self, name), 0 if name in ("warmup", "seed") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TrainConfig.{name} must be an int >= {low}, got {value!r}")
        for name in ("lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.warmup > self.steps:
            raise ValueError(f"TrainConfig.warmup must be an int between 0 and steps={self.steps} (warm-up longer "
                             f"than the run never reaches the peak learning rate), got {self.warmup}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")


@dataclass
class History:
    """What happened during training, ready to plot."""

    step: list[int] = field(default_factory=list)  # logged steps
    train_loss: list[float] = field(default_factory=list)  # cross-entropy at those steps (no aux terms)
    aux_loss: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    load: list[list[list[float]]] = field(default_factory=list)  # [log point][moe layer][expert] fractions
    tokens_per_s: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Preset:
    """A named, ready-to-run experiment."""

    model: ModelConfig
    train: TrainConfig
    description: str
    corpus: str = "course"  # the frozen corpus it trains on (moe_course.corpus.CORPORA)


def _moe(**kw) -> ModelConfig:
    return ModelConfig(ffn="moe", **kw)


def _dense(**kw) -> ModelConfig:
    return ModelConfig(ffn="dense", **kw)


# Dense and MoE presets of one size have equal *active* FFN width: d_hidden = (top_k + n_shared) · expert_hidden.
# The "-best" presets are the course's recipe (notebook 08): fine-grained experts (half the width, twice as many),
# shared experts (DeepSeekMoE) and auxiliary-loss-free balancing with a sigmoid gate (DeepSeek-V3). They hold the
# same total expert width as the "-moe" presets, so moe vs best compares recipes at equal total and active size.
# The cpu presets' learning rate and warm-up are what notebook 08's capstone_tuning sweep chose for each model (the
# same 4 x 2 grid for all three, scored on the tuning half of the validation files; a test keeps them in step).
_CPU = dict(block_size=128, n_layer=4, n_head=4, d_model=128)
_GPU = dict(block_size=256, n_layer=6, n_head=6, d_model=384)
_BEST = dict(top_k=2, n_shared=2, router_score="sigmoid", aux_loss_coef=0.0, bias_update_rate=1e-3)
# The GPU presets train on the "large" corpus (9.2 M training bytes): 1,500 steps x 32 x 256 = 12.3 M bytes is
# 1.3 epochs (4.2 of the 2.9 M-byte "course" corpus, which would mostly measure memorisation).
_GPU_TRAIN = dict(steps=1500, batch_size=32, lr=1e-3, warmup=100, eval_every=100, eval_batches=20)
PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        _moe(block_size=32, n_layer=2, n_head=2, d_model=32, n_experts=4, top_k=2, expert_hidden=32, d_hidden=64),
        TrainConfig(steps=20, batch_size=4, eval_every=10, eval_batches=2, warmup=2),
        "seconds-long run for tests",
    ),
    "cpu-moe": Preset(
        _moe(**_CPU, n_experts=8, top_k=2, expert_hidden=128),
        TrainConfig(steps=1000, batch_size=16, eval_every=100, lr=3e-3, warmup=100),  # capstone_tuning's choice
        "4 layers, d=128, 8 experts top-2 (GShard-style, aux loss 0.01); ~4 minutes on one CPU core",
    ),
    "cpu-dense": Preset(
        _dense(**_CPU, d_hidden=256),
        TrainConfig(steps=1000, batch_size=16, eval_every=100, lr=6e-3, warmup=100),  # capstone_tuning's choice
        "the dense twin of cpu-moe and cpu-best: same active parameters per token",
    ),
    "cpu-best": Preset(
        _moe(**_CPU, n_experts=16, expert_hidden=64, **_BEST),
        TrainConfig(steps=1000, batch_size=16, eval_every=100, lr=6e-3, warmup=100),  # capstone_tuning's choice
        "the course's recipe: 2 shared + 16 fine-grained experts (width 64) top-2, sigmoid gate, loss-free bias",
    ),
    "gpu-moe": Preset(
        _moe(**_GPU, n_experts=16, top_k=2, expert_hidden=384),
        TrainConfig(**_GPU_TRAIN),
        "6 layers, d=384, 16 experts top-2 (aux loss 0.01); bf16 + grouped_mm on one GPU",
        corpus="large",
    ),
    "gpu-dense": Preset(
        _dense(**_GPU, d_hidden=768),
        TrainConfig(**_GPU_TRAIN),
        "the dense twin of gpu-moe and gpu-best",
        corpus="large",
    ),
    "gpu-best": Preset(
        _moe(**_GPU, n_experts=32, expert_hidden=192, **_BEST),
        TrainConfig(**_GPU_TRAIN),
        "the course's recipe at GPU size: 2 shared + 32 fine-grained experts top-2, sigmoid gate, loss-free bias",
        corpus="large",
    ),
}


def epochs_seen(name: str) -> float:
    """Passes over its corpus's training bytes that preset ``name`` makes: steps · batch · block / train bytes."""
    preset = get_preset(name)
    seen = preset.train.steps * preset.train.batch_size * preset.model.block_size
    return seen / train_bytes(preset.corpus)


def get_preset(name: str) -> Preset:
    """Look up a preset by name, with the list of names in the error."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(sorted(PRESETS))}") from None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio · lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_kernel(device: torch.device) -> dict[str, bool]:
    """AdamW's fused kernel where PyTorch has one (CPU, CUDA): on the CPU it updates cpu-moe's 1.9M parameters
    6x faster than the multi-tensor ``foreach`` path (2.3 vs 15 ms a step, one thread); else ``foreach``."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype:
    """The dtype training computes in: bf16 on a CUDA GPU that has it natively (Ampere and newer), fp16 (with a
    GradScaler) on one that only emulates it, such as Colab's T4, float32 elsewhere or with ``enabled=False``."""
    if device.type != "cuda" or not enabled:
        return torch.float32
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 has no emulation flag and counts only native support
        native = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if native else torch.float16


def _autocast(device: torch.device, enabled: bool):
    dtype = amp_dtype(device, enabled)
    if dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def evaluate(
    model: TinyLM, data: torch.Tensor, batch_size: int = 16, n_batches: int = 8, seed: int = 1234,
    device: torch.device | None = None, amp: bool = True,
) -> float:
    """Mean cross-entropy (nats per byte) on ``n_batches`` fixed random windows of ``data``."""
    device = device or next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    losses = []
    for _ in range(n_batches):
        x, y = get_batch(data, batch_size, model.cfg.block_size, gen, device)
        with _autocast(device, amp):
            logits, _ = model(x)
        losses.append(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)).item())
    model.train(was_training)
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate_text(
    model: TinyLM, data: torch.Tensor, batch_size: int = 16, device: torch.device | None = None, amp: bool = True,
    max_windows: int | None = None,
) -> float:
    """Mean cross-entropy (nats per byte) over the whole of ``data``: every byte after the first scored once.

    The text is cut into consecutive, non-overlapping windows of ``block_size`` (the last one shorter), read
    in order, ``batch_size`` windows per forward pass: the evidence protocol's score (``Corpus.val_part("test")``),
    where a few random windows (:func:`evaluate`) swing by more than the gaps they are asked to show.
    ``max_windows`` scores only the first that many windows (say so where it is used).
    """
    if not isinstance(data, torch.Tensor) or data.dim() != 1 or data.numel() < 2:
        raise ValueError("data must be a 1-D tensor of at least 2 byte tokens (e.g. corpus.val_part('test')[0]), "
                         f"got {type(data).__name__}{tuple(data.shape) if isinstance(data, torch.Tensor) else ''}")
    check_int("batch_size", batch_size, 1)
    if max_windows is not None:
        check_int("max_windows", max_windows, 1, hint=" (or None for the whole text)")
    device = device or next(model.parameters()).device
    T = model.cfg.block_size
    starts = list(range(0, data.numel() - 1, T))[:max_windows]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        lengths = {min(T, data.numel() - 1 - s) for s in chunk}
        for length in sorted(lengths, reverse=True):  # the last, shorter window gets a pass of its own
            rows = [s for s in chunk if min(T, data.numel() - 1 - s) == length]
            x = torch.stack([data[s:s + length] for s in rows]).long().to(device)
            y = torch.stack([data[s + 1:s + 1 + length] for s in rows]).long().to(device)
            with _autocast(device, amp):
                logits, _ = model(x)
            total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                     reduction="sum").item()
            count += y.numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def causal_prefix_loss(model: TinyLM, data: torch.Tensor, n_windows: int = 64, amp: bool = True) -> float:
    """Mean cross-entropy (nats per byte) when every prediction is routed with only the text before it.

    Each of the first ``n_windows`` windows of :func:`evaluate_text` is fed prefix by prefix, one sequence at a
    time, and only the last position is scored: what generation sees. A causal router scores the same as in
    :func:`evaluate_text`; expert choice, whose experts pick among all tokens of a batch, does not.
    """
    if not isinstance(data, torch.Tensor) or data.dim() != 1 or data.numel() < 2:
        raise ValueError("data must be a 1-D tensor of at least 2 byte tokens (e.g. corpus.val_part('test')[0])")
    check_int("n_windows", n_windows, 1)
    device = next(model.parameters()).device
    T = model.cfg.block_size
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in list(range(0, data.numel() - 1, T))[:n_windows]:
        length = min(T, data.numel() - 1 - start)
        for t in range(1, length + 1):
            x = data[start:start + t].long()[None].to(device)  # (1, t)
            with _autocast(device, amp):
                logits, _ = model(x)
            total += F.cross_entropy(logits[0, -1].float()[None], data[start + t].long()[None].to(device)).item()
            count += 1
    model.train(was_training)
    return total / count


def train(
    model: TinyLM,
    train_data: torch.Tensor,
    val_data: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device | None = None,
    progress: bool = True,
    log_every: int = 10,
    desc: str = "training",
    callback: Callable[[int, TinyLM], None] | None = None,
    *,
    resume: Mapping[str, Any] | None = None,
    checkpoint_every: int | None = None,
    on_checkpoint: Callable[[History, dict[str, Any]], None] | None = None,
) -> History:
    """Train ``model`` in place with AdamW; return the :class:`History`.

    After every optimizer step the MoE layers' post-step balancing runs (``model.after_step()``: the
    routing-bias update, which the optimizer never sees), then ``callback(step, model)`` if given.

    ``on_checkpoint(history, state)`` runs every ``checkpoint_every`` steps and after the last one; ``state``
    is what :func:`save_checkpoint` needs to resume (it references live tensors: save it before returning).
    ``resume`` (a checkpoint from :func:`read_checkpoint`, left unchanged) restores the weights, optimizer,
    step, batch sampler, torch's RNG and history, and trains on to ``cfg.steps``: N steps, a checkpoint and
    the remaining M steps give the same weights and losses as N + M steps in one go. The learning-rate
    schedule always spans ``cfg.steps``.
    """
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive int or None, got {checkpoint_every!r}")
    device = device or pick_device()
    model.to(device).train()
    gen = torch.Generator().manual_seed(cfg.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), **optimizer_kernel(device),
    )
    use_scaler = amp_dtype(device, cfg.amp) == torch.float16  # fp16 underflows without loss scaling; bf16 does not
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    moe_layers = model.moe_layers()
    n_experts = [m.n_experts for m in moe_layers]
    counts = [torch.zeros(n, dtype=torch.long, device=device) for n in n_experts]  # on device: no sync per step
    hist = History()
    ce_sum, aux_sum, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    first, tokens_before = 0, 0  # steps and tokens done before this call
    if resume is not None:
        first, tokens_before, hist, (ce_sum, aux_sum, seen) = _restore(resume, model, opt, scaler, gen, counts,
                                                                       cfg, device)
    tokens_per_step = cfg.batch_size * model.cfg.block_size
    seconds_before = hist.seconds
    start = time.perf_counter()

    def clock(done: int) -> None:  # seconds and tokens/s of the whole run, resumed parts included
        hist.seconds = seconds_before + (time.perf_counter() - start)
        hist.tokens_per_s = (tokens_before + (done - first) * tokens_per_step) / hist.seconds

    def state(done: int) -> dict[str, Any]:  # everything besides weights and history that a resume needs
        return {
            "step": done,
            "tokens": tokens_before + (done - first) * tokens_per_step,
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "generator": gen.get_state(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "pending": {"ce_sum": ce_sum, "aux_sum": aux_sum, "seen": seen, "counts": [c.clone() for c in counts]},
        }

    bar = tqdm(range(first, cfg.steps), desc=desc, disable=not progress, mininterval=0.5, initial=first,
               total=cfg.steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = get_batch(train_data, cfg.batch_size, model.cfg.block_size, gen, device)
        with _autocast(device, cfg.amp):
            logits, _ = model(x)
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            aux = model.aux_loss().to(ce.device)
            loss = ce + aux
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        model.after_step()
        for c, layer, n in zip(counts, moe_layers, n_experts, strict=True):  # before the callback's own passes
            if layer.last_routing is not None:
                c += layer.last_routing.counts(n)
        if callback is not None:
            callback(step, model)
        ce_sum, aux_sum, seen = ce_sum + ce.detach(), aux_sum + aux.detach().float(), seen + 1
        last = step == cfg.steps - 1
        if (step + 1) % log_every == 0 or last:
            hist.step.append(step + 1)
            hist.train_loss.append(float(ce_sum) / seen)
            hist.aux_loss.append(float(aux_sum) / seen)
            hist.load.append([(c.double() / c.sum().clamp_min(1)).tolist() for c in counts])
            ce_sum, aux_sum, seen = torch.zeros_like(ce_sum), torch.zeros_like(aux_sum), 0
            for c in counts:
                c.zero_()
        if (step + 1) % cfg.eval_every == 0 or last:
            hist.val_step.append(step + 1)
            val = evaluate(model, val_data, cfg.batch_size, cfg.eval_batches, device=device, amp=cfg.amp)
            hist.val_loss.append(val)
            bar.set_postfix(train=f"{hist.train_loss[-1]:.3f}", val=f"{hist.val_loss[-1]:.3f}")
        if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and not last:
            clock(step + 1)
            on_checkpoint(hist, state(step + 1))
    clock(cfg.steps)
    if on_checkpoint is not None:
        on_checkpoint(hist, state(cfg.steps))
    return hist


def _restore(
    blob: Mapping[str, Any], model: TinyLM, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    gen: torch.Generator, counts: list[torch.Tensor], cfg: TrainConfig, device: torch.device,
) -> tuple[int, int, History, tuple[torch.Tensor, torch.Tensor, int]]:
    """Load a checkpoint's training state into a fresh run; return (steps done, tokens done, history, sums)."""
    state = blob.get("train_state")
    if not state:
        raise ValueError("resume: the checkpoint holds no training state (it was saved before checkpoints could "
                         "resume); load_checkpoint still loads its weights")
    if state["step"] >= cfg.steps:
        raise ValueError(f"resume: the checkpoint has done {state['step']} of cfg.steps={cfg.steps} steps; "
                         f"raise cfg.steps to train on")
    model.load_state_dict(blob["state_dict"])
    options = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    opt.load_state_dict(copy.deepcopy(state["optimizer"]))  # deep: the optimizer would update the blob in place
    for group, kept in zip(opt.param_groups, options, strict=True):  # this run's settings and kernel
        group.update(kept)
    if scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    gen.set_state(state["generator"].cpu())
    torch.set_rng_state(state["rng"].cpu())
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
    pending = state["pending"]
    for c, saved in zip(counts, pending["counts"], strict=True):
        c.copy_(saved)
    sums = (pending["ce_sum"].to(device).clone(), pending["aux_sum"].to(device).clone(), pending["seen"])
    history = History(**copy.deepcopy(blob["history"])) if blob.get("history") else History()
    return state["step"], state["tokens"], history, sums


def save_checkpoint(
    path: str | Path, model: TinyLM, history: History | None = None, train_cfg: TrainConfig | None = None,
    *, state: Mapping[str, Any] | None = None, preset: str | None = None,
    overrides: Mapping[str, Any] | None = None, max_bytes: int | None = None,
) -> Path:
    """Save weights, configs and history to one file, atomically (a temporary file, then a rename).

    With ``state`` (from :func:`train`'s ``on_checkpoint``) the run can resume; ``preset``, ``overrides`` and
    ``max_bytes`` record how the command line made it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "model_config": model.cfg.to_dict(),
        "state_dict": model.state_dict(),
        "train_config": asdict(train_cfg) if train_cfg else None,
        "history": history.to_dict() if history else None,
        "train_state": dict(state) if state else None,
        "preset": preset,
        "overrides": dict(overrides) if overrides else {},
        "max_bytes": max_bytes,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)  # a reader never sees half a checkpoint, even if this process is killed
    return path


def read_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The raw contents of a checkpoint (a dict; older checkpoints lack the resume keys)."""
    return torch.load(Path(path), map_location=device, weights_only=True)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[TinyLM, History | None]:
    """Rebuild the model saved by :func:`save_checkpoint` (default layers only) and its history."""
    blob = read_checkpoint(path, device)
    model = TinyLM(ModelConfig(**blob["model_config"]))
    model.load_state_dict(blob["state_dict"])
    history = History(**blob["history"]) if blob.get("history") else None
    return model.to(device), history


# ----------------------------------------------------------------------------------------------- overrides

_CONFIGS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig}


def override_keys() -> dict[str, tuple[str, str, Any]]:
    """Every key ``--set`` accepts -> (config, field, type): ``model.X`` and ``train.X`` always, a bare ``X``
    where only one config has that field."""
    keys: dict[str, tuple[str, str, Any]] = {}
    owners: dict[str, list[tuple[str, str, Any]]] = {}
    for prefix, cls in _CONFIGS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            keys[f"{prefix}.{f.name}"] = (prefix, f.name, hints[f.name])
            owners.setdefault(f.name, []).append(keys[f"{prefix}.{f.name}"])
    keys.update({name: found[0] for name, found in owners.items() if len(found) == 1})
    return keys


def _resolve_key(key: str) -> tuple[str, str, Any]:
    keys = override_keys()
    if key in keys:
        return keys[key]
    if f"model.{key}" in keys and f"train.{key}" in keys:
        raise ValueError(f"{key!r} is a field of both ModelConfig and TrainConfig: write model.{key} or train.{key}")
    valid = {p: ", ".join(f.name for f in fields(cls)) for p, cls in _CONFIGS.items()}
    raise ValueError(f"unknown key {key!r}; ModelConfig keys: {valid['model']}; TrainConfig keys: {valid['train']}")


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_value(key: str, text: str, kind: Any) -> Any:
    """``text`` read as the field type ``kind``: int, float, bool, str, or one of them ``| None`` ("none")."""
    options = typing.get_args(kind)
    optional = type(None) in options
    if optional:
        if text.strip().lower() == "none":
            return None
        (kind,) = [t for t in options if t is not type(None)]
    expects = f"{key} expects {'an' if kind is int else 'a'} {kind.__name__}{' or none' if optional else ''}"
    if kind is bool:
        if text.strip().lower() in _TRUE + _FALSE:
            return text.strip().lower() in _TRUE
        raise ValueError(f"{expects} (true/false, yes/no, on/off, 1/0), got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{expects}, got {text!r}") from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{expects}, got {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"{expects} (finite), got {text!r}")
        return value
    if kind is str:
        return text
    raise ValueError(f"{key} has type {kind!r}, which the command line cannot set")


def parse_override(item: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` -> (canonical key, typed value); the canonical key is bare unless both configs have it."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {item!r}")
    prefix, name, kind = _resolve_key(key)
    canonical = name if override_keys().get(name) == (prefix, name, kind) else f"{prefix}.{name}"
    return canonical, parse_value(canonical, text, kind)


def apply_overrides(
    model_cfg: ModelConfig, train_cfg: TrainConfig, overrides: Mapping[str, Any]
) -> tuple[ModelConfig, TrainConfig]:
    """Both configs with ``overrides`` (canonical key -> typed value) applied; ValueError when invalid."""
    keys = override_keys()
    changes: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for key, value in overrides.items():
        prefix, name, _ = keys[key] if key in keys else _resolve_key(key)
        changes[prefix][name] = value
    return replace(model_cfg, **changes["model"]), replace(train_cfg, **changes["train"])


def _differs(cfg: Any, shown: Mapping[str, Any]) -> str:
    """``key=value`` for each field that differs from the dataclass's default or is in ``shown``."""
    default = type(cfg)()
    return " ".join(f"{f.name}={getattr(cfg, f.name)}" for f in fields(cfg)
                    if getattr(cfg, f.name) != getattr(default, f.name) or f.name in shown) or "(defaults)"


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in TinyLM(cfg).state_dict().items()}  # on the CPU: meta's init is slower


def shape_changes(saved: Mapping[str, torch.Tensor], old: ModelConfig, new: ModelConfig) -> list[str]:
    """The fields of ``new`` (vs ``old``) that change a tensor of the state dict ``saved``; [] when it loads."""
    target = {k: tuple(v.shape) for k, v in saved.items()}
    if _shapes(new) == target:
        return []
    changed = [f.name for f in fields(ModelConfig) if getattr(old, f.name) != getattr(new, f.name)]
    alone = []
    for name in changed:  # name the fields that change a shape on their own
        try:
            if _shapes(replace(old, **{name: getattr(new, name)})) != target:
                alone.append(name)
        except ValueError:
            alone.append(name)
    return alone or changed


# ---------------------------------------------------------------------------------------------- command line

DEFAULT_PRESET = "cpu-moe"
# convenience flag -> the --set key it stands for (choices where the field has a fixed set of values)
FLAGS: dict[str, str] = {
    "--router": "router", "--router-score": "router_score", "--experts": "experts", "--n-experts": "n_experts",
    "--top-k": "top_k", "--expert-hidden": "expert_hidden", "--n-shared": "n_shared",
    "--capacity-factor": "capacity_factor", "--aux-loss": "aux_loss_coef", "--z-loss": "z_loss_coef",
    "--seq-aux-loss": "seq_aux_loss_coef", "--bias-update-rate": "bias_update_rate", "--lr": "lr",
    "--batch-size": "batch_size", "--seed": "seed",
}
_CHOICES = {"router": ("topk", "expert_choice", "hash"), "router_score": ("softmax", "sigmoid"),
            "experts": ("grouped", "list")}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m moe_course.train`` argument parser."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Example: python -m moe_course.train --preset cpu-best --set lr=2e-3 --top-k 1 --dry-run",
    )
    parser.add_argument("--preset", help=f"one of: {', '.join(sorted(PRESETS))} (default {DEFAULT_PRESET})")
    parser.add_argument("--steps", type=_positive_int, help="override the preset's number of steps (>= 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="set a ModelConfig or TrainConfig field (repeatable), e.g. --set n_experts=16")
    for flag, key in FLAGS.items():
        parser.add_argument(flag, dest=f"flag_{key}", metavar=None if key in _CHOICES else key.upper(),
                            choices=_CHOICES.get(key), help=f"same as --set {key}=VALUE")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    parser.add_argument("--out", help="folder for the checkpoint PRESET.pt (default checkpoints; with --resume: "
                                      "the resumed file)")
    parser.add_argument("--max-bytes", type=_positive_int, help="use only this many corpus bytes (quick runs)")
    parser.add_argument("--resume", metavar="PATH", help="continue the run saved in this checkpoint")
    parser.add_argument("--save-every", type=_positive_int, metavar="N",
                        help="also save the checkpoint every N steps (default: only at the end)")
    parser.add_argument("--json", metavar="PATH", help="also write the summary and the history as JSON")
    parser.add_argument("--list", action="store_true", help="list the presets with their parameters and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved configs and exit")
    return parser


def _collect_overrides(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """--set items, then convenience flags, then --steps -> {canonical key: value}; a key given twice is an error."""
    found: dict[str, tuple[Any, str]] = {}

    def put(key: str, value: Any, source: str) -> None:
        if key in found:
            parser.error(f"{source}: {key} is already set by {found[key][1]}; give it once")
        found[key] = (value, source)

    for item in args.overrides:
        try:
            key, value = parse_override(item)
        except ValueError as exc:
            parser.error(f"argument --set: {exc}")
        put(key, value, f"--set {item}")
    kinds = override_keys()
    for flag, key in FLAGS.items():
        text = getattr(args, f"flag_{key}")
        if text is not None:
            try:
                value = parse_value(key, text, kinds[key][2])
            except ValueError as exc:
                parser.error(f"argument {flag}: {exc}")
            put(key, value, f"{flag} {text}")
    if args.steps is not None:
        put("steps", args.steps, f"--steps {args.steps}")
    return {key: value for key, (value, _) in found.items()}


def _check_device(parser: argparse.ArgumentParser, name: str | None) -> torch.device:
    if name is not None:
        try:
            kind = torch.device(name).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda", "mps"):
            parser.error(f"argument --device: unknown device {name!r}; use cpu, cuda, cuda:N or mps")
        index = torch.device(name).index
        if kind == "cuda" and index is not None and torch.cuda.is_available() and index >= torch.cuda.device_count():
            parser.error(f"argument --device: {name} does not exist: this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
    try:
        return pick_device(name)
    except (RuntimeError, ValueError) as exc:  # an unavailable device, or a bad MOE_DEVICE
        parser.error(f"argument --device: {exc}")


def _list_presets() -> None:
    """Print each preset with its parameter counts; the models are built on the meta device (no memory, no init)."""
    for name, preset in sorted(PRESETS.items()):
        with torch.device("meta"):
            model = TinyLM(preset.model)
        total, active = count_model(model)
        print(f"{name:<10} total={total:<10,} active={active:<10,} {preset.description}")


def summary_line(summary: Mapping[str, Any]) -> str:
    """The one grep-friendly line the command line ends with: ``summary key=value ...``."""
    fmt = {"val_loss": "{:.3f}", "val_bpb": "{:.3f}", "tokens_per_s": "{:.0f}", "seconds": "{:.1f}"}
    return "summary " + " ".join(f"{k}={fmt.get(k, '{}').format(v)}" for k, v in summary.items())


def main(argv: list[str] | None = None) -> int:
    """Command line: train a preset (with overrides) on the standard-library corpus, or resume a checkpoint."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        _list_presets()
        return 0
    blob, max_bytes = None, args.max_bytes
    if args.resume is not None:
        if args.preset is not None:
            parser.error("argument --preset: not allowed with --resume (the checkpoint names its preset)")
        if not Path(args.resume).is_file():
            parser.error(f"argument --resume: no checkpoint file at {args.resume}")
        try:
            blob = read_checkpoint(args.resume)
        except Exception as exc:  # noqa: BLE001 - whatever torch.load raises, the file is not a checkpoint
            parser.error(f"argument --resume: cannot read {args.resume}: {exc}")
        if not blob.get("train_state") or not blob.get("train_config"):
            parser.error(f"argument --resume: {args.resume} holds no training state (saved before checkpoints "
                         f"could resume); load_checkpoint still loads its weights")
        name = blob.get("preset") or Path(args.resume).stem
        base_model, base_train = ModelConfig(**blob["model_config"]), TrainConfig(**blob["train_config"])
        earlier = dict(blob.get("overrides") or {})
        if args.max_bytes is not None and args.max_bytes != blob.get("max_bytes"):
            parser.error(f"argument --max-bytes: {args.resume} was trained with --max-bytes "
                         f"{blob.get('max_bytes')}; resume on the same data")
        max_bytes = blob.get("max_bytes")
    else:
        name = args.preset or DEFAULT_PRESET
        try:
            preset = get_preset(name)
        except ValueError as exc:
            parser.error(str(exc))
        base_model, base_train, earlier = preset.model, preset.train, {}
    overrides = _collect_overrides(args, parser)
    try:
        model_cfg, train_cfg = apply_overrides(base_model, base_train, overrides)
        if model_cfg.vocab_size < 256:
            raise ValueError(f"the byte-level corpus needs vocab_size >= 256, got {model_cfg.vocab_size}")
        total, active = count_model(TinyLM(model_cfg))  # the layers check what ModelConfig does not (n_groups, ...)
    except (ValueError, TypeError) as exc:
        given = ", ".join(f"{k}={v}" for k, v in overrides.items())
        parser.error(f"invalid settings for {name}{f' ({given})' if given else ''}: {exc}")
    if blob is not None:
        changed = shape_changes(blob["state_dict"], base_model, model_cfg)
        if changed:
            parser.error("argument --resume: " + ", ".join(f"{k}={getattr(model_cfg, k)}" for k in changed)
                         + " would change the model's shape (the checkpoint has "
                         + ", ".join(f"{k}={getattr(base_model, k)}" for k in changed) + "); drop it to resume")
        done = blob["train_state"]["step"]
        if done >= train_cfg.steps:
            parser.error(f"argument --resume: {args.resume} is complete ({done} of {train_cfg.steps} steps); "
                         f"pass --steps larger than {done} to train on")
    # the validation split gets a tenth of the bytes and must hold more than one block
    min_bytes = 10 * (model_cfg.block_size + 1)
    if max_bytes is not None and max_bytes < min_bytes:
        parser.error(f"argument --max-bytes: preset {name} needs at least {min_bytes} bytes (the validation "
                     f"tenth must exceed block_size={model_cfg.block_size}), got {max_bytes}")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"argument --out: {args.out} is a file; give a folder for the checkpoint")
    if args.json is not None and Path(args.json).is_dir():
        parser.error(f"argument --json: {args.json} is a folder; give a file name")
    for flag, path in (("--out", args.out and Path(args.out) / "checkpoint.pt"), ("--json", args.json)):
        if path is not None:  # checked before training: a path that cannot be written would lose the run
            try:
                check_output_path(flag, path)
            except ValueError as exc:
                parser.error(f"argument {exc}")
    device = _check_device(parser, args.device)
    out = Path(args.resume) if blob is not None and args.out is None else Path(args.out or "checkpoints") / f"{name}.pt"
    if args.dry_run:
        start = f" from step {blob['train_state']['step']} of {args.resume}" if blob is not None else ""
        print(f"preset {name}{start} on {device}; checkpoint {out}")
        shown = {key.rpartition(".")[2] for key in overrides}  # an override is shown even if it sets a default
        print(f"model  {_differs(model_cfg, shown)}")
        print(f"train  {_differs(train_cfg, shown)}")
        print(f"params total_params={total} active_params={active}")
        return 0

    seed_everything(train_cfg.seed)
    corpus = load_corpus(max_bytes=max_bytes, name=PRESETS[name].corpus if name in PRESETS else "course")
    model = TinyLM(model_cfg)
    print(f"preset {name}: {total:,} parameters ({active:,} active) on {device.type}")
    recorded = {**earlier, **overrides}
    done: dict[str, Any] = {}

    def save(hist: History, state: dict[str, Any]) -> None:
        save_checkpoint(out, model, hist, train_cfg, state=state, preset=name, overrides=recorded,
                        max_bytes=max_bytes)
        done.update(step=state["step"], tokens=state["tokens"])

    hist = train(model, corpus.train, corpus.val, train_cfg, device=device, desc=name, resume=blob,
                 checkpoint_every=args.save_every, on_checkpoint=save)
    summary = {
        "preset": name, "steps": done["step"], "tokens": done["tokens"], "val_loss": hist.val_loss[-1],
        "val_bpb": hist.val_loss[-1] / math.log(2), "total_params": total, "active_params": active,
        "tokens_per_s": hist.tokens_per_s, "seconds": hist.seconds, "device": str(device), "checkpoint": str(out),
    }
    if args.json is not None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            **summary, "overrides": recorded, "model_config": model_cfg.to_dict(), "train_config": asdict(train_cfg),
            "history": hist.to_dict(),
        }, indent=1) + "\n", encoding="utf-8")
    print(summary_line(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
