"""Launch links of every notebook: "Open in Colab" and Binder URLs and badges, all built from one :data:`REPO_URL`.

The README table and each notebook's title cell show these badges (the notebook generator writes the
latter, and the setup cell clones :data:`REPO_URL` at :data:`BRANCH` on Colab). Paths are relative to the
repository root, e.g. ``"notebooks/00_welcome.ipynb"``.

A fork points every badge and the setup cell at itself with one command (run in the repository root)::

    python -m moe_course.course.links set-repo OWNER/NAME [--branch BRANCH]

It rewrites :data:`REPO_URL` and :data:`BRANCH` below, the links in README.md (:func:`stamp_readme`) and the
repository in CITATION.cff, and regenerates the notebooks (``python -m moe_course.course.notebooks generate``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

__all__ = [
    "BRANCH",
    "REPO_URL",
    "binder_badge",
    "binder_url",
    "colab_badge",
    "colab_url",
    "main",
    "repo_slug",
    "set_repo",
    "stamp_readme",
]

REPO_URL = "https://github.com/moe-from-scratch/moe-from-scratch"
"""The course repository on GitHub: the one place its address is written."""

BRANCH = "main"
"""The branch that the Colab and Binder links open."""

COLAB_BADGE_SVG = "https://colab.research.google.com/assets/colab-badge.svg"
BINDER_BADGE_SVG = "https://mybinder.org/badge_logo.svg"
DEFAULT_NOTEBOOK = "notebooks/00_welcome.ipynb"


def repo_slug(repo_url: str = REPO_URL) -> str:
    """``"OWNER/REPO"`` of a ``https://github.com/OWNER/REPO`` URL (Colab and Binder address repos so)."""
    if not isinstance(repo_url, str):
        raise TypeError(f"repo_url must be a str such as {REPO_URL!r}, got {type(repo_url).__name__} {repo_url!r}")
    prefix = "https://github.com/"
    parts = repo_url.removeprefix(prefix).removesuffix(".git").strip("/").split("/")
    if not repo_url.startswith(prefix) or len(parts) != 2 or not all(_NAME.fullmatch(p) for p in parts):
        raise ValueError(f"repo_url must look like https://github.com/OWNER/REPO, got {repo_url!r}")
    return "/".join(parts)


