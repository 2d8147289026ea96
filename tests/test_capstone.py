"""Notebook 08's "look inside" tools: equal-active twins, type × expert tables, routed text, its figure and explorer."""

from __future__ import annotations

import dataclasses
import io

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from moe_course import analysis  # noqa: E402
from moe_course.capstone import DEFAULT_CODE, equal_active_moe, route_text, type_expert_table  # noqa: E402
from moe_course.corpus import TokenType, label_token_types  # noqa: E402
from moe_course.device import cpu_threads  # noqa: E402
from moe_course.model import ModelConfig, TinyLM  # noqa: E402
from moe_course.params import count_model  # noqa: E402
from moe_course.plots.capstone import (  # noqa: E402
    EXPERT_COLORS,
    TYPE_COLORS,
    expert_colors,
    plot_routed_text,
    routing_explorer,
)


@pytest.fixture(autouse=True)
def one_thread():
    with cpu_threads(1):
        yield


def tiny(n_layer: int = 2, block_size: int = 8, **kw) -> TinyLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, block_size=block_size, n_layer=n_layer, n_head=2, d_model=16, n_experts=6,
                      top_k=2, expert_hidden=16, **kw)
    return TinyLM(cfg)


# ----------------------------------------------------------------------------------------------------------
# equal_active_moe
# ----------------------------------------------------------------------------------------------------------

DENSE = ModelConfig(ffn="dense", vocab_size=256, block_size=16, n_layer=3, n_head=2, d_model=32, d_hidden=96,
                    dropout=0.1)


@pytest.mark.parametrize("n_experts, top_k, n_shared", [(8, 2, 0), (16, 3, 1), (4, 1, 1), (32, 6, 2)])
def test_equal_active_moe_matches_active_parameters(n_experts, top_k, n_shared):
    moe = equal_active_moe(DENSE, n_experts, top_k, n_shared)
    assert (moe.ffn, moe.n_experts, moe.top_k, moe.n_shared) == ("moe", n_experts, top_k, n_shared)
    assert moe.expert_hidden * (top_k + n_shared) == DENSE.d_hidden
    changed = {f.name for f in dataclasses.fields(ModelConfig) if getattr(moe, f.name) != getattr(DENSE, f.name)}
    assert changed <= {"ffn", "n_experts", "top_k", "n_shared", "expert_hidden"}
    dense_total, dense_active = count_model(TinyLM(DENSE))
    total, active = count_model(TinyLM(moe))
    assert dense_total == dense_active
    assert active - dense_active == DENSE.n_layer * DENSE.d_model * n_experts  # only the routers are extra
    assert total > active or n_experts == top_k


def test_equal_active_moe_overrides_and_moe_every():
    moe = equal_active_moe(dataclasses.replace(DENSE, moe_every=3), 8, 2, 1, router_score="sigmoid",
                           bias_update_rate=1e-3, aux_loss_coef=0.0)
    assert (moe.router_score, moe.bias_update_rate, moe.aux_loss_coef, moe.expert_hidden) == ("sigmoid", 1e-3, 0.0, 32)
    model = TinyLM(moe)
    assert len(model.moe_layers()) == 1  # layer 2 only: the others stay dense, with d_hidden
    assert count_model(model)[1] - count_model(TinyLM(dataclasses.replace(DENSE, moe_every=3)))[1] == 32 * 8
    assert DENSE.ffn == "dense"  # the dense config is left as it was


