"""Launch links: the URL builders, and every Colab/Binder badge and link in README.md and the title cells."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

from moe_course.course import links
from moe_course.course.links import (
    BINDER_BADGE_SVG,
    BRANCH,
    COLAB_BADGE_SVG,
    REPO_URL,
    binder_badge,
    binder_url,
    colab_badge,
    colab_url,
    repo_slug,
)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "notebooks").glob("*.ipynb"))
SLUG = repo_slug()
LAUNCHABLE = ("notebooks", "solutions")  # folders whose notebooks a launch link may open

URL = re.compile(r"https?://[^\s)<>\]\"'`]+")
MD_LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|!\[[^\]]*\]\([^)]*\))*\]\(([^)\s]+)\)")  # [text](target), not images
BADGE = re.compile(r"\[!\[([^\]]*)\]\(([^)\s]+)\)\]\(([^)\s]+)\)")  # [![alt](image)](target)
B = re.escape(BRANCH)
COLAB = re.compile(rf"https://colab\.research\.google\.com/github/{re.escape(SLUG)}/blob/{B}/(\S+\.ipynb)")
BINDER = re.compile(rf"https://mybinder\.org/v2/gh/{re.escape(SLUG)}/{B}\?urlpath=lab/tree/(\S+\.ipynb)")


# -- the URL builders ----------------------------------------------------------------------------------


def test_urls_built_from_the_repo_url() -> None:
    assert links.REPO_URL == REPO_URL and REPO_URL == f"https://github.com/{SLUG}"
    assert colab_url("notebooks/03_topk_routing.ipynb") == (
        f"https://colab.research.google.com/github/{SLUG}/blob/{BRANCH}/notebooks/03_topk_routing.ipynb"
    )
    assert binder_url() == f"https://mybinder.org/v2/gh/{SLUG}/{BRANCH}?urlpath=lab/tree/notebooks/00_welcome.ipynb"
    assert colab_url("notebooks/00_welcome.ipynb", "https://github.com/a/b", "v2") == (
        "https://colab.research.google.com/github/a/b/blob/v2/notebooks/00_welcome.ipynb")
    assert colab_url(Path("notebooks") / "00_welcome.ipynb") == colab_url("notebooks/00_welcome.ipynb")


def test_badges_wrap_the_urls() -> None:
    path = "notebooks/01_local_experts_1991.ipynb"
    assert colab_badge(path) == f"[![Open In Colab]({COLAB_BADGE_SVG})]({colab_url(path)})"
    assert binder_badge() == f"[![Binder]({BINDER_BADGE_SVG})]({binder_url()})"
    assert BADGE.fullmatch(colab_badge(path)) and BADGE.fullmatch(binder_badge())


@pytest.mark.parametrize("bad", ["/abs/notebooks/00.ipynb", "00_welcome.ipynb", "notebooks/00.py",
                                 "notebooks/../../x.ipynb"])
def test_bad_notebook_path_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="notebook_path must be a relative path"):
        colab_url(bad)
    with pytest.raises(ValueError, match="notebook_path must be a relative path"):
        binder_url(bad)


@pytest.mark.parametrize("bad", ["https://gitlab.com/a/b", "https://github.com/only-owner", "github.com/a/b"])
def test_bad_repo_url_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="repo_url must look like https://github.com/OWNER/REPO"):
        repo_slug(bad)


# -- the links in README.md and the notebooks' title cells ---------------------------------------------


def _link_problems(text: str, where: str) -> list[str]:
    """Every Colab/Binder URL, badge and relative link in ``text`` that is malformed or points nowhere."""
    problems: list[str] = []
    for alt, image, target in BADGE.findall(text):
        expected = {COLAB_BADGE_SVG: "colab.research.google.com", BINDER_BADGE_SVG: "mybinder.org"}.get(image)
        if expected and expected not in target:
            problems.append(f"{where}: badge {alt!r} shows {image} but links to {target}")
    for svg in (COLAB_BADGE_SVG, BINDER_BADGE_SVG):
        if text.count(svg) != sum(image == svg for _, image, _ in BADGE.findall(text)):
            problems.append(f"{where}: {svg} used outside a well-formed [![alt](image)](target) badge")
    for url in URL.findall(text):
        if url in (COLAB_BADGE_SVG, BINDER_BADGE_SVG):
            continue
        if "colab.research.google.com" in url or "mybinder.org" in url:
            match = COLAB.fullmatch(url) or BINDER.fullmatch(url)
            if not match:
                problems.append(f"{where}: malformed launch link {url}")
                continue
            path = match.group(1)
            rebuilt = colab_url(path) if match.re is COLAB else binder_url(path)
            if url != rebuilt:
                problems.append(f"{where}: {url} differs from the builder's {rebuilt}")
            if path.split("/")[0] not in LAUNCHABLE or not (ROOT / path).is_file():
                problems.append(f"{where}: {url} opens {path}, which is not a notebook in notebooks/ or solutions/")
        elif url.startswith((f"{REPO_URL}/blob/{BRANCH}/", f"{REPO_URL}/tree/{BRANCH}/")):
            path = url.split(f"/{BRANCH}/", 1)[1]
            if not (ROOT / path).exists():
                problems.append(f"{where}: {url} points at {path}, which does not exist")
    for target in MD_LINK.findall(text):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        if not (ROOT / target.split("#", 1)[0]).exists():
            problems.append(f"{where}: relative link {target} points at a missing file")
    return problems


def _title_cell(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    markdown = [cell for cell in nb.cells if cell.cell_type == "markdown"]
    assert markdown, f"{path.name} has no markdown title cell"
    return markdown[0].source


def test_there_are_notebooks() -> None:
    assert len(NOTEBOOKS) >= 4 and "notebooks/00_welcome.ipynb" in NOTEBOOKS


def test_readme_links_are_well_formed_and_point_at_notebooks() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert _link_problems(readme, "README.md") == []


def test_readme_has_a_colab_badge_for_every_notebook_and_a_binder_badge_at_the_top() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [path for path in NOTEBOOKS if colab_badge(path) not in readme]
    assert missing == [], f"README.md lacks an Open-in-Colab badge for {missing}"
    intro = readme.split("\n## ", 1)[0]
    assert binder_badge() in intro, "README.md needs binder_badge() above its first section"


@pytest.mark.parametrize("folder", LAUNCHABLE)
def test_title_cell_links_are_well_formed_and_open_their_own_notebook(folder: str) -> None:
    problems: list[str] = []
    for path in sorted((ROOT / folder).glob("*.ipynb")):
        title = _title_cell(path)
        own = f"{folder}/{path.name}"
        where = f"{own} (title cell)"
        problems += _link_problems(title, where)
        for opened in COLAB.findall(title) + BINDER.findall(title):
            if opened != own:
                problems.append(f"{where}: its Colab/Binder badge opens {opened}, not {own}")
    assert problems == []


def test_link_checker_catches_broken_links() -> None:
    good = colab_badge("notebooks/00_welcome.ipynb") + " " + binder_badge()
    assert _link_problems(good, "x") == []
    broken = [
        colab_badge("notebooks/99_missing.ipynb"),
        f"[![Open In Colab]({COLAB_BADGE_SVG})]({binder_url()})",
        "https://colab.research.google.com/github/someone/else/blob/main/notebooks/00_welcome.ipynb",
        binder_url().replace("urlpath=lab/tree/", "urlpath=tree/"),
        f"![Open In Colab]({COLAB_BADGE_SVG})",
        "[guide](CONTRIBUTING_missing.md)",
        f"{REPO_URL}/blob/main/notebooks/99_missing.ipynb",
    ]
    for text in broken:
        assert _link_problems(text, "x"), f"not caught: {text}"


# -- pointing the course at a fork ---------------------------------------------------------------------


def test_readme_is_stamped_from_the_one_place() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert links.stamp_readme(text) == text  # README's links are what links.py makes
    fork = links.stamp_readme(text, "https://github.com/alice/moe-fork", "v1")
    assert SLUG not in fork and fork.count("github/alice/moe-fork/blob/v1/notebooks/") == len(NOTEBOOKS)
    assert "mybinder.org/v2/gh/alice/moe-fork/v1?urlpath=lab/tree/notebooks/00_welcome.ipynb" in fork


def test_set_repo_points_badges_readme_and_setup_cell_at_a_fork(tmp_path) -> None:
    import shutil

    from moe_course.course.notebooks import find_setup_cell, setup_cell

    for folder in ("moe_course", "solutions", "notebooks"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copy(ROOT / "CITATION.cff", tmp_path / "CITATION.cff")
    assert links.main(["set-repo", "alice/moe-fork", "--branch", "v1", "--root", str(tmp_path)]) == 0
    fork_url = "https://github.com/alice/moe-fork"
    source = (tmp_path / "moe_course" / "course" / "links.py").read_text()
    assert f'REPO_URL = "{fork_url}"' in source and 'BRANCH = "v1"' in source
    readme = (tmp_path / "README.md").read_text()
    assert SLUG not in readme
    assert f'repository-code: "{fork_url}"' in (tmp_path / "CITATION.cff").read_text()
    for path in NOTEBOOKS:
        assert links.colab_url(path, fork_url, "v1") in readme
    for folder in ("solutions", "notebooks"):
        for nb_path in sorted((tmp_path / folder).glob("*.ipynb")):
            nb = nbformat.read(nb_path, as_version=4)
            setup = nb.cells[find_setup_cell(nb)].source
            assert setup == setup_cell(fork_url, "v1"), nb_path
            title = _title_cell(nb_path)
            assert links.colab_url(f"{folder}/{nb_path.name}", fork_url, "v1") in title, nb_path
            assert SLUG not in json.dumps(setup) + title
    again = links.set_repo("alice/moe-fork", "v1", tmp_path)  # nothing left to change
    assert again == []


@pytest.mark.parametrize(("argv", "message"), [
    (["set-repo", "alice"], "must be given as OWNER/NAME"),
    (["set-repo", "alice/moe fork"], "must be given as OWNER/NAME"),
    (["set-repo", "alice/fork", "--branch", "bad..name"], "branch must be a git branch or tag name"),
    (["set-repo", "alice/fork", "--root", "/nonexistent-course"], "run this in the course repository's root"),
])
def test_set_repo_usage_errors(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        links.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
