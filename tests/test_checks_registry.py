"""Every exercise check is used by a notebook and tested against wrong answers; no check is left orphaned."""

import re
from pathlib import Path

import pytest

from moe_course import check

ROOT = Path(__file__).resolve().parents[1]
CHECKS = [name for name in check.__all__ if name != "CheckError"]
SOLUTIONS = "\n".join(p.read_text() for p in sorted((ROOT / "solutions").glob("*.ipynb")))
CHECK_TESTS = {p.name: p.read_text() for p in sorted((ROOT / "tests").glob("test_checks_*.py"))}


def test_there_are_checks():
    assert len(CHECKS) >= 10


@pytest.mark.parametrize("name", CHECKS)
def test_check_is_called_in_a_solution_notebook(name):
    assert re.search(rf"check\.{name}\(", SOLUTIONS), f"check.{name} is not used by any notebook in solutions/"


@pytest.mark.parametrize("name", CHECKS)
def test_check_has_tests_that_expect_rejections(name):
    files = [text for text in CHECK_TESTS.values() if re.search(rf"\b{name}\b", text)]
    assert files, f"no tests/test_checks_*.py mentions check {name}"
    assert any("CheckError" in text for text in files), f"the tests of {name} never expect a CheckError"
