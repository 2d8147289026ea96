"""One look for every notebook's figures: the colour cycle, a new-or-given axes, and the axes style.

Every figure function in :mod:`moe_course.plots` takes an optional ``ax`` (draw into an existing subplot,
:func:`figure_axes`) and otherwise makes a new figure of a standard size, styled with :func:`style_axes`.
Nothing calls ``plt.show()``: in a notebook the returned figure is displayed when it is the cell's last
expression, or by ``plt.show()``.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["COLORS", "figure_axes", "style_axes"]

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]
"""The colour cycle shared by all figures (matplotlib's tab10)."""


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
