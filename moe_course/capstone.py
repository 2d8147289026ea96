"""Notebook 08's "look inside" tools: the equal-active MoE twin of a dense model, and where each byte is routed.

========================  ===============================================================================
``equal_active_moe``      the MoE config with the same active FFN width as a dense config (DeepSeekMoE)
``type_expert_table``     token type × expert count table of one batch (from :mod:`moe_course.analysis`)
``route_text``            run a TinyLM on any text and keep every byte's experts and weights, per MoE layer
``plot_routed_text``      the text drawn as a grid of characters, each cell coloured by its expert (or type)
``routing_explorer``      type Python, see its routing: a textarea, a layer menu and a colour toggle
========================  ===============================================================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PathCollection
from matplotlib.colors import BoundaryNorm, ListedColormap, to_rgb
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Rectangle
from matplotlib.path import Path
from matplotlib.textpath import TextPath
from matplotlib.transforms import Affine2D

from moe_course.analysis import _eval_mode, type_expert_table
from moe_course.corpus import TOKEN_TYPE_NAMES, label_token_types
from moe_course.model import ModelConfig
from moe_course.routing import Routing

__all__ = [
    "DEFAULT_CODE",
    "equal_active_moe",
    "EXPERT_COLORS",
    "expert_colors",
    "plot_routed_text",
    "route_text",
    "RoutedText",
    "routing_explorer",
    "train_flops_per_token_of",
    "TYPE_COLORS",
    "type_expert_table",
]

DEFAULT_CODE = '''def mean_square(values, scale=2.5):
    """Return the scaled mean of the squares."""
    # an empty list has no mean
    if not values:
        return 0.0
    total = sum(v * v for v in values)
    label = "mean square"
    print(f"{label}: {total / len(values):.3f}")
    return scale * total / len(values)
'''
"""The explorer's starting text: a def, a docstring, a comment, strings, numbers, keywords and operators."""


# ---------------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------------


