"""Shared helpers of the exercise checks: one error type, tensor comparisons with named mistakes."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch


class CheckError(AssertionError):
    """Raised by a check when the learner's answer is wrong; the message says what to fix."""


def fail(message: str) -> None:
    """Raise a :class:`CheckError` with a message aimed at the learner."""
    raise CheckError(message)


def ok(name: str, detail: str = "") -> None:
    """Print the one-line success message of a check."""
    print(f"OK  {name}" + (f": {detail}" if detail else ""))


def call(fn: Callable[..., Any], *args: Any, what: str, **kwargs: Any) -> Any:
    """Call the learner's function, turning a crash (other than an unfinished stub) into a clear message."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise
    except CheckError:
        raise
    except Exception as exc:  # noqa: BLE001 - we re-raise with context for the learner
        raise CheckError(f"{what} raised {type(exc).__name__}: {exc}") from exc


def as_tensor(value: Any, what: str) -> torch.Tensor:
    """Insist on a tensor (floats and numbers are accepted and converted)."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except Exception as exc:  # noqa: BLE001
        raise CheckError(f"{what} should return a tensor, got {type(value).__name__}") from exc


def expect_shape(value: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    """Fail with both shapes named when they differ."""
    if tuple(value.shape) != tuple(shape):
        fail(f"{what} has shape {tuple(value.shape)}, expected {tuple(shape)}")


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """allclose after moving both to float64 on the CPU (shapes must already match)."""
    return bool(torch.allclose(a.detach().double().cpu(), b.detach().double().cpu(), atol=atol, rtol=rtol))


def as_count(value: Any, what: str, expected: int | None = None) -> int:
    """A parameter count as an int: accept ints, NumPy ints, 0-d tensors and integral floats; explain the rest.

    With ``expected``, a float that is the answer in billions or millions gets its own message.
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(f"{what} should be an int (a parameter count), got {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    if expected and value > 0 and abs(value * 1e9 - expected) <= 0.01 * expected:
        fail(f"{what} returned {value:g}, which looks like billions; return the exact count "
             f"({expected / 1e9:.2f}B is {expected:,} parameters)")
    if expected and value > 0 and abs(value * 1e6 - expected) <= 0.01 * expected:
        fail(f"{what} returned {value:g}, which looks like millions; return the exact count")
    if not value.is_integer():
        fail(f"{what} is {value!r}; a parameter count is a whole number, return an int")
    return int(value)
