"""The package's internal imports go one way: no circles, and the layers of the tree are kept.

Every ``import`` statement counts, at the top of a module or inside a function (a function-level import
that closes a circle only hides it until the function runs). The layers, lowest first: the concepts (the
modules at the top of ``moe_course`` and the exercise checks), the figures (``moe_course.plots``) and the
experiments (``moe_course.experiments``), and the course's machinery (``moe_course.course``).
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

import moe_course

PACKAGE = Path(moe_course.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (``moe_course`` is its ``__init__.py``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("moe_course", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement may load: the module named and, for ``from X import y``, X.y."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from . import x, from ..y import z
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (function bodies included)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(node, name, path.name == "__init__.py"):
                    if target in modules and target != name:
                        graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None (depth-first search with three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_graph_sees_top_level_and_function_level_imports():
    graph = import_graph()
    assert "moe_course.check.capstone" in graph  # subpackages are parsed too
    assert "moe_course.routing" in graph["moe_course.moe"]  # from moe_course.routing import ... (top level)
    assert "moe_course.analysis" in graph["moe_course.experiments.fine_grained"]  # inside _probe_05 (function level)
    assert "moe_course.snapshot" in graph["moe_course.corpus"]  # from moe_course import snapshot


def test_find_cycle_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_package_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, (f"import cycle: {' -> '.join(cycle)}; move the shared helper into the lower module "
                           "(the one the others import) and re-export it where notebooks import it")


def test_moved_helpers_are_importable_from_their_old_modules():
    from moe_course import analysis, capstone, experiments, loss_free

    assert capstone.type_expert_table is analysis.type_expert_table  # notebook 08 imports it from capstone
    assert experiments.base_model is loss_free.course_model  # notebook 04 imports these from experiments
    assert experiments.base_train is loss_free.course_train
    assert experiments.SIZES == loss_free.SIZES == ("smoke", "cpu", "gpu")
    assert loss_free.base_model("smoke").router_score == "sigmoid"  # notebook 06's variant is unchanged
    assert {"type_expert_table"} <= set(capstone.__all__) & set(analysis.__all__)
    assert {"SIZES", "base_model", "base_train"} <= set(experiments.__all__)


LAYERS = ("plots", "experiments", "course")
"""The subpackages above the concepts; a concept imports none of them."""
MAY_IMPORT = {"concept": set(), "plots": {"plots"}, "experiments": {"experiments"},
              "course": {"plots", "experiments", "course"}}
"""Which subpackages each layer may import (every layer may import the concepts)."""


def layer_of(module: str) -> str:
    """``"plots"``, ``"experiments"`` or ``"course"`` for a module in that subpackage, else ``"concept"``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "concept"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes up a layer (or sideways between plots and experiments), as "a -> b"."""
    return [f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a])
            if layer_of(b) != "concept" and layer_of(b) not in MAY_IMPORT[layer_of(a)]]


def test_layer_of_names_the_subpackages():
    assert layer_of("moe_course.routing") == layer_of("moe_course.check.routing") == layer_of("moe_course") == "concept"
    assert layer_of("moe_course.plots.balancing") == "plots"
    assert layer_of("moe_course.experiments") == layer_of("moe_course.experiments.runner") == "experiments"
    assert layer_of("moe_course.course.notebooks") == "course"


def test_layer_violations_finds_planted_ones():
    planted = {"moe_course.routing": {"moe_course.plots.style"},
               "moe_course.plots.capstone": {"moe_course.course.links", "moe_course.capstone"},
               "moe_course.experiments.runner": {"moe_course.plots.style"},
               "moe_course.course.readme_tables": {"moe_course.experiments", "moe_course.plots.style"}}
    assert layer_violations(planted) == ["moe_course.experiments.runner -> moe_course.plots.style",
                                         "moe_course.plots.capstone -> moe_course.course.links",
                                         "moe_course.routing -> moe_course.plots.style"]


def test_concepts_figures_and_experiments_never_import_up():
    bad = layer_violations(import_graph())
    assert not bad, ("imports against the layers (concepts < plots, experiments < course): " + "; ".join(bad)
                     + ". Move the shared piece down into a concept module")


def test_the_tree_has_the_three_subpackages_and_no_flat_figure_modules():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert not {t for t in top if t.startswith("plots") or t in ("widgets", "notebooks", "links", "readme_tables",
                                                                 "course_table", "gpu_results", "experiments")}
    for sub in LAYERS:
        assert (PACKAGE / sub / "__init__.py").is_file(), sub


@pytest.mark.parametrize("module", sorted(_modules()))
def test_every_module_says_what_it_holds_and_which_notebook_uses_it(module):
    """The first paragraph of each module's docstring names the notebook(s) that use it (or says every one)."""
    doc = ast.get_docstring(ast.parse(_modules()[module].read_text(encoding="utf-8")))
    assert doc, f"{module} has no docstring"
    first = " ".join(doc.split("\n\n")[0].split())
    assert re.search(r"(?i)notebooks? \d\d|every notebook", first), (
        f"{module}: the docstring's first paragraph should name the notebook that uses it, got {first!r}")