def equal_active_moe(dense: ModelConfig, n_experts: int, top_k: int, n_shared: int = 0,
                     **overrides: Any) -> ModelConfig:
    """The MoE twin of ``dense`` with the same active FFN width: each token uses top_k + n_shared experts.

    Each expert (routed or shared) is ``dense.d_hidden / (top_k + n_shared)`` wide, so a token passes through
    exactly the dense FFN's hidden width, and the total grows with ``n_experts``. This is how DeepSeekMoE
    ("DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts Language Models", Dai et al.
    2024, arXiv:2401.06066) compares layouts: the active parameters stay fixed while experts are split.
    The only extra active parameters are the router's, ``d_model · n_experts`` per MoE layer. Every other
    field of ``dense`` is kept (``d_hidden`` too: layers left dense by ``moe_every`` use it); ``overrides``
    (e.g. ``router_score="sigmoid"``, ``bias_update_rate=1e-3``) are applied last.
    """
    if not isinstance(dense, ModelConfig) or dense.ffn != "dense":
        got = dense.ffn if isinstance(dense, ModelConfig) else type(dense).__name__
        raise ValueError(f"dense must be a ModelConfig with ffn='dense', got {got!r}: equal_active_moe splits a "
                         "dense model's FFN width into experts")
    for name, value, low in (("n_experts", n_experts, 1), ("top_k", top_k, 1), ("n_shared", n_shared, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if top_k > n_experts:
        raise ValueError(f"top_k={top_k} is larger than n_experts={n_experts}: a token cannot use more routed "
                         "experts than there are; lower top_k or add experts")
    per_token = top_k + n_shared
    if dense.d_hidden % per_token:
        below = dense.d_hidden - dense.d_hidden % per_token
        fits = [k for k in range(1, min(dense.d_hidden, 64) + 1) if dense.d_hidden % k == 0]
        raise ValueError(
            f"dense.d_hidden={dense.d_hidden} is not divisible by top_k + n_shared = {top_k} + {n_shared} = "
            f"{per_token}, so the experts cannot split the active width evenly: use a dense width of "
            f"{below or per_token} or {below + per_token}, or top_k + n_shared in {fits}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"overrides {unknown} are not ModelConfig fields")
    fields = dict(ffn="moe", n_experts=n_experts, top_k=top_k, n_shared=n_shared,
                  expert_hidden=dense.d_hidden // per_token)
    return dataclasses.replace(dense, **{**fields, **overrides})


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------


def train_flops_per_token_of(cfg: ModelConfig) -> float:
    """Training FLOPs per token of ``TinyLM(cfg)`` from its configuration: 6·N_active + 6·L·T·d.

    N_active counts the weights one token is multiplied by: per layer the attention's q, k, v and output
    projections (4·d²) and two RMSNorm weights (2·d); a dense SwiGLU FFN (3·d·d_hidden) or, in an MoE layer
    (every ``moe_every``-th), the router (d·N) and the SwiGLU experts the token uses, top_k routed and
    n_shared shared ones (3·d·expert_hidden each); then the final norm (d) and the output head tied to the token
    embedding (V·d, counted once; the position embedding is a lookup, no multiply). 6 per weight is forward plus
    backward (Kaplan et al. 2020, §2.1); 6·L·T·d is causal attention's scores and weighted sum (PaLM, app. B).
    Equal to :func:`moe_course.params.train_flops_per_token` of the built model (tested).
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}; pass model.cfg for a built TinyLM")
    if cfg.ffn == "moe" and cfg.router != "topk":
        raise ValueError(f"cfg.router={cfg.router!r}: this count is for token-choice top-k routing ('topk')")
    d, n_layer = cfg.d_model, cfg.n_layer
    active = cfg.vocab_size * d + d  # tied embedding / output head, final norm
    for layer in range(n_layer):
        active += 4 * d * d + 2 * d
        if cfg.ffn == "moe" and layer % cfg.moe_every == cfg.moe_every - 1:
            active += d * cfg.n_experts + 3 * d * cfg.expert_hidden * (cfg.top_k + cfg.n_shared)
        else:
            active += 3 * d * cfg.d_hidden
    return 6.0 * active + 6.0 * n_layer * cfg.block_size * d


# ---------------------------------------------------------------------------------------------------------
# Routing a text
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RoutedText:
    """Where a model routed each byte of a text, per MoE layer (T = number of bytes)."""

    bytes: list[int]  # (T,) the text's UTF-8 bytes
    types: torch.Tensor  # (T,) long: TokenType of each byte (corpus.label_token_types)
    experts: list[torch.Tensor]  # per MoE layer, (T, k) long: chosen experts, column 0 the first choice
    weights: list[torch.Tensor]  # per MoE layer, (T, k) float: their combine weights
    n_experts: list[int]  # per MoE layer, its number of routed experts
    blocks: list[int]  # per MoE layer, the index of the transformer block that holds it


@torch.no_grad()
def route_text(model: torch.nn.Module, text: str | bytes) -> RoutedText:
    """Run ``model`` (in eval mode, its mode restored after) on the UTF-8 bytes of ``text`` and keep the routing.

    Text longer than ``model.cfg.block_size`` is cut into consecutive windows, each run on its own (so a
    window's first byte sees no earlier context, as at the start of a training window).
    """
    if not isinstance(text, (str, bytes, bytearray)):
        raise TypeError(f"text must be a str (or UTF-8 bytes), got {type(text).__name__} {text!r:.40}; e.g. "
                        "route_text(model, DEFAULT_CODE)")
    if not callable(getattr(model, "moe_layers", None)):
        raise TypeError(f"model must be a TinyLM (it has moe_layers()), got {type(model).__name__}")
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if not data:
        raise ValueError("text is empty: give route_text at least one character (e.g. DEFAULT_CODE)")
    layers = model.moe_layers()
    if not layers:
        raise ValueError("model has no MoE layers (a dense model routes nothing): pass a TinyLM with ffn='moe'")
    if max(data) >= model.cfg.vocab_size:
        raise ValueError(f"text has byte value {max(data)} but the model's vocab_size is {model.cfg.vocab_size}; "
                         "use a byte-level model (vocab_size=256) or ASCII text")
    ids = torch.tensor(list(data), dtype=torch.long)  # (T,)
    device = next(model.parameters()).device
    block = model.cfg.block_size
    experts: list[list[torch.Tensor]] = [[] for _ in layers]
    weights: list[list[torch.Tensor]] = [[] for _ in layers]
    with _eval_mode(model):
        for start in range(0, len(ids), block):
            model(ids[None, start:start + block].to(device))  # (1, <= block_size)
            for i, layer in enumerate(layers):
                routing = layer.last_routing
                if not isinstance(routing, Routing):
                    raise ValueError(f"MoE layer {i} uses {type(routing).__name__}: route_text needs token-choice "
                                     "routing (each token picks its experts); expert choice picks tokens instead")
                experts[i].append(routing.indices.long().cpu())
                weights[i].append(routing.weights.float().cpu())
    blocks = getattr(model, "blocks", None)
    block_ids = ([j for j, b in enumerate(blocks) if any(b.ffn is layer for layer in layers)] if blocks is not None
                 else list(range(len(layers))))
    return RoutedText(
        bytes=list(data),
        types=torch.from_numpy(label_token_types(data).astype(np.int64)),
        experts=[torch.cat(e) for e in experts],
        weights=[torch.cat(w) for w in weights],
        n_experts=[int(layer.n_experts) for layer in layers],
        blocks=block_ids,
    )


# ---------------------------------------------------------------------------------------------------------
# The text as a coloured grid
# ---------------------------------------------------------------------------------------------------------


def _palette_32() -> list[str]:
    """32 qualitative colours: tab20 (10 hues, dark and light) then 12 more from tab20b and tab20c."""
    cmaps = matplotlib.colormaps
    tab20 = [cmaps["tab20"](i) for i in range(20)]
    extra = [cmaps["tab20b"](i) for i in (0, 2, 4, 6, 8, 10, 13, 15, 17, 19)] + [cmaps["tab20c"](i) for i in (4, 9)]
    return [matplotlib.colors.to_hex(c) for c in tab20 + extra]


EXPERT_COLORS: list[str] = _palette_32()
"""The colour of expert e (e < 32): a qualitative palette; larger N falls back to a continuous colormap."""

TYPE_COLORS: list[str] = ["#7f7f7f", "#e8e8e8", "#2ca02c", "#ff7f0e", "#bcbd22", "#1f77b4", "#9467bd", "#17becf",
                          "#d62728"]
"""The colour of each TokenType (OTHER, WHITESPACE, COMMENT, STRING, DOCSTRING, NAME, KEYWORD, NUMBER, OPERATOR)."""

CELL_W, CELL_H = 0.115, 0.19  # inches per character cell
FONT_SIZE = 8.5  # points: DejaVu Sans Mono advances 0.602 em = 5.1 pt = 0.071 in, inside the 0.115 in cell
_FONT = FontProperties(family="DejaVu Sans Mono")
_GLYPHS: dict[str, Path] = {}


def expert_colors(n_experts: int) -> list[str]:
    """One colour per expert: the 32-colour qualitative palette, or a continuous colormap beyond 32."""
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
    if n_experts <= len(EXPERT_COLORS):
        return EXPERT_COLORS[:n_experts]
    return [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["turbo"](np.linspace(0, 1, n_experts))]


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
