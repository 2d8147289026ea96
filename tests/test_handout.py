"""make handout: the learners' zip holds the exercise notebooks and the package, never the solutions."""

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("make") is None, reason="needs git and make")
def test_handout_has_no_solutions():
    subprocess.run(["make", "-s", "handout"], cwd=ROOT, check=True, capture_output=True)
    names = zipfile.ZipFile(ROOT / "handout" / "moe-from-scratch.zip").namelist()
    assert not [n for n in names if n.startswith("moe-from-scratch/solutions/")]
    assert "moe-from-scratch/notebooks/00_welcome.ipynb" in names
    assert "moe-from-scratch/moe_course/__init__.py" in names and "moe-from-scratch/Makefile" in names
    assert any(n.startswith("moe-from-scratch/data/corpus/") for n in names)
