"""The evidence protocol's instruments: the paired t-interval, whole-text evaluation, causal scoring of expert
choice, resumable sweeps, and the probes of notebooks 04-06 (the shared-as-routed swap, bias flips, Adam's step)."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest
import torch
import torch.nn.functional as F

from moe_course import metrics
from moe_course.analysis import shared_as_routed
from moe_course.model import ModelConfig, TinyLM
from moe_course.train import causal_prefix_loss, evaluate_text

# Student t quantiles from published tables (two-sided 95%: 0.975; one-sided 80%: 0.8).
T_TABLE = {(0.975, 1): 12.706, (0.975, 2): 4.303, (0.975, 4): 2.776, (0.975, 9): 2.262, (0.975, 29): 2.045,
           (0.8, 4): 0.941, (0.8, 9): 0.883, (0.995, 4): 4.604}


@pytest.mark.parametrize(("q", "df"), sorted(T_TABLE))
def test_t_quantile_matches_the_published_table(q: float, df: int) -> None:
    assert metrics.t_quantile(q, df) == pytest.approx(T_TABLE[(q, df)], abs=6e-4)
    assert metrics.t_quantile(1 - q, df) == pytest.approx(-T_TABLE[(q, df)], abs=6e-4)  # symmetric


def test_t_cdf_tends_to_the_normal_and_is_exact_for_one_degree() -> None:
    assert metrics.t_cdf(1.959964, 10_000) == pytest.approx(0.975, abs=2e-5)
    for t in (-3.0, -0.5, 0.0, 0.7, 5.0):  # df = 1 is the Cauchy distribution: 1/2 + atan(t)/pi
        assert metrics.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)


def test_paired_gaps_by_hand() -> None:
    a, b = [1.56, 1.55, 1.57, 1.53, 1.60], [1.50, 1.52, 1.49, 1.55, 1.50]
    pg = metrics.paired_gaps(a, b)
    gaps = [x - y for x, y in zip(a, b, strict=True)]
    se = statistics.stdev(gaps) / math.sqrt(5)
    assert pg.mean == pytest.approx(0.05) and pg.std == pytest.approx(statistics.stdev(gaps))
    assert (pg.low, pg.high) == pytest.approx((0.05 - 2.7764 * se, 0.05 + 2.7764 * se), abs=1e-5)
    assert pg.detectable == pytest.approx((2.7764 + 0.9410) * se, abs=1e-5)
    assert not pg.clear and pg.low < 0 < pg.high  # one seed goes the other way: the interval holds 0
    assert pg.p == pytest.approx(0.0757, abs=5e-4)  # scipy.stats.ttest_rel(a, b).pvalue
    assert pg.verdict("A", "B").startswith("no difference detected at this scale between A and B: A − B = +0.050")
    clear = metrics.paired_gaps([2.0, 2.1, 2.05], [1.0, 1.05, 1.0])
    assert clear.clear and clear.verdict("dense", "MoE").startswith("MoE beats dense")
    assert metrics.paired_gaps([1.0, 1.05, 1.0], [2.0, 2.1, 2.05]).verdict("dense", "MoE").startswith(
        "dense beats MoE")


def test_the_interval_covers_the_true_gap_95_percent_of_the_time() -> None:
    rng = random.Random(0)
    hits = 0
    for _ in range(2000):
        a = [rng.gauss(0.0, 1.0) for _ in range(5)]
        b = [x - 0.3 + rng.gauss(0.0, 0.5) for x in a]  # paired: the true gap a − b is 0.3
        pg = metrics.paired_gaps(a, b)
        hits += pg.low <= 0.3 <= pg.high
    assert 0.935 < hits / 2000 < 0.965


def test_paired_gaps_rejects_unpaired_seeds() -> None:
    with pytest.raises(ValueError, match="one result per seed"):
        metrics.paired_gaps([1.0, 2.0, 3.0], [1.0, 2.0])


def tiny(**kw) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(ModelConfig(vocab_size=256, block_size=8, n_layer=2, n_head=2, d_model=16, n_experts=6, top_k=2,
                              expert_hidden=16, **kw))


def _loop_score(model: TinyLM, data: torch.Tensor) -> float:
    """An independent scorer: one window at a time, float64 sums, the same cuts."""
    T, total, n = model.cfg.block_size, 0.0, 0
    with torch.no_grad():
        for s in range(0, len(data) - 1, T):
            x = data[s:min(s + T, len(data) - 1)].long()[None]
            y = data[s + 1:s + 1 + x.shape[1]].long()
            logits, _ = model(x)
            total += F.cross_entropy(logits[0].double(), y, reduction="sum").item()
            n += y.numel()
    return total / n


@pytest.mark.parametrize("length", [2, 9, 50, 67])  # one target; one window + 1; a short last window
def test_evaluate_text_scores_every_byte_once(length: int) -> None:
    model = tiny().eval()
    data = torch.randint(0, 256, (length,), dtype=torch.uint8)
    assert evaluate_text(model, data, batch_size=3) == pytest.approx(_loop_score(model, data), rel=1e-5)
    assert model.training is False
    first = evaluate_text(model, data, batch_size=1, max_windows=1)
    assert first == pytest.approx(_loop_score(model, data[:9]), rel=1e-5)


def test_evaluate_text_rejects_bad_text() -> None:
    with pytest.raises(ValueError, match="data must be a 1-D tensor"):
        evaluate_text(tiny(), torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_text(tiny(), torch.zeros(20, dtype=torch.long), batch_size=0)


def test_causal_scoring_equals_the_batch_for_token_choice_and_not_for_expert_choice() -> None:
    data = torch.randint(0, 256, (40,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    model = tiny().eval()  # token choice routes each token alone: prefixes change nothing
    assert causal_prefix_loss(model, data, n_windows=3) == pytest.approx(
        evaluate_text(model, data, 16, max_windows=3), rel=1e-5)
    ec = tiny(router="expert_choice", aux_loss_coef=0.0).eval()  # experts pick among all tokens of the batch
    with torch.no_grad():
        for layer in ec.moe_layers():  # large experts, so that who gets an expert moves the loss visibly
            for p in layer.experts.parameters():
                p.mul_(30.0)
    causal, batch = causal_prefix_loss(ec, data, n_windows=3), evaluate_text(ec, data, 16, max_windows=3)
    assert abs(causal - batch) > 1e-3  # 0.0046 with these seeds; equal to float rounding for token choice above


def test_shared_as_routed_swaps_the_shared_expert_for_one_more_routed_one() -> None:
    model = tiny(n_shared=1).eval()
    x = torch.randint(0, 256, (2, 8))
    before, _ = model(x)
    layer = model.moe_layers()[0]
    with shared_as_routed(model):
        assert layer.shared is None and layer.router.k == 3
        swapped, _ = model(x)
        assert int((layer.last_routing.weights > 0).sum(-1).min()) == 3
    assert layer.shared is not None and layer.router.k == 2
    assert torch.equal(model(x)[0], before) and not torch.allclose(swapped, before)


def test_noisy_router_config() -> None:
    model = tiny(noisy_router=True)
    assert all(layer.router.noise is not None for layer in model.moe_layers())
    with pytest.raises(ValueError, match="noisy_router"):
        ModelConfig(router="hash", noisy_router=True)
    with pytest.raises(TypeError, match="noisy_router"):
        ModelConfig(noisy_router=1)


def test_bias_flips_counts_changed_choices() -> None:
    from moe_course.loss_free import bias_flips

    model = tiny(router_score="sigmoid", bias_update_rate=1e-3)
    data = torch.randint(0, 256, (400,), dtype=torch.uint8)
    assert bias_flips(model, data, batch_size=4, n_batches=2) == [0.0, 0.0]  # a zero bias decides nothing
    for layer in model.moe_layers():
        layer.router.expert_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0]))  # forces experts 0 and 1
    shares = bias_flips(model, data, batch_size=4, n_batches=2)
    assert all(0.5 < s <= 1.0 for s in shares)


def test_adam_step_ratio_is_one_without_aux_and_shrinks_with_a_large_orthogonal_one() -> None:
    from moe_course.loss_free import GradientInterference, LossFreeRecorder
    from moe_course.train import TrainConfig

    rec = LossFreeRecorder(10, TrainConfig(steps=20, warmup=0), torch.zeros(100, dtype=torch.long))
    g = GradientInterference(1.0, 1.0, 0.0, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert rec._adam_step_ratio(g, 0.0) == pytest.approx(1.0)
    rec = LossFreeRecorder(10, TrainConfig(steps=20, warmup=0), torch.zeros(100, dtype=torch.long))
    g = GradientInterference(1.0, 1.0, 0.0, torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]))
    # weight 2 gets total gradient 1 + 3 = 4: its LM part is divided by 4 instead of 1
    assert rec._adam_step_ratio(g, 3.0) == pytest.approx(math.sqrt(1 + 1 / 16) / math.sqrt(2))


def test_a_sweep_resumes_and_extends_its_seeds(tmp_path, monkeypatch) -> None:
    from moe_course.experiments import runner

    calls: list[tuple[str, int]] = []
    real = runner.train_run

    def counting(run, seed, *args, **kw):
        calls.append((run.label, seed))
        if len(calls) == 3 and not getattr(counting, "crashed", False):
            counting.crashed = True
            raise KeyboardInterrupt  # the session ends in the middle of the sweep
        return real(run, seed, *args, **kw)

    monkeypatch.setattr(runner, "train_run", counting)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment("z_loss", "smoke", seeds=[0, 1], device="cpu", progress=False, results_dir=tmp_path)
    partial = tmp_path / "z_loss-smoke.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 2  # the two finished runs were kept
    calls.clear()
    result = runner.run_experiment("z_loss", "smoke", seeds=[0, 1], device="cpu", progress=False,
                                   results_dir=tmp_path)
    assert calls == [("z=0.001", 0), ("z=0.001", 1)] and not partial.exists()  # only the unfinished runs
    assert [(r.label, r.seed) for r in result.records] == [("z=0", 0), ("z=0", 1), ("z=0.001", 0), ("z=0.001", 1)]
    calls.clear()
    more = runner.run_experiment("z_loss", "smoke", seeds=[0, 1, 2], device="cpu", progress=False,
                                 results_dir=tmp_path)
    assert sorted(calls) == [("z=0", 2), ("z=0.001", 2)] and more.records[0] == result.records[0]
    stored = json.loads((tmp_path / "z_loss-smoke.json").read_text())
    assert stored["seeds"] == [0, 1, 2]
    fresh = runner.run_experiment("z_loss", "smoke", seeds=[0], device="cpu", progress=False, save=False)
    assert fresh.records[0].train_loss == result.records[0].train_loss  # a resumed record is the record


def test_a_widened_grid_trains_only_its_new_point_and_a_changed_run_retrains(tmp_path, monkeypatch) -> None:
    from dataclasses import replace

    from moe_course.experiments import runner

    calls: list[tuple[str, int]] = []
    real = runner.train_run
    monkeypatch.setattr(runner, "train_run", lambda run, seed, *a, **kw: calls.append((run.label, seed))
                        or real(run, seed, *a, **kw))
    exp = runner.get_experiment("z_loss")
    runner.run_experiment("z_loss", "smoke", seeds=[0], device="cpu", progress=False, results_dir=tmp_path)
    base_runs = exp.runs
    wider = lambda size: [*base_runs(size), replace(base_runs(size)[1], label="z=0.01",  # noqa: E731
                                                    model=replace(base_runs(size)[1].model, z_loss_coef=1e-2))]
    monkeypatch.setitem(runner.EXPERIMENTS, "z_loss", replace(exp, build=wider))
    calls.clear()
    result = runner.run_experiment("z_loss", "smoke", seeds=[0], device="cpu", progress=False, results_dir=tmp_path)
    assert calls == [("z=0.01", 0)] and result.labels == ["z=0", "z=0.001", "z=0.01"]  # one new point only
    changed = lambda size: [replace(r, train=replace(r.train, lr=r.train.lr * 2)) if r.label == "z=0" else r  # noqa: E731
                            for r in wider(size)]
    monkeypatch.setitem(runner.EXPERIMENTS, "z_loss", replace(exp, build=changed))
    calls.clear()
    runner.run_experiment("z_loss", "smoke", seeds=[0], device="cpu", progress=False, results_dir=tmp_path)
    assert calls == [("z=0", 0)]  # the run whose configuration changed, and nothing else
