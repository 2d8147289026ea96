"""The set-up files agree with each other: pyproject, environment.yml, Makefile, README and CI."""

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the dev extra installs tomli (never skip these tests for want of it)
    import tomli as tomllib

from moe_course.device import environment_report, has_gpu, pick_device, seed_everything

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAME = {"torch": "pytorch-cpu"}  # pip name -> conda-forge name where they differ


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].strip().lower()


def _spec(requirement: str) -> str:
    return requirement[len(_name(requirement)):].strip()


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _conda(path: Path) -> tuple[dict[str, str], list[list[str]], dict]:
    """(conda package -> version spec, pip sections, the whole file) of a conda environment file."""
    env = yaml.safe_load(path.read_text())
    conda = {_name(d): _spec(d) for d in env["dependencies"] if isinstance(d, str)}
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    return conda, pip_sections, env


def test_core_dependencies_leave_colabs_jupyter_alone():
    project = _project()
    core = {_name(d): _spec(d) for d in project["dependencies"]}
    lab = {_name(d): _spec(d) for d in project["optional-dependencies"]["lab"]}
    dev = {_name(d) for d in project["optional-dependencies"]["dev"]}
    jupyter_stack = {"jupyterlab", "notebook", "jupyter", "jupyter-server", "ipykernel", "jupyterlab-widgets"}
    assert not jupyter_stack & set(core), "the Colab install must not pull a Jupyter server or kernel"
    assert "jupyterlab" in lab and "playwright" in dev
    assert core["ipywidgets"] == ">=7.7", "Colab ships ipywidgets 7.7; the widgets are tested against it"
    assert lab["ipywidgets"] == ">=8.0", "JupyterLab 4 renders only ipywidgets 8"


def test_dev_extra_brings_a_toml_reader_to_python_3_10():
    dev = _project()["optional-dependencies"]["dev"]
    assert "tomli>=2.0; python_version < '3.11'" in dev


def test_conda_environment_says_it_is_cpu_only():
    for path in (ROOT / "environment.yml", ROOT / "binder" / "environment.yml"):
        text = path.read_text()
        assert "CPU-only" in text.split("name:")[0], f"{path.name}: the header comment must say it is CPU-only"
        assert "pytorch-cpu" in _conda(path)[0]


def test_environment_yml_matches_pyproject_dependencies_and_lab_extra():
    project = _project()
    conda, pip_sections, env = _conda(ROOT / "environment.yml")
    assert "conda-forge" in env["channels"]
    assert pip_sections == [["-e ."]], "environment.yml must install the package itself with pip: -e ."
    wanted = {_name(d): _spec(d) for d in project["dependencies"]}
    wanted.update({_name(d): _spec(d) for d in project["optional-dependencies"]["lab"]})  # the lab's pins win
    for name, spec in wanted.items():
        conda_name = CONDA_NAME.get(name, name)
        assert conda_name in conda, f"{name} is a dependency (core or lab) but missing from environment.yml"
        assert conda[conda_name] == spec, f"{name}: pyproject says {spec!r}, environment.yml {conda[conda_name]!r}"
    extra = set(conda) - {CONDA_NAME.get(n, n) for n in wanted} - {"python", "pip"}
    assert not extra, f"environment.yml has packages pyproject.toml does not: {extra}"
    py = project["requires-python"]
    assert conda["python"].startswith(py), f"python {conda['python']} vs requires-python {py}"


def test_binder_environment_is_the_conda_one_with_python_pinned():
    conda, _, env = _conda(ROOT / "environment.yml")
    binder, binder_pip, binder_env = _conda(ROOT / "binder" / "environment.yml")
    assert binder_env["channels"] == env["channels"]
    assert {k: v for k, v in binder.items() if k != "python"} == {k: v for k, v in conda.items() if k != "python"}
    # repo2docker reads the Python version only from an exact pin; it must lie in the supported range
    match = re.fullmatch(r"=(3)\.(\d+)", binder["python"])
    assert match, f"binder/environment.yml must pin python=3.X, got python{binder['python']}"
    low, high = (int(v) for v in re.findall(r"3\.(\d+)", conda["python"]))
    assert low <= int(match.group(2)) < high
    assert binder_pip == [], "on Binder the repository is not there yet when the environment is built"
    assert "pytorch-cpu" in binder, "Binder must install the CPU build of PyTorch"


def test_binder_post_build_installs_the_package_without_dependencies():
    post_build = ROOT / "binder" / "postBuild"
    text = post_build.read_text()
    assert os.access(post_build, os.X_OK) and text.startswith("#!/bin/bash\n") and "set -euo pipefail" in text
    assert re.search(r"^python -m pip install .*--no-deps -e \.$", text, flags=re.MULTILINE)
    assert "torch.version.cuda is None" in text
    assert 'cp jupyter-settings/overrides.json "$settings/overrides.json"' in text
    overrides = json.loads((ROOT / "jupyter-settings" / "overrides.json").read_text())
    assert overrides["@jupyterlab/apputils-extension:notification"] == {"fetchNews": "false", "checkForUpdates": False}


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make lab" in readme
    assert re.search(r"^make test$", ci, flags=re.MULTILINE)
    assert "torch==2.13.0" in ci, "CI must pin the local CPU wheel so it never downloads CUDA packages"


def test_ci_tests_the_oldest_torch_the_package_admits_and_a_recent_one():
    ci = (ROOT / ".ci" / "run").read_text()
    versions = re.search(r"^for version in ([\d. ]+); do\n\s+make test-torch TORCH=\"\$version\"", ci, re.MULTILINE)
    assert versions, "CI must run `make test-torch` for the supported torch range"
    tested = versions.group(1).split()
    floor = next(_spec(r) for r in _project()["dependencies"] if _name(r) == "torch")
    assert floor == f">={tested[0]}", f"pyproject admits torch{floor} but CI tests {tested[0]} as the oldest"
    for path in (ROOT / "environment.yml", ROOT / "binder" / "environment.yml"):
        assert f"pytorch-cpu>={tested[0]}" in path.read_text(), f"{path.name} states another torch floor"
    as_tuple = [tuple(int(p) for p in v.split(".")) for v in tested]
    assert len(tested) == 2 and as_tuple[1] > (2, 13, 0) > as_tuple[0], "test one release on each side of the pin"


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


@pytest.mark.parametrize("bad", ["tpu", "gpu", "xla"])
def test_pick_device_names_the_bad_device(bad, monkeypatch):
    monkeypatch.delenv("MOE_DEVICE", raising=False)
    with pytest.raises(ValueError, match=rf"prefer='{bad}'.*'cpu', 'cuda' \(or 'cuda:N'\) or 'mps'"):
        pick_device(bad)
    monkeypatch.setenv("MOE_DEVICE", bad)
    with pytest.raises(ValueError, match=rf"MOE_DEVICE='{bad}'"):
        pick_device()


def test_pin_threads_sets_the_cpu_count_returns_the_old_one_and_leaves_other_devices():
    from moe_course.device import pin_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert pin_threads(torch.device("cpu")) == 2 and torch.get_num_threads() == 1
        assert pin_threads(torch.device("cpu"), 2) == 1 and torch.get_num_threads() == 2
        assert pin_threads(torch.device("meta")) == 2 and torch.get_num_threads() == 2  # not the CPU: untouched
        for bad in (0, -1, 1.5, True, "1"):
            with pytest.raises(ValueError, match="threads must be a positive int"):
                pin_threads(torch.device("cpu"), bad)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
