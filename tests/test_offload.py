"""moe_course.offload: expert caches (LRU, Belady, static, prefetch) on hand-computed traces, and routing records."""

from __future__ import annotations

import functools
import itertools
import math
import random

import pytest
import torch

from moe_course.model import ModelConfig, TinyLM
from moe_course.offload import (
    batch_trace,
    cache_counts,
    hit_rate_curve,
    lru_hit_rate,
    offload_seconds_per_token,
    prefetch_recall,
    random_trace,
    record_routing,
    simulate_cache,
)


def test_lru_by_hand():
    # C=3: [0,1] 2 misses | [2,3] 2 misses, evict 0 -> {1,2,3} | [0,1]: 1 hit, evict 2 -> {3,0,1}
    # [0,2]: 0 hits, evict 3 -> {1,0,2} | [1,3]: 1 hit  => 3 hits of 10
    trace = torch.tensor([[0, 1], [2, 3], [0, 1], [0, 2], [1, 3]])
    stats = simulate_cache(trace, 3)
    assert (stats.hits, stats.requests, stats.loads) == (3, 10, 7)
    assert lru_hit_rate(trace, 3) == 0.3
    assert lru_hit_rate(trace, 4) == 0.6  # everything fits: only the 4 first uses miss
    assert lru_hit_rate(trace[:0], 2) == 0.0


def test_a_step_knows_its_whole_request_before_loading():
    # C=2, cache (0 least recent, 1); step (3, 0): 0 is a hit, loading 3 evicts 1 (not 0, which this step uses)
    assert simulate_cache(torch.tensor([[0, 1], [3, 0], [0, 3]]), 2).hits == 3


def test_belady_by_hand_and_never_below_lru():
    # C=2, requests 0 1 2 0 1: at 2, evict 1 (next used at step 4) rather than 0 (step 3) -> one hit; LRU gets none
    trace = torch.tensor([[0], [1], [2], [0], [1]])
    assert simulate_cache(trace, 2, "belady").hits == 1
    assert simulate_cache(trace, 2, "lru").hits == 0
    gen = torch.Generator().manual_seed(0)
    traces = random_trace(80, 8, 2, gen, sequences=4)
    for c in range(1, 9):
        assert hit_rate_curve(traces, [c], "belady")[0] >= hit_rate_curve(traces, [c], "lru")[0]


def exhaustive_hits(trace: torch.Tensor, capacity: int, start: frozenset[int] = frozenset(),
                    bypass: bool = False) -> int:
    """The most hits any policy gets under Belady's rules, by trying every choice of what stays after each step."""
    rows = [list(dict.fromkeys(r)) for r in trace.tolist()]

    @functools.cache
    def best(t: int, cache: frozenset[int]) -> int:
        if t == len(rows):
            return 0
        row = rows[t]
        forced = frozenset() if bypass or len(row) > capacity else frozenset(row)  # a step's experts, if they fit
        pool = sorted((cache | set(row)) - forced)
        choices = itertools.combinations(pool, min(capacity - len(forced), len(pool)))
        return sum(e in cache for e in row) + max(best(t + 1, forced | frozenset(c)) for c in choices)

    return best(0, start)


def test_belady_with_more_experts_per_step_than_fit_streams_the_rest():
    # C=1 < k=2: the kind of trace (18 requests). The old rule kept one of each step's own experts and got
    # 3 hits; keeping a cached expert that is needed sooner (streaming the step's others) gets the optimum, 5
    trace = torch.tensor([[1, 4], [0, 4], [4, 1], [5, 0], [2, 4], [1, 0], [5, 2], [5, 3], [2, 1]])
    assert simulate_cache(trace, 1, "belady").hits == exhaustive_hits(trace, 1) == 5
    # step 1 needs 0 and 4 with 4 cached; step 2 needs 4 again: keep 4, stream 0
    assert simulate_cache(torch.tensor([[4, 4], [0, 4], [4, 4]]), 1, "belady").hits == 2