def test_equal_active_moe_errors_name_the_argument():
    with pytest.raises(ValueError, match="dense must be a ModelConfig with ffn='dense', got 'moe'"):
        equal_active_moe(equal_active_moe(DENSE, 8, 2), 8, 2)
    with pytest.raises(ValueError, match=r"d_hidden=96 is not divisible by top_k \+ n_shared = 3 \+ 2 = 5.*95 or "
                                         r"100, or top_k \+ n_shared in \[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48\]"):
        equal_active_moe(DENSE, 8, 3, 2)
    with pytest.raises(ValueError, match="top_k=3 is larger than n_experts=2"):
        equal_active_moe(DENSE, 2, 3)
    with pytest.raises(ValueError, match="n_shared must be an int >= 0"):
        equal_active_moe(DENSE, 8, 2, -1)
    with pytest.raises(ValueError, match=r"overrides \['n_expert'\] are not ModelConfig fields"):
        equal_active_moe(DENSE, 8, 2, n_expert=4)


# ----------------------------------------------------------------------------------------------------------
# type_expert_table
# ----------------------------------------------------------------------------------------------------------


def test_type_expert_table_hand_computed():
    types = torch.tensor([0, 2, 2, 0, 2])
    indices = torch.tensor([[1, 0], [3, 1], [3, 0], [1, 3], [0, 1]])
    first = type_expert_table(types, indices, n_types=3, n_experts=5)
    assert first.dtype == torch.long
    assert first.tolist() == [[0, 2, 0, 0, 0],
                              [0, 0, 0, 0, 0],  # type 1 never occurs; expert 4 is never chosen
                              [1, 0, 0, 2, 0]]
    every = type_expert_table(types, indices, 3, 5, first_choice_only=False)
    assert every.tolist() == [[1, 2, 0, 1, 0], [0, 0, 0, 0, 0], [2, 2, 0, 2, 0]]
    assert int(every.sum()) == indices.numel()


def test_type_expert_table_rejects_bad_input():
    with pytest.raises(ValueError, match="types must be"):
        type_expert_table(torch.zeros(4, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 2, 2)
    with pytest.raises(ValueError, match=r"types must lie in \[0, n_types=2\)"):
        type_expert_table(torch.tensor([0, 2]), torch.zeros(2, 1, dtype=torch.long), 2, 2)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, n_experts=3\)"):
        type_expert_table(torch.tensor([0, 1]), torch.tensor([[0], [3]]), 2, 3)


