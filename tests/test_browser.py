"""The course in a real browser: JupyterLab on localhost, headless Chromium, every exercise notebook run.

Each notebook in notebooks/ (the learner's copies) is opened in JupyterLab and run with the menu
Run > Run All Cells, as a learner would. Then the page must show: an error only in cells tagged
``raises-exception`` (the unfinished exercises), every figure that the solution notebook has, every widget
rendered (no "Error displaying widget"), and for each slider widget, a new figure after a slider moves.
The run stands in for nbval-lax on notebooks/ in ``make test`` (see the Makefile).

Needs Playwright (``pip install playwright``) and a Chromium binary (Debian: ``apt-get install chromium``;
set MOE_CHROMIUM to use another path); Playwright's own browser download is not used. Without them the
test is skipped, or fails when MOE_REQUIRE_BROWSER=1 (CI). On failure, screenshots of the page and of
each failing cell are written to SCREENSHOTS (in the system's temp folder) and named in the message.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

from moe_course.course.notebooks import RAISES_TAG

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))
LAB_OVERRIDES = REPO / "jupyter-settings" / "overrides.json"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
FIGURE_TYPES = ("image/png", "image/jpeg", "image/svg+xml")
WIDGET_TYPE = "application/vnd.jupyter.widget-view+json"
# Generous limits: the test machine has 2 slow cores shared with other jobs.
SERVER_START_S = 180
KERNEL_START_S = 180
RUN_ALL_S = 1800
RENDER_S = 120
RUN_START_S = 60  # Run All must start a cell within this
SLIDER_REDRAW_S = 120
STALLED_S = 15  # kernel idle this long with cells left unrun: Run All stopped (an untagged error)

# Own folders, not pytest's tmp_path: parallel pytest runs on the machine rotate (delete) old tmp_path folders.
SCREENSHOTS = Path(tempfile.gettempdir()) / "moe_course_browser_test"

PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"
# The state of every cell of the open notebook, in notebook order: prompt, figures, widgets (progress bars
# excluded), sliders.
CELLS_JS = """(panel) => [...document.querySelectorAll(panel + ' .jp-Notebook .jp-Cell')].map(cell => {
  const top = [...cell.querySelectorAll('.jp-OutputArea-output')]
    .filter(o => !o.parentElement.closest('.jupyter-widgets'));
  const imgs = [...cell.querySelectorAll('.jp-OutputArea-output img')];
  const outside = imgs.filter(i => !i.closest('.jupyter-widgets'));
  return {
    code: cell.classList.contains('jp-CodeCell'),
    prompt: (cell.querySelector('.jp-InputPrompt') || {innerText: ''}).innerText.trim(),
    figures: outside.length,
    figures_loaded: outside.filter(i => i.complete && i.naturalWidth > 0).length,
    widget_figures: imgs.filter(i => i.closest('.jupyter-widgets') && i.complete && i.naturalWidth > 0)
                        .map(i => i.src),
    // tqdm progress bars are widgets live but stored as text in the solutions (notebooks.finish_progress_bars)
    widgets: top.filter(o => o.querySelector('.jupyter-widgets')
                          && !o.querySelector('.widget-hprogress, .widget-vprogress')).length,
    sliders: cell.querySelectorAll('.widget-slider').length,
    widget_errors: (cell.innerText.match(/Error displaying widget|Loading widget\\.\\.\\./g) || []).length,
  };
})"""


def find_chromium() -> str | None:
    """The Chromium (or Chrome) binary to drive: $MOE_CHROMIUM, else the first of CHROMIUM_NAMES on PATH."""
    if os.environ.get("MOE_CHROMIUM"):
        return os.environ["MOE_CHROMIUM"]
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def _unavailable(reason: str) -> None:
    """Skip (locally) or fail (MOE_REQUIRE_BROWSER=1, as in CI) when the browser test cannot run."""
    if os.environ.get("MOE_REQUIRE_BROWSER", "") not in ("", "0"):
        pytest.fail(f"MOE_REQUIRE_BROWSER is set but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, token: str, path: str, method: str = "GET") -> Any:
    """Call the Jupyter server's REST API; returns the decoded JSON (None when the reply is empty)."""
    req = urllib.request.Request(f"{base}/api/{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=30) as reply:
        body = reply.read()
    return json.loads(body) if body else None


def expected_outputs(solution: Path) -> dict[str, dict[str, Any]]:
    """Per cell id of the solution notebook: its figure count, widget count, and whether a widget has sliders."""
    expected = {}
    for cell in nbformat.read(solution, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        datas = [o.get("data", {}) for o in cell.get("outputs", []) if "data" in o]
        widgets = [d for d in datas if WIDGET_TYPE in d]
        expected[cell.get("id")] = {
            "figures": sum(any(t in d for t in FIGURE_TYPES) for d in datas),
            "widgets": len(widgets),
            "sliders": any("Slider(" in d.get("text/plain", "") for d in widgets),
        }
    return expected


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium driven by Playwright, shared by the notebooks of this module."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install playwright)")
    chromium = find_chromium()
    if chromium is None:
        _unavailable("chromium not found, install it with apt-get install chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def lab(browser: Any) -> Iterator[dict[str, Any]]:
    """JupyterLab on a free localhost port, serving a temporary copy of notebooks/ (and data/, if present).

    The copy lets the test save the notebooks it runs without touching the repository. Settings come from
    temporary folders: the course's overrides (no news pop-up) and, for the test only, every cell kept in
    the page (windowingMode none) so that the page can be read from top to bottom.
    """
    tmp = Path(tempfile.mkdtemp(prefix="moe_course_lab_"))
    root = tmp / "course"
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    if (REPO / "data").is_dir():
        shutil.copytree(REPO / "data", root / "data")
    app_settings = tmp / "app-settings"
    app_settings.mkdir()
    shutil.copy(LAB_OVERRIDES, app_settings / "overrides.json")
    tracker = tmp / "user-settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyterlab", "--ServerApp.open_browser=False", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", f"--LabApp.app_settings_dir={app_settings}",
           f"--LabApp.user_settings_dir={tracker.parents[2]}", f"--LabApp.workspaces_dir={tmp / 'workspaces'}"]
    if hasattr(os, "getuid") and os.getuid() == 0:
        cmd.append("--allow-root")
    # One intra-op thread per kernel unless told otherwise: on a 2-core machine shared with other jobs,
    # PyTorch's default (one thread per core) oversubscribes the cores and small ops slow down many times.
    env = {**os.environ, "MOE_DEVICE": os.environ.get("MOE_DEVICE", "cpu"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log = open(tmp / "jupyterlab.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            _api(base, token, "status")
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                log.close()
                pytest.fail(f"JupyterLab did not start; its log:\n{(tmp / 'jupyterlab.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield {"base": base, "token": token, "root": root, "log": tmp / "jupyterlab.log"}
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    log.close()
    shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_kernel(page: Any) -> None:
    """Wait until the notebook's kernel is idle and no dialog is open; accept a "Select Kernel" dialog.

    JupyterLab sometimes asks for the kernel although the notebook names one (a race while it loads); a
    learner clicks "Select" with the proposed Python 3 kernel, and so does the test.
    """
    deadline = time.monotonic() + KERNEL_START_S
    ready_since = None
    while time.monotonic() < deadline:
        dialog = page.locator(".jp-Dialog")
        if dialog.count():
            text = dialog.first.inner_text()
            if "Select Kernel" not in text:
                pytest.fail(f"JupyterLab opened a dialog: {text!r}")
            dialog.first.locator(".jp-mod-accept").click()
            ready_since = None
        elif page.locator(f"{PANEL} .jp-Notebook-ExecutionIndicator[data-status=idle]").count():
            ready_since = ready_since or time.monotonic()
            if time.monotonic() - ready_since > 2.0:
                return
        time.sleep(0.5)
    pytest.fail(f"the kernel was not ready within {KERNEL_START_S} s")


def _code_prompts(page: Any) -> list[str]:
    return [c["prompt"] for c in page.evaluate(CELLS_JS, PANEL) if c["code"]]


def _run_all(page: Any) -> list[dict[str, Any]]:
    """Run > Run All Cells, then wait until every code cell has run and the kernel is idle, or Run All has
    stopped (an untagged error); return the cells. The menu is tried again if no cell starts (seen once on a
    loaded machine, right after the kernel came up)."""
    for _attempt in range(3):
        page.click(".lm-MenuBar-itemLabel:text-is('Run')")
        page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
        deadline = time.monotonic() + RUN_START_S
        while time.monotonic() < deadline and all(p == "[ ]:" for p in _code_prompts(page)):
            time.sleep(0.5)
        if not all(p == "[ ]:" for p in _code_prompts(page)):
            break
    else:
        pytest.fail(f"Run > Run All Cells started no cell in 3 tries of {RUN_START_S} s")
    started = time.monotonic()
    idle_since = None
    while True:
        cells = page.evaluate(CELLS_JS, PANEL)
        status = page.get_attribute(f"{PANEL} .jp-Notebook-ExecutionIndicator", "data-status")
        prompts = [c["prompt"] for c in cells if c["code"]]
        running = any("*" in p for p in prompts)
        if status == "idle" and not running and all(p[1:-2].isdigit() for p in prompts):
            return cells
        idle_since = (idle_since or time.monotonic()) if status == "idle" and not running else None
        if idle_since and time.monotonic() - idle_since > STALLED_S:
            return cells  # Run All stopped early: the unrun cells are reported by the caller
        if time.monotonic() - started > RUN_ALL_S:
            pytest.fail(f"Run All did not finish in {RUN_ALL_S} s (kernel {status}); prompts: {prompts}")
        time.sleep(1.0)


def _rendered(cells: list[dict[str, Any]], expected: list[dict[str, Any] | None]) -> bool:
    """Whether every figure and widget that the solution shows has appeared (and loaded) in the page."""
    return all(e is None or (c["figures_loaded"] >= e["figures"] and c["widgets"] >= e["widgets"]
                             and (not e["sliders"] or (c["sliders"] and c["widget_figures"])))
               for c, e in zip(cells, expected, strict=True))


def _save(page: Any, path: Path, n_code: int) -> Any:
    """Save the notebook from the page (File > Save) and read it back; returns the saved notebook."""
    before = path.stat().st_mtime_ns
    page.click(".lm-MenuBar-itemLabel:text-is('File')")
    page.click(".lm-Menu-itemLabel:text-matches('^Save( Notebook)?$')")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.stat().st_mtime_ns != before:
            try:
                nb = nbformat.read(path, as_version=4)
                if sum(c.cell_type == "code" for c in nb.cells) == n_code:
                    return nb
            except (json.JSONDecodeError, nbformat.reader.NotJSONError):
                pass  # caught mid-write
        time.sleep(0.5)
    pytest.fail(f"saving {path.name} from JupyterLab did not change the file within 60 s")


def _move_slider(page: Any, cell: Any) -> str | None:
    """Move the cell's first slider one step right; return what went wrong, or None once its figure changed."""
    figures = cell.locator(".jupyter-widgets .jp-OutputArea-output img")
    before = figures.evaluate_all("imgs => imgs.map(i => i.src)")
    readout = cell.locator(".widget-slider .widget-readout").first
    value = readout.inner_text()
    handle = cell.locator(".widget-slider .noUi-handle, .widget-slider .ui-slider-handle").first
    handle.scroll_into_view_if_needed()
    handle.focus()
    page.keyboard.press("ArrowRight")
    deadline = time.monotonic() + SLIDER_REDRAW_S
    while time.monotonic() < deadline:
        after = figures.evaluate_all("imgs => imgs.filter(i => i.complete && i.naturalWidth > 0).map(i => i.src)")
        if after and after != before:
            return None
        time.sleep(0.5)
    return (f"moving the first slider (readout {value!r} -> {readout.inner_text()!r}) did not redraw "
            f"the widget's figure within {SLIDER_REDRAW_S} s")


def _screenshots(page: Any, stem: Path, cells: Iterable[int]) -> list[str]:
    """Save a screenshot of the page and of (up to five of) the given cells; return their paths."""
    shots = [f"{stem}.png"]
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=shots[0])
        for i in sorted(cells)[:5]:
            shots.append(f"{stem}_cell{i}.png")
            page.locator(f"{PANEL} .jp-Notebook .jp-Cell").nth(i).screenshot(path=shots[-1], timeout=30_000)
    except Exception as err:  # a screenshot must never hide the real failure
        shots.append(f"(screenshot failed: {err})")
    return shots


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_browser(name: str, lab: dict[str, Any], browser: Any) -> None:
    """Run All in JupyterLab: errors only where tagged, every figure drawn, widgets live."""
    path = lab["root"] / "notebooks" / name
    solution_expected = expected_outputs(REPO / "solutions" / name)
    nb = nbformat.read(path, as_version=4)
    tagged = [RAISES_TAG in c.metadata.get("tags", []) for c in nb.cells]
    # What the solution shows, per cell of this copy (same cell ids); a tagged cell stops at the exercise.
    expected = [None if c.cell_type != "code" or tag else solution_expected.get(c.get("id"))
                for c, tag in zip(nb.cells, tagged, strict=True)]
    n_code = sum(c.cell_type == "code" for c in nb.cells)

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: dict[int, list[str]] = {}  # cell index -> what is wrong with it

    def problem(i: int, text: str) -> None:
        problems.setdefault(i, []).append(f"cell {i}: {text}")
    try:
        page.set_default_timeout(60_000)
        page.goto(f"{lab['base']}/lab/tree/notebooks/{name}?reset&token={lab['token']}")
        page.wait_for_selector(f"{PANEL} .jp-Notebook .jp-Cell", timeout=KERNEL_START_S * 1000)
        _wait_for_kernel(page)
        toasts = page.locator(".Toastify__toast").all_inner_texts()
        assert not [t for t in toasts if "news" in t.lower()], f"JupyterLab showed its news pop-up: {toasts}"

        started = time.monotonic()
        cells = _run_all(page)
        run_s = time.monotonic() - started
        assert len(cells) == len(nb.cells), f"the page shows {len(cells)} cells, the notebook has {len(nb.cells)}"
        deadline = time.monotonic() + RENDER_S
        while not _rendered(cells, expected) and time.monotonic() < deadline:
            time.sleep(1.0)
            cells = page.evaluate(CELLS_JS, PANEL)

        saved = _save(page, path, n_code)
        for i, (cell, tag) in enumerate(zip(saved.cells, tagged, strict=True)):
            if cell.cell_type != "code":
                continue
            if cell.get("execution_count") is None:
                problem(i, "never run (Run All stopped before it)")
            errors = [f"{o.ename}: {o.evalue}" for o in cell.get("outputs", []) if o.output_type == "error"]
            if errors and not tag:
                problem(i, f"not tagged {RAISES_TAG} but shows an error: {errors[0]}")

        for i, (c, e) in enumerate(zip(cells, expected, strict=True)):
            if c["figures_loaded"] < c["figures"]:
                problem(i, f"{c['figures'] - c['figures_loaded']} figure(s) failed to load")
            if c["widget_errors"]:
                problem(i, "a widget did not render (Error displaying widget / Loading widget)")
            if e is None:
                continue
            if c["figures"] != e["figures"]:
                problem(i, f"{c['figures']} figure(s) drawn, the solution has {e['figures']}")
            if c["widgets"] != e["widgets"]:
                problem(i, f"{c['widgets']} widget(s) rendered, the solution has {e['widgets']}")
            if e["sliders"] and not (c["sliders"] and c["widget_figures"]):
                problem(i, f"the widget shows {c['sliders']} slider(s) and {len(c['widget_figures'])} figure(s); "
                           "expected sliders and a figure")
            elif e["sliders"]:
                cell_locator = page.locator(f"{PANEL} .jp-Notebook .jp-Cell").nth(i)
                if slider_problem := _move_slider(page, cell_locator):
                    problem(i, slider_problem)
        if problems:
            shots = _screenshots(page, SCREENSHOTS / Path(name).stem, problems)
            problems[len(nb.cells)] = ["screenshots: " + ", ".join(shots)]
        print(f"{name}: Run All took {run_s:.1f} s in the browser")
    except BaseException:
        print("screenshots:", ", ".join(_screenshots(page, SCREENSHOTS / Path(name).stem, problems)))
        raise
    finally:
        page.close()
        for session in _api(lab["base"], lab["token"], "sessions"):
            _api(lab["base"], lab["token"], f"sessions/{session['id']}", method="DELETE")
    assert not problems, f"{name} in JupyterLab:\n" + "\n".join(sum((problems[i] for i in sorted(problems)), []))
