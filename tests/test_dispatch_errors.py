"""expert_capacity and capacity_mask reject bad arguments with a message naming the argument and the fix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_course.dispatch import capacity_mask, expert_capacity


def test_expert_capacity_values():
    assert expert_capacity(16, 4, 2, 1.0) == 8
    assert expert_capacity(10, 4, 1, 1.25) == 4  # ceil(3.125)
    assert expert_capacity(0, 4, 2, 1.0) == 0  # an empty batch needs no slots
    assert expert_capacity(np.int64(16), torch.tensor(4), 2, 1) == 8  # integer-like sizes and an int factor


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((-1, 4, 2, 1.0), ValueError, "n_tokens must be >= 0, got -1"),
        ((16, 0, 1, 1.0), ValueError, "n_experts must be >= 1, got 0"),
        ((16, -4, 1, 1.0), ValueError, "n_experts must be >= 1"),
        ((16, 4, 0, 1.0), ValueError, "k must be >= 1, got 0"),
        ((16, 4, 5, 1.0), ValueError, "k must be between 1 and n_experts=4, got k=5"),
        ((16, 4, True, 1.0), TypeError, "k must be an int, got bool"),
        ((16, 4, 2.0, 1.0), TypeError, "k must be an int, got float"),
        ((16.0, 4, 2, 1.0), TypeError, "n_tokens must be an int, got float"),
        ((16, "4", 2, 1.0), TypeError, "n_experts must be an int, got str"),
        ((16, 4, 2, 0.0), ValueError, "capacity_factor must be a finite number > 0, got 0.0"),
        ((16, 4, 2, -1.0), ValueError, "capacity_factor must be a finite number > 0"),
        ((16, 4, 2, math.nan), ValueError, "capacity_factor must be a finite number > 0, got nan"),
        ((16, 4, 2, math.inf), ValueError, "capacity_factor must be a finite number > 0, got inf"),
        ((16, 4, 2, None), TypeError, "capacity_factor must be a number, got NoneType"),
        ((16, 4, 2, True), TypeError, "capacity_factor must be a number, got bool"),
    ],
)
def test_expert_capacity_rejects(args, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        expert_capacity(*args)


def test_capacity_mask_accepts_int32_ids_and_empty_batches():
    indices = torch.tensor([[0, 1], [0, 2], [0, 1]])
    expected = torch.tensor([[True, True], [True, True], [False, True]])
    assert torch.equal(capacity_mask(indices, 3, 2), expected)
    assert torch.equal(capacity_mask(indices.int(), 3, 2), expected)
    assert capacity_mask(torch.zeros(0, 2, dtype=torch.long), 3, 0).shape == (0, 2)


GOOD = torch.tensor([[0, 1], [2, 0]])


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((GOOD, 0, 2), ValueError, "n_experts must be >= 1, got 0"),
        ((GOOD, 3.0, 2), TypeError, "n_experts must be an int, got float"),
        ((GOOD, 3, -1), ValueError, "capacity must be >= 0, got -1"),
        ((GOOD, 3, 2.5), TypeError, "capacity must be an int, got float"),
        ((GOOD, 3, True), TypeError, "capacity must be an int, got bool"),
        ((GOOD.float(), 3, 2), TypeError, "indices must hold integer expert ids"),
        ((GOOD.bool(), 3, 2), TypeError, "indices must hold integer expert ids"),
        ((GOOD.reshape(-1), 3, 2), ValueError, r"indices must be a \(T, k\) tensor"),
        ((GOOD.tolist(), 3, 2), ValueError, r"indices must be a \(T, k\) tensor of expert ids, got list"),
        ((GOOD, 2, 2), ValueError, r"indices must be expert ids in \[0, 2\) for n_experts=2, got 0..2"),
        ((-GOOD, 3, 2), ValueError, r"expert ids in \[0, 3\).*got -2..0"),
    ],
)
def test_capacity_mask_rejects(args, error, message):
    with pytest.raises(error, match=message):
        capacity_mask(*args)
