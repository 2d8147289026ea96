"""The GPU suite (benchmarks/gpu_suite.py) at smoke size on the CPU, so that it cannot rot between GPU runs.

One run of the whole suite, the way the GPU machine runs it: from another directory, with only the checkout
on the path (``python -I -S``: no installed copy of the package, no PYTHONPATH) and without tqdm. Then: every
stage's file is there and well-formed, the capstone file is a result ``load_result`` accepts, the log has a
timestamped line per stage, and a spent budget stops the suite before the benchmarks and the capstone.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_course.experts import HAS_GROUPED_MM

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
SITES = sorted({str(Path(m.__file__).resolve().parents[1]) for m in (torch, np)})  # not the checkout

BOOT = """
import importlib.util, runpy, sys
sys.path.extend({sites!r})
assert importlib.util.find_spec("moe_course") is None, "moe_course importable without the checkout"
sys.modules["tqdm"] = None  # as if tqdm were not installed
sys.argv = [{suite!r}, *{args!r}]
runpy.run_path({suite!r}, run_name="__main__")
"""
FILES = {"environment.json", "correctness.json", "bench.json", "profile.json", "capstone-smoke.json", "suite.log"}


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The whole suite at smoke size, run once for the tests of this module."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    out = cwd / "out"
    args = ["--out", str(out), "--size", "smoke", "--device", "cpu", "--threads", "1", "--max-seeds", "2"]
    boot = BOOT.format(sites=SITES, suite=str(SUITE), args=args)
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", boot], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    return out, proc


def _json(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text(encoding="utf-8"))


def test_suite_runs_from_a_bare_checkout_and_writes_every_file(suite_run):
    out, proc = suite_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert files == FILES and len(files) <= 8
    env = _json(out, "environment.json")
    assert env["package"]["path"] == str(ROOT / "moe_course")  # the checkout, not an installed copy
    assert env["tqdm_stand_in"] is True
    if HAS_GROUPED_MM:
        assert env["grouped_mm"]["exists"] and env["grouped_mm"]["runs"] and env["grouped_mm"]["max_rel_err"] < 1e-5
    else:  # an older torch (2.4): recorded as absent, and the package says it falls back
        assert env["grouped_mm"]["exists"] is False and env["grouped_mm"]["package_uses_it"] is False
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["cpu_count"] >= 1
    assert env["peak_bf16_tflops"] is None and len(env["source_sha256"]) == 16


def test_correctness_checks_all_pass_on_the_cpu(suite_run):
    out, _ = suite_run
    result = _json(out, "correctness.json")
    checks = result["checks"]
    assert set(checks) == {"grouped_experts_vs_loop", "moe_layer_vs_list", "training_steps", "sync_free_step",
                           "expert_parallel_one_rank"}
    assert result["ok"] and all(c["ok"] for c in checks.values()), json.dumps(checks, indent=1)[:3000]
    assert checks["grouped_experts_vs_loop"]["grouped_mm_used"] is HAS_GROUPED_MM
    assert max(checks["grouped_experts_vs_loop"]["errors"].values()) <= 1e-5
    assert checks["grouped_experts_vs_loop"]["counts"][-1] == 0  # an empty expert is part of the check
    assert set(checks["training_steps"]["models"]) == {"dense", "moe", "best"}
    assert checks["sync_free_step"]["skipped"].startswith("CUDA only")
    assert checks["expert_parallel_one_rank"]["backend"] == "gloo"


def test_bench_and_profile_are_well_formed(suite_run):
    out, _ = suite_run
    bench = _json(out, "bench.json")
    rows = bench["model_step"]["rows"]
    assert set(rows) == {"dense", "moe", "best"}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["best_ms"] > 0 and row["flops_per_token"] > 0
        assert row["mfu"] is None  # no bf16 peak for a CPU
    assert rows["dense"]["tokens_per_s_vs_dense"] == 1.0
    assert bench["model_step"]["ratio_best"] > 0 and bench["model_step"]["recipe_ratio_best"] > 0
    assert bench["layer"]["sparse_vs_dense"] > 0 and "MoE grouped" in bench["layer"]["rows"]
    assert bench["layer"]["grouped_mm_used"] is HAS_GROUPED_MM
    profile = _json(out, "profile.json")
    for model in profile["models"].values():
        assert model["ms_per_step"] > 0 and model["top_ops"]
        assert "GEMM" in model["categories_ms"]
    # the per-expert multiplies inside grouped_mm have their own category; without grouped_mm they are plain GEMMs
    assert ("grouped GEMM" in profile["models"]["moe"]["categories_ms"]) is HAS_GROUPED_MM


def test_capstone_file_is_a_result_the_loader_reads_seed_interleaved(suite_run):
    from moe_course.course.gpu_results import format_gpu_summary, gpu_summary, load_gpu_capstone
    from moe_course.experiments import load_result
    from moe_course.experiments.capstone import CAPSTONE_LABELS

    out, _ = suite_run
    result = load_result("capstone", "smoke", results_dir=out)
    assert result.seeds == [0, 1]
    n_runs = len(result.labels)
    assert [r.seed for r in result.records] == [0] * n_runs + [1] * n_runs  # whole seeds, one after the other
    for record in result.records:
        assert record.extra["device_name"].startswith("cpu") and record.extra["mfu"] is None
        assert record.extra["train_flops_per_token"] > 0
    assert "gpu_suite.py" in result.command
    loaded = load_gpu_capstone(out, size="smoke")
    assert loaded is not None and loaded.seeds == [0, 1]
    rows = {row["label"]: row for row in gpu_summary(loaded)}
    assert set(CAPSTONE_LABELS) <= set(rows)
    assert rows["dense"]["tokens_per_s_vs_dense"] == 1.0 and rows["MoE top-2"]["bench_tokens_per_s"] > 0
    assert rows["dense"]["seeds"] == [0, 1] and rows["dense"]["val_loss_std"] >= 0
    table = format_gpu_summary(loaded)
    assert "| MoE recipe |" in table and "seeds [0, 1]" in table


def test_log_has_a_timestamped_line_per_stage(suite_run):
    out, proc = suite_run
    log = (out / "suite.log").read_text(encoding="utf-8").splitlines()
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \+\s*\d+\.\ds ")
    assert all(stamp.match(line) for line in log if line and not line.startswith((" ", "Traceback")))
    text = "\n".join(log)
    for number, stage in enumerate(("environment", "correctness", "bench", "capstone"), start=1):
        assert f"stage {number} ({stage}) starts" in text and f"stage {number} ({stage}) done" in text
    assert "all checks passed" in text
    assert re.search(r"suite done in \d+ s", text)  # its duration is logged, not asserted (no wall-clock bounds)


def test_a_spent_budget_stops_before_the_benchmarks_and_the_capstone(tmp_path):
    sys.path.insert(0, str(SUITE.parent))
    import gpu_suite

    assert gpu_suite.main(["--out", str(tmp_path), "--size", "smoke", "--device", "cpu", "--budget-s", "0"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"environment.json", "correctness.json", "suite.log"}
    log = (tmp_path / "suite.log").read_text(encoding="utf-8")
    assert "budget spent" in log and "stopping before stage 3 (bench) and stage 4 (capstone)" in log


def test_the_bench_stage_stops_its_repeats_at_the_budget(tmp_path):
    sys.path.insert(0, str(SUITE.parent))
    import gpu_suite

    suite = gpu_suite.Suite(tmp_path, budget_s=1e-3, size="smoke", device=torch.device("cpu"))  # spent at once
    result = gpu_suite.stage_bench(suite)
    assert suite.settings["bench_repeats"] > 1 and result["model_step"]["repeats_done"] == 1  # one whole round
    assert "layer" not in result and not (tmp_path / "profile.json").exists()
    assert "budget spent: the layer benchmark and the profile are skipped" in (tmp_path / "suite.log").read_text(
        encoding="utf-8")


def test_the_capstone_stops_before_a_seed_that_would_not_fit(tmp_path):
    sys.path.insert(0, str(SUITE.parent))
    import gpu_suite

    suite = gpu_suite.Suite(tmp_path, budget_s=30.0, size="smoke", device=torch.device("cpu"))
    slow = {"best_ms": 1e5}  # 100 s a step: one seed of six steps per model cannot fit into 30 s
    suite.bench = {"model_step": {"rows": {"dense": slow, "moe": slow, "best": slow}}}
    summary = gpu_suite.stage_capstone(suite)
    assert summary["seeds_done"] == [] and summary["stopped"] == "budget spent before the first seed"
    assert not (tmp_path / "capstone-smoke.json").exists()
    assert "stopping before the capstone" in (tmp_path / "suite.log").read_text(encoding="utf-8")


def test_profile_categories_and_the_tqdm_stand_in(monkeypatch):
    sys.path.insert(0, str(SUITE.parent))
    import gpu_suite
    from bench_model_step import IN_GROUPED, categorise

    assert categorise("aten::_grouped_mm") == "grouped GEMM"
    assert categorise("aten::mm") == "GEMM"
    assert categorise("aten::mm" + IN_GROUPED) == "grouped GEMM"  # a per-expert multiply of the CPU's grouped_mm
    assert categorise("aten::item" + IN_GROUPED) == "grouped GEMM"  # and its bookkeeping
    assert categorise("aten::topk") == "routing"
    assert categorise("aten::index_add_") == "gather / scatter"
    assert categorise("aten::argsort") == "sort / count"
    assert categorise("aten::_fused_adamw_") == "optimizer"
    assert categorise("aten::mul") == "elementwise / other"
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.delitem(sys.modules, "tqdm.auto", raising=False)
    assert gpu_suite.ensure_tqdm() is True
    bar = sys.modules["tqdm.auto"].tqdm(range(3), desc="x", disable=False, total=3)
    bar.set_postfix(a=1)
    bar.update()
    assert list(bar) == [0, 1, 2]  # monkeypatch puts the real tqdm back afterwards


def test_no_gpu_capstone_is_none(tmp_path):
    from moe_course.course.gpu_results import load_gpu_capstone, main

    assert load_gpu_capstone(tmp_path) is None
    assert main([str(tmp_path)]) == 0


def test_bench_command_lines_still_work(tmp_path, capsys):
    sys.path.insert(0, str(SUITE.parent))
    import bench_moe_layer

    assert bench_moe_layer.main(["--tokens", "64", "--d-model", "16", "--expert-hidden", "16", "--experts", "4",
                                 "--repeats", "1", "--device", "cpu", "--threads", "1"]) == 0
    assert "sparse / dense" in capsys.readouterr().out


def test_the_sync_check_records_where_a_step_would_wait(monkeypatch):
    """The CUDA-only check, run on the CPU: a stand-in sync-debug switch and a warning planted in the dispatch."""
    import warnings

    sys.path.insert(0, str(SUITE.parent))
    import gpu_suite

    from moe_course import dispatch, routing

    mode = {"now": 0}
    count = dispatch.count_per_expert

    def noisy_count(ids, n):
        if mode["now"] == "warn":
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        return count(ids, n)

    monkeypatch.setattr(dispatch, "count_per_expert", noisy_count)  # sort_by_expert's count
    monkeypatch.setattr(routing, "count_per_expert", noisy_count)  # Routing.counts: the recipe's bias update
    result = gpu_suite.check_sync_free(torch.device("cpu"), "smoke", 2, set_mode=lambda m: mode.update(now=m))
    assert mode["now"] == 0  # switched back off
    models = result["models"]
    assert models["dense"]["sync_free"] and models["dense"]["syncs"] == 0
    for kind, syncs in (("moe", 1), ("best", 2)):  # one MoE layer each; the recipe also counts for its bias
        assert not models[kind]["sync_free"] and models[kind]["syncs"] == syncs
        assert any("dispatch.py" in frame for frame in models[kind]["first"][0]["stack"])
    assert result["ok"] is False
