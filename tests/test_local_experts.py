"""The 1991 mixture of local experts: model, the two error functions, metrics, baseline, training, plots."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from moe_course import synthetic  # noqa: E402
from moe_course.local_experts import (  # noqa: E402
    GatingNetwork,
    MixtureOfLocalExperts,
    competitive_loss,
    confident_fraction,
    cooperative_loss,
    count_params,
    expert_region_mse,
    expert_regions,
    matched_mlp,
    partition_purity,
    responsibilities,
    specialisation_report,
    train_mixture,
    weighted_squared_error,
)
from moe_course.plots.local_experts import (  # noqa: E402
    plot_data,
    plot_expert_fits,
    plot_gate_partition,
    plot_learning_curves,
)

# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


def test_gate_is_a_softmax_over_experts() -> None:
    gate = GatingNetwork(d_in=3, n_experts=5)
    x = torch.randn(7, 3)
    p = gate(x)
    assert p.shape == (7, 5)
    assert torch.allclose(p.sum(-1), torch.ones(7))
    assert torch.allclose(p, torch.softmax(x @ gate.net.weight.T + gate.net.bias, dim=-1))
    assert torch.allclose(gate.log_probs(x).exp(), p)


@pytest.mark.parametrize("expert_hidden", [0, 6])
def test_mixture_shapes_and_blend(expert_hidden: int) -> None:
    model = MixtureOfLocalExperts(n_experts=4, d_in=2, d_out=3, expert_hidden=expert_hidden, gate_hidden=5, seed=0)
    x = torch.randn(10, 2)
    p, o, y, log_p = model(x)
    assert p.shape == (10, 4) and o.shape == (10, 4, 3) and y.shape == (10, 3)
    assert torch.allclose(p.sum(-1), torch.ones(10))
    assert torch.allclose(y, (p.unsqueeze(-1) * o).sum(1), atol=1e-6)
    assert torch.allclose(log_p.exp(), p)
    for i, expert in enumerate(model.experts):
        assert torch.allclose(o[:, i], expert(x))


def test_mixture_seed_is_reproducible_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    a = MixtureOfLocalExperts(3, 1, 1, seed=11)
    assert torch.equal(torch.rand(2), expected)
    b = MixtureOfLocalExperts(3, 1, 1, seed=11)
    c = MixtureOfLocalExperts(3, 1, 1, seed=12)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_bad_sizes_raise() -> None:
    with pytest.raises(ValueError, match="n_experts"):
        MixtureOfLocalExperts(0, 1, 1)
    with pytest.raises(ValueError, match="hidden"):
        MixtureOfLocalExperts(2, 1, 1, expert_hidden=-1)


# ----------------------------------------------------------------------------------------------------------
# The error functions, on a 2-case example computed by hand
# ----------------------------------------------------------------------------------------------------------
#
# Two experts, one output dimension.
#   case 1: p = (0.5, 0.5),   o = (1, 3), d = 1  -> squared errors (0, 4), blend 2.0
#   case 2: p = (0.25, 0.75), o = (0, 2), d = 2  -> squared errors (4, 0), blend 1.5
# cooperative: case 1 (1 - 2)^2 = 1,  case 2 (2 - 1.5)^2 = 0.25,         mean 0.625
# competitive: case 1 -log(0.5 + 0.5 e^-2)   = log 2 - log(1 + e^-2)  = 0.566219
#              case 2 -log(0.25 e^-2 + 0.75)                            = 0.243558,  mean 0.404889
# eq. 1.2:     case 1 0.5 * 0 + 0.5 * 4 = 2,  case 2 0.25 * 4 + 0.75 * 0 = 1,        mean 1.5
# responsibilities: case 1 (1, e^-2) / (1 + e^-2) = (0.880797, 0.119203)
#                   case 2 (0.25 e^-2, 0.75) / (0.25 e^-2 + 0.75) = (0.043165, 0.956835)

P = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
O = torch.tensor([[[1.0], [3.0]], [[0.0], [2.0]]])
D = torch.tensor([[1.0], [2.0]])


def test_cooperative_loss_by_hand() -> None:
    assert float(cooperative_loss(P, O, D)) == pytest.approx(0.625, abs=1e-6)


def test_competitive_loss_by_hand() -> None:
    assert float(competitive_loss(P, O, D)) == pytest.approx(0.404889, abs=1e-6)
    assert float(competitive_loss(P, O, D, log_p=P.log())) == pytest.approx(0.404889, abs=1e-6)


def test_weighted_squared_error_by_hand() -> None:
    assert float(weighted_squared_error(P, O, D)) == pytest.approx(1.5, abs=1e-6)


def test_responsibilities_by_hand() -> None:
    h = responsibilities(P, O, D)
    assert torch.allclose(h, torch.tensor([[0.880797, 0.119203], [0.043165, 0.956835]]), atol=1e-6)


def test_competitive_gradient_is_weighted_by_responsibility() -> None:
    # dE/do_i = -h_i (d - o_i) / N for the mean over N cases
    o = O.clone().requires_grad_(True)
    competitive_loss(P, o, D).backward()
    h = responsibilities(P, O, D)
    expected = -(h.unsqueeze(-1) * (D.unsqueeze(1) - O)) / 2
    assert torch.allclose(o.grad, expected, atol=1e-6)


def test_competitive_loss_is_stable_for_large_errors() -> None:
    # squared errors 10^4 and 4 * 10^4: exp underflows to 0 in any precision, the loss is 5000 + log 2
    p = torch.tensor([[0.5, 0.5]])
    o = torch.tensor([[[100.0], [200.0]]], requires_grad=True)
    d = torch.zeros(1, 1)
    naive = -torch.log((p * torch.exp(-0.5 * (d.unsqueeze(1) - o).pow(2).sum(-1))).sum(-1)).mean()
    assert math.isinf(naive.item())
    loss = competitive_loss(p, o, d)
    assert loss.item() == pytest.approx(5000 + math.log(2), rel=1e-6)
    loss.backward()
    assert torch.isfinite(o.grad).all()
    assert float(o.grad[0, 0, 0]) == pytest.approx(100.0)  # expert 0 takes all the responsibility
    assert float(o.grad[0, 1, 0]) == 0.0


def test_competitive_loss_with_a_zero_gate_probability() -> None:
    p = torch.tensor([[1.0, 0.0]], requires_grad=True)
    o = torch.tensor([[[0.0], [5.0]]])
    loss = competitive_loss(p, o, torch.zeros(1, 1))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert torch.isfinite(p.grad).all()


def test_loss_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shapes"):
        competitive_loss(P, O, torch.zeros(3, 1))
    with pytest.raises(ValueError, match="expected p"):
        cooperative_loss(P, O[:, :, 0], D)


# ----------------------------------------------------------------------------------------------------------
# Specialisation metrics on a hand-made gate
# ----------------------------------------------------------------------------------------------------------

# four inputs, two experts (a third one that never wins in the nan test)
GATE = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.08, 0.92], [0.3, 0.7]])
REGIMES = torch.tensor([0, 1, 1, 1])


def test_confident_fraction_and_regions() -> None:
    assert confident_fraction(GATE) == pytest.approx(0.5)  # rows 0 and 2 exceed 0.9
    assert confident_fraction(GATE, threshold=0.5) == pytest.approx(1.0)
    assert expert_regions(GATE).tolist() == [0, 0, 1, 1]


def test_partition_purity_by_hand() -> None:
    # region of expert 0 = inputs {0, 1} with regimes {0, 1}: majority 1 input; region 1 = {2, 3}, both regime 1
    assert partition_purity(GATE, REGIMES) == pytest.approx(3 / 4)
    assert partition_purity(GATE, torch.tensor([0, 0, 1, 1])) == pytest.approx(1.0)
    everything_to_one = torch.tensor([[1.0, 0.0]] * 4)
    assert partition_purity(everything_to_one, REGIMES) == pytest.approx(3 / 4)  # share of the largest regime


def test_expert_region_mse_by_hand() -> None:
    d = torch.zeros(4, 1)
    o = torch.tensor([[1.0, 1.0], [2.0, 1.0], [3.0, 0.0], [4.0, 2.0]]).unsqueeze(-1)  # (4 inputs, 2 experts, 1)
    own, other = expert_region_mse(GATE, o, d)
    # expert 0 owns inputs 0, 1: (1 + 4) / 2; elsewhere (9 + 16) / 2.  expert 1 owns 2, 3: (0 + 4) / 2; else 1.
    assert own.tolist() == pytest.approx([2.5, 2.0])
    assert other.tolist() == pytest.approx([12.5, 1.0])
    three = torch.cat([GATE * 0.9, torch.full((4, 1), 0.1)], dim=1)  # expert 2 never has the largest gate
    own3, other3 = expert_region_mse(three, torch.cat([o, o[:, :1]], dim=1), d)
    assert math.isnan(own3[2]) and other3[2] == pytest.approx(7.5)


def test_specialisation_report_on_a_perfect_mixture() -> None:
    # a hand-built 1-D mixture whose gate and experts are the true regimes of a two-regime problem
    model = MixtureOfLocalExperts(2, 1, 1, expert_hidden=0)
    with torch.no_grad():
        model.gate.net.weight.copy_(torch.tensor([[-50.0], [50.0]]))
        model.gate.net.bias.zero_()
        model.experts[0].net.weight.fill_(1.0)
        model.experts[0].net.bias.fill_(2.0)
        model.experts[1].net.weight.fill_(-1.0)
        model.experts[1].net.bias.fill_(-2.0)
    x = torch.linspace(-1, 1, 201).unsqueeze(1)
    regimes = (x[:, 0] >= 0).long()
    d = torch.where(regimes.bool(), -x[:, 0] - 2, x[:, 0] + 2).unsqueeze(1)
    report = specialisation_report(model, x, d, regimes)
    assert report.purity == pytest.approx(1.0)
    assert report.own_mse == pytest.approx([0.0, 0.0], abs=1e-10)
    assert report.other_mse[0] > 1 and report.other_mse[1] > 1
    assert report.top1_mse == pytest.approx(0.0, abs=1e-10)
    assert report.confident > 0.9
    assert report.region_share == pytest.approx([100 / 201, 101 / 201])
    rows = dict(report.rows())
    assert rows["regime purity"] == "1.000" and rows["top-1 expert MSE"] == "0.000"


# ----------------------------------------------------------------------------------------------------------
# Baseline and training
# ----------------------------------------------------------------------------------------------------------


def test_matched_mlp_counts() -> None:
    net, n = matched_mlp(100, d_in=1, d_out=1)  # 3 per hidden unit + 1: 33 units = 100 exactly
    assert n == count_params(net) == 100
    mixture = MixtureOfLocalExperts(4, 2, 1, expert_hidden=0)  # gate 2*4+4, experts 4*(2+1): 24
    assert count_params(mixture) == 24
    net, n = matched_mlp(mixture, d_in=2, d_out=1)
    assert n == 25  # 6 hidden units of 4 parameters, plus the output bias
    with pytest.raises(ValueError, match="too few"):
        matched_mlp(3, d_in=2, d_out=1)


def test_train_mixture_is_deterministic_and_learns() -> None:
    data = synthetic.quadrants_2d(128, seed=0)
    runs = []
    for _ in range(2):
        model = MixtureOfLocalExperts(4, 2, 1, expert_hidden=0, seed=0)
        runs.append(train_mixture(model, data.x, data.y, steps=60, lr=0.05, log_every=20, progress=False,
                                  x_test=data.x, d_test=data.y))
    a, b = runs
    assert a.step == [1, 20, 40, 60]
    assert a.loss == b.loss and a.test_mse == b.test_mse
    assert a.train_mse[-1] < a.train_mse[0]
    net, _ = matched_mlp(24, 2, 1, seed=0)
    h = train_mixture(net, data.x, data.y, loss="mse", steps=30, batch_size=32, log_every=10, progress=False)
    assert len(h.loss) == 4 and h.test_mse == []


def test_train_mixture_argument_errors() -> None:
    data = synthetic.piecewise_1d(16)
    net, _ = matched_mlp(20, 1, 1)
    with pytest.raises(ValueError, match="needs a MixtureOfLocalExperts"):
        train_mixture(net, data.x, data.y, loss="competitive", steps=2, progress=False)
    with pytest.raises(ValueError, match="loss must be one of"):
        train_mixture(net, data.x, data.y, loss="hinge", steps=2, progress=False)


def test_competitive_specialises_more_than_cooperative() -> None:
    """The notebook's experiment, on one seed: same model and data, only the error function differs."""
    train, test = synthetic.quadrants_2d(512, seed=0), synthetic.quadrants_2d(1024, seed=1)
    reports = {}
    for loss in ("competitive", "cooperative"):
        model = MixtureOfLocalExperts(4, 2, 1, expert_hidden=0, seed=3)
        train_mixture(model, train.x, train.y, loss=loss, steps=1500, lr=0.05, seed=3, log_every=1500,
                      progress=False)
        reports[loss] = specialisation_report(model, test.x, test.y, test.regime)
    comp, coop = reports["competitive"], reports["cooperative"]
    assert comp.purity > 0.95 > coop.purity
    assert comp.confident > coop.confident + 0.3
    assert comp.top1_mse < 0.2 < 1.0 < coop.top1_mse  # competitive experts are right on their own
    assert max(comp.own_mse) < 0.5 < min(comp.other_mse)


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "d_in"), [(synthetic.piecewise_1d, 1), (synthetic.quadrants_2d, 2)])
def test_plots_return_figures(make, d_in: int) -> None:
    data = make(64, seed=0)
    models = {"a": MixtureOfLocalExperts(4, d_in, 1, seed=0), "b": MixtureOfLocalExperts(4, d_in, 1, seed=1)}
    h = train_mixture(models["a"], data.x, data.y, steps=3, log_every=1, progress=False, x_test=data.x,
                      d_test=data.y)
    figures = [
        plot_data(data.x, data.y, data.regime),
        plot_gate_partition(models, boundaries=(0.0,)),
        plot_gate_partition(models["a"]),
        plot_expert_fits(models, data.x, data.y),
        plot_learning_curves({"a": h}),
        plot_learning_curves({"a": h}, metric="loss"),
    ]
    for fig in figures:
        assert isinstance(fig, Figure)
        plt.close(fig)
    with pytest.raises(ValueError, match="no 'test_mse'"):
        plot_learning_curves({"a": train_mixture(models["b"], data.x, data.y, steps=1, progress=False)})
