"""Wall-clock timing for notebooks 02, 03 and 09 and the benchmarks: warm up, repeat, report the median.

A single measurement of a fast function is mostly noise (a busy neighbour process, a cache miss, a GPU
kernel still queued from the previous call). :func:`time_fn` therefore runs the function a few times
without timing it, then times ``repeats`` calls one by one and returns their median, which ignores the
occasional slow outlier. :func:`time_many` compares several functions fairly on a busy machine: it
measures them round-robin, so that a burst of load from another process slows all of them alike.

GPU work is asynchronous, so the clock is only read after the device has finished
(``torch.cuda.synchronize`` / ``torch.mps.synchronize``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["synchronize", "time_fn", "time_many", "time_samples"]


def synchronize() -> None:
    """Wait until queued CUDA/MPS work is done (no-op on the CPU or before any GPU use)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    mps = getattr(torch, "mps", None)
    backend = getattr(torch.backends, "mps", None)
    if mps is not None and backend is not None and backend.is_available():
        mps.synchronize()


def time_samples(fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1,
                 clock: Callable[[], float] | None = None, **kwargs: Any) -> list[float]:
    """Seconds taken by each of ``repeats`` calls ``fn(*args, **kwargs)``, after ``warmup`` untimed calls.

    ``clock`` is wall-clock time (``time.perf_counter``) by default; ``time.process_time`` counts only this
    process's CPU time, which other programs competing for the cores disturb far less (use it with one thread).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more, got {warmup}")
    clock = clock or time.perf_counter
    for _ in range(warmup):
        fn(*args, **kwargs)
    synchronize()
    samples = []
    for _ in range(repeats):
        start = clock()
        fn(*args, **kwargs)
        synchronize()
        samples.append(clock() - start)
    return samples


def time_fn(fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1, **kwargs: Any) -> float:
    """Median wall-clock seconds of ``fn(*args, **kwargs)`` over ``repeats`` timed calls.

    ``warmup`` calls run first and are not timed (first calls pay for memory allocation and, on a GPU,
    kernel selection). Keyword arguments other than ``repeats`` and ``warmup`` are passed to ``fn``.

    >>> seconds = time_fn(sum, range(1000), repeats=3)
    >>> seconds > 0
    True
    """
    return statistics.median(time_samples(fn, *args, repeats=repeats, warmup=warmup, **kwargs))


def samples_many(fns: Mapping[str, Callable[..., Any]], *args: Any, repeats: int = 5, warmup: int = 1,
                 threads: int | None = None, clock: Callable[[], float] | None = None,
                 deadline: float | None = None, **kwargs: Any) -> dict[str, list[float]]:
    """Seconds of every call of each ``fn(*args, **kwargs)`` in ``fns``, measured round-robin.

    Each round times every function once, in order, so slow periods of a shared machine hit all of them
    rather than whichever happened to run then. ``threads``, if given, sets PyTorch's CPU thread count for
    the measurement (restored afterwards); one thread gives steadier CPU numbers when other programs
    compete for the cores. ``deadline`` (a ``time.monotonic()`` value) ends the measurement after the first
    whole round that finishes past it, so every function keeps the same number of samples, at least one.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more, got {warmup}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for name, fn in fns.items():
            samples[name] += time_samples(fn, *args, repeats=1, warmup=warmup, clock=clock, **kwargs)
        for _ in range(repeats - 1):
            if deadline is not None and time.monotonic() >= deadline:
                break
            for name, fn in fns.items():
                samples[name] += time_samples(fn, *args, repeats=1, warmup=0, clock=clock, **kwargs)
    finally:
        torch.set_num_threads(before)
    return samples


def time_many(fns: Mapping[str, Callable[..., Any]], *args: Any, repeats: int = 5, warmup: int = 1,
              threads: int | None = None, **kwargs: Any) -> dict[str, float]:
    """Median seconds of each ``fn(*args, **kwargs)`` in ``fns``, measured round-robin (see :func:`samples_many`)."""
    samples = samples_many(fns, *args, repeats=repeats, warmup=warmup, threads=threads, **kwargs)
    return {name: statistics.median(values) for name, values in samples.items()}
