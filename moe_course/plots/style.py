"""One look for every notebook's figures: the colour cycle, a new-or-given axes, and the axes style.

Every figure function in :mod:`moe_course.plots` takes an optional ``ax`` (draw into an existing subplot,
:func:`figure_axes`) and otherwise makes a new figure of a standard size, styled with :func:`style_axes`.
Nothing calls ``plt.show()``: in a notebook the returned figure is displayed when it is the cell's last
expression, or by ``plt.show()``.
"""

from __future__ import annotations

from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["COLORS", "EXPERT_COLORS", "expert_colors", "figure_axes", "style_axes"]

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]
"""The colour cycle shared by all figures (matplotlib's tab10)."""


def _palette_32() -> list[str]:
    """32 qualitative colours: tab20 (10 hues, dark and light) then 12 more from tab20b and tab20c."""
    cmaps = matplotlib.colormaps
    tab20 = [cmaps["tab20"](i) for i in range(20)]
    extra = [cmaps["tab20b"](i) for i in (0, 2, 4, 6, 8, 10, 13, 15, 17, 19)] + [cmaps["tab20c"](i) for i in (4, 9)]
    return [matplotlib.colors.to_hex(c) for c in tab20 + extra]


EXPERT_COLORS: list[str] = _palette_32()
"""The colour of expert e (e < 32): a qualitative palette; larger N falls back to a continuous colormap."""

def expert_colors(n_experts: int) -> list[str]:
    """One colour per expert: the 32-colour qualitative palette, or a continuous colormap beyond 32."""
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
    if n_experts <= len(EXPERT_COLORS):
        return EXPERT_COLORS[:n_experts]
    return [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["turbo"](np.linspace(0, 1, n_experts))]


def figure_axes(ax: Axes | None, figsize: tuple[float, float] = (7.0, 4.0)) -> tuple[Figure, Axes]:
    """The figure and axes to draw into: the given ``ax``, or a new figure."""
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def style_axes(ax: Axes, title: str | None, xlabel: str | None = None, ylabel: str | None = None,
               title_size: float | None = None) -> None:
    """The course's look for one axes: title and labels, a light grid behind the data, no top/right spines."""
    if title:
        ax.set_title(title, fontsize=title_size)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _numpy(values: Any) -> np.ndarray:
    """A tensor (any device, with or without grad), list or array as a NumPy array."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values)
