"""Launch links: "Open in Colab" and Binder URLs and badges, all built from the one :data:`REPO_URL`.

The README table and each notebook's title cell show these badges (the notebook generator writes the
latter). Paths are relative to the repository root, e.g. ``"notebooks/00_welcome.ipynb"``.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath

__all__ = [
    "BRANCH",
    "REPO_URL",
    "binder_badge",
    "binder_url",
    "colab_badge",
    "colab_url",
    "repo_slug",
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
    prefix = "https://github.com/"
    parts = repo_url.removeprefix(prefix).removesuffix(".git").strip("/").split("/")
    if not repo_url.startswith(prefix) or len(parts) != 2 or not all(parts):
        raise ValueError(f"repo_url must look like https://github.com/OWNER/REPO, got {repo_url!r}")
    return "/".join(parts)


def _notebook(notebook_path: str | os.PathLike[str]) -> str:
    """Validate a notebook path relative to the repository root and return it in POSIX form."""
    path = PurePosixPath(os.fspath(notebook_path).replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or path.suffix != ".ipynb" or len(path.parts) < 2:
        raise ValueError(
            "notebook_path must be a relative path from the repository root to a notebook, such as "
            f"'notebooks/00_welcome.ipynb'; got {os.fspath(notebook_path)!r}"
        )
    return path.as_posix()


def colab_url(notebook_path: str | os.PathLike[str]) -> str:
    """URL that opens ``notebook_path`` (e.g. ``notebooks/00_welcome.ipynb``) on Google Colab."""
    return f"https://colab.research.google.com/github/{repo_slug()}/blob/{BRANCH}/{_notebook(notebook_path)}"


def binder_url(notebook_path: str | os.PathLike[str] = DEFAULT_NOTEBOOK) -> str:
    """URL that builds the repository on mybinder.org and opens ``notebook_path`` in JupyterLab."""
    return f"https://mybinder.org/v2/gh/{repo_slug()}/{BRANCH}?urlpath=lab/tree/{_notebook(notebook_path)}"


def colab_badge(notebook_path: str | os.PathLike[str]) -> str:
    """Markdown for an "Open in Colab" badge linking to :func:`colab_url`."""
    return f"[![Open In Colab]({COLAB_BADGE_SVG})]({colab_url(notebook_path)})"


def binder_badge(notebook_path: str | os.PathLike[str] = DEFAULT_NOTEBOOK) -> str:
    """Markdown for a "launch Binder" badge linking to :func:`binder_url`."""
    return f"[![Binder]({BINDER_BADGE_SVG})]({binder_url(notebook_path)})"