def test_belady_is_optimal_against_exhaustive_search():
    rng = random.Random(0)
    for _ in range(150):
        n = rng.randint(2, 6)
        k, steps, c = rng.randint(1, min(n, 4)), rng.randint(1, 8), rng.randint(1, n)
        trace = torch.tensor([rng.sample(range(n), k) for _ in range(steps)])
        assert simulate_cache(trace, c, "belady").hits == exhaustive_hits(trace, c)
        start = rng.sample(range(n), rng.randint(0, c))
        warm = simulate_cache(trace, c, "belady", keep=start, bypass=True).hits
        assert warm == exhaustive_hits(trace, c, frozenset(start), bypass=True)


def test_belady_with_the_static_rules_bounds_the_static_cache():
    # static starts with keep loaded and streams its misses: cold Belady can lose to it (here at C = N, where
    # static never misses but Belady misses each expert's first use); Belady warm with keep and bypass cannot
    gen = torch.Generator().manual_seed(3)
    trace = random_trace(60, 6, 2, gen)
    popular = torch.bincount(trace.flatten(), minlength=6).argsort(descending=True, stable=True).tolist()
    assert simulate_cache(trace, 6, "static", keep=popular).hits > simulate_cache(trace, 6, "belady").hits
    for c in range(1, 7):
        static = simulate_cache(trace, c, "static", keep=popular[:c]).hits
        assert simulate_cache(trace, c, "belady", keep=popular[:c], bypass=True).hits >= static
        assert simulate_cache(trace, c, "belady").hits >= simulate_cache(trace, c, "lru").hits


def test_static_cache_counts_requests_of_the_kept_set():
    trace = torch.tensor([[0, 1], [2, 0], [3, 1]])
    stats = simulate_cache(trace, 2, "static", keep=[0, 3])
    assert (stats.hits, stats.requests) == (3, 6)
    with pytest.raises(ValueError, match="at most capacity=1"):
        simulate_cache(trace, 1, "static", keep=[0, 3])


def test_prefetching_the_right_experts_hits_everything():
    trace = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 1]])
    stats = simulate_cache(trace, 2, prefetch=trace)
    assert stats.hit_rate == 1.0 and stats.prefetched == 8 and stats.loads == 0
    wrong = simulate_cache(trace, 2, prefetch=torch.tensor([[6], [6], [6], [6]]))
    assert wrong.hits == 0 and wrong.prefetched == 4  # 6 is evicted again by each step's misses
    with pytest.raises(ValueError, match="lru policy only"):
        simulate_cache(trace, 2, "belady", prefetch=trace)


def test_random_routing_hits_about_c_over_n():
    gen = torch.Generator().manual_seed(1)
    trace = random_trace(4000, 8, 2, gen)
    assert trace.shape == (4000, 2) and bool((trace[:, 0] != trace[:, 1]).all())
    for c in (2, 4, 6):
        assert lru_hit_rate(trace, c) == pytest.approx(c / 8, abs=0.02)


def test_batch_trace_puts_b_sequences_side_by_side():
    traces = torch.arange(3 * 2 * 2).reshape(3, 2, 2)  # 3 sequences, 2 steps, k = 2
    batched = batch_trace(traces, 2)
    assert batched.shape == (1, 2, 4)
    assert batched[0, 0].tolist() == [0, 1, 4, 5] and batched[0, 1].tolist() == [2, 3, 6, 7]
    # a repeat inside a step counts once
    assert simulate_cache(torch.tensor([[0, 0, 1], [1, 1, 1]]), 2).requests == 3


def test_prefetch_recall_by_hand():
    ranking = torch.tensor([[2, 0, 1, 3], [3, 2, 1, 0]])
    chosen = torch.tensor([[0, 2], [0, 1]])
    assert prefetch_recall(ranking, chosen, 1) == 0.25  # token 0 finds 2 of (0, 2), token 1 nothing
    assert prefetch_recall(ranking, chosen, 2) == 0.5
    assert prefetch_recall(ranking, chosen, 4) == 1.0


