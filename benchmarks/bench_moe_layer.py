"""Forward + backward wall time of one sparse MoE layer against a dense FFN and the soft mixture.

Compared (same d_model, same tokens):

* ``MoE``: 8 SwiGLU experts of width ``expert_hidden``, top-2 routing. "MoE grouped" is the package default
  (:class:`~moe_course.experts.GroupedExperts`, one grouped GEMM per projection); the teaching layouts follow:
  a ModuleList with dispatch "sorted", "loop" and "dense" (the last runs every expert on every token, then masks).
* a dense SwiGLU FFN with the same *active* width: ``d_hidden = top_k · expert_hidden``, so each token
  does the same multiply-adds in its FFN as in the sparse layer.
* ``SoftMixture``: all 8 experts on every token, softmax-weighted (4x the dense FLOPs for 8 experts, k=2).

Targets on a CPU: sparse (grouped) within 1.05x of dense at 4,096 tokens and 1.15x at 1,024 (``--quick``),
soft mixture at least 3.5x slower than sparse.

Run by hand (the GPU suite, ``benchmarks/gpu_suite.py``, calls :func:`measure_layers`):

    .venv/bin/python benchmarks/bench_moe_layer.py           # 4096 tokens, d_model 256, expert_hidden 512
    .venv/bin/python benchmarks/bench_moe_layer.py --quick   # a smaller, faster run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from moe_course.device import pick_device, seed_everything
from moe_course.experts import SwiGLU
from moe_course.moe import MoE, SoftMixture
from moe_course.timing import samples_many

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def step_fn(layer: nn.Module, x: torch.Tensor, amp: bool = False) -> Callable[[], None]:
    """One forward + backward pass of ``layer`` on ``x`` (gradients of x and of every weight).

    ``amp``: under CUDA bf16 autocast (the grouped_mm path of the GPU); the output is cast to fp32 for the loss.
    """
    probe = torch.randn_like(x)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            y = layer(x)
        (y.float() * probe).sum().backward()

    return step


LAYERS = ("dense FFN", "MoE grouped", "MoE sorted (list)", "MoE loop (list)", "MoE dense-dispatch", "soft mixture")


def build_layers(d: int, h: int, n: int, k: int, names: Sequence[str] = LAYERS) -> dict[str, nn.Module]:
    """The layers to compare (``names`` of :data:`LAYERS`); the MoE variants share router and expert weights."""
    unknown = [name for name in names if name not in LAYERS]
    if unknown:
        raise ValueError(f"unknown layers {unknown}; choose from {LAYERS}")
    makers = {
        "dense FFN": lambda: SwiGLU(d, k * h),
        "MoE grouped": lambda: MoE(d, h, n, k),
        "MoE sorted (list)": lambda: MoE(d, h, n, k, experts="list", dispatch="sorted"),
        "MoE loop (list)": lambda: MoE(d, h, n, k, experts="list", dispatch="loop"),
        "MoE dense-dispatch": lambda: MoE(d, h, n, k, experts="list", dispatch="dense"),
        "soft mixture": lambda: SoftMixture(d, h, n),
    }
    layers = {name: makers[name]() for name in LAYERS if name in names or name == "MoE grouped"}
    for name in ("MoE sorted (list)", "MoE loop (list)", "MoE dense-dispatch"):  # the same function, 4 ways
        if name in layers:
            layers[name].router.load_state_dict(layers["MoE grouped"].router.state_dict())
            layers[name].experts = layers["MoE grouped"].experts.to_experts()
    return {name: layers[name] for name in LAYERS if name in names}


def measure_layers(tokens: int, d: int, h: int, n: int, k: int, device: torch.device, repeats: int,
                   clock: str = "wall", amp: bool = False, names: Sequence[str] = LAYERS, warmup: int = 2,
                   deadline: float | None = None) -> dict:
    """Forward + backward time of each layer, round-robin; ``rows[name]`` holds median and fastest ms and the
    median over the dense FFN's (``x_dense``); ``sparse_vs_dense`` and ``soft_vs_sparse`` where both were run."""
    seed_everything(0)
    x = torch.randn(tokens, d, device=device, requires_grad=True)
    layers = build_layers(d, h, n, k, names)
    steps = {name: step_fn(layer.to(device), x, amp) for name, layer in layers.items()}
    samples = samples_many(steps, repeats=repeats, warmup=warmup, clock=CLOCKS[clock], deadline=deadline)
    median = {name: statistics.median(s) for name, s in samples.items()}
    best = {name: min(s) for name, s in samples.items()}
    ref = median.get("dense FFN")
    result = {"device": device.type, "threads": torch.get_num_threads(), "torch": torch.__version__, "tokens": tokens,
              "d_model": d, "expert_hidden": h, "n_experts": n, "top_k": k, "repeats": repeats,
              "repeats_done": len(next(iter(samples.values()))), "clock": clock,
              "amp": amp, "rows": {name: {"median_ms": 1e3 * median[name], "min_ms": 1e3 * best[name],
                                          "x_dense": median[name] / ref if ref else None} for name in median}}
    if "dense FFN" in median and "MoE grouped" in median:
        result["sparse_vs_dense"] = median["MoE grouped"] / median["dense FFN"]
        result["sparse_vs_dense_fastest"] = best["MoE grouped"] / best["dense FFN"]
    if "soft mixture" in median and "MoE grouped" in median:
        result["soft_vs_sparse"] = median["soft mixture"] / median["MoE grouped"]
        result["soft_vs_sparse_fastest"] = best["soft mixture"] / best["MoE grouped"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024 tokens and fewer repeats")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--expert-hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: pick_device())")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall-clock, or this process's CPU time (steadier on a shared machine; use --threads 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA: the grouped_mm path)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tokens = args.tokens or (1024 if args.quick else 4096)
    repeats = args.repeats or (5 if args.quick else 15)
    device = pick_device(args.device)
    d, h, n, k = args.d_model, args.expert_hidden, args.experts, args.top_k
    result = measure_layers(tokens, d, h, n, k, device, repeats, args.clock, amp=args.amp)
    rows = result["rows"]

    print(f"device {device.type}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{tokens} tokens, d_model {d}, {n} experts x SwiGLU({h}), top-{k}; dense FFN SwiGLU({k * h}); "
          f"forward + backward, median of {repeats}")
    print(f"{'layer':<20} {'ms':>9} {'min ms':>9} {'x dense':>8}")
    for name, row in rows.items():
        print(f"{name:<20} {row['median_ms']:>9.1f} {row['min_ms']:>9.1f} {row['x_dense']:>8.2f}")
    sparse_vs_dense, soft_vs_sparse = result["sparse_vs_dense"], result["soft_vs_sparse"]
    target = 1.15 if tokens <= 1024 else 1.05
    print(f"sparse / dense = {sparse_vs_dense:.2f}  (target <= {target}: "
          f"{'met' if sparse_vs_dense <= target else 'MISSED'}; "
          f"from the fastest runs {result['sparse_vs_dense_fastest']:.2f})")
    print(f"soft / sparse  = {soft_vs_sparse:.2f}  (target >= 3.5: {'met' if soft_vs_sparse >= 3.5 else 'MISSED'}; "
          f"from the fastest runs {result['soft_vs_sparse_fastest']:.2f})")
    if any(row["median_ms"] > 1.5 * row["min_ms"] for row in rows.values()):
        print("note: medians are far above the fastest runs, so other processes are competing for the CPU; "
              "rerun on a quiet machine or with --threads 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
