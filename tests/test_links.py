"""Launch links: the URL builders, and every Colab/Binder badge and link in README.md and the title cells."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

import moe_course
from moe_course.links import (
    BINDER_BADGE_SVG,
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
COLAB = re.compile(rf"https://colab\.research\.google\.com/github/{re.escape(SLUG)}/blob/main/(\S+\.ipynb)")
BINDER = re.compile(rf"https://mybinder\.org/v2/gh/{re.escape(SLUG)}/main\?urlpath=lab/tree/(\S+\.ipynb)")


# -- the URL builders ----------------------------------------------------------------------------------


def test_urls_built_from_the_repo_url() -> None:
    assert moe_course.REPO_URL == REPO_URL and SLUG == "moe-from-scratch/moe-from-scratch"
    assert colab_url("notebooks/03_topk_routing.ipynb") == (
        "https://colab.research.google.com/github/moe-from-scratch/moe-from-scratch/blob/main/"
        "notebooks/03_topk_routing.ipynb"
    )
    assert binder_url() == (
        "https://mybinder.org/v2/gh/moe-from-scratch/moe-from-scratch/main"
        "?urlpath=lab/tree/notebooks/00_welcome.ipynb"
    )
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
        elif url.startswith(REPO_URL + "/blob/main/") or url.startswith(REPO_URL + "/tree/main/"):
            path = url.split("/main/", 1)[1]
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
