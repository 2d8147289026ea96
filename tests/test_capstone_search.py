"""Notebook 08 on the protocol: capstone_search's two stages, its choice functions, the race's definition and the
preference tracker."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moe_course.experiments import EXPERIMENTS
from moe_course.experiments import capstone as cap
from moe_course.experiments.runner import ExperimentResult, RunRecord, _configs, fingerprint


def _fake(runs, losses) -> ExperimentResult:
    return ExperimentResult("capstone_search", "smoke", [0], fingerprint("capstone_search", "smoke"), _configs(runs),
                            [RunRecord(r.label, 0, val_loss=[9.0], tune_loss=losses[r.label]) for r in runs])


def test_stage_one_is_the_same_grid_for_every_model_on_the_tuning_half():
    runs = {r.label: r for r in EXPERIMENTS["capstone_search"].runs("cpu")}
    shapes = {r.label: r for r in cap.capstone_shapes("cpu")}
    assert len(cap.SEARCH_LRS) >= 3 and len(cap.SEARCH_WARMUPS) >= 3
    for label in cap.CAPSTONE_LABELS:
        for lr in cap.SEARCH_LRS:
            for w in cap.SEARCH_WARMUPS:
                run = runs[cap.tuning_label(label, lr, w)]
                assert run.val == "tune" and run.probe is None and (run.train.lr, run.train.warmup) == (lr, w)
                assert run.model == shapes[label].model
                assert replace(run.train, lr=0, warmup=0) == replace(shapes[label].train, lr=0, warmup=0)


def test_stage_two_searches_each_models_knob_with_the_same_number_of_runs():
    per_model = {label: [r for r in EXPERIMENTS["capstone_search"].runs("cpu") if r.label.startswith(label + " lr=")]
                 for label in cap.CAPSTONE_LABELS}
    assert len({len(v) for v in per_model.values()}) == 1  # every model gets as many runs
    for label, (name, values) in cap.KNOBS.items():
        shape = {r.label: r for r in cap.capstone_shapes("cpu")}[label]
        assert cap.knob_of(shape) in values  # the preset's value is a stage-1 run, the others are stage 2
        if label not in cap.GRID_CHOICE:
            continue
        lr, w = cap.GRID_CHOICE[label]
        stage2 = [r for r in per_model[label] if name in r.label]
        assert sorted(cap.knob_of(r) for r in stage2) == sorted(v for v in values if v != cap.knob_of(shape))
        assert all((r.train.lr, r.train.warmup) == (lr, w) for r in stage2)
    assert 0.0 in cap.KNOBS["MoE top-2"][1]  # alpha = 0: no balancing at all is a candidate


def test_choices_take_the_lowest_tuning_loss_of_each_stage():
    runs = EXPERIMENTS["capstone_search"].runs("smoke")
    losses = {r.label: 3.0 + i / 100 for i, r in enumerate(runs)}
    losses[cap.tuning_label("MoE recipe", 3e-3, 100)] = 1.0
    result = _fake(runs, losses)
    grid = cap.grid_choice(result)
    assert grid["MoE recipe"] == {"lr": 3e-3, "warmup": 100, "loss": 1.0}
    assert grid["dense"] == {"lr": cap.SEARCH_LRS[0], "warmup": cap.SEARCH_WARMUPS[0], "loss": 3.0}
    # without stage 2 the knob stays the preset's
    choice = cap.search_choice(result)
    assert choice["MoE recipe"] == {"lr": 3e-3, "warmup": 100, "knob": 1e-3, "loss": 1.0}
    # a stored stage 2 whose best value is not the preset's moves the knob
    point = next(r for r in runs if r.label == cap.tuning_label("MoE top-2", cap.SEARCH_LRS[0], cap.SEARCH_WARMUPS[0]))
    extra = [replace(cap.with_knob(point, "MoE top-2", v),
                     label=cap.tuning_label("MoE top-2", cap.SEARCH_LRS[0], cap.SEARCH_WARMUPS[0], v))
             for v in cap.KNOBS["MoE top-2"][1] if v != 0.01]
    losses.update({r.label: 2.0 + cap.knob_of(r) for r in extra})
    result = _fake(runs + extra, losses)
    assert cap.knob_losses(result)["MoE top-2"][0.0] == pytest.approx(2.0)
    assert cap.search_choice(result)["MoE top-2"]["knob"] == 0.0
    with pytest.raises(ValueError, match="capstone_search result"):
        cap.search_grid(replace(result, experiment="capstone"))


def test_with_knob_sets_the_right_field():
    dense, moe, best = cap.capstone_shapes("cpu")
    assert cap.with_knob(dense, "dense", 0.3).train.weight_decay == 0.3
    assert cap.with_knob(moe, "MoE top-2", 0.0).model.aux_loss_coef == 0.0
    assert cap.with_knob(best, "MoE recipe", 3e-3).model.bias_update_rate == 3e-3
    assert cap.knob_of(cap.with_knob(best, "MoE recipe", 3e-3)) == 3e-3


def test_equal_time_ratio_is_the_stored_step_benchmarks():
    bench = json.loads(Path("data/results/bench_model_step-cpu.json").read_text())
    assert abs(cap.EQUAL_TIME_RATIO - bench["recipe_ratio_median"]) <= 0.01


def test_the_race_and_the_expert_sweep_at_smoke_size():
    race = {r.label: r for r in cap.capstone_race("smoke")}
    assert list(race) == [*cap.CAPSTONE_LABELS, "dense, equal time"]
    assert race["dense, equal time"].train.steps == round(cap.EQUAL_TIME_RATIO * race["dense"].train.steps)
    assert race["MoE recipe"].tracker is not None and race["dense"].tracker is None
    assert len(cap.RACE_SEEDS) >= 5
    sweep = cap.capstone_experts("smoke")
    assert [r.model.n_experts for r in sweep] == list(cap.RACE_EXPERTS)
    recipe = race["MoE recipe"].model
    assert all(replace(r.model, n_experts=recipe.n_experts) == recipe for r in sweep)


def test_preference_tracker_measures_scores_and_bias_per_layer():
    from moe_course.model import ModelConfig, TinyLM

    torch.manual_seed(0)
    model = TinyLM(ModelConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, d_model=16, ffn="moe", n_experts=4,
                               top_k=2, expert_hidden=8, router_score="sigmoid", bias_update_rate=0.1))
    tracker = cap.PreferenceTracker(log_every=2, steps=3)
    x = torch.randint(0, 32, (2, 8))
    for step in range(3):
        model(x)
        model.moe_layers()[0].router.expert_bias.copy_(torch.tensor([0.0, 0.1, -0.2, 0.05]))
        tracker(step, model)
    rec = tracker.record()
    assert [len(rec["bias_range"]), len(rec["bias_range"][0])] == [2, 2]  # steps 2 and 3 (the last), 2 layers
    assert rec["bias_range"][0] == pytest.approx([0.3, 0.0])
    scores = model.moe_layers()[1].last_routing.scores
    assert rec["score_range"][-1][1] == pytest.approx(float(scores.mean(0).max() - scores.mean(0).min()), abs=1e-6)
    assert rec["net_range"][-1][1] == pytest.approx(rec["score_range"][-1][1], abs=1e-6)  # layer 1 has no bias


def test_loss_at_seconds_interpolates_by_hand():
    steps, losses = [100, 200, 300], [3.0, 2.0, 1.5]
    # 300 steps in 60 s: 45 s is step 225, a quarter of the way from 2.0 to 1.5
    assert cap.loss_at_seconds(steps, losses, 300, 60.0, 45.0) == pytest.approx(1.875)
    assert cap.loss_at_seconds(steps, losses, 300, 60.0, 60.0) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="outside its curve"):
        cap.loss_at_seconds(steps, losses, 300, 60.0, 10.0)


def test_expert_power_law_recovers_a_known_slope():
    # L = 2 * E^-0.05 exactly, three seeds scaled by 1.00, 1.01, 0.99: the slope is -0.05 in every seed
    losses = {e: [2 * e ** -0.05 * f for f in (1.0, 1.01, 0.99)] for e in (4, 8, 16, 32)}
    fit = cap.expert_power_law(losses)
    assert fit["slopes"] == pytest.approx([-0.05] * 3)
    assert fit["intercepts"][0] == pytest.approx(math.log(2))
    noisy = {e: [v * (1 + 0.002 * ((i + e) % 3 - 1)) for i, v in enumerate(vs)] for e, vs in losses.items()}
    fit = cap.expert_power_law(noisy)
    assert fit["gaps"].low < -0.05 < fit["gaps"].high and fit["gaps"].high < 0
    with pytest.raises(ValueError, match="at least 3 expert counts"):
        cap.expert_power_law({4: [1.0], 8: [0.9]})


def test_the_stored_search_chose_inside_its_grid_on_every_axis():
    from moe_course.experiments import load_result

    result = load_result("capstone_search", "cpu")
    stage1 = cap.grid_choice(result)
    for c in stage1.values():
        assert cap.SEARCH_LRS[0] < c["lr"] < cap.SEARCH_LRS[-1]
        assert cap.SEARCH_WARMUPS[0] < c["warmup"] < cap.SEARCH_WARMUPS[-1]
    if not cap.GRID_CHOICE:  # stage 1 stored, stage 2 not yet run
        assert not cap.knob_losses(result) and not cap.RACE_TUNED
        return
    assert {label: (c["lr"], c["warmup"]) for label, c in stage1.items()} == cap.GRID_CHOICE
    assert set(cap.knob_losses(result)) == set(cap.CAPSTONE_LABELS)  # stage 2 is stored for every model
    for label, c in cap.search_choice(result).items():
        values = cap.KNOBS[label][1]
        # inside, or at 0 where the knob cannot go lower (no weight decay, no auxiliary loss)
        assert values[0] < c["knob"] < values[-1] or c["knob"] == values[0] == 0.0, label
        assert cap.RACE_TUNED[label] == {"lr": c["lr"], "warmup": c["warmup"], "knob": c["knob"]}