def _notebook(notebook_path: str | os.PathLike[str]) -> str:
    """Validate a notebook path relative to the repository root and return it in POSIX form."""
    if not isinstance(notebook_path, (str, os.PathLike)):
        raise TypeError(f"notebook_path must be a str or path such as 'notebooks/00_welcome.ipynb', got "
                        f"{type(notebook_path).__name__} {notebook_path!r}")
    path = PurePosixPath(os.fspath(notebook_path).replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or path.suffix != ".ipynb" or len(path.parts) < 2:
        raise ValueError(
            "notebook_path must be a relative path from the repository root to a notebook, such as "
            f"'notebooks/00_welcome.ipynb'; got {os.fspath(notebook_path)!r}"
        )
    return path.as_posix()


def colab_url(notebook_path: str | os.PathLike[str], repo_url: str | None = None, branch: str | None = None) -> str:
    """URL that opens ``notebook_path`` (e.g. ``notebooks/00_welcome.ipynb``) on Google Colab."""
    slug, branch = repo_slug(repo_url or REPO_URL), _check_branch(branch or BRANCH)
    return f"https://colab.research.google.com/github/{slug}/blob/{branch}/{_notebook(notebook_path)}"


def binder_url(notebook_path: str | os.PathLike[str] = DEFAULT_NOTEBOOK, repo_url: str | None = None,
               branch: str | None = None) -> str:
    """URL that builds the repository on mybinder.org and opens ``notebook_path`` in JupyterLab."""
    slug, branch = repo_slug(repo_url or REPO_URL), _check_branch(branch or BRANCH)
    return f"https://mybinder.org/v2/gh/{slug}/{branch}?urlpath=lab/tree/{_notebook(notebook_path)}"


def colab_badge(notebook_path: str | os.PathLike[str]) -> str:
    """Markdown for an "Open in Colab" badge linking to :func:`colab_url`."""
    return f"[![Open In Colab]({COLAB_BADGE_SVG})]({colab_url(notebook_path)})"


def binder_badge(notebook_path: str | os.PathLike[str] = DEFAULT_NOTEBOOK) -> str:
    """Markdown for a "launch Binder" badge linking to :func:`binder_url`."""
    return f"[![Binder]({BINDER_BADGE_SVG})]({binder_url(notebook_path)})"


# -- pointing the course at a fork -----------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,99})")
_BRANCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
_COLAB_ANY = re.compile(r"https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/[\w./-]+?/"
                        r"((?:notebooks|solutions)/[\w.-]+\.ipynb)")
_BINDER_ANY = re.compile(r"https://mybinder\.org/v2/gh/[\w.-]+/[\w.-]+/[\w./-]+?\?urlpath=lab/tree/([\w./-]+\.ipynb)")


def _check_slug(slug: str) -> str:
    parts = slug.removeprefix("https://github.com/").removesuffix(".git").strip("/").split("/")
    if len(parts) != 2 or not all(_NAME.fullmatch(p) for p in parts):
        raise ValueError(f"the repository must be given as OWNER/NAME (letters, digits, '.', '_', '-'), got {slug!r}")
    return "/".join(parts)


def _check_branch(branch: object) -> str:
    """A git branch or tag name (letters, digits, '.', '_', '-', '/'; no spaces, no '..')."""
    if not isinstance(branch, str):
        raise TypeError(f"branch must be a str such as 'main', got {type(branch).__name__} {branch!r}")
    if not _BRANCH.fullmatch(branch) or ".." in branch or branch.endswith(("/", ".lock")):
        raise ValueError(f"branch must be a git branch or tag name such as main or v1.0, got {branch!r}")
    return branch


def stamp_readme(text: str, repo_url: str | None = None, branch: str | None = None) -> str:
    """``text`` with every Colab, Binder and repository link rewritten for ``repo_url`` at ``branch``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str (the README's text), got {type(text).__name__}")
    repo_url, branch = repo_url or REPO_URL, branch or BRANCH
    text = _COLAB_ANY.sub(lambda m: colab_url(m.group(1), repo_url, branch), text)
    text = _BINDER_ANY.sub(lambda m: binder_url(m.group(1), repo_url, branch), text)
    return text.replace(REPO_URL + "/", repo_url + "/") if repo_url != REPO_URL else text


def set_repo(slug: str, branch: str | None = None, root: str | Path = ".") -> list[Path]:
    """Point the course in ``root`` at ``https://github.com/OWNER/NAME`` (``slug``); return the files changed.

    Rewrites REPO_URL and BRANCH in ``moe_course/course/links.py`` and the links in README.md, then regenerates the
    solutions' setup and title cells and the exercise notebooks with the new values.
    """
    slug = _check_slug(slug)
    branch = _check_branch(branch or BRANCH)
    root = Path(root)
    source = root / "moe_course" / "course" / "links.py"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: run this in the course repository's root (or pass --root)")
    repo_url = f"https://github.com/{slug}"
    text = source.read_text(encoding="utf-8")
    new, n_repo = re.subn(r'^REPO_URL = "[^"]*"$', f'REPO_URL = "{repo_url}"', text, flags=re.M)
    new, n_branch = re.subn(r'^BRANCH = "[^"]*"$', f'BRANCH = "{branch}"', new, flags=re.M)
    if (n_repo, n_branch) != (1, 1):
        raise ValueError(f"{source}: expected one REPO_URL = \"...\" and one BRANCH = \"...\" line")
    old_url = re.search(r'^REPO_URL = "([^"]*)"$', text, flags=re.M).group(1)
    changed: list[Path] = []
    if new != text:
        source.write_text(new, encoding="utf-8")
        changed.append(source)
    rewrites = {
        "README.md": lambda text: stamp_readme(text.replace(old_url + "/", repo_url + "/"), repo_url, branch),
        "CITATION.cff": lambda text: text.replace(f'"{old_url}"', f'"{repo_url}"'),
    }
    for name, rewrite in rewrites.items():
        path = root / name
        if not path.is_file():
            continue
        before = path.read_text(encoding="utf-8")
        after = rewrite(before)
        if after != before:
            path.write_text(after, encoding="utf-8")
            changed.append(path)
    # the notebooks are stamped by a fresh interpreter, which imports the links.py just written
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root.resolve()), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "moe_course.course.notebooks", "generate"], cwd=root, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"regenerating the notebooks failed:\n{done.stdout}{done.stderr}")
    changed += [root / line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith("wrote ")]
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moe_course.course.links set-repo OWNER/NAME [--branch B]`` or ``show``; usage errors exit 2."""
    parser = argparse.ArgumentParser(prog="python -m moe_course.course.links", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("show", help="print the repository, branch and launch links")
    p = sub.add_parser("set-repo", help="point every badge and the Colab setup cell at a fork")
    p.add_argument("slug", metavar="OWNER/NAME", help="the GitHub repository, e.g. my-org/moe-from-scratch")
    p.add_argument("--branch", help=f"branch or tag the links open (default: the current one, {BRANCH})")
    p.add_argument("--root", default=".", help="the course repository's root (default: the current folder)")
    args = parser.parse_args(argv)
    if args.command == "show":
        print(f"repository {REPO_URL}\nbranch     {BRANCH}\nbinder     {binder_url()}\n"
              f"colab      {colab_url(DEFAULT_NOTEBOOK)}")
        return 0
    try:
        changed = set_repo(args.slug, args.branch, args.root)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    for path in changed:
        print(f"wrote {path}")
    print(f"the course now points at https://github.com/{_check_slug(args.slug)} ({args.branch or BRANCH}); "
          "commit the changes and push them to that repository")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
