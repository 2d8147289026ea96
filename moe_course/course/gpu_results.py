"""The GPU figures: notebook 08's capstone trained at GPU size by ``benchmarks/gpu_suite.py``, read back.

The suite trains the dense twin, the top-2 MoE and the recipe (presets ``gpu-dense``, ``gpu-moe``,
``gpu-best``) seed by seed and writes ``capstone-gpu.json``, an :class:`~moe_course.experiments.ExperimentResult`
like every stored result; copied into ``data/results/`` it is what ``load_result("capstone", "gpu")`` reads.
Each record's ``extra`` adds the GPU's name, the training FLOPs per token and the MFU of the run (tokens/s of the
whole run, evaluation included, against the device's bf16 peak), plus the suite's benchmark of one training step
(``bench_tokens_per_s``, ``bench_mfu``).

:func:`load_gpu_capstone` returns None until a GPU has produced the file; :func:`gpu_summary` and
:func:`format_gpu_summary` give one row per model (mean ± sample std over seeds)::

    python -m moe_course.course.gpu_results          # the table, or a note that no GPU result is stored yet
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moe_course.experiments import ExperimentResult, load_result, result_path
from moe_course.metrics import mean_std

__all__ = ["format_gpu_summary", "gpu_summary", "load_gpu_capstone", "main"]

DENSE_LABEL = "dense"
"""The run of the capstone that every ratio divides by."""


def load_gpu_capstone(results_dir: str | Path | None = None, size: str = "gpu") -> ExperimentResult | None:
    """The stored GPU capstone (``data/results/capstone-gpu.json``), or None when no GPU has produced it yet.

    A file that the current configurations would not produce raises
    :class:`~moe_course.experiments.StaleResultError`, as :func:`~moe_course.experiments.load_result` does.
    ``size`` exists for the tests (the suite writes ``capstone-smoke.json`` at smoke size on the CPU).
    """
    if not result_path("capstone", size, results_dir).exists():
        return None
    return load_result("capstone", size, results_dir)


def _mean(values: Sequence[float | None]) -> float | None:
    numbers = [v for v in values if v is not None and math.isfinite(v)]
    return sum(numbers) / len(numbers) if numbers else None


def gpu_summary(result: ExperimentResult) -> list[dict[str, Any]]:
    """One row per model: seeds, final validation loss (mean, sample std), tokens/s and its ratio to the dense
    twin, MFU, the benchmarked step's tokens/s and MFU (None where not recorded), and the device name."""
    rows = []
    dense = None
    for label in result.labels:
        records = result.records_of(label)
        loss, std = mean_std([r.final["val_loss"] for r in records])
        tps = _mean([r.tokens_per_s for r in records])
        row = {
            "label": label, "seeds": [r.seed for r in records], "val_loss": loss, "val_loss_std": std,
            "tokens_per_s": tps, "mfu": _mean([r.extra.get("mfu") for r in records]),
            "bench_tokens_per_s": _mean([r.extra.get("bench_tokens_per_s") for r in records]),
            "bench_mfu": _mean([r.extra.get("bench_mfu") for r in records]),
            "device": next((r.extra["device_name"] for r in records if r.extra.get("device_name")), result.device),
        }
        if label == DENSE_LABEL:
            dense = row
        rows.append(row)
    for row in rows:
        for key in ("tokens_per_s", "bench_tokens_per_s"):
            base = dense[key] if dense else None
            row[f"{key}_vs_dense"] = row[key] / base if base and row[key] is not None else None
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_gpu_summary(result: ExperimentResult) -> str:
    """A Markdown table of :func:`gpu_summary` (the README's GPU section), with the device and the seeds."""
    rows = gpu_summary(result)
    device = rows[0]["device"] if rows else result.device
    lines = [f"Capstone at GPU size on {device}, seeds {result.seeds} (torch {result.torch_version}):", "",
             "| model | val loss (mean ± std) | tokens/s (run) | × dense | MFU (run) | tokens/s (step bench) "
             "| × dense | MFU (step bench) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = _fmt(r["val_loss"], ".4f") + ("" if math.isnan(r["val_loss_std"]) else f" ± {r['val_loss_std']:.4f}")
        lines.append(f"| {r['label']} | {loss} | {_fmt(r['tokens_per_s'], ',.0f')} | "
                     f"{_fmt(r['tokens_per_s_vs_dense'], '.2f')} | {_fmt(r['mfu'], '.1%')} | "
                     f"{_fmt(r['bench_tokens_per_s'], ',.0f')} | {_fmt(r['bench_tokens_per_s_vs_dense'], '.2f')} | "
                     f"{_fmt(r['bench_mfu'], '.1%')} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the stored GPU capstone's table, or say that none is stored yet."""
    args = list(sys.argv[1:] if argv is None else argv)
    result = load_gpu_capstone(args[0] if args else None)
    if result is None:
        print("no GPU capstone stored yet: run `PYTHONPATH=. python benchmarks/gpu_suite.py --out gpu-out` on a GPU "
              "machine and copy gpu-out/capstone-gpu.json to data/results/")
        return 0
    print(format_gpu_summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
