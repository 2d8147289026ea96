"""Whole training steps of each ``*-moe`` and ``*-best`` preset against their ``*-dense`` twin (same active parameters).

One process, interleaved (round-robin), the same random batch for every model: forward, loss, backward,
gradient clipping and the AdamW step, exactly as :func:`moe_course.train.train` does them. Reported: the
ratio of the fastest steps (MoE / dense), which other processes on a shared machine disturb least, plus the
medians; tokens/s; and, on CUDA, model FLOPs utilisation against the GPU's bf16 peak (``--peak-tflops``).

Target on a 2-core CPU: cpu-moe step <= 1.15x cpu-dense. On a GPU: gpu-moe tokens/s >= 0.85x gpu-dense.

    .venv/bin/python benchmarks/bench_model_step.py                     # cpu presets on the CPU
    .venv/bin/python benchmarks/bench_model_step.py --device cuda       # gpu presets, bf16 autocast
    .venv/bin/python benchmarks/bench_model_step.py --experts list      # the ModuleList layout, for comparison
    MOE_GROUPED_MM=off .venv/bin/python benchmarks/bench_model_step.py  # the per-expert loop instead of grouped_mm
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from moe_course.device import pick_device, seed_everything
from moe_course.model import TinyLM
from moe_course.params import count_model, train_flops_per_token
from moe_course.timing import samples_many, synchronize
from moe_course.train import _autocast, get_preset, optimizer_kernel

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def train_step(model: TinyLM, x: torch.Tensor, y: torch.Tensor, amp: bool) -> Callable[[], None]:
    """One optimizer step of ``model`` on the batch (x, y), as the training loop does it."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), **optimizer_kernel(x.device))

    def step() -> None:
        with _autocast(x.device, amp):
            logits, _ = model(x)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)) + model.aux_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.after_step()
        synchronize()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: pick_device())")
    parser.add_argument("--size", choices=["cpu", "gpu"], default=None, help="preset pair (default: by device)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--experts", choices=["grouped", "list"], default="grouped")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall-clock, or this process's CPU time (steadier on a shared machine; use --threads 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the GPU (H100 SXM)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    size = args.size or ("gpu" if device.type == "cuda" else "cpu")
    repeats = args.repeats or (30 if device.type == "cuda" else 12)
    amp = device.type == "cuda"

    seed_everything(0)
    models, steps, tokens = {}, {}, 0
    kinds = ("dense", "moe", "best")
    for kind in kinds:
        preset = get_preset(f"{size}-{kind}")
        cfg = replace(preset.model, experts=args.experts) if kind != "dense" else preset.model
        model = TinyLM(cfg).to(device).train()
        gen = torch.Generator().manual_seed(0)
        b, t = preset.train.batch_size, cfg.block_size
        x = torch.randint(0, cfg.vocab_size, (b, t), generator=gen).to(device)
        y = torch.randint(0, cfg.vocab_size, (b, t), generator=gen).to(device)
        models[kind], steps[kind], tokens = model, train_step(model, x, y, amp), b * t
    samples = samples_many(steps, repeats=repeats, warmup=3, clock=CLOCKS[args.clock])

    best = {k: min(v) for k, v in samples.items()}
    median = {k: statistics.median(v) for k, v in samples.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}"
    print(f"device {name}, {torch.get_num_threads()} threads, torch {torch.__version__}, experts {args.experts}")
    print(f"{'preset':<12} {'active':>10} {'total':>10} {'best ms':>9} {'median ms':>10} {'tokens/s':>10}"
          + ("  MFU" if amp else ""))
    result = {"device": name, "torch": torch.__version__, "experts": args.experts, "size": size, "rows": {}}
    for kind in kinds:
        total, active = count_model(models[kind])
        tps = tokens / best[kind]
        mfu = tps * train_flops_per_token(models[kind]) / (args.peak_tflops * 1e12)
        print(f"{size + '-' + kind:<12} {active:>10,} {total:>10,} {1e3 * best[kind]:>9.1f} "
              f"{1e3 * median[kind]:>10.1f} {tps:>10,.0f}" + (f"  {mfu:.1%}" if amp else ""))
        result["rows"][kind] = {"active": active, "total": total, "best_ms": 1e3 * best[kind],
                                "median_ms": 1e3 * median[kind], "tokens_per_s": tps, "mfu": mfu if amp else None}
    ratio, ratio_median = best["moe"] / best["dense"], median["moe"] / median["dense"]
    target = 1.15 if device.type == "cpu" else 1 / 0.85
    print(f"moe / dense step time = {ratio:.2f} from the fastest steps (median {ratio_median:.2f}); "
          f"target <= {target:.2f}: {'met' if ratio <= target else 'MISSED'}")
    best_ratio, best_ratio_median = best["best"] / best["dense"], median["best"] / median["dense"]
    print(f"best / dense step time = {best_ratio:.2f} from the fastest steps (median {best_ratio_median:.2f}): "
          "the recipe of notebook 08 (its equal-time dense run trains this many times the steps)")
    result.update(ratio_best=ratio, ratio_median=ratio_median, recipe_ratio_best=best_ratio,
                  recipe_ratio_median=best_ratio_median)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
