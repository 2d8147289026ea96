"""Whole training steps of each ``*-moe`` and ``*-best`` preset against their ``*-dense`` twin (same active parameters).

One process, interleaved (round-robin), the same random batch for every model: forward, loss, backward,
gradient clipping and the AdamW step, exactly as :func:`moe_course.train.train` does them. Reported: the
ratio of the fastest steps (MoE / dense), which other processes on a shared machine disturb least, plus the
medians; tokens/s; and, on CUDA, model FLOPs utilisation against the GPU's bf16 peak (looked up from the device
name in :data:`moe_course.metrics.PEAK_BF16_FLOPS`, or ``--peak-tflops``).

Target on a 2-core CPU: cpu-moe step <= 1.10x cpu-dense. On a GPU: gpu-moe tokens/s >= 0.85x gpu-dense.

    .venv/bin/python benchmarks/bench_model_step.py                     # cpu presets on the CPU
    .venv/bin/python benchmarks/bench_model_step.py --device cuda       # gpu presets, bf16 autocast
    .venv/bin/python benchmarks/bench_model_step.py --experts list      # the ModuleList layout, for comparison
    MOE_GROUPED_MM=off .venv/bin/python benchmarks/bench_model_step.py  # the per-expert loop instead of grouped_mm

RESULTS.md's run adds a profile of each preset by op category (``--profile 5``, :func:`profile_step`), other
expert layouts at the same active width (``--variants``, :func:`variant_configs`) and the presets widened
(``--widths 192,256``, :func:`widened_configs`):

    ATEN_CPU_CAPABILITY=avx2 .venv/bin/python benchmarks/bench_model_step.py --threads 1 --clock cpu \\
        --variants --profile 5 --widths 192,256 --json data/results/bench_model_step-cpu.json

:func:`measure_steps` does the measurement and returns what the command line prints (the GPU suite,
``benchmarks/gpu_suite.py``, calls it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from moe_course.device import pick_device, seed_everything
from moe_course.metrics import PEAK_BF16_FLOPS
from moe_course.model import ModelConfig, TinyLM
from moe_course.params import count_model, train_flops_per_token
from moe_course.timing import samples_many, synchronize
from moe_course.train import _autocast, get_preset, optimizer_kernel

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
KINDS = ("dense", "moe", "best")
CPU_TARGET = 1.10
"""Step time of cpu-moe and cpu-best over cpu-dense that the CPU layout aims for (one thread)."""
GPU_TARGET = 0.85
"""Tokens/s of gpu-moe and gpu-best over gpu-dense that the GPU path aims for (bf16, grouped_mm)."""


def train_step(model: TinyLM, x: torch.Tensor, y: torch.Tensor, amp: bool,
               sync: bool = True) -> Callable[[], torch.Tensor]:
    """One optimizer step of ``model`` on the batch (x, y), as the training loop does it; it returns the loss.

    ``sync=False`` leaves out the final ``synchronize()`` (to check that the step itself never waits for the GPU).
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), **optimizer_kernel(x.device))

    def step() -> torch.Tensor:
        with _autocast(x.device, amp):
            logits, _ = model(x)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)) + model.aux_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.after_step()
        if sync:
            synchronize()
        return loss.detach()

    return step