def test_routing_tables_unchanged():
    """routing_tables (now built on type_expert_table) gives the counts of the loop it replaced."""
    model = tiny()
    data = torch.randint(0, 256, (200,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    types = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(2))
    tables = analysis.routing_tables(model, data, types, n_types=3, batch_size=4, n_batches=3, seed=7)
    gen = torch.Generator().manual_seed(7)
    expected = [torch.zeros(3, 6, dtype=torch.long) for _ in model.moe_layers()]
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            x, t = analysis._windows(data, types, 4, model.cfg.block_size, gen)
            model(x)
            for table, layer in zip(expected, model.moe_layers(), strict=True):
                for ty, e in zip(t.reshape(-1).tolist(), layer.last_routing.indices[:, 0].tolist(), strict=True):
                    table[ty, e] += 1
    assert [t.tolist() for t in tables] == [t.tolist() for t in expected]
    assert all(int(t.sum()) == 3 * 4 * 8 for t in tables)


# ----------------------------------------------------------------------------------------------------------
# route_text
# ----------------------------------------------------------------------------------------------------------


def test_route_text_shapes_and_types():
    model = tiny()
    routed = route_text(model, DEFAULT_CODE[:7])
    assert routed.bytes == list(b"def mea")
    assert len(routed.experts) == len(routed.weights) == 2
    assert all(e.shape == (7, 2) and e.dtype == torch.long for e in routed.experts)
    assert all(w.shape == (7, 2) and w.is_floating_point() for w in routed.weights)
    assert routed.n_experts == [6, 6] and routed.blocks == [0, 1]
    assert routed.types.tolist() == label_token_types(b"def mea").tolist()
    assert routed.types[:3].tolist() == [TokenType.KEYWORD] * 3


def test_route_text_windows_match_separate_runs():
    model = tiny(block_size=8)
    text = "x = 1\ny = 'caf\u00e9'\n"  # 18 bytes (é is two): windows of 8, 8 and 2
    routed = route_text(model, text)
    data = torch.tensor(list(text.encode()))
    assert len(routed.bytes) == 18 and all(e.shape == (18, 2) for e in routed.experts)
    model.eval()
    for start in (0, 8, 16):
        with torch.no_grad():
            model(data[None, start:start + 8])
        for layer, experts, weights in zip(model.moe_layers(), routed.experts, routed.weights, strict=True):
            assert torch.equal(experts[start:start + 8], layer.last_routing.indices)
            assert torch.allclose(weights[start:start + 8], layer.last_routing.weights)
    assert routed.types[-3:].tolist() == [TokenType.STRING, TokenType.STRING, TokenType.WHITESPACE]


def test_route_text_restores_mode_and_accepts_bytes():
    model = tiny(dropout=0.5)
    model.train()
    a = route_text(model, b"a = b + c")
    assert model.training
    b = route_text(model, "a = b + c")
    assert all(torch.equal(x, y) for x, y in zip(a.experts, b.experts, strict=True))  # eval: no dropout noise
    model.eval()
    route_text(model, "x")
    assert not model.training


def test_route_text_errors():
    with pytest.raises(ValueError, match="text is empty"):
        route_text(tiny(), "")
    with pytest.raises(ValueError, match="no MoE layers"):
        route_text(TinyLM(ModelConfig(ffn="dense", block_size=8, n_layer=1, n_head=2, d_model=16, d_hidden=32)), "x")
    with pytest.raises(ValueError, match="token-choice routing"):
        route_text(tiny(router="expert_choice", aux_loss_coef=0.0), "x = 1")
    torch.manual_seed(0)
    small_vocab = TinyLM(ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=16, n_experts=4,
                                     expert_hidden=8))
    with pytest.raises(ValueError, match="vocab_size is 32"):
        route_text(small_vocab, "abc")


# ----------------------------------------------------------------------------------------------------------
# plot_routed_text
# ----------------------------------------------------------------------------------------------------------


def _panels(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.images]


def test_plot_routed_text_panels_and_cells():
    model = tiny(n_layer=3)
    text = "ab c\n\tx\x01\n" + "z" * 70
    routed = route_text(model, text)
    fig = plot_routed_text(routed)
    assert isinstance(fig, Figure)
    panels = _panels(fig)
    assert len(panels) == 3 and len(fig.axes) == 4  # one panel per MoE layer, plus the colour key
    assert fig.text_grid[:10] == ["a", "b", "·", "c", "⏎", "→", "x", "01", "⏎", "z"]
    image = panels[1].images[0].get_array()
    # rows: "ab c⏎", "→x01⏎", then 70 z's wrapped at 64 -> 4 rows of up to 64 cells
    assert image.shape[:2] == (4, 64)
    first = routed.experts[1][:, 0]
    np.testing.assert_allclose(image[0, 3], to_rgb(EXPERT_COLORS[int(first[3])]))  # "c"
    np.testing.assert_allclose(image[1, 2], to_rgb(EXPERT_COLORS[int(first[7])]))  # the \x01 byte
    np.testing.assert_allclose(image[3, 5], to_rgb(EXPERT_COLORS[int(first[-1])]))  # the last z
    np.testing.assert_allclose(image[0, 5], [1.0, 1.0, 1.0])  # past the end of the line: empty
    assert len(panels[1].collections[0].get_paths()) == len(text)  # one glyph per byte

    one = plot_routed_text(routed, layer=2)
    assert len(_panels(one)) == 1 and "MoE layer 2" in _panels(one)[0].get_title(loc="left")
    by_type = plot_routed_text(routed, colour_by="type", width=8)
    (panel,) = _panels(by_type)
    assert panel.images[0].get_array().shape[:2] == (2 + 9, 8)  # the z's wrap into 9 rows of 8
    np.testing.assert_allclose(panel.images[0].get_array()[0, 0], to_rgb(TYPE_COLORS[int(routed.types[0])]))


