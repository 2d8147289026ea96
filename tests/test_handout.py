"""make handout: the learners' zip holds the exercise notebooks and the package, never the solutions."""

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from moe_course.course import handout

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("make") is None, reason="needs git and make")
def test_handout_has_no_solutions_and_its_readme_sends_nobody_there():
    subprocess.run(["make", "-s", "handout"], cwd=ROOT, check=True, capture_output=True)
    with zipfile.ZipFile(ROOT / "handout" / "moe-from-scratch.zip") as zf:
        names = zf.namelist()
        readme = zf.read("moe-from-scratch/README.md").decode()
    assert not [n for n in names if n.startswith("moe-from-scratch/solutions/")]
    assert "moe-from-scratch/notebooks/00_welcome.ipynb" in names
    assert "moe-from-scratch/moe_course/__init__.py" in names and "moe-from-scratch/Makefile" in names
    assert any(n.startswith("moe-from-scratch/data/corpus/") for n in names)
    start = readme[readme.index("## Start"):readme.index("## The notebooks")]
    assert "`solutions/`" not in start and "make test" not in start
    assert "your instructor has the solved notebooks" in start


def test_handout_readme_names_a_stale_sentence():
    with pytest.raises(ValueError, match="README_CHANGES"):
        handout.handout_readme("a README without the sentences")
    with pytest.raises(TypeError, match="text"):
        handout.handout_readme(b"bytes")
    assert "solutions/" not in handout.handout_readme((ROOT / "README.md").read_text()).split("## The package")[0]


def test_handout_refuses_a_folder_as_output(tmp_path):
    with pytest.raises(ValueError, match="out must be a file path"):
        handout.build(tmp_path, ROOT)
    with pytest.raises(FileNotFoundError, match="not a git checkout"):
        handout.build(tmp_path / "x.zip", tmp_path)
