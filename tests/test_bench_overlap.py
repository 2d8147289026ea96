"""The overlap benchmark (benchmarks/bench_overlap.py) and the result notebook 07 reads from it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_overlap as bench  # noqa: E402

from moe_course.parallel import OVERLAP_ARMS  # noqa: E402

STORED = ROOT / "data" / "results" / "bench_overlap-cpu.json"


def test_the_stored_result_is_the_benchmark_s_setting_with_every_arm_and_seed():
    stored = json.loads(STORED.read_text())
    assert stored["moe"] == bench.SETTING
    assert (stored["tokens_per_rank"], stored["chunks"], stored["world"]) == (bench.TOKENS, bench.CHUNKS, 2)
    assert len(stored["runs"]) == len(stored["seeds"]) >= 5  # the protocol's minimum of paired seeds
    for run in stored["runs"]:
        assert list(run) == list(OVERLAP_ARMS) and all(0 < s < 10 for s in run.values())
    assert stored["max_diff"] <= 1e-5


def test_the_command_line_writes_its_runs_and_prints_both_verdicts(tmp_path, capsys):
    out = tmp_path / "overlap.json"
    assert bench.main(["--seeds", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["seeds"] == [0, 1] and len(result["runs"]) == 2 and result["moe"] == bench.SETTING
    printed = capsys.readouterr().out
    assert all(f"{a} − {b}" in printed for a, b in bench.PAIRS)


def test_the_command_line_refuses_fewer_than_two_seeds_before_running():
    with pytest.raises(SystemExit):
        bench.main(["--seeds", "1"])
