"""moe_course.plots.balancing: the collapse toy behaves as described; figures and the explorer draw what they say."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from moe_course.plots.balancing import (  # noqa: E402
    balancing_explorer,
    plot_alpha_sweep,
    plot_curves,
    plot_experts_per_token,
    plot_layer_loads,
    plot_simulated_load,
    simulate_collapse,
)
from moe_course.plots.style import COLORS  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_toy_collapses_without_the_loss_and_balances_with_it():
    plain = simulate_collapse(n_experts=8, k=2, alpha=0.0, steps=200, seed=0)
    balanced = simulate_collapse(n_experts=8, k=2, alpha=1.0, steps=200, seed=0)
    assert plain.load.shape == (200, 8)
    assert torch.allclose(plain.load.sum(dim=1), torch.ones(200))
    assert float(plain.max_vio[-1]) > 1.0 and plain.dead >= 2
    assert float(balanced.max_vio[-1]) < 0.5 and balanced.dead == 0
    # starved experts stop improving: their loss stays well above that of the experts still served
    starved = plain.load[-20:].mean(dim=0) < 0.01
    final = plain.expert_loss[-1]
    assert final[starved].mean() > final[~starved].mean() + 0.2


def test_toy_is_deterministic_and_validates_arguments():
    a, b = simulate_collapse(steps=20, seed=3), simulate_collapse(steps=20, seed=3)
    assert torch.equal(a.load, b.load)
    with pytest.raises(ValueError, match="k=9 must be between 1 and n_experts=8"):
        simulate_collapse(n_experts=8, k=9)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        simulate_collapse(alpha=-1.0)


def test_toy_restores_the_thread_count():
    threads = torch.get_num_threads()
    simulate_collapse(steps=2)
    assert torch.get_num_threads() == threads


def test_plot_simulated_load_stacks_one_band_per_expert():
    sim = simulate_collapse(n_experts=4, k=1, steps=30, seed=0)
    fig = plot_simulated_load(sim)
    (ax,) = fig.get_axes()
    assert len(ax.collections) == 4
    assert "N=4, k=1" in ax.get_title() and "MaxVio" in ax.get_title()


def test_plot_layer_loads_one_panel_per_layer():
    load = [[[0.5, 0.5], [1.0, 0.0]], [[0.25, 0.75], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]]  # 3 points, 2 layers
    fig = plot_layer_loads(load, [10, 20, 30], title="t")
    axes = fig.get_axes()
    assert len(axes) == 2 and [ax.get_title() for ax in axes] == ["MoE layer 0", "MoE layer 1"]
    assert all(len(ax.collections) == 2 for ax in axes)
    with pytest.raises(ValueError, match="2 steps for 3 log points"):
        plot_layer_loads(load, [10, 20])
    with pytest.raises(ValueError, match=r"\[log point\]\[layer\]\[expert\]"):
        plot_layer_loads([[0.5, 0.5]], [10])


def test_plot_alpha_sweep_one_colour_per_alpha_and_a_mean_marker():
    rows = [{"alpha": a, "max_vio": v, "val_loss": loss} for a, v, loss in
            [(0.0, 2.0, 2.5), (0.0, 1.8, 2.6), (0.01, 0.3, 2.55), (0.01, 0.2, 2.5)]]
    fig = plot_alpha_sweep(rows)
    (ax,) = fig.get_axes()
    assert len(ax.collections) == 4  # seeds + mean for each alpha
    means = ax.collections[1].get_offsets().tolist()
    assert means == [[pytest.approx(1.9), pytest.approx(2.55)]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["α = 0", "α = 0.01"]


def test_plot_curves_and_experts_per_token():
    fig = plot_curves({"a": ([1, 2], [3.0, 4.0]), "b": ([1, 2], [1.0, 2.0])}, logy=True)
    (ax,) = fig.get_axes()
    assert len(ax.get_lines()) == 2 and ax.get_yscale() == "log"
    fig = plot_experts_per_token(torch.tensor([0, 2, 2, 1, 0, 3]))
    (ax,) = fig.get_axes()
    assert [p.get_height() for p in ax.patches] == [2, 1, 2, 1]
    assert to_hex(ax.patches[0].get_facecolor()) == COLORS[3]  # tokens with no expert stand out
    assert "2 of 6 tokens get none" in ax.get_title()


def test_explorer_static_figure_and_fallback(block_ipywidgets):
    fig = balancing_explorer(static=True, steps=20)
    assert isinstance(fig, Figure) and len(fig.get_axes()) == 4
    block_ipywidgets()
    assert isinstance(balancing_explorer(steps=20), Figure)


def test_explorer_widget_redraws():
    widgets = pytest.importorskip("ipywidgets")
    box = balancing_explorer(steps=10)
    assert isinstance(box, widgets.VBox)
    assert set(box.controls) == {"n_experts", "k", "alpha", "seed"}
    box.controls["k"].value = 4
    box.controls["n_experts"].value = 2  # k is clamped to N when redrawing; must not raise
    box.controls["alpha"].value = 0.1
    with pytest.raises(ValueError, match="alpha=0.5 is not on the slider"):
        balancing_explorer(alpha=0.5)


def test_toy_records_both_gradients_and_alpha_zero_ignores_the_switch_loss():
    sim = simulate_collapse(n_experts=8, k=2, alpha=0.0, steps=30, seed=0)
    assert sim.task_grad.shape == sim.aux_grad.shape == (30,)
    assert bool((sim.aux_grad > 0).all())  # the Switch loss always has a gradient, even when α = 0 ignores it
    assert float(sim.task_grad[0]) == 0.0  # identical experts at the start: the task prefers none of them


def test_router_gradient_norms_of_a_tinylm():
    from moe_course.experiments import base_model
    from moe_course.model import TinyLM
    from moe_course.plots.balancing import router_gradient_norms

    torch.manual_seed(0)
    model = TinyLM(base_model("smoke")).eval()
    x = torch.randint(0, 256, (2, 16))
    ce, aux = router_gradient_norms(model, x, x)
    assert ce > 0 and aux > 0
    assert not model.training  # the training flag is restored
    # the model's own aux_loss_coef does not change the measured (unweighted) Switch-loss gradient
    torch.manual_seed(0)
    weighted = TinyLM(base_model("smoke", aux_loss_coef=0.5))
    assert router_gradient_norms(weighted, x, x) == pytest.approx((ce, aux))
    with pytest.raises(ValueError, match="learned top-k routers"):
        router_gradient_norms(TinyLM(base_model("smoke", router="hash")), x, x)
