"""Notebook 07's overlap measurement over many seeds: the EP layer's forward in micro-batches, exchanges blocking
or in flight while the previous micro-batch's experts compute, with the experts here or "elsewhere".

Each seed is its own launch of 2 gloo ranks (:func:`moe_course.parallel.overlap_seeds`), one thread each.
The stored file holds every seed's time per arm; the notebook reads it, prints the paired intervals and
re-runs 5 seeds live:

    ATEN_CPU_CAPABILITY=avx2 .venv/bin/python benchmarks/bench_overlap.py --seeds 20 \\
        --json data/results/bench_overlap-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from moe_course import parallel
from moe_course.metrics import paired_gaps

SETTING = {"d_model": 1024, "d_hidden": 128, "n_experts": 8, "top_k": 2}
"""The notebook's layer: wide rows and narrow experts, so the exchanges take about as long as the experts."""
TOKENS, CHUNKS = 2048, 4
PAIRS = (("one after another", "overlapped"),
         ("one after another, experts elsewhere", "overlapped, experts elsewhere"))
"""The comparisons the notebook makes: each schedule against its own blocking twin."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="launches, one per seed (default 20)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 for an interval (the protocol asks for 5)")
    if args.json is not None and not os.access(args.json.parent if args.json.parent.exists() else ".", os.W_OK):
        parser.error(f"--json {args.json}: its folder is not writable")
    start = time.perf_counter()
    result = parallel.overlap_seeds(SETTING, TOKENS, CHUNKS, range(args.seeds), progress=True)
    result.update(torch=torch.__version__, cpus=os.cpu_count(), python=platform.python_version(),
                  seconds=round(time.perf_counter() - start, 1))
    for a, b in PAIRS:
        gaps = paired_gaps([1e3 * r[a] for r in result["runs"]], [1e3 * r[b] for r in result["runs"]])
        print(gaps.verdict(a, b, unit="ms", digits=1))
    print(f"largest difference from the unsplit layer {result['max_diff']:.1e}; {result['seconds']} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
