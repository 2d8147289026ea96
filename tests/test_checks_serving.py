"""Notebook 09's checks accept the reference and name each plausible wrong answer."""

from __future__ import annotations

from collections import Counter, OrderedDict

import pytest
import torch

from moe_course import check
from moe_course.check import CheckError
from moe_course.offload import lru_hit_rate
from moe_course.serving import bytes_per_token, expected_distinct_experts


def _rejects(check_fn, fn, message):
    with pytest.raises(CheckError) as info:
        check_fn(fn)
    assert message in str(info.value), str(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------------------------------------
# expected_distinct_experts
# ----------------------------------------------------------------------------------------------------------


def distinct_ok(n, k, batch):
    if k > n:
        raise ValueError("k > n")
    return n * (1 - (1 - k / n) ** batch.double())


def test_expected_distinct_accepts_reference_and_a_learner_answer(capsys):
    check.expected_distinct_experts(expected_distinct_experts)
    check.expected_distinct_experts(distinct_ok)
    out = capsys.readouterr().out
    assert out.startswith("OK  expected_distinct_experts: DeepSeek-V3 (N=256, k=8): 8.0, 163.3 and 255.9")


@pytest.mark.parametrize("fn, message", [
    (lambda n, k, b: n * (1 - (1 - 1 / n) ** b.double()), "left k out"),
    (lambda n, k, b: n * (1 - (1 - 1 / n) ** (b.double() * k)), "with replacement"),
    (lambda n, k, b: torch.clamp(b.double() * k, max=n), "assumed no two tokens share an expert"),
    (lambda n, k, b: b.double() * k, "returned B·k"),
    (lambda n, k, b: n * (1 - k / n) ** b.double(), "the experts that *no* token uses"),
    (lambda n, k, b: n * (1 - (k / n) ** b.double()), "wrote (k/N)^B"),
    (lambda n, k, b: 1 - (1 - k / n) ** b.double(), "returned the fraction of experts used"),
    (lambda n, k, b: n * (1 - (1 - k / n) ** (b.double() - 1)), "exponent B − 1"),
    (lambda n, k, b: (n * (1 - (1 - k / n) ** b.double())).round(), "do not round"),
    (lambda n, k, b: n * (1 - (1 - k / n) ** float(b[0])), "returned shape ()"),
    (lambda n, k, b: n * (1 - (1 - k / n) ** b.double()) + 0.5, "= N·(1 − (1 − k/N)^B)"),
])
def test_expected_distinct_names_mistakes(fn, message):
    _rejects(check.expected_distinct_experts, fn, message)


def refuses_k_equal_n(n, k, b):
    if k >= n:
        raise ValueError("k must be smaller than n_experts")
    return n * (1 - (1 - k / n) ** b.double())


def k_equal_n_shortcut(n, k, b):  # "every expert is used", forgetting B = 0
    if k > n:
        raise ValueError("k > n")
    if k == n:
        return torch.full(b.shape, float(n), dtype=torch.float64)
    return n * (1 - (1 - k / n) ** b.double())


def flattens_the_batch(n, k, b):  # one value per size, but as a flat list
    if k > n:
        raise ValueError("k > n")
    return torch.tensor([n * (1 - (1 - k / n) ** s) for s in b.reshape(-1).tolist()], dtype=torch.float64)


def writes_into_batch(n, k, b):
    if k > n:
        raise ValueError("k > n")
    p = b.double()  # a copy of an int batch, but the caller's own tensor when it is float64 already
    torch.pow(1 - k / n, p, out=p)
    return n * (1 - p)


def log_form(n, k, b):  # exp(B·log(1 − k/N)): log 0 at k = N
    import math

    if k > n:
        raise ValueError("k > n")
    return n * (1 - torch.exp(b.double() * math.log(1 - k / n)))


@pytest.mark.parametrize("fn, message", [
    (refuses_k_equal_n, "refuses_k_equal_n(4, 4, torch.tensor([0, 1, 3])) [N=4, k=4 (k = N: every token uses all "
                        "experts; no token, none)] raised ValueError: k must be smaller than n_experts; k = N is "
                        "allowed"),
    (k_equal_n_shortcut, "k_equal_n_shortcut(4, 4, torch.tensor([0, 1, 3])) [N=4, k=4 (k = N: every token uses all "
                         "experts; no token, none)] returned [4.0, 4.0, 4.0], expected [0.0, 4.0, 4.0]"),
    (flattens_the_batch, "flattens_the_batch(8, 2, torch.tensor([[0, 1, 2], [4, 8, 16]])) [N=8, k=2, a (2, 3) grid "
                         "of batch sizes] returned shape (6,), expected (2, 3)"),
    (writes_into_batch, "writes_into_batch(8, 2, torch.tensor([1.0, 3.0, 12.0], dtype=torch.float64)) [N=8, k=2, "
                        "float64 batch sizes] changed the batch sizes it was given"),
    (log_form, "log_form(4, 4, torch.tensor([0, 1, 3])) [N=4, k=4 (k = N: every token uses all experts; no token, "
               "none)] raised ValueError: math domain error"),
])
def test_expected_distinct_names_the_edge_case_mistakes(fn, message):
    _rejects(check.expected_distinct_experts, fn, message)


def test_expected_distinct_requires_the_value_error_and_untouched_input():
    _rejects(check.expected_distinct_experts, lambda n, k, b: n * (1 - (1 - k / n) ** b.double()),
             "it should raise a ValueError (a token cannot use k=5 distinct experts out of n_experts=4)")

    def mutates(n, k, b):
        if k > n:
            raise ValueError
        b.clamp_(min=1)
        return n * (1 - (1 - k / n) ** b.double())

    _rejects(check.expected_distinct_experts, mutates, "changed the batch sizes it was given (now [1, 1, 2")

    def wrong_error(n, k, b):
        assert k <= n
        return n * (1 - (1 - k / n) ** b.double())

    _rejects(check.expected_distinct_experts, wrong_error, "raised AssertionError")


# ----------------------------------------------------------------------------------------------------------
# lru_hit_rate: wrong caches a learner could write
# ----------------------------------------------------------------------------------------------------------


def _check_capacity(capacity):
    if capacity < 1:
        raise ValueError("capacity must be >= 1")


def lru_ok(trace, capacity):
    _check_capacity(capacity)
    cache, hits, requests = OrderedDict(), 0, 0
    for row in trace.tolist():
        hits += sum(e in cache for e in row)
        requests += len(row)
        for e in row:
            cache[e] = True
            cache.move_to_end(e)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hits / requests


def fifo(trace, capacity):
    _check_capacity(capacity)
    cache, hits, requests = OrderedDict(), 0, 0
    for row in trace.tolist():
        hits += sum(e in cache for e in row)
        requests += len(row)
        for e in row:
            if e not in cache:
                cache[e] = True
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hits / requests


def one_at_a_time(trace, capacity):
    _check_capacity(capacity)
    cache, hits, requests = OrderedDict(), 0, 0
    for row in trace.tolist():
        for e in row:
            requests += 1
            if e in cache:
                hits += 1
                cache.move_to_end(e)
            else:
                if len(cache) == capacity:
                    cache.popitem(last=False)
                cache[e] = True
    return hits / requests


def evicts_newest(trace, capacity):
    _check_capacity(capacity)
    cache, hits, requests = [], 0, 0  # most recent last
    for row in trace.tolist():
        hits += sum(e in cache for e in row)
        requests += len(row)
        for e in row:
            if e in cache:
                cache.remove(e)
            elif len(cache) == capacity:
                stale = [x for x in cache if x not in row]
                cache.remove(stale[-1])
            cache.append(e)
    return hits / requests


def warm_start(trace, capacity):
    _check_capacity(capacity)
    cache, hits, requests = OrderedDict((e, True) for e in range(capacity)), 0, 0
    for row in trace.tolist():
        hits += sum(e in cache for e in row)
        requests += len(row)
        for e in row:
            cache[e] = True
            cache.move_to_end(e)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hits / requests


def whole_token_hits(trace, capacity):
    _check_capacity(capacity)
    cache, hits, requests = OrderedDict(), 0, 0
    for row in trace.tolist():
        hits += len(row) if all(e in cache for e in row) else 0
        requests += len(row)
        for e in row:
            cache[e] = True
            cache.move_to_end(e)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hits / requests


def least_frequent(trace, capacity):
    _check_capacity(capacity)
    cache, uses, hits, requests = OrderedDict(), Counter(), 0, 0  # recency order breaks ties in the counts
    for row in trace.tolist():
        hits += sum(e in cache for e in row)
        requests += len(row)
        for e in row:
            uses[e] += 1
            if e not in cache and len(cache) == capacity:
                del cache[min((x for x in cache if x not in row), key=lambda x: uses[x])]
            cache[e] = True
            cache.move_to_end(e)
    return hits / requests


def miss_rate(trace, capacity):
    return 1 - lru_ok(trace, capacity)


def hit_count(trace, capacity):
    return round(lru_ok(trace, capacity) * trace.numel())


def one_too_small(trace, capacity):
    _check_capacity(capacity)
    return lru_ok(trace, capacity - 1) if capacity > 1 else 0.0


def one_too_large(trace, capacity):
    _check_capacity(capacity)
    return lru_ok(trace, capacity + 1)


def sorts_in_place(trace, capacity):
    trace.copy_(trace.sort(dim=1).values)
    return lru_ok(trace, capacity)


def no_value_error(trace, capacity):
    return lru_ok(trace, max(capacity, 1))


def test_lru_accepts_reference_and_a_learner_answer(capsys):
    check.lru_hit_rate(lru_hit_rate)
    check.lru_hit_rate(lru_ok)
    assert capsys.readouterr().out.count("OK  lru_hit_rate") == 2


@pytest.mark.parametrize("fn, message", [
    (fifo, "did not refresh an expert on a hit (that is first-in-first-out)"),
    (one_at_a_time, "handled a step's experts one at a time"),
    (evicts_newest, "evicted the most recently used expert"),
    (warm_start, "started with experts 0 ... C−1 in the cache"),
    (whole_token_hits, "counted a step as a hit only when all its k experts were cached"),
    (least_frequent, "evicted the least *frequently* used expert (LFU)"),
    (miss_rate, "returned the miss rate"),
    (hit_count, "returned the number of hits"),
    (one_too_small, "capacity − 1 experts"),
    (one_too_large, "capacity + 1 experts"),
    (sorts_in_place, "changed the trace it was given"),
    (no_value_error, "it should raise a ValueError (a cache must hold at least one expert)"),
])
def test_lru_names_mistakes(fn, message):
    _rejects(check.lru_hit_rate, fn, message)


def test_lru_names_the_failing_case_and_the_numbers():
    text = _rejects(check.lru_hit_rate, fifo, "fifo(trace, capacity=2) [k=1, C=2: a hit refreshes an expert]")
    assert "returned 0.2857, expected 0.4286" in text and "(trace [[0], [1], [0], [2], [0], [1], [0]])" in text


def test_lru_unknown_mistake_gets_the_rule():
    _rejects(check.lru_hit_rate, lambda trace, capacity: 0.5 if capacity > 0 else 1 / 0,
             "Per step: count the requested experts already cached")


# ----------------------------------------------------------------------------------------------------------
# bytes_per_token
# ----------------------------------------------------------------------------------------------------------


def bytes_ok(indices, expert_bytes, other_bytes):
    b = indices[0].shape[0]
    if b == 0:
        raise ValueError("empty batch")
    return (other_bytes + sum(torch.unique(i).numel() for i in indices) * expert_bytes) / b


def _guarded(body):
    def fn(indices, expert_bytes, other_bytes):
        if indices[0].shape[0] == 0:
            raise ValueError("empty batch")
        return body(indices, expert_bytes, other_bytes, indices[0].shape[0])
    return fn


def test_bytes_accepts_reference_and_a_learner_answer(capsys):
    check.bytes_per_token(bytes_per_token)
    check.bytes_per_token(bytes_ok)
    assert capsys.readouterr().out.count("OK  bytes_per_token") == 2


@pytest.mark.parametrize("fn, message", [
    (_guarded(lambda ix, e, o, b: (o + sum(i.numel() for i in ix) * e) / b), "counted every token's k experts"),
    (_guarded(lambda ix, e, o, b: o + sum(torch.unique(i).numel() for i in ix) * e), "did not divide by the batch"),
    (_guarded(lambda ix, e, o, b: (o + torch.unique(torch.cat([i.flatten() for i in ix])).numel() * e) / b),
     "counted the distinct expert ids over all layers together"),
    (_guarded(lambda ix, e, o, b: sum(torch.unique(i).numel() for i in ix) * e / b), "left out other_bytes"),
    (_guarded(lambda ix, e, o, b: o + sum(torch.unique(i).numel() for i in ix) * e / b),
     "charged other_bytes to every token"),
    (_guarded(lambda ix, e, o, b: (o + sum(int(i.max()) + 1 for i in ix) * e) / b), "counted max(id) + 1"),
    (_guarded(lambda ix, e, o, b: (o + sum(torch.unique(i).numel() for i in ix) * e) / ix[0].numel()),
     "divided by the B·k assignments"),
    (_guarded(lambda ix, e, o, b: (o + sum(torch.unique(i).numel() for i in ix) * e) / b + 1.0),
     "= (other_bytes + Σ over layers"),
])
def test_bytes_names_mistakes(fn, message):
    _rejects(check.bytes_per_token, fn, message)


def test_bytes_requires_the_value_error_and_untouched_input():
    def no_error(indices, expert_bytes, other_bytes):
        b = max(indices[0].shape[0], 1)
        return (other_bytes + sum(torch.unique(i).numel() for i in indices) * expert_bytes) / b

    _rejects(check.bytes_per_token, no_error, "it should raise a ValueError (no token was decoded")

    def pops(indices, expert_bytes, other_bytes):
        result = bytes_ok(indices, expert_bytes, other_bytes)
        indices.pop()
        return result

    _rejects(check.bytes_per_token, pops, "changed the routing it was given")

    def sorts(indices, expert_bytes, other_bytes):
        for i in indices:
            i.copy_(i.sort(dim=1).values)
        return bytes_ok(indices, expert_bytes, other_bytes)

    _rejects(check.bytes_per_token, sorts, "changed the routing it was given")


def _lru_in_order(order):
    """A correct LRU whose step marks its experts most recently used in another order within the step."""

    def lru(trace, capacity):
        if capacity < 1:
            raise ValueError("capacity < 1")
        cache, hits, requests = OrderedDict(), 0, 0
        for row in trace.tolist():
            found = [e in cache for e in row]
            hits += sum(found)
            requests += len(row)
            pairs = list(zip(row, found, strict=True))
            hit_first = [e for e, f in pairs if f] + [e for e, f in pairs if not f]
            for e in {"row": row, "reversed": row[::-1], "hits_first": hit_first, "misses_first": hit_first[::-1],
                      "sorted": sorted(row), "set": list(set(row))}[order]:
                cache[e] = None
                cache.move_to_end(e)
            while len(cache) > capacity:
                cache.popitem(last=False)
        return hits / requests

    return lru


@pytest.mark.parametrize("order", ["row", "reversed", "hits_first", "misses_first", "sorted", "set"])
def test_lru_accepts_every_order_within_a_step(order, capsys):
    """'mark all of them as most recently used' leaves the order within a step open: no trace depends on it."""
    check.lru_hit_rate(_lru_in_order(order))
    assert capsys.readouterr().out.startswith("OK  lru_hit_rate")
