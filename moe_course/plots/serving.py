"""Notebook 09's figures and the offloading explorer (widget and static fallback).

=========================  =========================================================================================
``plot_per_batch``         one line per series against the batch size B (log axis): bytes per token, distinct experts
``plot_roofline``          attainable FLOP/s against FLOPs per byte, with points (e.g. an MoE layer at several B)
``plot_hit_rates``         expert-cache hit rate (or its cost) against the capacity C, one line per policy
``plot_popularity``        each MoE layer's experts sorted by their share of tokens, against the uniform share
``plot_decode_split``      milliseconds per decoded token split into attention, router, experts (or FFN), other
``plot_prefetch``          recall of speculative prefetch against the number of experts prefetched
``offload_explorer``       sliders for the cache size C and the batch B: hit rate and bytes per token
=========================  =========================================================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from moe_course.plots.style import COLORS, figure_axes, style_axes

__all__ = [
    "PART_COLORS",
    "explorer_data",
    "offload_explorer",
    "plot_decode_split",
    "plot_hit_rates",
    "plot_per_batch",
    "plot_popularity",
    "plot_prefetch",
    "plot_roofline",
    "static_offload_figure",
]

PART_COLORS = {"attention": "#1f77b4", "router": "#d62728", "experts": "#ff7f0e", "ffn": "#9467bd",
               "other": "#7f7f7f"}
"""One colour per part of a decoding step (the router and the experts as in notebook 02's breakdown)."""


def plot_per_batch(batches: Sequence[float], series: Mapping[str, Sequence[float]], ax: Axes | None = None,
                   title: str | None = None, ylabel: str = "", styles: Mapping[str, str] | None = None,
                   logy: bool = False, hline: tuple[float, str] | None = None) -> Figure:
    """``series[label]``: one value per batch size in ``batches`` (log x axis). ``styles[label]``: a line style
    (``"--"`` for formulas, ``"o-"`` for measurements); ``hline``: (y, label) of a reference line such as N."""
    fig, ax = figure_axes(ax, (6.5, 4.0))
    for i, (label, values) in enumerate(series.items()):
        if len(values) != len(batches):
            raise ValueError(f"series {label!r} has {len(values)} values for {len(batches)} batch sizes")
        style = (styles or {}).get(label, "o-")
        ax.plot(batches, values, style, color=COLORS[i % len(COLORS)], label=label, lw=1.6, ms=4)
    if hline is not None:
        ax.axhline(hline[0], color="0.5", ls=":", lw=1)
        ax.annotate(hline[1], (batches[0], hline[0]), textcoords="offset points", xytext=(2, 3), fontsize=8,
                    color="0.35")
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    style_axes(ax, title, "batch size B (tokens decoded together)", ylabel, title_size=10)
    ax.legend(frameon=False, fontsize=8)
    return fig


def plot_roofline(peak_flops: float, bytes_per_s: float, points: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                  labels: Mapping[str, Sequence[str]] | None = None, ax: Axes | None = None,
                  title: str | None = None) -> Figure:
    """The roofline min(peak, bandwidth · I) against the arithmetic intensity I (FLOPs per byte read), log-log.

    ``points[series] = (intensities, achieved FLOP/s)``; ``labels[series]``: a text per point (e.g. "B=64").
    """
    fig, ax = figure_axes(ax, (6.5, 4.0))
    xs = [x for xi, _ in points.values() for x in xi]
    lo, hi = min(xs + [1.0]) / 2, max(xs + [4 * peak_flops / bytes_per_s]) * 2
    grid = np.geomspace(lo, hi, 200)
    ax.plot(grid, np.minimum(peak_flops, bytes_per_s * grid), color="black", lw=1.8, label="roofline")
    ridge = peak_flops / bytes_per_s
    ax.axvline(ridge, color="0.6", ls=":", lw=1)
    ax.annotate(f"ridge: {ridge:.0f} FLOPs/byte", (ridge, peak_flops), textcoords="offset points", xytext=(4, -12),
                fontsize=8, color="0.35")
    for i, (name, (x, y)) in enumerate(points.items()):
        ax.plot(x, y, "o", color=COLORS[i % len(COLORS)], label=name, ms=5)
        for xi, yi, text in zip(x, y, (labels or {}).get(name, []), strict=False):  # alternate below / above
            ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(4, -10 if i % 2 == 0 else 5), fontsize=7,
                        color=COLORS[i % len(COLORS)])
    ax.set_xscale("log")
    ax.set_yscale("log")
    style_axes(ax, title, "arithmetic intensity (FLOPs per byte read from memory)", "FLOP/s", title_size=10)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    return fig


