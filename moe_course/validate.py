"""Argument checks shared by every notebook's functions: one wording for one kind of bad input.

Each check names the argument, says what is expected and what came instead; a wrong type raises TypeError, a
wrong value ValueError. Value checks on tensors read the values only on the CPU (on a GPU that would wait for
the device), shapes and dtypes always.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["check_choice", "check_int", "check_int_tensor", "check_ids", "check_number", "check_output_path",
           "check_tensor"]


def _got(value: object) -> str:
    """How a bad value is shown: its type and its repr (shortened)."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def check_int(name: str, value: object, low: int, high: int | None = None, hint: str = "") -> None:
    """Raise TypeError unless ``value`` is an int (not a bool), ValueError unless ``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {_got(value)}{hint}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}{hint}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be an int between {low} and {high}, got {value}{hint}")


def check_number(name: str, value: object, low: float | None = None, high: float | None = None,
                 positive: bool = False, hint: str = "") -> None:
    """Raise TypeError unless ``value`` is a real number (int or float, not a bool, str or tensor), ValueError
    unless it is finite, within [low, high] and (``positive``) above zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number (int or float), got {_got(value)}{hint}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}{hint}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be a number > 0, got {value}{hint}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be a number >= {low}, got {value}{hint}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be a number <= {high}, got {value}{hint}")


def check_tensor(name: str, value: object, dims: int | tuple[int, ...], shape: str, hint: str = "") -> None:
    """Raise TypeError unless ``value`` is a torch.Tensor, ValueError unless it has ``dims`` dimensions."""
    allowed = (dims,) if isinstance(dims, int) else dims
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {_got(value)}{hint}")
    if value.dim() not in allowed:
        raise ValueError(f"{name} must be {'- or '.join(map(str, allowed))}-D {shape}, got shape "
                         f"{tuple(value.shape)}{hint}")


def check_int_tensor(name: str, value: torch.Tensor, what: str = "ids") -> None:
    """Raise TypeError unless the tensor holds integers (not floats, bools or complex numbers)."""
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise TypeError(f"{name} must hold integer {what} (torch.long), got dtype {value.dtype}; "
                        f"convert with {name}.long()")


def check_ids(name: str, value: torch.Tensor, high: int, what: str = "ids", hint: str = "") -> None:
    """Raise TypeError unless integer, ValueError unless every id lies in [0, high) (checked on the CPU only)."""
    check_int_tensor(name, value, what)
    if value.device.type != "cpu" or not value.numel():
        return
    low, top = int(value.min()), int(value.max())
    if low < 0 or top >= high:
        raise ValueError(f"{name} must hold {what} in [0, {high}), got {low}..{top}{hint}")


def check_choice(name: str, value: object, options: Iterable[object]) -> None:
    """Raise ValueError unless ``value`` is one of ``options``."""
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")


def check_output_path(name: str, path: str | Path) -> Path:
    """Raise ValueError unless ``path`` can be written: not a folder, and its nearest existing parent a folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} must be a file path, got the folder {path}; name a file inside it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{name} cannot be written: {parent} is a file, not a folder; choose another path")
    return path
