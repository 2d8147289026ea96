"""The pipeline of every notebook: learner's copies from the solved notebooks, execution, and consistency checks.

``solutions/NN_topic.ipynb`` is the only notebook anyone edits. This module

* stamps the shared setup cell (:data:`SETUP_CELL`) at the top of every solution notebook, the "Open in
  Colab" and Binder badges under its title (:func:`stamp_badges`), and turns nbval comment markers such as
  ``# NBVAL_IGNORE_OUTPUT`` into cell tags, so that learners never see them (:func:`nbval_comments_to_tags`),
* writes ``notebooks/NN_topic.ipynb``: the solution with each nbgrader ``### BEGIN SOLUTION`` ...
  ``### END SOLUTION`` region replaced by a stub and all outputs cleared (:func:`make_exercise`),
* executes solution notebooks in place on the CPU, storing the final state of every progress bar
  (:func:`execute`), and
* reports anything out of date (:func:`check`).

Command line (run from the repository root)::

    python -m moe_course.course.notebooks generate [SOLUTION.ipynb ...]   # make exercises
    python -m moe_course.course.notebooks execute [SOLUTION.ipynb ...]    # make execute
    python -m moe_course.course.notebooks check [SOLUTION.ipynb ...]      # exit status 1 on problems
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import html
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nbformat
from nbformat import NotebookNode

from moe_course.course.links import BRANCH, REPO_URL, binder_badge, colab_badge

__all__ = [
    "BEGIN_SOLUTION",
    "END_SOLUTION",
    "EXERCISE_STUB",
    "MARKDOWN_STUB",
    "NBVAL_TAGS",
    "RAISES_TAG",
    "NOTEBOOK_TIMES",
    "RECORDING_ENV",
    "SETUP_CELL",
    "SETUP_MARKER",
    "SETUP_METADATA",
    "check",
    "execute",
    "generate",
    "find_setup_cell",
    "learner_minutes",
    "learner_time_line",
    "stamp_learner_time",
    "is_setup_cell",
    "badge_line",
    "finish_progress_bars",
    "main",
    "make_exercise",
    "nbval_comments_to_tags",
    "normalize_notebook",
    "prepare_solution",
    "record_time",
    "read_notebook",
    "setup_cell",
    "setup_cell_position",
    "stamp_badges",
    "stamp_setup_cell",
    "stubbed_names",
    "write_notebook",
    "writes_notebook",
]

SETUP_MARKER = "#@title Setup: run this cell first"
"""The first line of the setup cell (a Colab form title, so Colab shows this one line); how the generator finds it."""
OLD_SETUP_MARKERS = ("# MoE from Scratch setup cell",)
"""First lines of earlier versions of the setup cell, recognised so that the generator replaces them."""

_SETUP_TEMPLATE = """\
@MARKER@ (installs the course on Colab; elsewhere checks it can be imported) { display-mode: "form" }
# The same cell in every notebook. On Google Colab it clones the course (the package and the stored results in
# data/results), installs it and turns on interactive widgets; everywhere it checks that the package can be
# imported.
import sys

if "google.colab" in sys.modules:
    import os
    import subprocess

    REPO_URL = "@REPO_URL@"  # your fork? python -m moe_course.course.links set-repo OWNER/NAME
    BRANCH = "@BRANCH@"  # the branch or tag whose package and stored results match these notebooks
    COURSE_DIR = "/content/moe-from-scratch"
    if not os.path.isdir(COURSE_DIR):
        clone = subprocess.run(
            ["git", "clone", "--depth", "1", "--branch", BRANCH, REPO_URL, COURSE_DIR],
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},  # a wrong address fails instead of asking for a password
            capture_output=True, text=True,
        )
        if clone.returncode != 0:
            raise RuntimeError(
                f"Could not clone the course from {REPO_URL} (branch or tag '{BRANCH}'). git said: "
                f"{clone.stderr.strip()}\\nCheck that the repository is public and that the branch or tag exists. "
                "To use another copy (a fork, a release tag), set REPO_URL and BRANCH at the top of this cell "
                "and run it again."
            ) from None
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", COURSE_DIR],
                             capture_output=True, text=True)
    if install.returncode != 0:
        raise RuntimeError(
            f"Could not install the course from {COURSE_DIR}. pip said: {install.stderr.strip()[-2000:]}\\n"
            "Start a fresh runtime (Runtime > Disconnect and delete runtime) and run this cell again."
        ) from None
    sys.path.insert(0, COURSE_DIR)  # this kernel started before the install
    from google.colab import output as colab_output

    colab_output.enable_custom_widget_manager()

try:
    import moe_course
