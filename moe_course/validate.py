"""Argument checks shared by every notebook's functions: one wording for one kind of bad input."""

from __future__ import annotations

__all__ = ["check_int"]


def check_int(name: str, value: object, low: int) -> None:
    """Raise TypeError unless ``value`` is an int (not a bool), ValueError unless it is at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
