"""The notebook pipeline: exercise copies, the setup cell, the sync of notebooks/ with solutions/, nbval's
sanitize patterns. Only the last two tests start a Jupyter kernel (a few seconds each)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest
from nbformat import NotebookNode

from moe_course.course import links
from moe_course.course import notebooks as nbmod
from moe_course.course.links import BRANCH
from moe_course.course.notebooks import (
    RAISES_TAG,
    SETUP_CELL,
    badge_line,
    check,
    execute,
    finish_progress_bars,
    generate,
    make_exercise,
    nbval_comments_to_tags,
    read_notebook,
    stamp_badges,
    stamp_setup_cell,
    write_notebook,
    writes_notebook,
)

REPO = Path(__file__).resolve().parents[1]
SOLUTIONS = REPO / "solutions"
NOTEBOOKS = REPO / "notebooks"
SANITIZE = REPO / "tests" / "nbval_sanitize.cfg"
v4 = nbformat.v4


# ------------------------------------------------------------------------------------------------------
# a small solution notebook


def _code(source: str, tags: list[str] | None = None) -> NotebookNode:
    cell = v4.new_code_cell(source)
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


MY_ADD = '''\
def my_add(a, b):
    """Return a + b."""
    ### BEGIN SOLUTION
    total = a + b
    return total
    ### END SOLUTION


class Counter:
    def __init__(self):
        self.n = 0

    def bump(self):
        if True:
            ### BEGIN SOLUTION
            self.n += 1
            ### END SOLUTION
        return self.n'''

MY_ADD_STUBBED = '''\
def my_add(a, b):
    """Return a + b."""
    # YOUR CODE HERE
    raise NotImplementedError()


class Counter:
    def __init__(self):
        self.n = 0

    def bump(self):
        if True:
            # YOUR CODE HERE
            raise NotImplementedError()
        return self.n'''

# (source, extra tags in the solution, tagged raises-exception in the exercise copy)
DEMO_CELLS: list[tuple[str, list[str], bool]] = [
    ("import math", [], False),
    (MY_ADD, [], False),  # defining a stubbed function does not raise
    ("assert my_add(1, 2) == 3\nprint('OK  my_add')", [], True),
    ("print(math.sqrt(16))", [], False),
    ("total = my_add(1, 1)", ["keep-me"], True),
    ("print(total)", [], True),  # `total` is never set in the exercise copy
    ("%time _ = my_add(2, 2)", [], True),  # a magic that uses the stub
    ("%time _ = math.sqrt(4)\n!echo hello", [], False),
    ("def helper(obj):\n    return obj.my_add", [], False),  # an attribute, not the name
    ("print('my_add is a name in a string')", [], False),
    ("c = Counter()\nc.bump()", [], True),
    ("result = 2 + 2  # untouched\nprint(result)", [], False),
]


def demo_solution(executed: bool = True) -> NotebookNode:
    """A solution notebook (setup cell stamped); ``executed`` fakes execution counts and outputs."""
    nb = v4.new_notebook()
    nb.cells = [
        v4.new_markdown_cell(
            "# Demo\nWhy does it work?\n<!-- BEGIN SOLUTION -->\nBecause **addition**.\n<!-- END SOLUTION -->"
        )
    ]
    nb.cells += [_code(source, tags) for source, tags, _ in DEMO_CELLS]
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"
    stamp_setup_cell(nb)
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.7", "mimetype": "text/x-python"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    if executed:
        for n, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
            cell.execution_count = n + 1
            cell.outputs = [v4.new_output("stream", name="stdout", text=f"out {n}\n")]
            cell.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00.000000Z"}
    return nb


def _demo_index(source: str) -> int:
    """Index of a DEMO_CELLS cell in demo_solution() (markdown title and setup cell come first)."""
    return 2 + [s for s, _, _ in DEMO_CELLS].index(source)


# ------------------------------------------------------------------------------------------------------
# the setup cell


def test_setup_cell_holds_repo_url_and_compiles() -> None:
    assert links.REPO_URL in SETUP_CELL
    assert f'REPO_URL = "{links.REPO_URL}"' in SETUP_CELL and f'BRANCH = "{BRANCH}"' in SETUP_CELL
    assert '"git", "clone", "--depth", "1", "--branch", BRANCH, REPO_URL, COURSE_DIR' in SETUP_CELL
    assert SETUP_CELL.startswith(nbmod.SETUP_MARKER)
    first = SETUP_CELL.splitlines()[0]  # a Colab form title: Colab shows this one line, the code hidden
    assert first.startswith("#@title ") and first.endswith('{ display-mode: "form" }')
    assert SETUP_CELL.splitlines()[1].startswith("# ")  # then an explaining comment
    assert not [line for line in SETUP_CELL.splitlines() if line.lstrip().startswith(("!", "%"))]  # pure Python
    compile(SETUP_CELL, "<setup cell>", "exec")


def _fake_colab(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    output = types.SimpleNamespace(enable_custom_widget_manager=lambda: calls.append("widgets"))
    google = types.ModuleType("google")
    colab = types.ModuleType("google.colab")
    colab.output = output  # type: ignore[attr-defined]
    google.colab = colab  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    return calls


def test_setup_cell_on_colab_installs_package_and_enables_widgets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_colab(monkeypatch)
    pip_calls: list[list[str]] = []

    envs: list[dict | None] = []

    def fake_run(cmd, *args, **kwargs):
        pip_calls.append(list(cmd))
        envs.append(kwargs.get("env"))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def refuse(*args, **kwargs):
        raise AssertionError("the setup cell must not call anything but subprocess.run")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(subprocess, "check_call", refuse)
    monkeypatch.setattr(subprocess, "call", refuse)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the cell puts the clone first on sys.path
    exec(compile(SETUP_CELL, "<setup cell>", "exec"), {})
    course = "/content/moe-from-scratch"  # the whole repository, so data/results/ is there too
    assert pip_calls == [["git", "clone", "--depth", "1", "--branch", BRANCH, links.REPO_URL, course],
                         [sys.executable, "-m", "pip", "install", "-q", "-e", course]]
    assert envs[0]["GIT_TERMINAL_PROMPT"] == "0"  # never a password prompt
    assert sys.path[0] == course
    assert calls == ["widgets"]


def _run_setup_cell(monkeypatch, tmp_path, repo_url: str, branch: str) -> tuple[Path, Path]:
    """Run the setup cell as on Colab with real git, cloning ``repo_url`` at ``branch`` into tmp_path/course.

    pip is replaced by a script that records its arguments (nothing is installed into this environment).
    """
    _fake_colab(monkeypatch)
    course, pip_log = tmp_path / "course", tmp_path / "pip.log"
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/bin/sh\necho "$@" > {pip_log}\n')
    fake_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    monkeypatch.setattr(sys, "path", list(sys.path))
    cell = nbmod.setup_cell(repo_url, branch)
    cell = cell.replace('COURSE_DIR = "/content/moe-from-scratch"', f'COURSE_DIR = "{course}"', 1)
    assert str(course) in cell
    exec(compile(cell, "<setup cell>", "exec"), {})
    return course, pip_log


def _bare_repo(tmp_path: Path, branch: str) -> Path:
    """A local bare repository whose ``branch`` holds README.md ("course v1")."""
    work, bare = tmp_path / "work", tmp_path / "course.git"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(work)], check=True)
    (work / "README.md").write_text("course v1\n")
    subprocess.run([*git, "-C", str(work), "add", "README.md"], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-q", "-m", "v1"], check=True)
    subprocess.run([*git, "-C", str(work), "branch", "-q", branch], check=True)
    subprocess.run([*git, "clone", "-q", "--bare", str(work), str(bare)], check=True)
    return bare


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_setup_cell_clones_the_branch_of_a_local_bare_repository(monkeypatch, tmp_path) -> None:
    bare = _bare_repo(tmp_path, "course-v1")
    course, pip_log = _run_setup_cell(monkeypatch, tmp_path, f"file://{bare}", "course-v1")
    assert (course / "README.md").read_text() == "course v1\n"
    head = subprocess.run(["git", "-C", str(course), "rev-parse", "--abbrev-ref", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert head == "course-v1"
    assert pip_log.read_text().split() == ["-m", "pip", "install", "-q", "-e", str(course)]
    assert sys.path[0] == str(course)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("what", ["missing repository", "missing branch"])
def test_setup_cell_explains_a_failed_clone(monkeypatch, tmp_path, what) -> None:
    bare = _bare_repo(tmp_path, "course-v1")
    url = f"file://{tmp_path / 'no-such-repo.git'}" if what == "missing repository" else f"file://{bare}"
    branch = "course-v1" if what == "missing repository" else "no-such-branch"
    with pytest.raises(RuntimeError) as info:
        _run_setup_cell(monkeypatch, tmp_path, url, branch)
    message = str(info.value)
    assert message.startswith(f"Could not clone the course from {url} (branch or tag '{branch}'). git said: ")
    assert "set REPO_URL and BRANCH at the top of this cell" in message
    assert ("does not appear to be a git repository" in message if what == "missing repository"
            else "no-such-branch" in message.split("git said: ")[1])
    assert info.value.__suppress_context__ and not isinstance(info.value, subprocess.CalledProcessError)
    assert not (tmp_path / "pip.log").exists()  # nothing installed after a failed clone


def test_setup_cell_never_waits_for_a_password(monkeypatch, tmp_path) -> None:
    """git gets GIT_TERMINAL_PROMPT=0, so a private or mistyped https URL fails at once."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "prompt"
    (bin_dir / "git").write_text(f'#!/bin/sh\necho "$GIT_TERMINAL_PROMPT" > {seen}\n'
                                 'echo "fatal: could not read Username for \'https://github.com\'" >&2\nexit 128\n')
    (bin_dir / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(RuntimeError, match="could not read Username"):
        _run_setup_cell(monkeypatch, tmp_path, "https://github.com/someone/private-fork", "main")
    assert seen.read_text().strip() == "0"


def test_setup_cell_elsewhere_does_nothing(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be installed outside Colab")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "check_call", refuse)
    exec(compile(SETUP_CELL, "<setup cell>", "exec"), {})
    assert capsys.readouterr() == ("", "")


def test_setup_cell_without_the_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setitem(sys.modules, "moe_course", None)  # `import moe_course` now fails like a missing package
    with pytest.raises(ModuleNotFoundError) as info:
        exec(compile(SETUP_CELL, "<setup cell>", "exec"), {})
    message = str(info.value)
    for advice in ("make lab", "pip install -e .", "restart the kernel", "re-run this cell", sys.executable):
        assert advice in message
    assert info.value.__suppress_context__  # one clear error, not the bare ModuleNotFoundError above it


def test_stamp_setup_cell_inserts_replaces_and_keeps() -> None:
    nb = v4.new_notebook(cells=[v4.new_markdown_cell("# Title"), v4.new_code_cell("x = 1")])
    assert stamp_setup_cell(nb) is True
    assert [c.cell_type for c in nb.cells] == ["markdown", "code", "code"]  # the title first, then the setup
    assert nb.cells[1].source == SETUP_CELL and nb.cells[1].metadata["jupyter"] == {"source_hidden": True}
    assert nb.cells[1].metadata["cellView"] == "form" and SETUP_CELL.startswith("#@title ")  # Colab's form

    nb.cells[1].execution_count = 1
    nb.cells[1].outputs = [v4.new_output("stream", name="stdout", text="kept\n")]
    assert stamp_setup_cell(nb) is False  # already current: outputs are kept
    assert nb.cells[1].outputs[0].text == "kept\n" and len(nb.cells) == 3

    nb.cells[1].source = nbmod.SETUP_MARKER + " (an old version)\nprint('old')"
    assert stamp_setup_cell(nb) is True  # an old setup cell is replaced, not duplicated
    assert len(nb.cells) == 3 and nb.cells[1].source == SETUP_CELL
    assert nb.cells[1].outputs == [] and nb.cells[1].execution_count is None


def test_stamp_setup_cell_moves_an_old_first_setup_cell_below_the_title() -> None:
    old = "# MoE from Scratch setup cell (the same in every notebook).\nimport sys"
    nb = v4.new_notebook(cells=[v4.new_code_cell(old), v4.new_markdown_cell("# Title"), v4.new_code_cell("x = 1")])
    assert stamp_setup_cell(nb) is True
    assert [c.source for c in nb.cells] == ["# Title", SETUP_CELL, "x = 1"]
    assert nbmod.find_setup_cell(nb) == nbmod.setup_cell_position(nb) == 1
    assert stamp_setup_cell(nb) is False
    untitled = v4.new_notebook(cells=[v4.new_code_cell("x = 1")])
    assert stamp_setup_cell(untitled) is True and untitled.cells[0].source == SETUP_CELL  # no title: first


# ------------------------------------------------------------------------------------------------------
# badges and nbval tags


def test_stamp_badges_puts_one_badge_line_under_the_heading() -> None:
    nb = v4.new_notebook(cells=[v4.new_code_cell("x = 1"), v4.new_markdown_cell("# 07 · Title\nFirst line.")])
    assert stamp_badges(nb, "solutions/07_title.ipynb") is True
    line = badge_line("solutions/07_title.ipynb")
    assert nb.cells[1].source == f"# 07 · Title\n\n{line}\n\nFirst line."
    assert links.colab_url("solutions/07_title.ipynb") in line
    assert links.binder_url("solutions/07_title.ipynb") in line
    assert stamp_badges(nb, "solutions/07_title.ipynb") is False  # idempotent
    assert stamp_badges(nb, "solutions/08_new.ipynb") is True  # an old badge line is replaced, not repeated
    assert nb.cells[1].source.count("[![Open In Colab]") == 1 and "08_new.ipynb" in nb.cells[1].source
    plain = v4.new_notebook(cells=[v4.new_markdown_cell("No heading here.")])
    assert stamp_badges(plain, "solutions/x.ipynb") is False


def test_exercise_badges_open_the_exercise_copy(tmp_path: Path) -> None:
    solutions, notebooks = _course(tmp_path)
    generate(solutions, notebooks)
    solution_title = read_notebook(solutions / "01_demo.ipynb").cells[0].source
    exercise_title = read_notebook(notebooks / "01_demo.ipynb").cells[0].source
    assert badge_line("solutions/01_demo.ipynb") in solution_title
    assert badge_line("notebooks/01_demo.ipynb") in exercise_title
    assert "solutions/" not in exercise_title


def test_nbval_comment_markers_become_cell_tags(tmp_path: Path) -> None:
    nb = v4.new_notebook(
        cells=[
            _code("# NBVAL_IGNORE_OUTPUT\nprint(time.time())", tags=["keep-me"]),
            _code("x = 1  # NBVAL_IGNORE_OUTPUT is only a marker on its own line"),
            _code("#  NBVAL_RAISES_EXCEPTION\nraise ValueError"),
        ]
    )
    assert nbval_comments_to_tags(nb) is True
    assert [c.source for c in nb.cells] == [
        "print(time.time())",
        "x = 1  # NBVAL_IGNORE_OUTPUT is only a marker on its own line",
        "raise ValueError",
    ]
    assert [c.metadata.get("tags") for c in nb.cells] == [["keep-me", "nbval-ignore-output"], None, [RAISES_TAG]]
    assert nbval_comments_to_tags(nb) is False

    solutions, notebooks = _course(tmp_path)
    generate(solutions, notebooks)
    solution = solutions / "01_demo.ipynb"
    sol = read_notebook(solution)
    sol.cells[4].source = "# NBVAL_IGNORE_OUTPUT\n" + sol.cells[4].source
    write_notebook(sol, solution)
    assert any("not as `make exercises` writes it" in p for p in check(solutions, notebooks))
    generate(solutions, notebooks)
    assert check(solutions, notebooks) == []
    for folder in (solutions, notebooks):
        cell = read_notebook(folder / "01_demo.ipynb").cells[4]
        assert "NBVAL" not in cell.source and "nbval-ignore-output" in cell.metadata["tags"]


def test_notebooks_have_no_nbval_comments_and_badges_that_open_themselves() -> None:
    for folder in (SOLUTIONS, NOTEBOOKS):
        for path in sorted(folder.glob("*.ipynb")):
            nb = read_notebook(path)
            for index, cell in enumerate(nb.cells):
                assert "NBVAL_" not in cell.source, f"{path} cell {index}: an nbval comment; run `make exercises`"
            title = next(c for c in nb.cells if c.cell_type == "markdown")
            own = f"{folder.name}/{path.name}"
            assert title.source.split("\n")[2] == badge_line(own), f"{path}: title badges; run `make exercises`"
            for url in re.findall(r"\]\((https://[^)\s]+)\)", title.source):
                assert url.endswith(".svg") or url.endswith(own) or url.endswith(f"lab/tree/{own}")


# ------------------------------------------------------------------------------------------------------
# progress bars


def _tqdm_widget_state(left: str, value: float, total: float, right: str) -> dict:
    def model(name: str, **state) -> dict:
        return {"model_name": name, "state": {"_model_name": name, **state}}

    return {
        "box": model("HBoxModel", children=["IPY_MODEL_l", "IPY_MODEL_p", "IPY_MODEL_r"]),
        "l": model("HTMLModel", value=left),
        "p": model("FloatProgressModel", value=value, max=total),
        "r": model("HTMLModel", value=right),
        "vbox": model("VBoxModel", children=["IPY_MODEL_l"]),
    }


def test_finish_progress_bars_stores_the_last_frame() -> None:
    space = "\u2007"  # tqdm writes spaces as figure spaces in its HTML
    state = _tqdm_widget_state(f"train:{space}100%", 30, 30, f"{space}30/30{space}[00:01&lt;00:00,{space}29.9it/s]")
    view = {"model_id": "box", "version_major": 2, "version_minor": 0}
    other = {"model_id": "vbox", "version_major": 2, "version_minor": 0}
    first_frame = "train:   0%|          | 0/30 [00:00<?, ?it/s]"
    cell = _code("for _ in tqdm(range(30), desc='train'): pass")
    widget = "application/vnd.jupyter.widget-view+json"
    cell.outputs = [
        v4.new_output("display_data", data={widget: view, "text/plain": first_frame}),
        v4.new_output("display_data", data={widget: other, "text/plain": "VBox()"}),
    ]
    nb = v4.new_notebook(cells=[cell])
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": state}}
    assert finish_progress_bars(nb) == 1
    bar, vbox = nb.cells[0].outputs
    assert dict(bar.data) == {"text/plain": "train: 100%|██████████| 30/30 [00:01<00:00, 29.9it/s]"}
    assert widget in vbox.data  # not a progress bar: kept as it is
    assert _sanitize(bar.data["text/plain"]) == _sanitize(first_frame)  # nbval compares the live first frame

    # leave=False: tqdm closes the bar without redrawing its text; the widget's value is final
    for left, right in [(f"train:{space}{space}97%", f"{space}29/30{space}[00:01&lt;00:00]"),
                        (f"train:{space}100%", f"{space}1499/1500{space}[00:01&lt;00:00]")]:
        total = 1500 if "1500" in right else 30
        nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {
            "state": _tqdm_widget_state(left, total, total, right)}}
        nb.cells[0].outputs[0].data = {widget: view, "text/plain": first_frame}
        assert finish_progress_bars(nb) == 1
        assert nb.cells[0].outputs[0].data["text/plain"] == f"train: 100%|██████████| {total}/{total}"


# ------------------------------------------------------------------------------------------------------
# make_exercise


def test_make_exercise_replaces_regions_keeping_indentation() -> None:
    sol = demo_solution()
    ex = make_exercise(sol)
    assert [c.id for c in ex.cells] == [c.id for c in sol.cells]
    assert ex.cells[_demo_index(MY_ADD)].source == MY_ADD_STUBBED
    assert ex.cells[0].source == "# Demo\nWhy does it work?\n*Your answer here.*"
    for cell in ex.cells:
        assert "BEGIN SOLUTION" not in cell.source and "END SOLUTION" not in cell.source
    untouched = [i for i, c in enumerate(sol.cells) if "SOLUTION" not in c.source]
    assert all(ex.cells[i].source == sol.cells[i].source for i in untouched)


def test_make_exercise_clears_outputs_and_normalises_metadata() -> None:
    sol = demo_solution()
    before = writes_notebook(sol)
    ex = make_exercise(sol)
    assert writes_notebook(sol) == before  # the solution is not modified
    for cell in ex.cells:
        assert "execution" not in cell.metadata
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    assert dict(ex.metadata) == {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    nbformat.validate(ex)


def test_make_exercise_tags_exactly_the_cells_that_use_stubs() -> None:
    sol = demo_solution()
    ex = make_exercise(sol)
    expected = {_demo_index(source) for source, _, raises in DEMO_CELLS if raises}
    tagged = {i for i, c in enumerate(ex.cells) if RAISES_TAG in c.metadata.get("tags", [])}
    assert tagged == expected
    assert ex.cells[_demo_index("total = my_add(1, 1)")].metadata["tags"] == ["keep-me", RAISES_TAG]
    assert not any(RAISES_TAG in c.metadata.get("tags", []) for c in sol.cells)  # solutions stay untagged
    assert nbmod.stubbed_names(sol) == {"my_add", "Counter", "total", "c"}


def test_make_exercise_tags_a_cell_that_runs_a_region_at_top_level() -> None:
    nb = v4.new_notebook(
        cells=[
            _code("### BEGIN SOLUTION\nanswer = 42\n### END SOLUTION\nprint(answer)"),
            _code("print(answer + 1)"),
            _code("print('independent')"),
        ]
    )
    ex = make_exercise(nb)
    assert ex.cells[0].source == "# YOUR CODE HERE\nraise NotImplementedError()\nprint(answer)"
    assert [RAISES_TAG in c.metadata.get("tags", []) for c in ex.cells] == [True, True, False]


def test_make_exercise_without_regions_only_clears_outputs() -> None:
    nb = v4.new_notebook(cells=[_code("x = 1", tags=["a"]), v4.new_markdown_cell("text")])
    nb.cells[0].outputs = [v4.new_output("stream", name="stdout", text="1\n")]
    ex = make_exercise(nb)
    assert ex.cells[0].source == "x = 1" and ex.cells[0].metadata["tags"] == ["a"]
    assert ex.cells[0].outputs == []


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def f():\n    ### BEGIN SOLUTION\n    return 1\n", "no ### END SOLUTION"),
        ("def f():\n    return 1\n    ### END SOLUTION\n", "without ### BEGIN SOLUTION"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n### END SOLUTION", "nested"),
    ],
)
def test_make_exercise_rejects_unbalanced_markers(source: str, message: str) -> None:
    nb = v4.new_notebook(cells=[v4.new_markdown_cell("title"), _code("x = 1"), _code(source)])
    with pytest.raises(ValueError, match=rf"cell 2: .*{message}"):
        make_exercise(nb)


@pytest.mark.parametrize(
    "text",
    [
        "<!-- BEGIN SOLUTION --> a",
        "a <!-- END SOLUTION -->",
        "<!-- BEGIN SOLUTION --><!-- BEGIN SOLUTION -->a<!-- END SOLUTION --><!-- END SOLUTION -->",
    ],
)
def test_make_exercise_rejects_unbalanced_markdown_markers(text: str) -> None:
    nb = v4.new_notebook(cells=[_code("x = 1"), v4.new_markdown_cell(text)])
    with pytest.raises(ValueError, match="cell 1: "):
        make_exercise(nb)


def test_make_exercise_is_deterministic(tmp_path: Path) -> None:
    sol = demo_solution()
    first = writes_notebook(make_exercise(sol))
    assert writes_notebook(make_exercise(copy.deepcopy(sol))) == first
    write_notebook(sol, tmp_path / "sol.ipynb")  # through the disk: same text again
    assert writes_notebook(make_exercise(read_notebook(tmp_path / "sol.ipynb"))) == first
    assert first.endswith("}\n")


def test_read_notebook_gives_missing_cell_ids_stable_values(tmp_path: Path) -> None:
    nb = demo_solution()
    for cell in nb.cells:
        del cell["id"]
    path = tmp_path / "no_ids.ipynb"
    path.write_text(json.dumps(nb), encoding="utf-8")
    ids = [c.id for c in read_notebook(path).cells]
    assert ids == [c.id for c in read_notebook(path).cells]
    assert len(set(ids)) == len(ids)


# ------------------------------------------------------------------------------------------------------
# generate and check, in temporary folders


def _course(tmp_path: Path, names: tuple[str, ...] = ("01_demo",)) -> tuple[Path, Path]:
    solutions, notebooks = tmp_path / "solutions", tmp_path / "notebooks"
    solutions.mkdir()
    for name in names:
        write_notebook(demo_solution(), solutions / f"{name}.ipynb")
    return solutions, notebooks


def assert_notebook_in_sync(solution: Path, notebooks_dir: Path) -> None:
    """The sync test's assertions for one solution notebook (compared as the JSON text written)."""
    nb = read_notebook(solution)
    index = nbmod.find_setup_cell(nb)
    assert index is not None and index == nbmod.setup_cell_position(nb) and nb.cells[index].source == SETUP_CELL, (
        f"{solution}: the cell after the title is not the setup cell; run `make exercises`"
    )
    assert nb.cells[index].metadata.get("jupyter") == {"source_hidden": True}, f"{solution}: setup cell not collapsed"
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        tags = cell.metadata.get("tags", [])
        assert cell.execution_count is not None or "skip-execution" in tags, (
            f"{solution}: cell {index} was not executed; run `make execute`"
        )
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors or RAISES_TAG in tags, f"{solution}: cell {index} has an error output"
    exercise = notebooks_dir / solution.name
    assert exercise.exists(), f"{exercise} is missing; run `make exercises`"
    assert exercise.read_text(encoding="utf-8") == writes_notebook(make_exercise(nb)), (
        f"{exercise} is out of sync with {solution}; run `make exercises` (never edit notebooks/ by hand)"
    )


def test_generate_writes_exercises_and_is_idempotent(tmp_path: Path) -> None:
    solutions, notebooks = _course(tmp_path, ("01_a", "02_b"))
    changed = generate(solutions, notebooks)
    assert [p.relative_to(tmp_path).as_posix() for p in changed] == [  # solutions are normalised too
        "solutions/01_a.ipynb",
        "notebooks/01_a.ipynb",
        "solutions/02_b.ipynb",
        "notebooks/02_b.ipynb",
    ]
    texts = {p: p.read_bytes() for p in [*solutions.iterdir(), *notebooks.iterdir()]}
    assert generate(solutions, notebooks) == []
    assert {p: p.read_bytes() for p in texts} == texts  # byte-identical
    assert check(solutions, notebooks) == []
    for solution in solutions.glob("*.ipynb"):
        assert_notebook_in_sync(solution, notebooks)
    assert "widgets" not in read_notebook(solutions / "01_a.ipynb").metadata


def test_generate_stamps_the_setup_cell_into_solutions(tmp_path: Path) -> None:
    solutions, notebooks = _course(tmp_path)
    nb = demo_solution()
    nb.cells.pop(1)
    write_notebook(nb, solutions / "01_demo.ipynb")
    assert any("not the current setup cell" in p for p in check(solutions, notebooks))
    generate(solutions, notebooks)
    assert read_notebook(solutions / "01_demo.ipynb").cells[1].source == SETUP_CELL


def test_generate_removes_orphans_and_paths_limit_the_work(tmp_path: Path) -> None:
    solutions, notebooks = _course(tmp_path, ("01_a", "02_b"))
    generate(solutions, notebooks)
    (solutions / "02_b.ipynb").unlink()
    assert check(solutions, notebooks) == [
        f"{notebooks / '02_b.ipynb'}: no solution {solutions / '02_b.ipynb'} (run `make exercises`)"
    ]
    assert generate(solutions, notebooks, paths=[solutions / "01_a.ipynb"]) == [notebooks / "02_b.ipynb"]
    assert sorted(p.name for p in notebooks.iterdir()) == ["01_a.ipynb"]


def test_a_stale_exercise_copy_fails_the_sync_test(tmp_path: Path) -> None:
    solutions, notebooks = _course(tmp_path)
    generate(solutions, notebooks)
    solution = solutions / "01_demo.ipynb"
    nb = read_notebook(solution)
    nb.cells[-1].source += "\nprint('an edit after the last generate')"
    write_notebook(nb, solution)
    problems = check(solutions, notebooks)
    assert problems == [f"{notebooks / '01_demo.ipynb'}: out of sync with {solution} (run `make exercises`)"]
    with pytest.raises(AssertionError, match="out of sync"):
        assert_notebook_in_sync(solution, notebooks)
    (notebooks / "01_demo.ipynb").unlink()
    with pytest.raises(AssertionError, match="missing"):
        assert_notebook_in_sync(solution, notebooks)
    generate(solutions, notebooks)
    assert_notebook_in_sync(solution, notebooks)


def test_a_hand_edited_exercise_copy_fails_the_sync_test(tmp_path: Path) -> None:
    solutions, notebooks = _course(tmp_path)
    generate(solutions, notebooks)
    exercise = notebooks / "01_demo.ipynb"
    exercise.write_text(exercise.read_text(encoding="utf-8").replace("# YOUR CODE HERE", "return a + b"))
    assert check(solutions, notebooks) and "out of sync" in check(solutions, notebooks)[0]
    with pytest.raises(AssertionError, match="out of sync"):
        assert_notebook_in_sync(solutions / "01_demo.ipynb", notebooks)


def test_check_reports_unexecuted_cells_and_errors(tmp_path: Path) -> None:
    solutions, notebooks = _course(tmp_path)
    nb = demo_solution()
    nb.cells[2].execution_count = None
    nb.cells[3].outputs = [v4.new_output("error", ename="ValueError", evalue="bad", traceback=[])]
    nb.cells[4].outputs = [v4.new_output("error", ename="CheckError", evalue="shown", traceback=[])]
    nb.cells[4].metadata["tags"] = [RAISES_TAG]  # an error on purpose
    write_notebook(nb, solutions / "01_demo.ipynb")
    generate(solutions, notebooks)
    path = solutions / "01_demo.ipynb"
    assert check(solutions, notebooks) == [
        f"{path}: cell 2 was not executed (run `make execute`)",
        f"{path}: cell 3 has an error output",
    ]
    with pytest.raises(AssertionError, match="cell 2 was not executed"):
        assert_notebook_in_sync(path, notebooks)


def test_generate_names_the_notebook_on_bad_markers(tmp_path: Path) -> None:
    solutions, notebooks = _course(tmp_path)
    write_notebook(v4.new_notebook(cells=[_code("### BEGIN SOLUTION\nx = 1")]), solutions / "02_bad.ipynb")
    with pytest.raises(ValueError, match=r"02_bad\.ipynb: cell 1: "):  # cell 0 is the stamped setup cell
        generate(solutions, notebooks)


def test_cli_check_exit_status(tmp_path: Path, capsys) -> None:
    solutions, notebooks = _course(tmp_path)
    args = ["--solutions", str(solutions), "--notebooks", str(notebooks)]
    assert nbmod.main(["check", *args]) == 1
    assert "missing" in capsys.readouterr().out
    assert nbmod.main(["generate", *args]) == 0
    assert "wrote" in capsys.readouterr().out
    done = subprocess.run(
        [sys.executable, "-m", "moe_course.course.notebooks", "check", *args], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------------------------------------------
# THE SYNC TEST: notebooks/ is exactly what the generator makes from solutions/

SOLUTION_PATHS = sorted(SOLUTIONS.glob("*.ipynb"))


@pytest.mark.parametrize("solution", SOLUTION_PATHS or [None], ids=lambda p: p.name if p else "none")
def test_exercise_notebooks_are_in_sync_with_solutions(solution: Path | None) -> None:
    if solution is None:
        pytest.skip("solutions/ has no notebooks yet: nothing to keep in sync")
    assert_notebook_in_sync(solution, NOTEBOOKS)


def test_no_exercise_notebook_without_solution() -> None:
    names = {p.name for p in SOLUTION_PATHS}
    extra = [p.name for p in sorted(NOTEBOOKS.glob("*.ipynb")) if p.name not in names]
    assert not extra, f"notebooks/ has copies without a solution: {extra}; run `make exercises`"


# ------------------------------------------------------------------------------------------------------
# nbval's sanitize patterns


def _sanitize(text: str) -> str:
    from nbval.plugin import get_sanitize_patterns

    for regex, replace in get_sanitize_patterns(SANITIZE.read_text(encoding="utf-8")):
        text = re.sub(regex, replace, text)
    return text


def test_sanitize_file_is_read_completely_by_nbval() -> None:
    from nbval.plugin import get_sanitize_patterns

    text = SANITIZE.read_text(encoding="ascii")  # ASCII: nbval opens it with the locale's encoding
    patterns = get_sanitize_patterns(text)
    assert len(patterns) == sum(line.startswith("regex: ") for line in text.splitlines()) >= 5
    for regex, replace in patterns:
        re.compile(regex)
        assert regex == regex.strip() and replace == replace.strip()


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (" 45%|████▌     | 45/100 [00:01<00:02, 30.1it/s]", "PROGRESS/100"),
        ("100%|██████████| 50/50 [00:00<00:00, 98.24it/s]", "PROGRESS/50"),
        ("train:   0%|          | 0/30 [00:00<?, ?it/s]", "train:PROGRESS/30"),
        ("train: 100%|██████████| 30/30 [00:01<00:00, 29.9it/s, loss=1.2]", "train:PROGRESS/30"),
        ("train: 100%|██████████| 30/30", "train:PROGRESS/30"),
        ("epoch 3: 100%|##########| 9/9 [1:02:03<00:00, 4.12s/it, loss=2.31]", "epoch 3:PROGRESS/9"),
        ("50it [00:00, 95.66it/s, loss=1.5]", "50it [TIME, RATE, loss=1.5]"),
        ("100%|██████████| 2k/2k [00:03<00:00, 61.2tok/s]", "PROGRESS/2k"),
        ("took 12.3 s", "took TIME"),
        ("one step: 1.23 ms, all: 0.5s", "one step: TIME, all: TIME"),
        ("dense 3 s vs sparse 2.0 seconds", "dense TIME vs sparse TIME"),
        (
            "CPU times: user 5 μs, sys: 0 ns, total: 5 µs\nWall time: 6.44 μs",
            "CPU times: user TIME, sys: TIME, total: TIME\nWall time: TIME",
        ),
        ("1.08 μs ± 207 ns per loop (mean ± std. dev. of 7 runs, 1,000,000 loops each)", "TIMEIT"),
        ("12.3 ms ± 1.2 ms per loop (mean ± std. dev. of 7 runs, 100 loops each)", "TIMEIT"),
        (
            "throughput: 30.1 it/s, 12,345 tokens/s, 2.5k tok/s, 1.5 s/it",
            "throughput: RATE, RATE, RATE, RATE",
        ),
        ("<__main__.A object at 0x7fc051d5d710>", "<__main__.A object at 0xADDRESS>"),
        ("<function f at 0x10a3b5e80>", "<function f at 0xADDRESS>"),
    ],
)
def test_sanitize_hides_what_changes_between_runs(raw: str, clean: str) -> None:
    assert _sanitize(raw) == clean


