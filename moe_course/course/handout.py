"""The learners' copy of every notebook's exercises: the repository without ``solutions/``, its README adapted.

``make handout`` (``python moe_course/course/handout.py``, standard library only) writes
``handout/moe-from-scratch.zip`` from the last commit: ``git archive`` of every top-level entry but
``solutions/``, then the README's sentences that send a learner to ``solutions/`` or to the test suite (which
needs the solutions) rewritten for a learner who has only the exercises (INSTRUCTORS.md, "Handing out the
exercises without the solutions").
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["OMIT", "PREFIX", "README_CHANGES", "build", "handout_readme", "main"]

PREFIX = "moe-from-scratch/"
"""The folder every file of the zip sits in."""

README_CHANGES = (
    ("Work through `notebooks/` in order; the solved notebooks are in `solutions/`.",
     "Work through `notebooks/` in order; your instructor has the solved notebooks."),
    ("  The solved and executed notebooks are in `solutions/`.",
     "  Your instructor has the solved and executed notebooks."),
    ("  make test   # the whole test suite\n", ""),
)
"""(sentence of README.md, what the handout says instead); a sentence that is missing is an error."""


OMIT = re.compile(r"\n<!-- not in the handout -->\n.*?<!-- end not in the handout -->\n", re.DOTALL)
"""README.md's passages for maintainers of the full repository (e.g. what ``make test`` does), left out."""


def handout_readme(text: str) -> str:
    """README.md as the handout gives it: :data:`OMIT` passages removed, each of :data:`README_CHANGES` applied."""
    if not isinstance(text, str):
        raise TypeError(f"text must be the README's text (str), got {type(text).__name__}")
    text = OMIT.sub("", text)
    for old, new in README_CHANGES:
        if text.count(old) != 1:
            raise ValueError(f"README.md should hold {old.strip()!r} once (found {text.count(old)}); update "
                             "README_CHANGES in moe_course/course/handout.py to the README's new wording")
        text = text.replace(old, new)
    return text


def build(out: str | Path = "handout/moe-from-scratch.zip", root: str | Path = ".", ref: str = "HEAD") -> Path:
    """Write the handout zip of commit ``ref`` of the repository at ``root`` to ``out``; return its path."""
    root, out = Path(root), Path(out)
    if not (root / ".git").exists():
        raise FileNotFoundError(f"{root.resolve()} is not a git checkout: run this in the course repository")
    if out.is_dir():
        raise ValueError(f"out must be a file path, got the folder {out}; e.g. handout/moe-from-scratch.zip")
    names = subprocess.run(["git", "ls-tree", "--name-only", ref], cwd=root, check=True, capture_output=True,
                           text=True).stdout.split()
    entries = [n for n in names if n != "solutions"]
    archive = subprocess.run(["git", "archive", "--format=zip", f"--prefix={PREFIX}", ref, *entries], cwd=root,
                             check=True, capture_output=True).stdout
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == f"{PREFIX}README.md":
                data = handout_readme(data.decode("utf-8")).encode("utf-8")
            dst.writestr(info, data)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moe_course.course.handout [--out PATH] [--ref REV]``; errors exit with status 1."""
    parser = argparse.ArgumentParser(prog="python -m moe_course.course.handout", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="handout/moe-from-scratch.zip", help="the zip to write")
    parser.add_argument("--ref", default="HEAD", help="the commit to hand out (default: the last one)")
    args = parser.parse_args(argv)
    try:
        path = build(args.out, ".", args.ref)
    except (FileNotFoundError, ValueError, subprocess.CalledProcessError) as err:
        detail = err.stderr.decode().strip() if isinstance(err, subprocess.CalledProcessError) and err.stderr else err
        print(f"error: {detail}", file=sys.stderr)
        return 1
    print(f"wrote {path} (without solutions/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
