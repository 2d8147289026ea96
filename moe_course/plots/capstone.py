"""Notebook 08's figures: training curves over seeds, loss against the number of experts, the tuning grid, and
the routed text (:func:`moe_course.capstone.route_text`) drawn and explored.

==========================  ===========================================================================
``plot_seed_curves``        one colour per model: a thin line per seed, a thick line for the seed mean
``plot_expert_sweep``       final loss against the number of experts at fixed active width (log2 axis)
``plot_tuning``             each model's tuning loss over the learning-rate x warm-up grid, its choice marked
``plot_routed_text``        a text drawn as a grid of characters, each cell coloured by its expert (or type)
``routing_explorer``        type Python, see its routing: a textarea, a layer menu and a colour toggle
``expert_colors``           one colour per expert (32 distinct, then a continuous colormap)
==========================  ===========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PathCollection
from matplotlib.colors import BoundaryNorm, ListedColormap, to_rgb
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Rectangle
from matplotlib.path import Path
from matplotlib.textpath import TextPath
from matplotlib.transforms import Affine2D

from moe_course.capstone import DEFAULT_CODE, RoutedText, route_text
from moe_course.corpus import TOKEN_TYPE_NAMES
from moe_course.plots.style import COLORS, EXPERT_COLORS, expert_colors, figure_axes, style_axes

__all__ = [
    "EXPERT_COLORS",
    "TYPE_COLORS",
    "expert_colors",
    "plot_expert_sweep",
    "plot_routed_text",
    "plot_seed_curves",
    "plot_tuning",
    "routing_explorer",
]

Curve = tuple[Sequence[float], Sequence[float]]


def plot_seed_curves(curves: Mapping[str, Sequence[Curve]], ax: Axes | None = None, title: str | None = None,
                     xlabel: str = "training tokens", ylabel: str = "validation loss (nats/byte)",
                     bits_axis: bool = True) -> Figure:
    """``curves[label]``: one ``(x, y)`` pair per seed. Seeds as thin lines, their mean (where x agree) thick; a
    single seed as one thick line.

    With ``bits_axis`` a right-hand axis gives the same loss in bits per byte (nats / ln 2).
    """
    fig, ax = figure_axes(ax, (7.0, 4.0))
    for i, (label, runs) in enumerate(curves.items()):
        if not runs:
            raise ValueError(f"curves[{label!r}] is empty: give one (x, y) pair per seed")
        color = COLORS[i % len(COLORS)]
        if len(runs) == 1:  # one seed: its own line is the curve
            ax.plot(*runs[0], color=color, lw=2.2, label=label)
            continue
        xs = [tuple(x) for x, _ in runs]
        same = len(set(xs)) == 1
        for j, (x, y) in enumerate(runs):
            ax.plot(x, y, color=color, lw=0.8, alpha=0.45,
                    label=None if same or j else f"{label} ({len(runs)} seeds)")
        if same:  # same evaluation points: draw the mean over seeds
            mean = np.mean([np.asarray(y, dtype=float) for _, y in runs], axis=0)
            ax.plot(xs[0], mean, color=color, lw=2.2, label=f"{label} (mean of {len(runs)} seeds)")
    style_axes(ax, title, xlabel, ylabel, title_size=10)
    ax.legend(frameon=False, fontsize=8)
    if bits_axis:
        right = ax.secondary_yaxis("right", functions=(lambda n: n / math.log(2), lambda b: b * math.log(2)))
        right.set_ylabel("bits/byte")
    return fig


def plot_expert_sweep(points: Mapping[int, Sequence[float]], totals: Mapping[int, int] | None = None,
                      ax: Axes | None = None, title: str | None = None,
                      ylabel: str = "validation loss (nats/byte)",
                      fit: tuple[float, float, Sequence[int]] | None = None) -> Figure:
    """``points[E]``: final losses (one per seed) with E experts; E = 1 is the dense twin. Mean line, seed dots.

    ``totals[E]`` (total parameters) is written next to each mean. ``fit = (d, b, counts)`` draws the power law
    log L = d + b·log E (Clark et al. 2022's form at fixed dense size) dashed over the expert counts it was fitted on.
    """
    if not points:
        raise ValueError("points is empty: give {number of experts: [loss per seed]}")
    fig, ax = figure_axes(ax, (6.0, 3.8))
    es = sorted(points)
    means = [float(np.mean(points[e])) for e in es]
    for e in es:
        ax.scatter([e] * len(points[e]), points[e], color=COLORS[0], s=16, alpha=0.5, zorder=3)
    ax.plot(es, means, color=COLORS[0], lw=2, marker="o", zorder=4, label="mean over seeds")
    if fit is not None:
        d, b, counts = fit
        xs = np.geomspace(min(counts), max(counts), 50)
        ax.plot(xs, np.exp(d) * xs ** b, color=COLORS[3], lw=1.2, ls="--", zorder=2,
                label=f"fit: L ∝ E^{b:.3f}")
    if totals:
        for e, m in zip(es, means, strict=True):
            if e in totals:
                ax.annotate(f"{totals[e] / 1e6:.1f}M", (e, m), textcoords="offset points", xytext=(6, 6),
                            fontsize=8, color="0.3")
    ax.set_xscale("log", base=2)
    ax.set_xticks(es, [("1 (dense)" if e == 1 else str(e)) for e in es])
    style_axes(ax, title, "experts E (same active parameters per token)", ylabel, title_size=10)
    ax.legend(frameon=False, fontsize=8)
    return fig


def plot_tuning(losses: Mapping[str, Mapping[tuple[float, int], float]], chosen: Mapping[str, tuple[float, int]],
                title: str | None = None, ylabel: str = "tuning loss (nats/byte)") -> Figure:
    """One panel per model: ``losses[model][(lr, warmup)]`` against lr, a line per warm-up; ``chosen`` ringed."""
    if not losses:
        raise ValueError("losses is empty: give {model: {(lr, warmup): loss}}")
    fig, axes = _panels(len(losses))
    warmups = sorted({w for grid in losses.values() for _, w in grid})
    for ax, (model, grid) in zip(axes, losses.items(), strict=True):
        for i, w in enumerate(warmups):
            lrs = sorted(lr for lr, ww in grid if ww == w)
            ax.plot(lrs, [grid[(lr, w)] for lr in lrs], marker="o", color=COLORS[i % len(COLORS)],
                    label=f"warm-up {w} steps")
        lr, w = chosen[model]
        ax.scatter([lr], [grid[(lr, w)]], s=160, facecolors="none", edgecolors="black", lw=1.5, zorder=5,
                   label="chosen")
        ax.set_xscale("log")
        lrs = sorted({lr for lr, _ in grid})
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        ax.minorticks_off()
        style_axes(ax, model, "learning rate", ylabel if ax is axes[0] else None, title_size=10)
    axes[0].legend(frameon=False, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def _panels(n: int) -> tuple[Figure, list[Axes]]:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.2), sharey=True, squeeze=False, layout="constrained")
    return fig, list(axes[0])


# ---------------------------------------------------------------------------------------------------------
# The text as a coloured grid
# ---------------------------------------------------------------------------------------------------------


TYPE_COLORS: list[str] = ["#7f7f7f", "#e8e8e8", "#2ca02c", "#ff7f0e", "#bcbd22", "#1f77b4", "#9467bd", "#17becf",
                          "#d62728"]
"""The colour of each TokenType (OTHER, WHITESPACE, COMMENT, STRING, DOCSTRING, NAME, KEYWORD, NUMBER, OPERATOR)."""

CELL_W, CELL_H = 0.115, 0.19  # inches per character cell
FONT_SIZE = 8.5  # points: DejaVu Sans Mono advances 0.602 em = 5.1 pt = 0.071 in, inside the 0.115 in cell
_FONT = FontProperties(family="DejaVu Sans Mono")
_GLYPHS: dict[str, Path] = {}


def _glyph(byte: int) -> str:
    """What a byte's cell shows: the character, · for space, ⏎ newline, → tab, else its hex value."""
    special = {0x20: "·", 0x0A: "⏎", 0x09: "→"}
    if byte in special:
        return special[byte]
    return chr(byte) if 0x21 <= byte <= 0x7E else f"{byte:02x}"


def _glyph_path(s: str) -> Path:
    """The outline of ``s`` in ems, centred on (0, 0); hex pairs are drawn smaller to fit one cell."""
    if s not in _GLYPHS:
        scale = 1.0 if len(s) == 1 else 0.62
        raw = TextPath((0, 0), s, size=1, prop=_FONT)
        # mono advance 0.602 em per character; 0.36 em lifts the middle of a capital to the centre line
        trans = Affine2D().translate(-0.301 * len(s), -0.36).scale(scale)
        _GLYPHS[s] = trans.transform_path(raw)
    return _GLYPHS[s]


def _grid(data: list[int], width: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Row and column of each byte: a new row after each newline, and every ``width`` cells of a long line."""
    rows, cols = np.zeros(len(data), dtype=np.int64), np.zeros(len(data), dtype=np.int64)
    r = c = 0
    for i, b in enumerate(data):
        if c == width:
            r, c = r + 1, 0
        rows[i], cols[i] = r, c
        c += 1
        if b == 0x0A:
            r, c = r + 1, 0
    n_rows = int(rows[-1]) + 1 if len(data) else 0
    return rows, cols, n_rows, int(cols.max()) + 1 if len(data) else 0


def _text_colors(rgb: np.ndarray) -> np.ndarray:
    """Black on light cells, white on dark ones (relative luminance)."""
    lum = rgb @ np.array([0.2126, 0.7152, 0.0722])
    return np.where(lum[:, None] > 0.5, 0.0, 1.0).repeat(3, axis=1)


def _draw_panel(fig: Figure, rect: list[float], glyphs: list[Path], rows: np.ndarray, cols: np.ndarray,
                shape: tuple[int, int], cell_colors: np.ndarray, title: str) -> Any:
    """One grid of characters: a background image (one pixel per cell) and one collection of glyph outlines."""
    ax = fig.add_axes(rect)
    n_rows, n_cols = shape
    image = np.ones((n_rows, n_cols, 3))
    image[rows, cols] = cell_colors
    ax.imshow(image, aspect="auto", interpolation="nearest", extent=(-0.5, n_cols - 0.5, n_rows - 0.5, -0.5))
    # glyph outlines in ems -> points (FONT_SIZE) -> inches (1/72) -> pixels at the figure's dpi
    to_pixels = Affine2D().scale(FONT_SIZE / 72) + fig.dpi_scale_trans
    ax.add_collection(PathCollection(glyphs, offsets=np.column_stack([cols, rows]), offset_transform=ax.transData,
                                     transform=to_pixels, facecolors=_text_colors(cell_colors), edgecolors="none",
                                     linewidths=0), autolim=False)
    ax.set_xlim(-0.5, n_cols - 0.5)
    ax.set_ylim(n_rows - 0.5, -0.5)
    ax.set_axis_off()  # no ticks to lay out: drawing the axis took half the render time
    ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, edgecolor="#bbbbbb", lw=0.8,
                           clip_on=False))
    ax.set_title(title, fontsize=9, loc="left")
    return ax


def plot_routed_text(routed: RoutedText, layer: int | None = None, colour_by: str = "expert", width: int = 64,
                     title: str | None = None) -> Figure:
    """The routed text as a character grid, each cell coloured by its first-choice expert (or by token type).

    One row per source line (lines longer than ``width`` wrap), one panel per MoE layer when ``layer`` is None.
    Spaces show as ·, newlines as ⏎, tabs as →, other non-printable bytes (and each byte of a multi-byte UTF-8
    character) as two hex digits. ``colour_by="type"`` draws one panel coloured by TokenType instead (the
    types do not depend on the layer).
    """
    if not isinstance(routed, RoutedText):
        raise TypeError(f"routed must be the RoutedText that route_text returns, got {type(routed).__name__}")
    if colour_by not in ("expert", "type"):
        raise ValueError(f"colour_by must be 'expert' or 'type', got {colour_by!r}")
    n_layers = len(routed.experts)
    if layer is not None and not (isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < n_layers):
        raise ValueError(f"layer must be None (all MoE layers) or an int in [0, {n_layers}), got {layer!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 8:
        raise ValueError(f"width must be an int >= 8 (characters per row), got {width!r}")
    data = routed.bytes
    rows, cols, n_rows, n_cols = _grid(data, width)
    glyphs = [_glyph_path(_glyph(b)) for b in data]

    if colour_by == "type":
        colors = TYPE_COLORS
        panels = [(routed.types.numpy(), "token type (corpus.label_token_types)")]
        if len(data) > 1 and not routed.types.any():
            panels = [(routed.types.numpy(), "token type: the text does not tokenize, so every byte is OTHER")]
        key_labels, key_title = list(TOKEN_TYPE_NAMES), "token type"
    else:
        shown = range(n_layers) if layer is None else [layer]
        n = max(routed.n_experts[i] for i in shown)
        colors = expert_colors(n)
        panels = [(routed.experts[i][:, 0].numpy(),
                   f"MoE layer {i} (block {routed.blocks[i]}): first-choice expert of each byte, "
                   f"{routed.n_experts[i]} experts, top-{routed.experts[i].shape[1]}") for i in shown]
        step = 1 if n <= 32 else int(np.ceil(n / 32))
        key_labels, key_title = [str(e) if e % step == 0 else "" for e in range(n)], "first-choice expert e"
    palette = np.array([to_rgb(c) for c in colors])

    grid_w = max(n_cols, 40) * CELL_W  # inches; at least 40 cells so that the key fits
    left, right, key_h, title_h, gap, bottom = 0.15, 0.15, 0.62, 0.28, 0.12, 0.1
    panel_h = n_rows * CELL_H
    fig_w = left + grid_w + right
    fig_h = key_h + len(panels) * (title_h + panel_h) + (len(panels) - 1) * gap + bottom + (0.3 if title else 0)
    fig = Figure(figsize=(fig_w, fig_h))
    top = fig_h - (0.3 if title else 0)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.05 / fig_h, va="top")
    # the key: a discrete colour bar, one cell per expert (or type)
    cax = fig.add_axes([left / fig_w, (top - 0.52) / fig_h, grid_w / fig_w, 0.14 / fig_h])
    cbar = fig.colorbar(ScalarMappable(BoundaryNorm(np.arange(len(colors) + 1) - 0.5, len(colors)),
                                       ListedColormap(colors)), cax=cax, orientation="horizontal")
    cbar.set_ticks(np.arange(len(colors)), labels=key_labels, fontsize=7 if colour_by == "expert" else 6)
    cbar.ax.xaxis.set_ticks_position("top")
    cbar.ax.xaxis.set_label_position("top")
    cbar.set_label(key_title, fontsize=8)
    y = top - key_h
    for values, panel_title in panels:
        y -= title_h + panel_h
        rect = [left / fig_w, y / fig_h, n_cols * CELL_W / fig_w, panel_h / fig_h]
        _draw_panel(fig, rect, glyphs, rows, cols, (n_rows, n_cols), palette[values % len(colors)], panel_title)
        y -= gap
    fig.text_grid = [_glyph(b) for b in data]  # what the cells show, for tests and for reading back
    return fig


# ---------------------------------------------------------------------------------------------------------
# The explorer
# ---------------------------------------------------------------------------------------------------------

MAX_EXPLORER_BYTES = 2048
"""The explorer routes and draws at most this many bytes (a figure of 2,048 characters is already tall)."""


def routing_explorer(model: torch.nn.Module, text: str = DEFAULT_CODE, static: bool = False) -> Any:
    """A textarea for Python, a layer menu and a colour-by toggle that redraw the routed text; returns the widget.

    Falls back to the static :func:`plot_routed_text` figure of ``text`` (a ``Figure``) when ``static=True``
    or when ipywidgets is not installed.
    """
    try:
        if static:
            raise ImportError
        import ipywidgets as widgets
        from IPython.display import display
    except ImportError:
        return plot_routed_text(route_text(model, text))

    if not isinstance(text, str):
        raise TypeError(f"text must be a str of Python source, got {type(text).__name__}; e.g. DEFAULT_CODE")

    n_layers = len(model.moe_layers())
    if not n_layers:
        raise ValueError("model has no MoE layers (a dense model routes nothing): pass a TinyLM with ffn='moe'")
    style = {"description_width": "initial"}
    controls = {
        "text": widgets.Textarea(value=text, description="Python", continuous_update=False, style=style,
                                 layout=widgets.Layout(width="95%", height="11em")),
        "layer": widgets.Dropdown(options=[("all layers", -1)] + [(f"layer {i}", i) for i in range(n_layers)],
                                  value=-1, description="MoE layer", style=style),
        "colour_by": widgets.ToggleButtons(options=[("first-choice expert", "expert"), ("token type", "type")],
                                           value="expert", description="colour by", style=style),
    }
    cache: dict[bytes, RoutedText] = {}
    state: dict[str, Any] = {"figure": None, "draws": 0}  # the last figure drawn, and how many (for tests)

    def update(text: str, layer: int, colour_by: str) -> None:
        data = text.encode("utf-8")
        if not data:
            print("Type or paste some Python above.")
            return
        note = f"the first {MAX_EXPLORER_BYTES} of {len(data)} bytes" if len(data) > MAX_EXPLORER_BYTES else None
        data = data[:MAX_EXPLORER_BYTES]
        if data not in cache:  # route once per text; the menu and the toggle only redraw
            cache.clear()
            cache[data] = route_text(model, data)
        fig = plot_routed_text(cache[data], None if layer < 0 else layer, colour_by, title=note)
        state["figure"], state["draws"] = fig, state["draws"] + 1
        display(fig)

    out = widgets.interactive_output(update, controls)
    box = widgets.VBox([controls["text"], widgets.HBox([controls["layer"], controls["colour_by"]]), out])
    box.controls = controls  # for tests and notebooks that set values programmatically
    box.state = state
    return box