@pytest.mark.parametrize(
    "text",
    [
        "loss 2.345, accuracy 0.912",
        "top-2 routing with 8 experts, 3 steps, 16 tokens",
        "Jacobs et al. 1991; the 1990s",
        "MaxVio 0.123, CV 0.45",
        "<Figure size 640x480 with 1 Axes>",
        "Mixtral 8x7B: 46.7B total / 12.9B active",
        "tensor([0.1234, 0.5000])",
        "byte 0x41 is 'A'",
        "faster: True",
        "shape (4, 16, 32) -> 2 s-shaped curves",
    ],
)
def test_sanitize_keeps_results(text: str) -> None:
    assert _sanitize(text) == text


# ------------------------------------------------------------------------------------------------------
# with a kernel: execute() and the exercise copy of a tiny course


KERNEL_SOLUTION = [
    "import os",
    "def my_add(a, b):\n    ### BEGIN SOLUTION\n    return a + b\n    ### END SOLUTION",
    "assert my_add(2, 3) == 5\nprint('OK  my_add')",
    "print(2 + 2, os.environ.get('MOE_DEVICE'), os.path.basename(os.getcwd()))",
    "# NBVAL_IGNORE_OUTPUT\nfrom tqdm.auto import tqdm\n\nfor _ in tqdm(range(5), desc='steps', leave=False):\n"
    "    pass",
]