def test_offload_seconds_by_hand():
    # one expert = 100 MB over 25 GB/s = 4 ms. 32 layers, 1 miss each: 128 ms; no compute, nothing prefetched
    assert offload_seconds_per_token(1.0, 0.0, 32, 100e6, 25e9) == pytest.approx(0.128)
    # 0.5 prefetched per layer (2 ms of copy) hides behind 3 ms of compute: 32 x (4 + 3) ms
    assert offload_seconds_per_token(1.0, 0.5, 32, 100e6, 25e9, 0.003) == pytest.approx(0.224)
    # 2 prefetched (8 ms) outlast the compute: the layer waits for the link, 32 x (4 + 8) ms
    assert offload_seconds_per_token(1.0, 2.0, 32, 100e6, 25e9, 0.003) == pytest.approx(0.384)
    with pytest.raises(ValueError, match="loads"):
        offload_seconds_per_token(-1.0, 0.0, 32, 1.0, 1.0)


def test_a_warm_lru_starts_with_its_set_and_cache_counts_add_up():
    trace = torch.tensor([[0, 1], [2, 3], [0, 1]])
    cold, warm = simulate_cache(trace, 2), simulate_cache(trace, 2, keep=[0, 1])
    assert (cold.hits, cold.loads) == (0, 6) and (warm.hits, warm.loads) == (2, 4)
    traces = torch.stack([trace, trace.flip(0)])
    (c2,) = cache_counts(traces, [2], keep=[[0, 1]])
    assert (c2.hits, c2.requests, c2.loads, c2.prefetched) == (4, 12, 8, 0)
    (pf,) = cache_counts(traces, [2], prefetch=traces)  # prefetching the right experts: every request hits
    assert (pf.hits, pf.loads) == (12, 0) and pf.prefetched == 12  # every expert copied ahead, none on demand


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="capacity must be an int >= 1"):
        lru_hit_rate(torch.tensor([[0, 1]]), 0)
    with pytest.raises(ValueError, match=r"\(T, m\) tensor"):
        lru_hit_rate(torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="policy must be one of"):
        simulate_cache(torch.tensor([[0]]), 1, "fifo")
    with pytest.raises(TypeError, match="integer expert ids"):
        lru_hit_rate(torch.tensor([[0.0, 1.0]]), 1)


def test_record_routing_matches_the_forward_pass_and_guesses_from_earlier_layers():
    torch.manual_seed(0)
    cfg = ModelConfig(ffn="moe", vocab_size=64, block_size=16, n_layer=3, n_head=2, d_model=16, n_experts=6, top_k=2,
                      expert_hidden=8, n_shared=1, router_score="sigmoid", aux_loss_coef=0.0, bias_update_rate=1e-3)
    model = TinyLM(cfg)
    for layer in model.moe_layers():
        layer.router.expert_bias.normal_(0, 0.1)
    idx = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(2))
    record = record_routing(model, idx, ahead=(1, 2))
    assert model.training  # mode restored
    with torch.no_grad():
        model.eval()(idx)
    for rec, layer in zip(record.indices, model.moe_layers(), strict=True):
        assert rec.shape == (2, 16, 2) and torch.equal(rec.reshape(-1, 2), layer.last_routing.indices)
    assert record.guesses[1][0] is None and record.guesses[2][1] is None
    guess = record.guesses[1][1]
    assert guess.shape == (2, 16, 6) and bool((guess.sort(-1).values == torch.arange(6)).all())  # a ranking
    # the guess for layer 1 is layer 1's router applied to the input of layer 0's router
    inputs = {}
    hook = model.moe_layers()[0].register_forward_pre_hook(lambda m, args: inputs.setdefault("x", args[0]))
    with torch.no_grad():
        model(idx)
    hook.remove()
    router = model.moe_layers()[1].router
    with torch.no_grad():
        scores = router(inputs["x"].reshape(-1, 16)).scores + router.expert_bias
    top = scores.topk(2, dim=-1).indices.sort(-1).values
    assert torch.equal(guess.reshape(-1, 6)[:, :2].sort(-1).values, top)
    assert 0.0 <= prefetch_recall(guess, record.indices[1], 2) <= 1.0
    assert not math.isnan(prefetch_recall(guess, record.indices[1], 6))