CATEGORIES = (  # (category, substrings of op names), first match wins
    ("grouped GEMM", ("_grouped_mm",)),
    ("attention", ("attention", "_flash_", "_efficient_")),
    ("GEMM", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("routing", ("softmax", "sigmoid", "topk", "gather", "logsumexp")),
    ("sort / count", ("sort", "bincount", "cumsum", "histc")),
    ("gather / scatter", ("index_select", "index_add", "aten::index", "index_put", "scatter", "embedding")),
    ("norms", ("rms_norm", "layer_norm")),
    ("optimizer", ("adam", "_foreach", "vector_norm", "clamp")),
    ("copies / casts", ("copy_", "_to_copy", "contiguous", "clone")),
)
"""Op categories of the profile breakdown, as ``(category, substrings of aten op names)``; the first match wins."""
IN_GROUPED = " (in _grouped_mm)"
"""Suffix of an op that ran inside ``aten::_grouped_mm``: on the CPU its per-expert ``aten::mm`` calls."""


def categorise(name: str) -> str:
    """The category of an aten op name (an op inside ``_grouped_mm`` counts as grouped GEMM)."""
    if name.endswith(IN_GROUPED):
        return "grouped GEMM"
    lower = name.lower()
    for category, keys in CATEGORIES:
        if any(key.lower() in lower for key in keys):
            return category
    return "elementwise / other"


def _inside_grouped_mm(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == "aten::_grouped_mm":
            return True
        parent = parent.cpu_parent
    return False


def profile_step(step: Callable[[], Any], device: torch.device, steps: int) -> dict[str, Any]:
    """Per-step self time of each category of ops, and the top ops, from ``torch.profiler`` over ``steps`` steps.

    On CUDA: device (kernel) time of each op. On the CPU: CPU self time, with the per-expert matrix multiplies
    that ``_grouped_mm`` runs there counted as grouped GEMM rather than as plain GEMM. The profiler's own
    overhead per op makes the CPU total larger than an unprofiled step, most for models with many small ops.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize()
    micros: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    if device.type == "cuda":
        for avg in prof.key_averages():
            if avg.device_type != DeviceType.CPU:
                continue  # kernel rows: their time is already in the op that launched them
            value = getattr(avg, "self_device_time_total", None)
            micros[avg.key] += value if value is not None else getattr(avg, "self_cuda_time_total", 0.0)
            calls[avg.key] += avg.count
    else:
        for event in prof.events():
            if event.device_type != DeviceType.CPU:
                continue
            name = event.name + (IN_GROUPED if _inside_grouped_mm(event) else "")
            micros[name] += event.self_cpu_time_total
            calls[name] += 1
    rows = sorted(((name, us / steps / 1e3, calls[name] / steps) for name, us in micros.items() if us),
                  key=lambda r: -r[1])
    by_category: Counter[str] = Counter()
    for name, ms, _ in rows:
        by_category[categorise(name)] += ms
    return {"clock": "device (CUDA kernels)" if device.type == "cuda" else "CPU", "steps": steps,
            "ms_per_step": sum(by_category.values()),
            "categories_ms": {k: round(v, 3) for k, v in by_category.most_common()},
            "top_ops": [{"op": n, "ms": round(ms, 3), "calls": round(c, 1)} for n, ms, c in rows[:15]]}


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU called ``device_name`` (``metrics.PEAK_BF16_FLOPS``), or None."""
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in device_name), None)


def preset_configs(size: str, experts: str = "grouped") -> dict[str, tuple[ModelConfig, int]]:
    """``{kind: (model config, batch size)}`` of the presets ``SIZE-dense``, ``SIZE-moe`` and ``SIZE-best``."""
    out = {}
    for kind in KINDS:
        preset = get_preset(f"{size}-{kind}")
        cfg = replace(preset.model, experts=experts) if kind != "dense" else preset.model
        out[kind] = (cfg, preset.train.batch_size)
    return out


