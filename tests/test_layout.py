"""The README's package tables and CONTRIBUTING.md's recipes match the package's tree."""

from __future__ import annotations

import re
from pathlib import Path

import moe_course

PACKAGE = Path(moe_course.__file__).resolve().parent
ROOT = PACKAGE.parent
SUBPACKAGES = ("plots", "experiments", "course")


def _package_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text[text.index("## The package"):text.index("### Training from the command line")]


def tree_names() -> set[str]:
    """Every module as the README names it: ``routing``, ``plots.style``, ``experiments.runner``, ``course.links``."""
    names = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"} | {"check"}
    for sub in SUBPACKAGES:
        names |= {f"{sub}.{p.stem}" for p in (PACKAGE / sub).glob("*.py") if not p.stem.startswith("__")}
    return names


def readme_names(section: str) -> set[str]:
    """The backticked module names in the package section (first column of the tables, and the experiments)."""
    names = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([a-z_.]+)`", line.split("|")[1]))
    names |= set(re.findall(r"`(experiments\.[a-z_]+)`", section))
    if "`runner`" in section:
        names.add("experiments.runner")
    return names


def test_readme_names_every_module_of_the_tree_and_no_other():
    section = _package_section()
    named, tree = readme_names(section), tree_names()
    assert tree - named == set(), f"README's package tables do not name {sorted(tree - named)}"
    assert named - tree == set(), f"README's package tables name modules that do not exist: {sorted(named - tree)}"


def test_readme_names_finds_a_missing_module():
    section = _package_section().replace("| `capstone` |", "| `capstone_gone` |")
    assert "capstone" not in readme_names(section) and "capstone_gone" in readme_names(section)


def test_contributing_paths_exist():
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"`(moe_course/[A-Za-z_/]+\.py)`", text))
    assert {"moe_course/experiments/fine_grained.py", "moe_course/experiments/__init__.py",
            "moe_course/course/course_table.py"} <= paths
    missing = sorted(p for p in paths if "<" not in p and not (ROOT / p).is_file())
    assert not missing, f"CONTRIBUTING.md names files that do not exist: {missing}"


def test_cli_names_in_the_docs_are_importable_modules():
    """Every ``python -m moe_course...`` in the docs and the Makefile names a module that exists."""
    import importlib.util

    for doc in ("README.md", "CONTRIBUTING.md", "INSTRUCTORS.md", "RESULTS.md", "Makefile"):
        for name in set(re.findall(r"python -m (moe_course[a-z_.]*)", (ROOT / doc).read_text(encoding="utf-8"))):
            assert importlib.util.find_spec(name) is not None, f"{doc}: `python -m {name}` names no module"
