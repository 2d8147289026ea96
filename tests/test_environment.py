"""The set-up files agree with each other: pyproject, environment.yml, Makefile, README and CI."""

import os
import re
from pathlib import Path

import pytest
import tomllib
import torch
import yaml

from moe_course.device import environment_report, has_gpu, pick_device, seed_everything

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAME = {"torch": "pytorch-cpu"}  # pip name -> conda-forge name where they differ


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].strip().lower()


def _spec(requirement: str) -> str:
    return requirement[len(_name(requirement)):].strip()


def test_environment_yml_matches_pyproject_runtime_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "conda-forge" in env["channels"]
    conda = {_name(d): _spec(d) for d in env["dependencies"] if isinstance(d, str)}
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert pip_sections == [["-e ."]], "environment.yml must install the package itself with pip: -e ."
    runtime = {_name(d): _spec(d) for d in project["dependencies"]}
    for name, spec in runtime.items():
        conda_name = CONDA_NAME.get(name, name)
        assert conda_name in conda, f"{name} is a runtime dependency but missing from environment.yml"
        assert conda[conda_name] == spec, f"{name}: pyproject says {spec!r}, environment.yml {conda[conda_name]!r}"
    extra = set(conda) - {CONDA_NAME.get(n, n) for n in runtime} - {"python", "pip"}
    assert not extra, f"environment.yml has packages pyproject.toml does not: {extra}"
    py = project["requires-python"]
    assert conda["python"].startswith(py), f"python {conda['python']} vs requires-python {py}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make lab" in readme
    assert re.search(r"^make test$", ci, flags=re.MULTILINE)
    assert "torch==2.13.0" in ci, "CI must pin the local CPU wheel so it never downloads CUDA packages"


def test_makefile_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("lab:", "test:", "exercises:", "execute:"):
        assert f"\n{target}" in makefile


def test_pick_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.delenv("MOE_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device().type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device().type == "cpu"
    assert not has_gpu(torch.device("cpu"))


def test_pick_device_override_and_error(monkeypatch):
    monkeypatch.setenv("MOE_DEVICE", "cpu")
    assert pick_device().type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_seed_everything_makes_all_rngs_repeat():
    import random

    import numpy as np

    seed_everything(3)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(3)
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())


def test_environment_report(capsys):
    report = environment_report()
    out = capsys.readouterr().out
    assert report["all_ok"] is True
    assert "OK   torch" in out and "FAIL" not in out
    assert os.environ.get("MOE_DEVICE", report["device"]) == report["device"] or report["device"] == "cpu"
