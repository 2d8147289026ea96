"""moe_course.plots style, params and moe: every helper returns a Figure with the expected bars, lines and labels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from moe_course import params  # noqa: E402
from moe_course.plots import moe as moe_plots  # noqa: E402
from moe_course.plots import params as param_plots  # noqa: E402
from moe_course.plots import style  # noqa: E402
from moe_course.train import History  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _bars(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_param_breakdown_bars_per_component_and_model() -> None:
    cfgs = {name: params.get_published(name) for name in ("Mixtral 8x7B", "DeepSeek-V3")}
    breakdowns = {name: params.param_breakdown(cfg) for name, cfg in cfgs.items()}
    fig = param_plots.plot_param_breakdown(breakdowns)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    nonzero = [k for k in params.BREAKDOWN_KEYS if any(b[k] for b in breakdowns.values())]
    assert len(_bars(ax)) == len(nonzero) * 2  # one segment per (component, model)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [param_plots.COMPONENT_LABELS[k] for k in nonzero]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["Mixtral 8x7B", "DeepSeek-V3"]
    assert any("671.0B" in text for text in _texts(ax))
    # Relative bars end at 100 %.
    ends = {}
    for bar in _bars(ax):
        ends[round(bar.get_y(), 3)] = max(ends.get(round(bar.get_y(), 3), 0), bar.get_x() + bar.get_width())
    assert all(end == pytest.approx(100) for end in ends.values())


def test_param_breakdown_absolute_and_given_ax() -> None:
    fig, ax = plt.subplots()
    out = param_plots.plot_param_breakdown({"a": {"attention": 2e9, "routed_experts": 6e9, "router": 0}},
                                     relative=False, ax=ax)
    assert out is fig
    widths = sorted(bar.get_width() for bar in _bars(ax))
    assert widths == pytest.approx([2.0, 6.0])  # billions; the all-zero router is left out
    with pytest.raises(ValueError):
        param_plots.plot_param_breakdown({})


def test_total_vs_active_labels_every_model() -> None:
    names = ["Mixtral 8x7B", "Grok-1", "DBRX", "Mixtral 8x22B", "DeepSeek-V3", "Llama 4 Maverick",
             "Qwen3-235B-A22B"]
    models = {n: (params.total_params(params.get_published(n)), params.active_params(params.get_published(n)))
              for n in names}
    fig = param_plots.plot_total_vs_active(models)
    ax = fig.axes[0]
    assert isinstance(fig, Figure)
    annotations = [t.get_text() for t in ax.texts if t.get_text() in names]
    assert annotations == names
    assert len(ax.collections) == len(names)  # one scatter point per model
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    with pytest.raises(ValueError):
        param_plots.plot_total_vs_active({"bad": (1e9, 2e9)})  # active > total


def test_scaling_one_line_per_series() -> None:
    ns = [1, 2, 4, 8, 16]
    fig = param_plots.plot_scaling(ns, {"soft": [1, 2, 4, 8, 16], "dense": [1] * 5, "top-2": [1, 2, 2, 2, 2]}, "ms")
    ax = fig.axes[0]
    assert len(ax.lines) == 3
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["soft", "dense", "top-2"]
    assert ax.get_ylabel() == "ms"
    assert ax.get_xscale() == "linear"
    assert list(ax.lines[0].get_xdata()) == ns
    assert param_plots.plot_scaling(ns, {"soft": ns}, "FLOPs", logx=True, logy=True).axes[0].get_xscale() == "log"
    with pytest.raises(ValueError, match="values"):
        param_plots.plot_scaling(ns, {"short": [1, 2]}, "ms")


def _history(n_layers: int = 2, n_experts: int = 4, points: int = 5) -> History:
    rng = np.random.default_rng(0)
    hist = History()
    for p in range(points):
        hist.step.append(10 * (p + 1))
        hist.train_loss.append(3.0 - 0.1 * p)
        loads = rng.random((n_layers, n_experts))
        hist.load.append((loads / loads.sum(axis=1, keepdims=True)).tolist())
    hist.val_step = [20, 40]
    hist.val_loss = [2.9, 2.7]
    return hist


def test_loss_curves_train_and_val_per_run() -> None:
    fig = moe_plots.plot_loss_curves({"moe": _history(), "dense": _history()})
    ax = fig.axes[0]
    assert len(ax.lines) == 4
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["moe (train)", "moe (val)", "dense (train)", "dense (val)"]


def test_expert_load_area_and_heatmap() -> None:
    hist = _history(n_experts=4)
    fig = moe_plots.plot_expert_load(hist, layer=1)
    ax = fig.axes[0]
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 4  # one band per expert
    assert "layer 1" in ax.get_title()
    fig = moe_plots.plot_expert_load(hist, kind="heatmap")
    assert any(isinstance(im, AxesImage) for im in fig.axes[0].images)
    assert fig.axes[0].images[0].get_array().shape == (4, 5)
    with pytest.raises(ValueError, match="out of range"):
        moe_plots.plot_expert_load(hist, layer=2)
    with pytest.raises(ValueError, match="kind"):
        moe_plots.plot_expert_load(hist, kind="pie")


def test_routing_map_marks_chosen_experts() -> None:
    scores = torch.softmax(torch.randn(6, 8), dim=-1)
    indices = scores.topk(2, dim=-1).indices
    labels = list("abcdef")
    fig = moe_plots.plot_routing_map(scores, indices, token_labels=labels)
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (6, 8)
    assert len(ax.collections) == 2  # one marker set per choice
    assert np.array_equal(ax.collections[0].get_offsets()[:, 0], indices[:, 0].numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    with pytest.raises(ValueError, match="labels"):
        moe_plots.plot_routing_map(scores, indices, token_labels=["x"])


def test_moe_block_diagram_draws_every_expert_and_highlights_the_chosen() -> None:
    fig = moe_plots.moe_block_diagram(n_experts=6, top_k=2, chosen=[1, 4])
    ax = fig.axes[0]
    experts = {p.get_gid(): p for p in ax.patches if (p.get_gid() or "").startswith("expert ")}
    assert sorted(experts) == [f"expert {e}" for e in range(6)]
    orange = style.COLORS[1]
    highlighted = sorted(g for g, p in experts.items() if matplotlib.colors.to_hex(p.get_facecolor()) == orange)
    assert highlighted == ["expert 1", "expert 4"]
    text = " ".join(_texts(ax))
    for shape in ("(T, d)", "W_g (d, N)", "logits (T, N)", "weights (T, k)", "indices (T, k)", "N = 6", "k = 2"):
        assert shape in text
    assert {p.get_gid() for p in ax.patches} >= {"input", "router", "topk", "sum", "output"}
    assert len(moe_plots.moe_block_diagram(n_experts=8, top_k=3).axes[0].patches) > 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_experts": 0}, "n_experts"),
        ({"n_experts": 4, "top_k": 5}, "top_k"),
        ({"n_experts": 4, "top_k": 2, "chosen": [1, 1]}, "chosen"),
        ({"n_experts": 4, "top_k": 1, "chosen": [4]}, "chosen"),
    ],
)
def test_moe_block_diagram_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        moe_plots.moe_block_diagram(**kwargs)
