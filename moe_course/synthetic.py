"""Small generated datasets for notebook 01, each made of several *regimes*.

A regime is a region of the input space with its own rule for the target. Every function returns the inputs,
the targets and the ground-truth regime id of each sample, so that a notebook can ask whether a mixture of
experts split the input space the way the data was made. All randomness comes from a local
:class:`torch.Generator` seeded with ``seed``: the same arguments always give the same tensors, and the
global random state is never touched.

=========================  =====================================================================
``piecewise_1d``           x in [-1, 1] cut into four intervals, each with its own line (one is flat)
``quadrants_2d``           x in [-1, 1]^2; a different linear function of x in each quadrant
=========================  =====================================================================
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "PIECEWISE_1D_BOUNDARIES",
    "PIECEWISE_1D_LINES",
    "PIECEWISE_1D_NAMES",
    "QUADRANT_NAMES",
    "QUADRANT_WEIGHTS",
    "RegimeData",
    "piecewise_1d",
    "piecewise_1d_target",
    "quadrants_2d",
    "quadrants_2d_target",
]


class RegimeData(NamedTuple):
    """Inputs ``x`` (N, d_in), targets ``y`` (N, d_out) and the regime id of each sample (N,), int64."""

    x: torch.Tensor
    y: torch.Tensor
    regime: torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# 1-D: four intervals with four different rules
# ----------------------------------------------------------------------------------------------------------

#: Inner cut points of [-1, 1]; regime r holds the x between the (r-1)-th and r-th cut.
PIECEWISE_1D_BOUNDARIES: tuple[float, ...] = (-0.5, 0.0, 0.5)
#: Human-readable rule of each 1-D regime, in order of x.
PIECEWISE_1D_NAMES: tuple[str, ...] = ("y = 6x + 9", "y = -3", "y = -12x + 4.5", "y = 9x - 10.5")
#: (slope, intercept) of each 1-D regime: three lines and a constant.
PIECEWISE_1D_LINES: tuple[tuple[float, float], ...] = ((6.0, 9.0), (0.0, -3.0), (-12.0, 4.5), (9.0, -10.5))


def _check_sizes(n_samples: int, noise: float) -> None:
    if isinstance(n_samples, bool) or not isinstance(n_samples, int):
        raise ValueError(f"n_samples must be an int, got {type(n_samples).__name__}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")


def _regime_1d(x: torch.Tensor) -> torch.Tensor:
    cuts = torch.tensor(PIECEWISE_1D_BOUNDARIES, dtype=x.dtype)
    return torch.bucketize(x, cuts, right=True)


def piecewise_1d_target(x: torch.Tensor) -> torch.Tensor:
    """The noise-free 1-D target at ``x`` (any shape): each quarter of [-1, 1] has its own rule.

    ====================  ==================  =====================
    x in [-1, -0.5)       y = 6x + 9          rises from 3 to 6
    x in [-0.5, 0)        y = -3              constant
    x in [0, 0.5)         y = -12x + 4.5      falls from 4.5 to -1.5
    x in [0.5, 1]         y = 9x - 10.5       rises from -6 to -1.5
    ====================  ==================  =====================

    The target jumps at every cut point (by 9, 7.5 and 4.5), so no single straight line can serve two
    neighbouring regimes: a linear expert has to pick one. The values span several units on purpose: the
    competitive error of Jacobs et al. (1991) treats each expert as a Gaussian of variance 1, and regimes
    that differ by many standard deviations make the competition between experts decisive.
    """
    x = torch.as_tensor(x, dtype=torch.float32)
    lines = torch.tensor(PIECEWISE_1D_LINES, dtype=x.dtype)[_regime_1d(x)]  # (..., 2)
    return lines[..., 0] * x + lines[..., 1]


def piecewise_1d(n_samples: int = 512, noise: float = 0.15, seed: int = 0) -> RegimeData:
    """A 1-D regression problem with four regimes (see :func:`piecewise_1d_target`).

    ``x`` is uniform on [-1, 1], ``y = target(x) + noise * N(0, 1)``. Returns :class:`RegimeData` with
    ``x`` and ``y`` of shape (n_samples, 1) and ``regime`` of shape (n_samples,) with values 0..3 from left
    to right. Samples are in random order (not sorted by x).
    """
    _check_sizes(n_samples, noise)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n_samples, generator=gen) * 2 - 1
    y = piecewise_1d_target(x) + noise * torch.randn(n_samples, generator=gen)
    return RegimeData(x.unsqueeze(1), y.unsqueeze(1), _regime_1d(x))


# ----------------------------------------------------------------------------------------------------------
# 2-D: one linear rule per quadrant
# ----------------------------------------------------------------------------------------------------------

#: Quadrant names in regime-id order: regime 0 is x1 >= 0, x2 >= 0, then counter-clockwise.
QUADRANT_NAMES: tuple[str, ...] = ("x1>=0, x2>=0", "x1<0, x2>=0", "x1<0, x2<0", "x1>=0, x2<0")
#: (w1, w2, bias) of the linear rule y = w1 x1 + w2 x2 + bias in each quadrant.
QUADRANT_WEIGHTS: tuple[tuple[float, float, float], ...] = (
    (2.0, 2.0, 0.0),
    (3.0, -2.0, 2.0),
    (-2.0, 1.0, -1.0),
    (0.0, -4.0, 1.0),
)


def _regime_2d(x: torch.Tensor) -> torch.Tensor:
    right = x[..., 0] >= 0
    top = x[..., 1] >= 0
    regime = torch.where(top, torch.where(right, 0, 1), torch.where(right, 3, 2))
    return regime.long()


def quadrants_2d_target(x: torch.Tensor) -> torch.Tensor:
    """The noise-free 2-D target of ``x`` (..., 2): a different plane in each quadrant, shape (...,)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    if x.shape[-1] != 2:
        raise ValueError(f"quadrants_2d_target expects inputs with last dimension 2, got shape {tuple(x.shape)}")
    table = torch.tensor(QUADRANT_WEIGHTS, dtype=x.dtype)[_regime_2d(x)]  # (..., 3)
    return (table[..., :2] * x).sum(-1) + table[..., 2]


def quadrants_2d(n_samples: int = 512, noise: float = 0.1, seed: int = 0) -> RegimeData:
    """A 2-D regression problem whose rule changes from quadrant to quadrant.

    ``x`` is uniform on [-1, 1]^2, ``y = w_q . x + b_q + noise * N(0, 1)`` where q is the quadrant of ``x``
    (weights in :data:`QUADRANT_WEIGHTS`). Returns ``x`` (n_samples, 2), ``y`` (n_samples, 1) and
    ``regime`` (n_samples,) with the quadrant id (0..3, see :data:`QUADRANT_NAMES`).
    """
    _check_sizes(n_samples, noise)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n_samples, 2, generator=gen) * 2 - 1
    y = quadrants_2d_target(x) + noise * torch.randn(n_samples, generator=gen)
    return RegimeData(x, y.unsqueeze(1), _regime_2d(x))
