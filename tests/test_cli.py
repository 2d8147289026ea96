"""`python -m moe_course.train`: every bad argument is a usage error (exit code 2, a message, no traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moe_course import train


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run main(argv), expect argparse's exit code 2, and return what it printed to stderr."""
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "argument --steps: must be a positive whole number, got 0"),
        (["--steps", "-5"], "argument --steps: must be a positive whole number, got -5"),
        (["--steps", "1.5"], "argument --steps: expected a whole number, got '1.5'"),
        (["--max-bytes", "0"], "argument --max-bytes: must be a positive whole number, got 0"),
        (["--max-bytes", "lots"], "argument --max-bytes: expected a whole number, got 'lots'"),
        (["--preset", "smoke", "--max-bytes", "100"], "preset smoke needs at least 330 bytes"),
        (["--preset", "huge"], "unknown preset 'huge'; available presets: cpu-dense, cpu-moe"),
        (["--device", "tpu"], "argument --device: unknown device 'tpu'; use cpu, cuda, cuda:N or mps"),
        (["--device", "meta"], "argument --device: unknown device 'meta'"),
        (["--device", ""], "argument --device: unknown device ''"),
        (["--steps"], "argument --steps: expected one argument"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    assert message in usage_error(argv, capsys)


def test_cuda_without_cuda_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = usage_error(["--device", "cuda"], capsys)
    assert "argument --device: device 'cuda' was requested but CUDA is not available; use 'cpu'" in err


def test_bad_moe_device_environment_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("MOE_DEVICE", "tpu")
    assert "argument --device:" in usage_error([], capsys)


def test_out_must_not_be_a_file(tmp_path, capsys):
    target = tmp_path / "checkpoint.pt"
    target.write_text("")
    assert "is a file; give a folder" in usage_error(["--out", str(target)], capsys)


def test_list_presets(capsys):
    assert train.main(["--list"]) == 0
    assert "smoke" in capsys.readouterr().out


def test_module_entry_point_gives_a_usage_error_without_a_traceback():
    run = subprocess.run([sys.executable, "-m", "moe_course.train", "--device", "tpu"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert "unknown device 'tpu'" in run.stderr and "Traceback" not in run.stderr