def plot_hit_rates(capacities: Sequence[int], curves: Mapping[str, Sequence[float | None]], ax: Axes | None = None,
                   title: str | None = None, styles: Mapping[str, str] | None = None, ylabel: str = "hit rate",
                   ylim: tuple[float, float] | None = (0, 1.02), legend_loc: str = "lower right") -> Figure:
    """Hit rate (y, 0 to 1) against the cache capacity C (x), one line per policy in ``curves``; with ``ylabel``
    and ``ylim=None``, any other per-policy quantity (experts copied per token, tokens per second)."""
    fig, ax = figure_axes(ax, (6.5, 4.0))
    for i, (label, values) in enumerate(curves.items()):
        if len(values) != len(capacities):
            raise ValueError(f"curve {label!r} has {len(values)} values for {len(capacities)} capacities")
        ax.plot(capacities, values, (styles or {}).get(label, "o-"), color=COLORS[i % len(COLORS)], label=label,
                lw=1.6, ms=3.5)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xticks(list(capacities))
    style_axes(ax, title, "experts cached per layer C", ylabel, title_size=10)
    ax.legend(frameon=False, fontsize=8, loc=legend_loc)
    return fig


def plot_popularity(shares: Sequence[Sequence[float]], k: int, fig: Figure | None = None,
                    title: str | None = None) -> Figure:
    """One panel per MoE layer: its experts sorted by the share of tokens that use them (bars, labelled with the
    expert id), against the uniform share k/N (dashed)."""
    arr = np.asarray(shares, dtype=float)
    if arr.ndim != 2:
        raise ValueError(f"shares must be [layer][expert], got an array of shape {arr.shape}")
    layers, n = arr.shape
    fig = fig or Figure(figsize=(3.2 * layers + 0.6, 3.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, layers, sharey=True))
    for layer, ax in enumerate(axes):
        order = np.argsort(-arr[layer], kind="stable")
        ax.bar(np.arange(n), arr[layer][order], color=COLORS[layer % len(COLORS)])
        ax.set_xticks(np.arange(n), [str(e) for e in order], fontsize=6)
        ax.axhline(k / n, color="black", ls="--", lw=1)
        style_axes(ax, f"MoE layer {layer}", "expert (hottest first)", "share of tokens" if layer == 0 else None,
                   title_size=10)
    axes[0].annotate(f"uniform k/N = {k / n:.3f}", (n - 1, k / n), textcoords="offset points", xytext=(0, 4),
                     ha="right", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_decode_split(rows: Mapping[str, Mapping[str, float]], ax: Axes | None = None,
                      title: str | None = None) -> Figure:
    """Stacked horizontal bars: ``rows[label][part]`` = milliseconds per decoded token spent in each part."""
    fig, ax = figure_axes(ax, (7.0, 0.45 * len(rows) + 1.4))
    labels = list(rows)
    y = np.arange(len(labels))
    parts = [p for p in PART_COLORS if any(p in r for r in rows.values())]
    left = np.zeros(len(labels))
    for part in parts:
        width = np.array([max(rows[label].get(part, 0.0), 0.0) for label in labels])
        ax.barh(y, width, left=left, color=PART_COLORS[part], label=part)
        left += width
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    style_axes(ax, title, "milliseconds per decoded token", None, title_size=10)
    ax.legend(frameon=False, fontsize=8, ncol=len(parts), loc="lower right")
    return fig


def plot_prefetch(n_prefetched: Sequence[int], curves: Mapping[str, Sequence[float]], k: int,
                  ax: Axes | None = None, title: str | None = None) -> Figure:
    """Recall of speculative prefetch (the share of a token's k experts already loaded) against the number of
    experts prefetched m, one line per series, with the line m/N of a random guess and a mark at m = k."""
    fig, ax = figure_axes(ax, (6.5, 4.0))
    m = np.asarray(n_prefetched, dtype=float)
    for i, (label, values) in enumerate(curves.items()):
        ax.plot(m, values, "o-", color=COLORS[i % len(COLORS)], label=label, lw=1.6, ms=3.5)
    ax.plot(m, m / m.max(), "--", color="0.5", lw=1.2, label="random guess: m/N")
    ax.axvline(k, color="0.6", ls=":", lw=1)
    ax.set_ylim(0, 1.02)
    style_axes(ax, title, "experts prefetched m", "recall (share of the k experts already loaded)", title_size=10)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    return fig


# ---------------------------------------------------------------------------------------------------------
# The explorer: cache size x batch -> hit rate and bytes per token
# ---------------------------------------------------------------------------------------------------------


def explorer_data(extra: Mapping[str, Any]) -> dict[str, Any]:
    """What the explorer draws, from one MoE record of the stored ``serving_traces`` result (``record.extra``):
    the LRU hit rate of every (batch, capacity) and the distinct experts per step of every batch, both averaged
    over the MoE layers, and the model's weight bytes."""
    batches = list(extra["grid_batches"])
    layers = len(extra["grid_lru"])
    hit = np.mean(np.asarray(extra["grid_lru"], dtype=float), axis=0)  # (batches, capacities)
    measured = dict(zip(extra["batches"], np.mean(np.asarray(extra["distinct"], dtype=float), axis=0), strict=True))
    return {"batches": batches, "capacities": list(extra["capacities"]), "hit_rate": hit.tolist(),
            "distinct": [float(measured[b]) for b in batches], "n_layers": layers,
            "expert_bytes": float(extra["weight_bytes"]["expert"]),
            "other_bytes": float(extra["weight_bytes"]["other"]), "n_experts": int(extra["n_experts"])}


def _bytes_per_token(data: Mapping[str, Any], capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Per batch size: weight bytes read from fast memory per token, and bytes loaded over the link per token."""
    b = np.asarray(data["batches"], dtype=float)
    distinct = np.asarray(data["distinct"], dtype=float)
    hit = np.asarray(data["hit_rate"], dtype=float)[:, capacity - 1]
    read = (data["other_bytes"] + data["n_layers"] * distinct * data["expert_bytes"]) / b
    loaded = data["n_layers"] * distinct * (1 - hit) * data["expert_bytes"] / b
    return read, loaded


def _draw_explorer(fig: Figure, data: Mapping[str, Any], capacity: int, batch: int) -> None:
    ax_hit, ax_bytes = fig.subplots(1, 2)
    bi = data["batches"].index(batch)
    caps = data["capacities"]
    hit = np.asarray(data["hit_rate"], dtype=float)
    for i, b in enumerate(data["batches"]):
        chosen = i == bi
        ax_hit.plot(caps, hit[i], "-", color=COLORS[i % len(COLORS)], lw=2.2 if chosen else 0.9,
                    alpha=1.0 if chosen else 0.45, label=f"B = {b}")
    ax_hit.plot([capacity], [hit[bi, capacity - 1]], "o", color="black", ms=7)
    ax_hit.set_ylim(0, 1.02)
    style_axes(ax_hit, f"LRU hit rate: {hit[bi, capacity - 1]:.2f} at C = {capacity}, B = {batch}",
               "experts cached per layer C", "hit rate", title_size=10)
    ax_hit.legend(frameon=False, fontsize=7, ncol=2, loc="lower right")
    read, loaded = _bytes_per_token(data, capacity)
    b = data["batches"]
    ax_bytes.plot(b, read / 1e3, "o-", color=COLORS[0], label="weights read from fast memory")
    ax_bytes.plot(b, loaded / 1e3, "s-", color=COLORS[3], label=f"experts loaded over the link (C = {capacity})")
    ax_bytes.axvline(batch, color="0.6", ls=":", lw=1)
    ax_bytes.set_xscale("log", base=2)
    ax_bytes.set_yscale("log")
    style_axes(ax_bytes, f"per token at B = {batch}: {read[bi] / 1e3:.0f} kB read, {loaded[bi] / 1e3:.1f} kB loaded",
               "batch size B", "kB per decoded token (fp32)", title_size=10)
    ax_bytes.legend(frameon=False, fontsize=7)


def static_offload_figure(data: Mapping[str, Any], capacities: Sequence[int] | None = None) -> Figure:
    """The explorer's static version: the hit rate of every (B, C) as a heatmap, and bytes per token for a few C."""
    fig = Figure(figsize=(11, 4.0), layout="constrained")
    ax_map, ax_bytes = fig.subplots(1, 2)
    hit = np.asarray(data["hit_rate"], dtype=float)
    image = ax_map.imshow(hit, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
    ax_map.set_xticks(range(len(data["capacities"])), data["capacities"], fontsize=7)
    ax_map.set_yticks(range(len(data["batches"])), data["batches"], fontsize=7)
    for i in range(hit.shape[0]):
        for j in range(hit.shape[1]):
            ax_map.text(j, i, f"{hit[i, j]:.2f}", ha="center", va="center", fontsize=5.5,
                        color="white" if hit[i, j] < 0.6 else "black")
    ax_map.set_xlabel("experts cached per layer C")
    ax_map.set_ylabel("batch size B")
    ax_map.set_title("LRU hit rate (mean over the MoE layers)", fontsize=10)
    fig.colorbar(image, ax=ax_map, shrink=0.8)
    n = data["n_experts"]
    for i, c in enumerate(capacities or (n // 4, n // 2, 3 * n // 4)):
        read, loaded = _bytes_per_token(data, c)
        if i == 0:
            ax_bytes.plot(data["batches"], read / 1e3, "o-", color="black", label="weights read from fast memory")
        ax_bytes.plot(data["batches"], loaded / 1e3, "s--", color=COLORS[i + 1], label=f"loaded over the link, C = {c}")
    ax_bytes.set_xscale("log", base=2)
    ax_bytes.set_yscale("log")
    style_axes(ax_bytes, "bytes per decoded token", "batch size B", "kB per token (fp32)", title_size=10)
    ax_bytes.legend(frameon=False, fontsize=7)
    return fig


def offload_explorer(data: Mapping[str, Any], static: bool = False, capacity: int | None = None,
                     batch: int | None = None) -> Any:
    """Sliders for the experts cached per layer C and the batch size B over :func:`explorer_data`; returns the
    widget. Falls back to :func:`static_offload_figure` (a ``Figure``) when ``static=True`` or without ipywidgets.
    """
    caps, batches = list(data["capacities"]), list(data["batches"])
    capacity = caps[len(caps) // 2 - 1] if capacity is None else capacity
    batch = batches[0] if batch is None else batch
    if capacity not in caps or batch not in batches:
        raise ValueError(f"capacity must be one of {caps} and batch one of {batches}, got {capacity} and {batch}")
    try:
        if static:
            raise ImportError
        import ipywidgets as widgets
        from IPython.display import display
    except ImportError:
        return static_offload_figure(data)

    style = {"description_width": "initial"}
    controls = {
        "capacity": widgets.IntSlider(value=capacity, min=min(caps), max=max(caps), description="experts cached C",
                                      style=style),
        "batch": widgets.SelectionSlider(options=batches, value=batch, description="batch size B", style=style),
    }
    state: dict[str, Any] = {"draws": 0}

    def update(capacity: int, batch: int) -> None:
        fig = Figure(figsize=(11, 3.8), layout="constrained")
        _draw_explorer(fig, data, capacity, batch)
        state["draws"] += 1
        display(fig)

    out = widgets.interactive_output(update, controls)
    box = widgets.VBox([widgets.HBox(list(controls.values())), out])
    box.controls = controls  # for tests and notebooks that set values programmatically
    box.state = state
    return box
