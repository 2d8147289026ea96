import math

import pytest
import torch

from moe_course.balancing import router_z_loss, switch_aux_loss
from moe_course.metrics import (
    coefficient_of_variation,
    expert_counts,
    expert_load,
    load_entropy,
    max_violation,
    routing_entropy,
)


def test_load_maxvio_cv_hand_computed():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])  # counts: 4, 2, 1, 1 of 8
    assert expert_counts(idx, 4).tolist() == [4, 2, 1, 1]
    load = expert_load(idx, 4)
    assert load.tolist() == pytest.approx([0.5, 0.25, 0.125, 0.125])
    assert max_violation(load) == pytest.approx((0.5 - 0.25) / 0.25)  # 1.0
    std = math.sqrt(((0.25**2) + 0 + 2 * (0.125**2)) / 4)
    assert coefficient_of_variation(load) == pytest.approx(std / 0.25)
    assert max_violation(torch.full((8,), 0.125)) == 0.0
    assert load_entropy(torch.full((8,), 0.125)) == pytest.approx(math.log(8))


def test_routing_entropy():
    uniform = torch.full((5, 4), 0.25)
    assert routing_entropy(uniform) == pytest.approx(math.log(4))
    assert routing_entropy(uniform, normalized=True) == pytest.approx(1.0)
    peaked = torch.tensor([[1.0, 0, 0, 0]])
    assert routing_entropy(peaked) == pytest.approx(0.0, abs=1e-9)


def test_metrics_errors():
    with pytest.raises(ValueError, match=r"must hold expert ids in \[0, 4\)"):
        expert_counts(torch.tensor([[4]]), 4)
    with pytest.raises(ValueError, match="empty"):
        expert_load(torch.zeros(0, 2, dtype=torch.long), 4)


def test_switch_aux_loss_is_one_when_uniform_and_n_when_collapsed():
    n = 4
    scores = torch.full((8, n), 1 / n)
    idx = torch.arange(8).remainder(n).unsqueeze(1)
    assert switch_aux_loss(scores, idx, n).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, n)
    collapsed[:, 0] = 1
    assert switch_aux_loss(collapsed, torch.zeros(8, 1, dtype=torch.long), n).item() == pytest.approx(n)


def test_switch_aux_loss_hand_value_and_gradient_only_through_probabilities():
    scores = torch.tensor([[0.7, 0.3], [0.4, 0.6]], requires_grad=True)
    idx = torch.tensor([[0], [0]])
    loss = switch_aux_loss(scores, idx, 2)
    # f = [1, 0], P = [0.55, 0.45] -> 2 * 0.55
    assert loss.item() == pytest.approx(1.1)
    loss.backward()
    assert torch.allclose(scores.grad, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_router_z_loss_hand_value():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


def test_metrics_of_an_empty_batch_are_finite_or_raise_clearly():
    empty = torch.zeros(0, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="indices is empty"):
        expert_load(empty, 4)
    counts = expert_counts(empty, 4).double()  # all zero: no expert got work, so none is overloaded
    assert max_violation(counts) == 0.0
    assert coefficient_of_variation(counts) == 0.0
    assert load_entropy(counts) == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match="empty batch"):
        routing_entropy(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="empty batch"):
        routing_entropy(torch.zeros(2, 0, 4))


def test_metrics_never_return_nan():
    assert routing_entropy(torch.ones(3, 1), normalized=True) == 0.0  # one expert: no choice to spread over
    assert max_violation(torch.tensor([1.0])) == 0.0
    assert coefficient_of_variation(torch.tensor([3, 1])) == pytest.approx(0.5)  # counts work too
    for fn in (max_violation, coefficient_of_variation, load_entropy):
        with pytest.raises(ValueError, match="one entry per expert"):
            fn(torch.zeros(0))
        with pytest.raises(ValueError, match="one entry per expert"):
            fn(torch.zeros(2, 3))
        with pytest.raises(ValueError, match="finite, non-negative"):
            fn(torch.tensor([0.5, math.nan]))
        with pytest.raises(ValueError, match="finite, non-negative"):
            fn(torch.tensor([1.5, -0.5]))
    with pytest.raises(ValueError, match="not the logits"):
        routing_entropy(torch.tensor([[1.0, -2.0]]))
    with pytest.raises(ValueError, match="not the logits"):
        routing_entropy(torch.tensor([[math.nan, 1.0]]))
    with pytest.raises(ValueError, match="N >= 1 experts"):
        routing_entropy(torch.zeros(3, 0))


def test_mean_std_is_the_sample_std_of_seeds():
    import math

    from moe_course.metrics import mean_std

    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # n - 1 in the denominator: the population std is 0.816
    mean, std = mean_std([2.5])
    assert mean == 2.5 and math.isnan(std)
    with pytest.raises(ValueError, match="values is empty"):
        mean_std([])


def test_paired_gaps_by_hand():
    from moe_course.metrics import paired_gaps

    pg = paired_gaps([1.56, 1.55, 1.57], [1.50, 1.52, 1.49])
    assert [round(g, 6) for g in pg.gaps] == [0.06, 0.03, 0.08]
    # mean 17/300, sample std 0.025166, t(0.975, 2) = 4.302653: half-width 0.062512 (by hand, t from a table)
    assert abs(pg.mean - 17 / 300) < 1e-12 and abs(pg.std - 0.0251661) < 1e-6
    assert abs(pg.high - pg.low - 2 * 0.0625121) < 1e-5 and pg.low < 0 < pg.high and not pg.clear
    assert pg.interval() == "+0.057 [−0.006, +0.119]"
    assert paired_gaps([2.0, 2.1], [1.0, 1.05]).clear
    with pytest.raises(ValueError, match="one result per seed"):
        paired_gaps([1.0, 2.0], [1.0])