def test_execute_then_exercise_copy_raises_only_in_tagged_cells(tmp_path: Path, capsys) -> None:
    from nbclient import NotebookClient

    solutions, notebooks = tmp_path / "solutions", tmp_path / "notebooks"
    solutions.mkdir()
    solution = solutions / "01_tiny.ipynb"
    write_notebook(v4.new_notebook(cells=[_code(s) for s in KERNEL_SOLUTION]), solution)

    times = execute([solution])
    assert list(times) == [solution] and f"{solution}: " in capsys.readouterr().out
    generate(solutions, notebooks)
    assert check(solutions, notebooks) == []
    executed = read_notebook(solution)
    assert executed.cells[0].source == SETUP_CELL and executed.cells[0].outputs == []  # silent off Colab
    assert executed.cells[4].outputs[0].text == "4 cpu solutions\n"  # MOE_DEVICE=cpu, cwd = its folder
    assert all("execution" not in c.metadata for c in executed.cells)
    bar = executed.cells[5]  # a tqdm.auto widget in the kernel, stored as the text of its final state
    assert bar.metadata["tags"] == ["nbval-ignore-output"] and not bar.source.startswith("#")
    assert [dict(o.data) for o in bar.outputs if o.output_type == "display_data"] == [
        {"text/plain": bar.outputs[0].data["text/plain"]}
    ]
    assert bar.outputs[0].data["text/plain"] == "steps: 100%|██████████| 5/5"  # leave=False: no time kept

    exercise = read_notebook(notebooks / solution.name)
    NotebookClient(
        exercise,
        kernel_name="python3",
        timeout=60,
        allow_errors=True,
        resources={"metadata": {"path": str(notebooks)}},
    ).execute()
    errors = {
        i: [o.ename for o in c.outputs if o.output_type == "error"] for i, c in enumerate(exercise.cells)
    }
    tagged = {i for i, c in enumerate(exercise.cells) if RAISES_TAG in c.metadata.get("tags", [])}
    assert tagged == {3}
    assert {i: e for i, e in errors.items() if e} == {3: ["NotImplementedError"]}
    assert exercise.cells[4].outputs[0].text.startswith("4 ")


