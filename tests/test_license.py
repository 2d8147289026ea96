"""The licence the package declares is shipped, and CITATION.cff describes this repository."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from moe_course.course.links import REPO_URL

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_license_file_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text
    assert "data/corpus/LICENSE-PSF.txt" in text and (ROOT / "data" / "corpus" / "LICENSE-PSF.txt").is_file()


def test_citation_file_is_valid_and_current():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for key in ("cff-version", "message", "title", "authors", "type"):
        assert cff.get(key), key
    assert cff["license"] == "MIT" and cff["version"] == project["version"]
    assert cff["repository-code"] == REPO_URL  # set-repo rewrites it for a fork