def variant_configs(moe: ModelConfig) -> dict[str, ModelConfig]:
    """Other layouts of the ``moe`` preset at the same active expert width (``top_k · expert_hidden``).

    Half and twice the experts, top-1 with experts twice as wide, twice the experts at half the width with top-2k,
    and the ModuleList teaching layout: whether any of them is much closer to the dense twin's step time.
    """
    n, k, h = moe.n_experts, moe.top_k, moe.expert_hidden
    shapes = [(n // 2, k, h), (2 * n, k, h), (n, 1, k * h), (2 * n, 2 * k, h // 2)]
    out = {f"{e} experts, top-{top}, width {width}": replace(moe, n_experts=e, top_k=top, expert_hidden=width)
           for e, top, width in shapes if e >= top >= 1 and width >= 1}
    out[f"{n} experts, top-{k}, width {h}, ModuleList"] = replace(moe, experts="list")
    return out


def widened_configs(configs: Mapping[str, tuple[ModelConfig, int]], d_model: int) -> dict[str, tuple[ModelConfig, int]]:
    """The same presets at token width ``d_model``, every FFN and expert width scaled by the same factor.

    Dense and MoE keep equal active parameters per token, and layers, heads, tokens and expert counts stay; only
    the width grows, so the overhead of routing a token can be compared with the multiply-adds it buys.
    """
    out = {}
    for name, (cfg, batch_size) in configs.items():
        scale = (d_model * cfg.d_hidden, d_model * cfg.expert_hidden)
        if d_model % cfg.n_head or any(x % cfg.d_model for x in scale):
            raise ValueError(f"d_model={d_model} must be a multiple of n_head={cfg.n_head} and scale the widths "
                             f"of d_model={cfg.d_model} to whole numbers; try a multiple of {cfg.d_model // 2}")
        out[name] = (replace(cfg, d_model=d_model, d_hidden=scale[0] // cfg.d_model,
                             expert_hidden=scale[1] // cfg.d_model), batch_size)
    return out


def make_batch(cfg: ModelConfig, batch_size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A random (x, y) batch of token ids, the same for every model of one vocabulary and block size."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), generator=gen).to(device)
    y = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), generator=gen).to(device)
    return x, y


def measure_steps(
    configs: Mapping[str, tuple[ModelConfig, int]], device: torch.device, repeats: int, clock: str = "wall",
    amp: bool | None = None, peak_flops: float | None = None, warmup: int = 3, label: str = "",
    deadline: float | None = None,
) -> dict:
    """Time one training step of each model round-robin; return rows and ratios (the first model is the reference).

    ``configs``: ``{name: (ModelConfig, batch size)}``, the dense twin first. ``amp``: bf16 autocast (default:
    on CUDA). ``peak_flops``: the device's peak for MFU (default: from the device name; None where unknown,
    and on the CPU). The result is what ``--json`` writes: ``rows[name]`` with parameters, best and median ms,
    tokens/s, FLOPs per token and MFU; ``ratio_best`` / ``ratio_median`` (step time of the second model over
    the first) and ``recipe_ratio_*`` (the third over the first). ``deadline``: see
    :func:`moe_course.timing.samples_many`; ``repeats_done`` says how many rounds were timed.
    """
    amp = device.type == "cuda" if amp is None else amp
    seed_everything(0)
    models, steps, tokens = {}, {}, {}
    for name, (cfg, batch_size) in configs.items():
        model = TinyLM(cfg).to(device).train()
        x, y = make_batch(cfg, batch_size, device)
        models[name], steps[name], tokens[name] = model, train_step(model, x, y, amp), x.numel()
    samples = samples_many(steps, repeats=repeats, warmup=warmup, clock=CLOCKS[clock], deadline=deadline)
    best = {k: min(v) for k, v in samples.items()}
    median = {k: statistics.median(v) for k, v in samples.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    if peak_flops is None and device.type == "cuda":
        peak_flops = peak_bf16_flops(name)
    result = {"device": name, "torch": torch.__version__, "experts": label, "threads": torch.get_num_threads(),
              "clock": clock, "repeats": repeats, "repeats_done": len(next(iter(samples.values()))), "amp": amp,
              "peak_flops": peak_flops, "rows": {}}
    for kind, model in models.items():
        total, active = count_model(model)
        tps = tokens[kind] / best[kind]
        flops = train_flops_per_token(model)
        util = tps * flops / peak_flops if peak_flops and device.type == "cuda" else None
        result["rows"][kind] = {"active": active, "total": total, "tokens": tokens[kind], "best_ms": 1e3 * best[kind],
                                "median_ms": 1e3 * median[kind], "tokens_per_s": tps,
                                "tokens_per_s_median": tokens[kind] / median[kind], "flops_per_token": flops,
                                "mfu": util}
    names = list(models)
    if len(names) >= 2:
        result.update(ratio_best=best[names[1]] / best[names[0]], ratio_median=median[names[1]] / median[names[0]])
    if len(names) >= 3:
        result.update(recipe_ratio_best=best[names[2]] / best[names[0]],
                      recipe_ratio_median=median[names[2]] / median[names[0]])
    return result


def profile_presets(configs: Mapping[str, tuple[ModelConfig, int]], device: torch.device, steps: int,
                    amp: bool | None = None) -> dict[str, dict[str, Any]]:
    """:func:`profile_step` of each model's training step, on the same batch as :func:`measure_steps` uses."""
    amp = device.type == "cuda" if amp is None else amp
    out = {}
    for name, (cfg, batch_size) in configs.items():
        seed_everything(0)
        model = TinyLM(cfg).to(device).train()
        x, y = make_batch(cfg, batch_size, device)
        out[name] = profile_step(train_step(model, x, y, amp), device, steps)
    return out


def extra_time(profiles: Mapping[str, Mapping[str, Any]], reference: str = "dense") -> dict[str, dict[str, float]]:
    """``{model: {category: ms}}``: each model's profiled time per category minus the reference model's."""
    base = profiles[reference]["categories_ms"]
    return {name: {cat: prof["categories_ms"].get(cat, 0.0) - base.get(cat, 0.0)
                   for cat in dict.fromkeys([*prof["categories_ms"], *base])}
            for name, prof in profiles.items() if name != reference}


def format_result(result: dict, size: str) -> str:
    """The table and the two ratio lines the command line prints."""
    cpu = result["device"] == "cpu"
    lines = [f"device {result['device']}, {result['threads']} threads, torch {result['torch']}, "
             f"experts {result['experts']}",
             f"{'preset':<12} {'active':>10} {'total':>10} {'best ms':>9} {'median ms':>10} {'tokens/s':>10}"
             + ("" if cpu else "  MFU")]
    for kind, row in result["rows"].items():
        util = "" if cpu else ("  n/a" if row["mfu"] is None else f"  {row['mfu']:.1%}")
        lines.append(f"{size + '-' + kind:<12} {row['active']:>10,} {row['total']:>10,} {row['best_ms']:>9.1f} "
                     f"{row['median_ms']:>10.1f} {row['tokens_per_s']:>10,.0f}" + util)
    target = CPU_TARGET if cpu else 1 / GPU_TARGET
    for key, what in (("ratio", "moe"), ("recipe_ratio", "best")):
        ratio, ratio_median = result[f"{key}_best"], result[f"{key}_median"]
        lines.append(f"{what} / dense step time = {ratio:.2f} from the fastest steps (median {ratio_median:.2f}); "
                     f"target <= {target:.2f}: {'met' if ratio <= target else 'MISSED'}")
    for width, row in result.get("widths", {}).items():
        lines.append(f"  widened to d_model {width}: dense {row['dense_ms']:.1f} ms, "
                     f"moe / dense {row['ratio_best']:.2f}, best / dense {row['recipe_ratio_best']:.2f}")
    for name, row in result.get("variants", {}).items():
        lines.append(f"  variant {name:<36} {row['best_ms']:>7.1f} ms  {row['ratio_best']:.2f}x dense "
                     f"(median {row['ratio_median']:.2f})")
    if "profile" in result:
        extra = extra_time(result["profile"])
        for by_cat in extra.values():
            by_cat["all matrix multiplies"] = by_cat.get("GEMM", 0.0) + by_cat.get("grouped GEMM", 0.0)
        first = next(iter(extra.values()))
        lines.append(f"profile, ms per step ({result['profile']['dense']['clock']} self time), minus the dense twin:")
        for cat in sorted(first, key=lambda c: -abs(first[c])):
            lines.append(f"  {cat:<22}" + "".join(f" {name} {by_cat[cat]:+7.2f}" for name, by_cat in extra.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: pick_device())")
    parser.add_argument("--size", choices=["cpu", "gpu"], default=None, help="preset pair (default: by device)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--experts", choices=["grouped", "list"], default="grouped")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall-clock, or this process's CPU time (steadier on a shared machine; use --threads 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="bf16 dense peak of the GPU (default: from the device name, e.g. 989 for an H100 SXM)")
    parser.add_argument("--variants", action="store_true",
                        help="also time other expert layouts at the same active width (variant_configs)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile STEPS steps of each preset (torch.profiler): time per op category")
    parser.add_argument("--widths", default="", metavar="D,D,...",
                        help="also time the presets widened to these token widths (widened_configs), e.g. 192,256")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    size = args.size or ("gpu" if device.type == "cuda" else "cpu")
    repeats = args.repeats or (30 if device.type == "cuda" else 12)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    configs = preset_configs(size, args.experts)
    variants = variant_configs(configs["moe"][0]) if args.variants else {}
    batch = configs["moe"][1]
    result = measure_steps({**configs, **{name: (cfg, batch) for name, cfg in variants.items()}}, device, repeats,
                           args.clock, peak_flops=peak, label=args.experts)
    result["size"] = size
    if variants:
        dense = result["rows"]["dense"]
        rows = {name: result["rows"].pop(name) for name in variants}
        result["variants"] = {name: {**row, "ratio_best": row["best_ms"] / dense["best_ms"],
                                     "ratio_median": row["median_ms"] / dense["median_ms"]}
                              for name, row in rows.items()}
    if args.profile:
        result["profile"] = profile_presets(configs, device, args.profile)
    for width in [int(w) for w in args.widths.split(",") if w.strip()]:
        wide = measure_steps(widened_configs(configs, width), device, repeats, args.clock, peak_flops=peak)
        result.setdefault("widths", {})[str(width)] = {
            **{f"{kind}_ms": row["best_ms"] for kind, row in wide["rows"].items()},
            **{key: wide[key] for key in ("ratio_best", "ratio_median", "recipe_ratio_best", "recipe_ratio_median")}}
    print(format_result(result, size))
    print("(best: the recipe of notebook 08; its equal-time dense run trains this many times the steps)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