def test_plot_routed_text_errors():
    routed = route_text(tiny(), "x = 1")
    with pytest.raises(ValueError, match="layer must be None"):
        plot_routed_text(routed, layer=2)
    with pytest.raises(ValueError, match="colour_by must be"):
        plot_routed_text(routed, colour_by="weight")
    with pytest.raises(ValueError, match="width must be"):
        plot_routed_text(routed, width=2)


def test_expert_colors_distinct_up_to_32():
    assert len(set(expert_colors(32))) == 32
    assert len(set(expert_colors(48))) == 48  # a continuous colormap beyond the palette


def test_plot_routed_text_draws_one_image_and_one_glyph_collection_per_panel():
    """512 bytes × 4 layers: what keeps the drawing fast is its structure (one background image and one
    collection of all glyphs per panel, no text artist per character), asserted here; the time itself is
    measured by benchmarks/bench_plots.py (no wall-clock bound in a unit test)."""
    routed = route_text(tiny(n_layer=4, block_size=64), (DEFAULT_CODE * 3)[:512])
    fig = plot_routed_text(routed)
    fig.savefig(io.BytesIO(), format="png", dpi=100)
    panels = _panels(fig)
    assert len(panels) == 4
    for ax in panels:
        assert len(ax.images) == 1  # the cell colours, one pixel per cell
        (glyphs,) = [c for c in ax.collections if isinstance(c, PathCollection)]
        assert len(glyphs.get_offsets()) == 512  # every byte's glyph, in one collection
        assert [t.get_text() for t in ax.texts] == []  # the characters are not text artists


# ----------------------------------------------------------------------------------------------------------
# routing_explorer
# ----------------------------------------------------------------------------------------------------------


def test_routing_explorer_static():
    fig = routing_explorer(tiny(), static=True)
    assert isinstance(fig, Figure) and len(_panels(fig)) == 2
    assert "".join(fig.text_grid).startswith("def·mean_square(")


def test_routing_explorer_without_ipywidgets(block_ipywidgets):
    block_ipywidgets()
    assert isinstance(routing_explorer(tiny(), "y = 2\n"), Figure)


def test_routing_explorer_widget_redraws(monkeypatch):
    pytest.importorskip("ipywidgets")
    import moe_course.plots.capstone as capstone_plots

    routed_texts = []
    real_route = capstone_plots.route_text
    monkeypatch.setattr(capstone_plots, "route_text", lambda m, t: routed_texts.append(t) or real_route(m, t))
    box = routing_explorer(tiny())
    assert set(box.controls) == {"text", "layer", "colour_by"}
    assert box.controls["text"].continuous_update is False
    assert box.state["draws"] == 1 and len(_panels(box.state["figure"])) == 2

    box.controls["text"].value = "z = 3\n"
    assert box.state["draws"] == 2 and box.state["figure"].text_grid == ["z", "·", "=", "·", "3", "⏎"]
    box.controls["layer"].value = 1
    assert box.state["draws"] == 3 and len(_panels(box.state["figure"])) == 1
    box.controls["colour_by"].value = "type"
    assert box.state["draws"] == 4
    np.testing.assert_allclose(_panels(box.state["figure"])[0].images[0].get_array()[0, 0],
                               to_rgb(TYPE_COLORS[TokenType.NAME]))
    assert routed_texts == [DEFAULT_CODE.encode(), b"z = 3\n"]  # the menu and the toggle only redraw

    box.controls["text"].value = ""
    assert box.state["draws"] == 4  # nothing to route: a message instead of a figure
    box.controls["text"].value = "x = 1\n" * 400
    assert len(box.state["figure"].text_grid) == 2048
    assert box.state["figure"]._suptitle.get_text() == "the first 2048 of 2400 bytes"
