"""The generated regime datasets: shapes, determinism, regimes, targets, argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from moe_course.synthetic import (
    PIECEWISE_1D_BOUNDARIES,
    piecewise_1d,
    piecewise_1d_target,
    quadrants_2d,
    quadrants_2d_target,
)

DATASETS = [(piecewise_1d, 1), (quadrants_2d, 2)]


@pytest.mark.parametrize(("make", "d_in"), DATASETS)
def test_shapes_and_dtypes(make, d_in: int) -> None:
    data = make(300, seed=3)
    assert data.x.shape == (300, d_in) and data.x.dtype == torch.float32
    assert data.y.shape == (300, 1) and data.y.dtype == torch.float32
    assert data.regime.shape == (300,) and data.regime.dtype == torch.int64
    assert data.x.min() >= -1 and data.x.max() <= 1
    assert set(data.regime.tolist()) == {0, 1, 2, 3}
    x, y, regime = data  # a NamedTuple unpacks
    assert x is data.x and y is data.y and regime is data.regime


@pytest.mark.parametrize(("make", "d_in"), DATASETS)
def test_same_seed_same_data_other_seed_other_data(make, d_in: int) -> None:
    a, b, c = make(64, seed=7), make(64, seed=7), make(64, seed=8)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    assert not torch.equal(a.x, c.x)


@pytest.mark.parametrize(("make", "d_in"), DATASETS)
def test_global_random_state_is_left_alone(make, d_in: int) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make(50, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_piecewise_regimes_follow_the_cut_points() -> None:
    data = piecewise_1d(2000, seed=1)
    x = data.x[:, 0]
    cuts = [-1.0, *PIECEWISE_1D_BOUNDARIES, 1.0]
    for r in range(4):
        inside = (x >= cuts[r]) & (x < cuts[r + 1]) if r < 3 else x >= cuts[3]
        assert torch.equal(data.regime == r, inside)


def test_piecewise_target_by_hand() -> None:
    # one point in the middle of each quarter: 6x+9, -3, -12x+4.5, 9x-10.5
    x = torch.tensor([-0.75, -0.25, 0.25, 0.75])
    assert torch.allclose(piecewise_1d_target(x), torch.tensor([4.5, -3.0, 1.5, -3.75]))
    # the cut points belong to the regime on their right
    assert torch.allclose(piecewise_1d_target(torch.tensor([-0.5, 0.0, 0.5])), torch.tensor([-3.0, 4.5, -6.0]))


def test_quadrant_regimes_and_target_by_hand() -> None:
    x = torch.tensor([[0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]])
    # quadrant rules: 2x1+2x2, 3x1-2x2+2, -2x1+x2-1, -4x2+1
    assert torch.allclose(quadrants_2d_target(x), torch.tensor([2.0, -0.5, -0.5, 3.0]))
    data = quadrants_2d(1000, seed=2)
    right, top = data.x[:, 0] >= 0, data.x[:, 1] >= 0
    assert torch.equal(data.regime == 0, right & top)
    assert torch.equal(data.regime == 1, ~right & top)
    assert torch.equal(data.regime == 2, ~right & ~top)
    assert torch.equal(data.regime == 3, right & ~top)


@pytest.mark.parametrize(("make", "target"), [(piecewise_1d, piecewise_1d_target), (quadrants_2d, quadrants_2d_target)])
def test_noise_level(make, target) -> None:
    clean = make(500, noise=0.0, seed=4)
    x = clean.x[:, 0] if clean.x.shape[1] == 1 else clean.x
    assert torch.allclose(clean.y[:, 0], target(x))
    noisy = make(4000, noise=0.2, seed=4)
    x = noisy.x[:, 0] if noisy.x.shape[1] == 1 else noisy.x
    residual = noisy.y[:, 0] - target(x)
    assert abs(float(residual.std()) - 0.2) < 0.01


@pytest.mark.parametrize("make", [piecewise_1d, quadrants_2d])
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_samples": 0}, "at least 1"),
        ({"n_samples": -5}, "at least 1"),
        ({"n_samples": 2.5}, "must be an int"),
        ({"n_samples": True}, "must be an int"),
        ({"n_samples": 10, "noise": -0.1}, "noise"),
        ({"n_samples": 10, "noise": math.nan}, "noise"),
    ],
)
def test_bad_arguments_raise(make, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_quadrant_target_needs_two_features() -> None:
    with pytest.raises(ValueError, match="last dimension 2"):
        quadrants_2d_target(torch.zeros(4, 3))