except ModuleNotFoundError as missing:
    raise ModuleNotFoundError(
        f"The course package moe_course cannot be imported (no module named '{missing.name}') by this "
        f"kernel's Python, {sys.executable}. Install it from the repository root with `make lab` (it sets "
        "up .venv and opens JupyterLab there) or with `pip install -e .` in this environment, then restart "
        "the kernel. On Google Colab, re-run this cell."
    ) from None"""


def setup_cell(repo_url: str | None = None, branch: str | None = None) -> str:
    """Source of the setup cell for ``repo_url`` at ``branch`` (default: ``moe_course.course.links``' values)."""
    return (_SETUP_TEMPLATE.replace("@MARKER@", SETUP_MARKER).replace("@REPO_URL@", repo_url or REPO_URL)
            .replace("@BRANCH@", branch or BRANCH))


SETUP_CELL = setup_cell()
"""Source of the first code cell of every notebook (repository URL and branch from ``moe_course.course.links``)."""

RECORDING_ENV: dict[str, str] = {"MOE_DEVICE": "cpu"}
if platform.machine().lower() in ("x86_64", "amd64"):
    # PyTorch's own CPU kernels pick AVX-512 where the CPU has it, and AVX-512 sums in another order than AVX2,
    # so trained numbers differ in the last digits between machines. Every x86-64 CPU that runs the course has
    # AVX2: recording and comparing outputs with it (the Makefile sets the same) gives one set of numbers.
    RECORDING_ENV["ATEN_CPU_CAPABILITY"] = "avx2"
"""Environment the solutions are executed in (``make execute``) and compared in (``make test``)."""

SETUP_CELL_ID = "setup"
BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
EXERCISE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
MARKDOWN_STUB = "*Your answer here.*"
RAISES_TAG = "raises-exception"
"""nbval's cell tag for a cell that is allowed to raise (``--nbval-lax`` runs the exercise copies)."""
NBVAL_TAGS = {
    "NBVAL_IGNORE_OUTPUT": "nbval-ignore-output",
    "NBVAL_CHECK_OUTPUT": "nbval-check-output",
    "NBVAL_RAISES_EXCEPTION": RAISES_TAG,
    "NBVAL_SKIP": "nbval-skip",
}
"""nbval's comment markers and the cell tags that replace them (same meaning, invisible to learners)."""
SOLUTIONS_DIR, NOTEBOOKS_DIR = "solutions", "notebooks"
"""Where the solutions and the learner's copies live in the repository (the badges link to them)."""
BADGE_PREFIX = "[![Open In Colab]"

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
CELL_TIMEOUT_S = 600

_MD_MARKER = re.compile(r"<!--\s*(BEGIN|END) SOLUTION\s*-->")
_DEF_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


# --------------------------------------------------------------------------------------------------------
# reading, writing, normalising


def _cell_source(cell: NotebookNode) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _stable_id(index: int, source: str, taken: set[str]) -> str:
    base = hashlib.sha1(f"{index}\n{source}".encode()).hexdigest()[:8]
    candidate, n = base, 0
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def read_notebook(path: str | Path) -> NotebookNode:
    """Read a v4 notebook; cells without an id get a deterministic one (nbformat would pick random ids)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("nbformat") == 4:
        cells = data.get("cells", [])
        taken = {c["id"] for c in cells if isinstance(c.get("id"), str)}
        for i, cell in enumerate(cells):
            if not isinstance(cell.get("id"), str):
                source = cell.get("source", "")
                cell["id"] = _stable_id(i, "".join(source) if isinstance(source, list) else source, taken)
                taken.add(cell["id"])
        data["nbformat_minor"] = max(int(data.get("nbformat_minor", 0)), 5)
    return nbformat.reads(json.dumps(data), as_version=4)


def normalize_notebook(nb: NotebookNode) -> NotebookNode:
    """Make a notebook independent of the machine that saved it (in place; returns ``nb``).

    Notebook metadata becomes just the ``python3`` kernelspec and ``language_info.name`` (this drops
    Python versions, saved widget state with random model ids, and editor settings). Each cell loses its
    ``execution`` timing metadata, and cells without an id get a deterministic one.
    """
    nb.metadata = nbformat.from_dict({"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}})
    nb.nbformat = 4
    nb.nbformat_minor = max(int(nb.get("nbformat_minor", 0)), 5)
    taken = {c.id for c in nb.cells if isinstance(c.get("id"), str)}
    for i, cell in enumerate(nb.cells):
        cell.metadata.pop("execution", None)
        if not isinstance(cell.get("id"), str):
            cell["id"] = _stable_id(i, _cell_source(cell), taken)
            taken.add(cell["id"])
    return nb


def writes_notebook(nb: NotebookNode) -> str:
    """The exact text :func:`write_notebook` writes: nbformat's JSON (sorted keys) and a final newline."""
    text = nbformat.writes(nb, version=4)
    return text if text.endswith("\n") else text + "\n"


def write_notebook(nb: NotebookNode, path: str | Path) -> None:
    """Write ``nb`` to ``path`` deterministically (UTF-8, ``\\n`` line ends, trailing newline)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(writes_notebook(nb))


# --------------------------------------------------------------------------------------------------------
# the setup cell


def is_setup_cell(cell: NotebookNode) -> bool:
    """True for a code cell whose first line starts with :data:`SETUP_MARKER` (or an older version's marker)."""
    source = _cell_source(cell).lstrip()
    return cell.cell_type == "code" and source.startswith((SETUP_MARKER, *OLD_SETUP_MARKERS))


SETUP_METADATA: dict[str, Any] = {"jupyter": {"source_hidden": True}, "cellView": "form"}
"""The setup cell's metadata: JupyterLab shows it collapsed to one line, Colab as a form (its #@title line)."""


def setup_cell_position(nb: NotebookNode) -> int:
    """Where the setup cell belongs: right after the title cell (the learner reads the title first), else first."""
    title = _title_cell(nb)
    others = [c for c in nb.cells if not is_setup_cell(c)]
    return 0 if title is None else others.index(title) + 1


def find_setup_cell(nb: NotebookNode) -> int | None:
    """Index of the notebook's setup cell, or None."""
    return next((i for i, c in enumerate(nb.cells) if is_setup_cell(c)), None)


def stamp_setup_cell(nb: NotebookNode) -> bool:
    """Put one code cell holding exactly :data:`SETUP_CELL` right after the title; return whether ``nb`` changed.

    A notebook without a setup cell gets one; a setup cell with other source gets the current source (and
    loses its outputs); one in the wrong place moves (the title comes first), and it is collapsed
    (:data:`SETUP_METADATA`). Extra setup cells are removed. An up-to-date setup cell is left alone.
    """
    found = [i for i, c in enumerate(nb.cells) if is_setup_cell(c)]
    changed = len(found) > 1
    if found:
        cell = nb.cells[found[0]]
        for i in reversed(found):
            del nb.cells[i]
    else:
        cell = nbformat.v4.new_code_cell(SETUP_CELL)
        taken = {c.get("id") for c in nb.cells}
        cell.id = SETUP_CELL_ID if SETUP_CELL_ID not in taken else _stable_id(0, SETUP_CELL, taken)
        changed = True
    if _cell_source(cell) != SETUP_CELL:
        cell.source = SETUP_CELL
        cell.outputs = []
        cell.execution_count = None
        changed = True
    for key, value in SETUP_METADATA.items():
        if cell.metadata.get(key) != value:
            cell.metadata[key] = value
            changed = True
    position = setup_cell_position(nb)
    nb.cells.insert(position, cell)
    return changed or not found or found[0] != position


# --------------------------------------------------------------------------------------------------------
# the title cell's badges and nbval's cell tags


def badge_line(notebook_path: str) -> str:
    """The "Open in Colab" and Binder badges (one markdown line) of the notebook at ``notebook_path``."""
    return f"{colab_badge(notebook_path)} {binder_badge(notebook_path)}"


def _title_cell(nb: NotebookNode) -> NotebookNode | None:
    """The first markdown cell that starts with a level-1 heading (``# 00 · Welcome``), if any."""
    for cell in nb.cells:
        if cell.cell_type == "markdown" and _cell_source(cell).startswith("# "):
            return cell
    return None


def stamp_badges(nb: NotebookNode, notebook_path: str) -> bool:
    """Put :func:`badge_line` for ``notebook_path`` under the title's heading; return whether ``nb`` changed.

    The title cell becomes ``heading``, a blank line, the badges, a blank line, then the rest of its text
    (an older badge line is replaced). A notebook without a ``# `` title cell is left alone.
    """
    cell = _title_cell(nb)
    if cell is None:
        return False
    heading, *rest = _cell_source(cell).split("\n")
    while rest and not rest[0].strip():
        rest.pop(0)
    if rest and rest[0].startswith(BADGE_PREFIX):
        rest.pop(0)
        while rest and not rest[0].strip():
            rest.pop(0)
    source = "\n".join([heading, "", badge_line(notebook_path), *([""] + rest if rest else [])])
    if source == _cell_source(cell):
        return False
    cell.source = source
    return True


READING_WORDS_PER_MIN = 120
"""Reading speed of technical prose with formulas, for :func:`learner_minutes`."""
CODE_LINES_PER_MIN = 15
"""Reading speed of the code cells a learner runs but does not write."""

LEARNER_TIME_PREFIX = "**Learner time:**"
"""The line :func:`stamp_learner_time` writes at the end of the title cell (the README's table reads the same count)."""


def learner_minutes(nb: NotebookNode | str | Path) -> int:
    """A learner's time for a notebook, in minutes rounded up to 5: reading + its exercises' stated minutes.

    Reading: the markdown at :data:`READING_WORDS_PER_MIN` words a minute (the stamped learner-time line not
    counted) and the code a learner runs at :data:`CODE_LINES_PER_MIN` lines a minute; each exercise's
    ``about N minutes``. Running time is extra.
    """
    if not isinstance(nb, NotebookNode):
        nb = read_notebook(nb)
    markdown = " ".join(line for c in nb.cells if c.cell_type == "markdown" for line in _cell_source(c).split("\n")
                        if not line.startswith(LEARNER_TIME_PREFIX))
    code = [_cell_source(c) for c in nb.cells if c.cell_type == "code" and not _cell_source(c).startswith("#@title")]
    words = len(re.findall(r"[A-Za-z]+", markdown))
    lines = sum(1 for src in code for line in src.splitlines() if line.strip())
    exercises = sum(int(m) for m in re.findall(r"\*\*Difficulty [★☆]+, about (\d+) minutes\.\*\*", markdown))
    total = words / READING_WORDS_PER_MIN + lines / CODE_LINES_PER_MIN + exercises
    return 5 * math.ceil(total / 5)


def learner_time_line(nb: NotebookNode) -> str:
    """``**Learner time:** about N minutes ...``: the title cell's last line, from :func:`learner_minutes`."""
    return (f"{LEARNER_TIME_PREFIX} about {learner_minutes(nb)} minutes to read the notebook and do its exercises "
            "(the course table in the README counts the same way; running it comes on top).")


def stamp_learner_time(nb: NotebookNode) -> bool:
    """End the title cell with :func:`learner_time_line` (an older one replaced); return whether ``nb`` changed."""
    cell = _title_cell(nb)
    if cell is None:
        return False
    lines = [line for line in _cell_source(cell).rstrip("\n").split("\n") if not line.startswith(LEARNER_TIME_PREFIX)]
    while lines and not lines[-1].strip():
        lines.pop()
    source = "\n".join([*lines, "", learner_time_line(nb)])
    if source == _cell_source(cell):
        return False
    cell.source = source
    return True


def _retarget_badges(nb: NotebookNode) -> None:
    """Point the title's badges of a solution (``solutions/NAME``) at its exercise copy (``notebooks/NAME``)."""
    cell = _title_cell(nb)
    if cell is None:
        return
    lines = _cell_source(cell).split("\n")
    for i, line in enumerate(lines):
        match = re.search(rf"/{SOLUTIONS_DIR}/([\w.-]+\.ipynb)", line) if line.startswith(BADGE_PREFIX) else None
        if match:
            lines[i] = badge_line(f"{NOTEBOOKS_DIR}/{match.group(1)}")
    cell.source = "\n".join(lines)


def _nbval_marker(line: str) -> str | None:
    """The nbval comment marker on ``line`` (``NBVAL_IGNORE_OUTPUT`` for ``# NBVAL_IGNORE_OUTPUT``), if any."""
    stripped = line.strip()
    marker = stripped.lstrip("#").strip() if stripped.startswith("#") else None
    return marker if marker in NBVAL_TAGS else None


def _comment_tags(source: str) -> list[str]:
    """The cell tags that the nbval comment markers in ``source`` stand for."""
    return [NBVAL_TAGS[m] for m in map(_nbval_marker, source.split("\n")) if m]


def nbval_comments_to_tags(nb: NotebookNode) -> bool:
    """Replace nbval comment lines (``# NBVAL_IGNORE_OUTPUT``...) by :data:`NBVAL_TAGS`; return if changed."""
    changed = False
    for cell in nb.cells:
        found = _comment_tags(_cell_source(cell)) if cell.cell_type == "code" else []
        if found:
            tags = list(cell.metadata.get("tags", []))
            cell.metadata["tags"] = tags + [t for t in dict.fromkeys(found) if t not in tags]
            kept = [line for line in _cell_source(cell).split("\n") if not _nbval_marker(line)]
            cell.source = "\n".join(kept).strip("\n")
            changed = True
    return changed


def prepare_solution(nb: NotebookNode, name: str) -> NotebookNode:
    """Bring solution ``nb`` (file ``solutions/<name>``) into the form the pipeline keeps (in place).

    Stamps the setup cell, the title's badges and its learner time, turns nbval comment markers into tags and
    normalises the metadata. :func:`generate` and :func:`execute` both call it, so their results agree.
    """
    stamp_setup_cell(nb)
    stamp_badges(nb, f"{SOLUTIONS_DIR}/{name}")
    nbval_comments_to_tags(nb)
    stamp_learner_time(nb)
    return normalize_notebook(nb)


# --------------------------------------------------------------------------------------------------------
# progress bars: the final state, not the first frame


_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _progress_bar_text(model_id: str, states: dict) -> str | None:
    """The final text of a ``tqdm.notebook`` bar from the saved widget state; None for any other widget.

    tqdm draws a notebook bar as an ``HBox`` of an ``HTML`` (description and percentage), a
    ``FloatProgress`` and an ``HTML`` (count, time and rate), writing spaces as U+2007 and escaping HTML.
    """

    def state(model: str) -> dict:
        return states.get(str(model).removeprefix("IPY_MODEL_"), {}).get("state", {})

    box = state(model_id)
    parts = [state(child) for child in box.get("children", [])]
    names = [part.get("_model_name") for part in parts]
    if box.get("_model_name") != "HBoxModel" or names != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    left, right = (html.unescape(str(part.get("value", ""))).replace("\u2007", " ") for part in parts[::2])
    shown = re.search(r"(\d{1,3})%$", left)
    count = re.match(r" ?([\d.]+[kMGTPEZY]?)/([\d.]+[kMGTPEZY]?)", right)
    if not (shown and count):  # no total: tqdm writes the whole bar ("train: 50it [00:01, 40.1it/s]") right
        return right
    from tqdm.std import Bar

    value, total = float(parts[1].get("value") or 0.0), float(parts[1].get("max") or 1.0)
    fraction = min(max(value / total, 0.0), 1.0)
    shown_n = count.group(1)
    if round(100 * fraction) != int(shown.group(1)) or (shown_n.isdigit() and float(shown_n) != value):
        # a bar closed with leave=False keeps the text of its last refresh; only the value is final
        n = count.group(2) if value >= total else f"{value:g}"
        left = f"{left[: shown.start() - (3 - len(shown.group(1)))]}{100 * fraction:3.0f}%"
        right = f" {n}/{count.group(2)}"
    return f"{left}|{Bar(fraction)}|{right}"


def finish_progress_bars(nb: NotebookNode) -> int:
    """Store every ``tqdm.notebook`` bar of an executed ``nb`` as the text of its final state (in place).

    A widget's stored ``text/plain`` is its first frame ("0/1500"), and without the widget state, which
    :func:`normalize_notebook` drops, that is all GitHub or a fresh JupyterLab can show. Each bar becomes a
    plain-text display of its last frame, read from the widget state that ``nbclient`` saved in
    ``nb.metadata.widgets``. Other widgets are left alone. Returns the number of bars rewritten.
    """
    states = nb.metadata.get("widgets", {}).get(_WIDGET_STATE, {}).get("state", {})
    done = 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(_WIDGET_VIEW) if output.output_type == "display_data" else None
            text = _progress_bar_text(view.get("model_id", ""), states) if view else None
            if text is not None:
                output.data = nbformat.from_dict({"text/plain": text})
                done += 1
    return done


# --------------------------------------------------------------------------------------------------------
# making the exercise copy


def _strip_code_regions(source: str, index: int) -> tuple[str, list[tuple[int, int]]]:
    """Replace solution regions by the stub; return the new source and the regions' 1-based line spans."""
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    begin: int | None = None
    for lineno, line in enumerate(source.split("\n"), start=1):
        marker = line.strip()
        if marker == BEGIN_SOLUTION:
            if begin is not None:
                raise ValueError(f"cell {index}: nested {BEGIN_SOLUTION} on line {lineno} (open: {begin})")
            begin = lineno
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(indent + stub for stub in EXERCISE_STUB)
        elif marker == END_SOLUTION:
            if begin is None:
                raise ValueError(f"cell {index}: {END_SOLUTION} without {BEGIN_SOLUTION} (line {lineno})")
            spans.append((begin, lineno))
            begin = None
        elif begin is None:
            out.append(line)
    if begin is not None:
        raise ValueError(f"cell {index}: {BEGIN_SOLUTION} on line {begin} has no {END_SOLUTION}")
    return "\n".join(out), spans


def _strip_markdown_regions(source: str, index: int) -> str:
    pieces: list[str] = []
    pos, begin = 0, None
    for m in _MD_MARKER.finditer(source):
        if m.group(1) == "BEGIN":
            if begin is not None:
                raise ValueError(f"cell {index}: nested <!-- BEGIN SOLUTION --> in a markdown cell")
            pieces.append(source[pos : m.start()])
            begin = m.start()
        else:
            if begin is None:
                raise ValueError(f"cell {index}: <!-- END SOLUTION --> without <!-- BEGIN SOLUTION -->")
            pieces.append(MARKDOWN_STUB)
            pos, begin = m.end(), None
    if begin is not None:
        raise ValueError(f"cell {index}: <!-- BEGIN SOLUTION --> has no <!-- END SOLUTION -->")
    pieces.append(source[pos:])
    return "".join(pieces)


def _python_only(source: str) -> str:
    """Blank IPython magics and shell escapes (``%...``, ``!...``) with ``pass``, keeping line numbers."""
    lines = []
    for line in source.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith(("%", "!")):
            line = line[: len(line) - len(stripped)] + "pass"
        lines.append(line)
    return "\n".join(lines)


def _parse(source: str) -> ast.Module | None:
    try:
        return ast.parse(_python_only(source))
    except SyntaxError:
        return None


def _loads(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _binds(stmt: ast.stmt) -> set[str]:
    """Names a top-level statement binds in the notebook's namespace (not inside nested scopes)."""
    names: set[str] = set()
    stack: list[ast.AST] = [stmt]
    while stack:
        node = stack.pop()
        if isinstance(node, _DEF_NODES):
            names.add(node.name)
            if node is not stmt:
                continue
            stack.extend(node.decorator_list)  # the body is a new scope
            continue
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return names


def _overlapping(stmt: ast.stmt, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The solution regions (line spans) that share a line with ``stmt``."""
    end = stmt.end_lineno or stmt.lineno
    return [(b, e) for b, e in spans if stmt.lineno <= e and b <= end]


def _holds_stub(stmt: ast.stmt, spans: Sequence[tuple[int, int]]) -> bool:
    """True when ``stmt`` is a def/class and every region it touches begins inside its body.

    (A region's ``### END SOLUTION`` comment may come after the last line of the body.)
    """
    touched = _overlapping(stmt, spans)
    end = stmt.end_lineno or stmt.lineno
    inside = all(stmt.lineno < b <= end for b, _ in touched)
    return isinstance(stmt, _DEF_NODES) and bool(touched) and inside


def _scan_cell(source: str, spans: Sequence[tuple[int, int]], stubbed: set[str], index: int) -> bool:
    """Update ``stubbed`` with this cell's stubbed names; return whether the exercise cell may raise."""
    tree = _parse(source)
    if tree is None:
        if spans:
            raise ValueError(f"cell {index}: a cell with a solution region must be valid Python")
        return any(re.search(rf"\b{re.escape(name)}\b", source) for name in stubbed)
    raises = False
    for stmt in tree.body:
        if _holds_stub(stmt, spans):
            stubbed.add(stmt.name)  # the definition runs; calling it raises NotImplementedError
        elif _overlapping(stmt, spans) or _loads(stmt) & stubbed:
            raises = True  # runs stubbed code, or uses a name that a stub left undefined or raising
            stubbed.update(_binds(stmt))
    # magics such as `%timeit my_router(x)` are not parsed: look for the names in their text
    magics = "\n".join(line for line in source.split("\n") if line.lstrip().startswith(("%", "!")))
    return raises or any(re.search(rf"\b{re.escape(name)}\b", magics) for name in stubbed)


def stubbed_names(nb: NotebookNode) -> set[str]:
    """The names that are stubbed (or depend on a stub) in the exercise copy of solution ``nb``."""
    stubbed: set[str] = set()
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            _, spans = _strip_code_regions(_cell_source(cell), index)
            _scan_cell(_cell_source(cell), spans, stubbed, index)
    return stubbed


def make_exercise(nb: NotebookNode) -> NotebookNode:
    """Return the learner's copy of solution notebook ``nb`` (which is not modified).

    * In code cells every ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region becomes
      ``# YOUR CODE HERE`` / ``raise NotImplementedError()`` at the marker's indentation; in markdown
      cells every ``<!-- BEGIN SOLUTION -->`` ... ``<!-- END SOLUTION -->`` region becomes
      ``*Your answer here.*``. Unbalanced or nested markers raise ``ValueError`` naming the cell index.
    * Functions and classes whose body holds a region are *stubbed*; every code cell that uses a stubbed
      name (or a name defined from one, or that runs a region at top level) gets nbval's
      ``raises-exception`` tag, so the copy still runs top to bottom under ``pytest --nbval-lax``.
    * Outputs and execution counts are cleared and metadata is normalised (:func:`normalize_notebook`).
    * The title's badges (:func:`stamp_badges`) open ``notebooks/NAME`` instead of ``solutions/NAME``.
    """
    ex = copy.deepcopy(nb)
    _retarget_badges(ex)
    stubbed: set[str] = set()
    for index, cell in enumerate(ex.cells):
        source = _cell_source(cell)
        if cell.cell_type == "markdown":
            cell.source = _strip_markdown_regions(source, index)
        elif cell.cell_type == "code":
            cell.source, spans = _strip_code_regions(source, index)
            if _scan_cell(source, spans, stubbed, index):
                tags = list(cell.metadata.get("tags", []))
                if RAISES_TAG not in tags:
                    cell.metadata["tags"] = [*tags, RAISES_TAG]
            cell.outputs = []
            cell.execution_count = None
    return normalize_notebook(ex)


# --------------------------------------------------------------------------------------------------------
# generate, check, execute


def _solution_paths(solutions_dir: Path, paths: Iterable[str | Path] | None) -> list[Path]:
    if paths:
        return [Path(p) for p in paths]
    return sorted(solutions_dir.glob("*.ipynb"))


def _prepared_solution(path: Path) -> tuple[NotebookNode, str, str]:
    """The solution as :func:`generate` leaves it: (notebook, its text now, its text after generate)."""
    text = path.read_text(encoding="utf-8")
    nb = prepare_solution(read_notebook(path), path.name)
    return nb, text, writes_notebook(nb)


def _exercise_text(nb: NotebookNode, path: Path) -> str:
    try:
        return writes_notebook(make_exercise(nb))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def generate(
    solutions_dir: str | Path = "solutions",
    notebooks_dir: str | Path = "notebooks",
    paths: Iterable[str | Path] | None = None,
) -> list[Path]:
    """Stamp the setup cell into each solution and write its exercise copy; return the files changed.

    ``paths`` limits the work to some solution notebooks (default: all of ``solutions_dir``). Exercise
    notebooks whose solution no longer exists are removed. Files are only written when their text changes.
    """
    solutions_dir, notebooks_dir = Path(solutions_dir), Path(notebooks_dir)
    notebooks_dir.mkdir(parents=True, exist_ok=True)
    changed: list[Path] = []
    for path in _solution_paths(solutions_dir, paths):
        nb, before, after = _prepared_solution(path)
        exercise = _exercise_text(nb, path)
        if after != before:
            path.write_text(after, encoding="utf-8", newline="\n")
            changed.append(path)
        target = notebooks_dir / path.name
        if not target.exists() or target.read_text(encoding="utf-8") != exercise:
            target.write_text(exercise, encoding="utf-8", newline="\n")
            changed.append(target)
    solution_names = {p.name for p in solutions_dir.glob("*.ipynb")}
    for orphan in sorted(notebooks_dir.glob("*.ipynb")):
        if orphan.name not in solution_names:
            orphan.unlink()
            changed.append(orphan)
    return changed


def check(
    solutions_dir: str | Path = "solutions",
    notebooks_dir: str | Path = "notebooks",
    paths: Iterable[str | Path] | None = None,
) -> list[str]:
    """Everything that ``make execute`` / ``make exercises`` would fix, one line per problem.

    Reports a solution whose first cell is not the current setup cell, that still has nbval comment
    markers or outdated badges (anything :func:`generate` would rewrite), code cells that were never
    executed or that hold an error (unless tagged ``raises-exception``), and exercise copies that are
    missing, differ from what :func:`generate` writes, or have no solution.
    """
    solutions_dir, notebooks_dir = Path(solutions_dir), Path(notebooks_dir)
    problems: list[str] = []
    for path in _solution_paths(solutions_dir, paths):
        raw = read_notebook(path)
        nb, before, after = _prepared_solution(path)
        index = find_setup_cell(raw)
        if index is None or index != setup_cell_position(raw) or _cell_source(raw.cells[index]) != SETUP_CELL:
            problems.append(f"{path}: the cell after the title is not the current setup cell (run `make exercises`)")
        elif before != after:
            problems.append(f"{path}: not as `make exercises` writes it (badges, nbval tags or metadata)")
        for index, cell in enumerate(raw.cells):
            if cell.cell_type != "code" or not _cell_source(cell).strip():
                continue
            tags = [*cell.metadata.get("tags", []), *_comment_tags(_cell_source(cell))]
            if cell.execution_count is None and "skip-execution" not in tags:
                problems.append(f"{path}: cell {index} was not executed (run `make execute`)")
            if RAISES_TAG not in tags and any(o.output_type == "error" for o in cell.get("outputs", [])):
                problems.append(f"{path}: cell {index} has an error output")
        try:
            expected = writes_notebook(make_exercise(nb))
        except ValueError as err:
            problems.append(f"{path}: {err}")
            continue
        target = notebooks_dir / path.name
        if not target.exists():
            problems.append(f"{target}: missing (run `make exercises`)")
        elif target.read_text(encoding="utf-8") != expected:
            problems.append(f"{target}: out of sync with {path} (run `make exercises`)")
    solution_names = {p.name for p in solutions_dir.glob("*.ipynb")}
    for extra in sorted(notebooks_dir.glob("*.ipynb")):
        if extra.name not in solution_names:
            problems.append(f"{extra}: no solution {solutions_dir / extra.name} (run `make exercises`)")
    return problems


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


NOTEBOOK_TIMES = Path(__file__).resolve().parents[2] / "data" / "results" / "notebook_times.json"
"""Where ``make execute`` records each course notebook's wall time (read by ``moe_course.course.readme_tables``)."""


def record_time(times_file: Path, name: str, seconds: float, load_1min: float) -> None:
    """Store one notebook's execution time (and the machine's load when it started) in ``times_file``."""
    import torch  # only here: the rest of this module does not need it

    data = json.loads(times_file.read_text(encoding="utf-8")) if times_file.exists() else {}
    data["environment"] = {"cpus": os.cpu_count(), "machine": platform.machine(),
                           "python": platform.python_version(), "torch": torch.__version__.split("+")[0]}
    data.setdefault("notebooks", {})[name] = {"seconds": round(seconds, 1), "load_1min": round(load_1min, 2)}
    data["notebooks"] = dict(sorted(data["notebooks"].items()))
    times_file.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def execute(
    paths: Iterable[str | Path] | None = None, solutions_dir: str | Path = "solutions",
    times_file: str | Path | None = None,
) -> dict[Path, float]:
    """Execute notebooks in place with :data:`RECORDING_ENV` (the CPU); return (and print) the wall time of each.

    Each notebook runs in a fresh ``python3`` kernel whose working directory is the notebook's folder,
    with a limit of 600 s per cell. The notebook is prepared first (:func:`prepare_solution`); after the
    run its progress bars keep their final state (:func:`finish_progress_bars`) and its metadata is
    normalised, so that re-executing gives small diffs. Default: every notebook in ``solutions_dir``.
    ``times_file``: also record each wall time there (:func:`record_time`).
    """
    from nbclient import NotebookClient

    times: dict[Path, float] = {}
    for path in _solution_paths(Path(solutions_dir), paths):
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        nb = prepare_solution(read_notebook(path), path.name)
        client = NotebookClient(
            nb,
            timeout=CELL_TIMEOUT_S,
            kernel_name="python3",
            record_timing=False,
            resources={"metadata": {"path": str(path.resolve().parent)}},
        )
        start = time.perf_counter()
        with _environ(**RECORDING_ENV):
            client.execute()
        times[path] = time.perf_counter() - start
        finish_progress_bars(nb)
        write_notebook(normalize_notebook(nb), path)
        if times_file is not None:
            record_time(Path(times_file), path.name, times[path], load)
        print(f"{path}: {times[path]:.1f} s", flush=True)
    return times


# --------------------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m moe_course.course.notebooks``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m moe_course.course.notebooks",
        description="Make the exercise notebooks from the solutions, execute solutions, or check both.",
    )
    parser.add_argument("command", choices=["generate", "execute", "check"])
    parser.add_argument("paths", nargs="*", help="solution notebooks (default: all of --solutions)")
    parser.add_argument("--solutions", default="solutions", help="folder of solved notebooks")
    parser.add_argument("--notebooks", default="notebooks", help="folder of the learner's copies")
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            for path in generate(args.solutions, args.notebooks, args.paths):
                print(f"{'removed' if not path.exists() else 'wrote'} {path}")
        elif args.command == "execute":
            course = Path(args.solutions).resolve() == NOTEBOOK_TIMES.parents[2] / "solutions"
            execute(args.paths, args.solutions, NOTEBOOK_TIMES if course else None)
        else:
            problems = check(args.solutions, args.notebooks, args.paths)
            for problem in problems:
                print(problem)
            if problems:
                return 1
            print("notebooks are in sync")
    except Exception as err:  # a message and exit status 1, rather than a traceback of this module
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