def test_make_test_compares_with_the_environment_make_execute_records_with() -> None:
    """Outputs are recorded and compared with the same CPU kernels (AVX2 on x86-64; see RECORDING_ENV)."""
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "test test-notebooks test-exercises: export MOE_DEVICE = cpu" in makefile
    assert nbmod.RECORDING_ENV["MOE_DEVICE"] == "cpu"
    if "ATEN_CPU_CAPABILITY" in nbmod.RECORDING_ENV:
        value = nbmod.RECORDING_ENV["ATEN_CPU_CAPABILITY"]
        assert f"test test-notebooks test-exercises: export ATEN_CPU_CAPABILITY = {value}" in makefile
        probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                              env={**os.environ, "ATEN_CPU_CAPABILITY": value})
        assert done.stdout.strip() == value.upper()  # the variable takes effect in a fresh interpreter


@pytest.mark.parametrize("solution", SOLUTION_PATHS, ids=lambda p: p.name)
def test_every_notebook_pins_one_cpu_thread_where_it_picks_its_device(solution: Path) -> None:
    """Recorded outputs must not depend on the core count: one CPU thread from the imports cell on, never changed."""
    cells = [c for c in read_notebook(solution).cells if c.cell_type == "code"]
    where = [i for i, c in enumerate(cells) if "device = pick_device()" in c.source]
    assert len(where) == 1, f"{solution.name}: expected one `device = pick_device()` cell, found {len(where)}"
    first = cells[where[0]].source
    assert "device = pick_device()\npin_threads(device)" in first, (
        f"{solution.name}: call pin_threads(device) right after pick_device() (moe_course.device.pin_threads)")
    assert not any("pick_device" in c.source or "torch.set_num_threads" in c.source or "TinyLM(" in c.source
                   for c in cells[:where[0]]), f"{solution.name}: work before the device and threads are set"
    changed = [i for i, c in enumerate(cells) if "set_num_threads" in c.source]
    assert not changed, f"{solution.name}: code cells {changed} change the thread count after pin_threads"
