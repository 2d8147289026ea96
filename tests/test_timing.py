"""moe_course.timing: warm-up calls are untimed, the median ignores outliers, arguments are passed on."""

from __future__ import annotations

import time

import pytest
import torch

from moe_course import timing
from moe_course.timing import time_fn, time_many, time_samples


def test_calls_warmup_plus_repeats_and_passes_arguments() -> None:
    seen: list[tuple[int, str]] = []

    def fn(a: int, b: str = "") -> None:
        seen.append((a, b))

    time_fn(fn, 3, b="x", repeats=4, warmup=2)
    assert seen == [(3, "x")] * 6


def test_returns_median_of_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake clock: each timed call "takes" the next duration; one outlier must not move the median.
    durations = iter([0.010, 0.011, 5.0, 0.012, 0.009])
    now = [0.0]

    def fake_counter() -> float:
        return now[0]

    def fn() -> None:
        now[0] += next(durations)

    monkeypatch.setattr(timing.time, "perf_counter", fake_counter)
    assert time_fn(fn, repeats=5, warmup=0) == pytest.approx(0.011)


def test_measures_real_sleep() -> None:
    seconds = time_fn(time.sleep, 0.01, repeats=3, warmup=0)
    assert 0.009 <= seconds < 0.5


def test_samples_length_and_positive() -> None:
    samples = time_samples(lambda: sum(range(100)), repeats=7, warmup=1)
    assert len(samples) == 7
    assert all(s >= 0 for s in samples)


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"warmup": -1}])
def test_rejects_bad_counts(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        time_fn(lambda: None, **kwargs)


def test_time_many_round_robin_and_restores_threads() -> None:
    order: list[str] = []
    fns = {name: (lambda x, name=name: order.append(f"{name}{x}")) for name in ("a", "b")}
    before = torch.get_num_threads()
    result = time_many(fns, 1, repeats=3, warmup=1, threads=1)
    assert set(result) == {"a", "b"} and all(v >= 0 for v in result.values())
    # a: warm-up + timed, b: warm-up + timed, then two rounds a, b.
    assert order == ["a1", "a1", "b1", "b1", "a1", "b1", "a1", "b1"]
    assert torch.get_num_threads() == before


def test_time_many_orders_by_cost() -> None:
    result = time_many({"fast": lambda: time.sleep(0.001), "slow": lambda: time.sleep(0.02)}, repeats=3, warmup=0)
    assert result["slow"] > result["fast"]


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"warmup": -1}, {"threads": 0}])
def test_time_many_rejects_bad_counts(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        time_many({"f": lambda: None}, **kwargs)


def test_samples_many_stops_at_the_deadline_after_a_whole_round() -> None:
    samples_many = timing.samples_many
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    spent = samples_many(fns, repeats=50, warmup=0, deadline=time.monotonic() - 1)  # already past
    assert {k: len(v) for k, v in spent.items()} == {"a": 1, "b": 1} and calls == ["a", "b"]
    full = samples_many(fns, repeats=4, warmup=0, deadline=time.monotonic() + 60)
    assert {k: len(v) for k, v in full.items()} == {"a": 4, "b": 4}  # a far deadline changes nothing

    def slow() -> None:
        time.sleep(0.02)

    start = time.monotonic()
    timed = samples_many({"x": slow, "y": slow}, repeats=1000, warmup=0, deadline=start + 0.2)
    assert len(timed["x"]) == len(timed["y"]) and 2 <= len(timed["x"]) < 1000  # whole rounds, stopped early
