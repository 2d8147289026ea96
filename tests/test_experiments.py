"""moe_course.experiments: every experiment runs at smoke size, results round-trip, stale results are refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moe_course.corpus import corpus_sha256
from moe_course.device import cpu_threads
from moe_course.experiments import (
    EXPERIMENTS,
    SIZES,
    Experiment,
    ExperimentResult,
    RunRecord,
    StaleResultError,
    base_model,
    fingerprint,
    load_result,
    main,
    result_path,
    run_experiment,
)
from moe_course.experiments import runner as ex

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Smoke-sized models run fastest on one thread, above all on a busy machine."""
    with cpu_threads(1):
        yield


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_experiment_runs_at_smoke_size_and_round_trips(name, tmp_path):
    result = run_experiment(name, "smoke", seeds=[0], progress=False, results_dir=tmp_path)
    runs = EXPERIMENTS[name].runs("smoke")
    assert [r.label for r in result.records] == [r.label for r in runs]
    for record, run in zip(result.records, runs, strict=True):
        steps = run.train.steps
        assert record.step[-1] == steps and record.val_step[-1] == steps
        assert len(record.load) == len(record.step) == len(record.max_vio) == len(record.drop_rate)
        assert len(record.logit_max) == len(record.step) == len(record.skipped)
        n_moe = run.model.n_layer if run.model.ffn == "moe" else 0
        assert len(record.load[-1]) == n_moe
        for layer in record.load[-1]:
            assert len(layer) == run.model.n_experts and sum(layer) == pytest.approx(1.0, abs=1e-3)
        assert record.tokens_per_s > 0
    blob = json.loads(result_path(name, "smoke", tmp_path).read_text())
    for key in ("package_version", "torch_version", "device", "seeds", "runs", "fingerprint", "created"):
        assert blob[key] not in (None, "", [])
    assert blob["runs"][0]["model"] == {k: v for k, v in runs[0].model.to_dict().items()
                                        if not (k in ex.NEW_DEFAULTS and v == ex.NEW_DEFAULTS[k])}
    loaded = load_result(name, "smoke", tmp_path)
    assert [r.val_loss for r in loaded.records] == [r.val_loss for r in result.records]
    assert loaded.records[0].final["val_loss"] == result.records[0].final["val_loss"]


def test_seeds_give_one_record_each_and_differ(tmp_path):
    result = run_experiment("z_loss", "smoke", seeds=[0, 1], progress=False, results_dir=tmp_path)
    assert [(r.label, r.seed) for r in result.records] == [("z=0", 0), ("z=0", 1), ("z=0.001", 0), ("z=0.001", 1)]
    a, b = result.records_of("z=0")
    assert a.train_loss != b.train_loss
    again = run_experiment("z_loss", "smoke", seeds=[0], progress=False, save=False)
    assert again.records_of("z=0")[0].val_loss == a.val_loss  # fixed seeds reproduce the numbers
    assert result.mean("z=0", "val_loss") == pytest.approx((a.val_loss[-1] + b.val_loss[-1]) / 2)
    with pytest.raises(KeyError, match="no run 'nope'"):
        result.records_of("nope")
    assert result.run_of("z=0.001")["model"]["z_loss_coef"] == 1e-3
    with pytest.raises(KeyError, match="no run 'nope'"):
        result.run_of("nope")
    assert len(result.tune_losses("z=0")) == 2 and result.tune_losses("z=0") == [a.tune_loss, b.tune_loss]


def test_alpha_sweep_covers_the_switch_values():
    coefs = [r.model.aux_loss_coef for r in EXPERIMENTS["aux_sweep"].runs("cpu")]
    assert coefs == [0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    for name in ("collapse", "aux_sweep", "aux_sweep_capacity", "z_loss", "routers", "fine_grained"):
        assert len(EXPERIMENTS[name].seeds) >= 5  # the protocol's minimum
        assert all(r.val == "tune" for r in EXPERIMENTS[name].runs("cpu"))  # curves never touch the test half


def _stored(tmp_path, name="z_loss") -> Path:
    """A stored result as run_experiment writes it (without training: only the fingerprint matters here)."""
    runs = EXPERIMENTS[name].runs("smoke")
    result = ExperimentResult(name, "smoke", [0], fingerprint(name, "smoke"), ex._configs(runs),
                              [RunRecord(r.label, 0, val_loss=[1.0]) for r in runs], corpus="course",
                              corpus_sha256=corpus_sha256("course"))
    return result.save(result_path(name, "smoke", tmp_path))


def test_results_record_the_corpus_they_trained_on(tmp_path):
    result = run_experiment("z_loss", "smoke", seeds=[0], progress=False, results_dir=tmp_path)
    assert (result.corpus, result.corpus_sha256) == ("course", corpus_sha256("course"))
    assert load_result("z_loss", "smoke", tmp_path).corpus_sha256 == corpus_sha256("course")
    assert ex.CORPUS_NAME == {"smoke": "course", "cpu": "course", "gpu": "large"}


def test_another_corpus_changes_the_fingerprint_and_refuses_the_result(tmp_path, monkeypatch):
    _stored(tmp_path)
    before = fingerprint("z_loss", "smoke")
    other = "f" * 64
    monkeypatch.setattr(ex, "corpus_sha256", lambda name: other)  # as if data/corpus held other text
    assert fingerprint("z_loss", "smoke") != before
    with pytest.raises(StaleResultError, match=r"trained on other text .*frozen 'course' corpus.*"
                                               r"python -m moe_course\.experiments run z_loss --size smoke"):
        load_result("z_loss", "smoke", tmp_path)


def test_a_result_without_a_corpus_hash_is_refused(tmp_path):
    path = _stored(tmp_path)
    blob = json.loads(path.read_text())
    del blob["corpus_sha256"], blob["corpus"]  # made before results recorded their corpus
    path.write_text(json.dumps(blob))
    with pytest.raises(StaleResultError, match="a corpus it does not record"):
        load_result("z_loss", "smoke", tmp_path)


def test_a_stored_result_loads_while_it_matches(tmp_path):
    _stored(tmp_path)
    assert load_result("z_loss", "smoke", tmp_path).records_of("z=0")[0].val_loss == [1.0]


def test_a_changed_configuration_makes_the_stored_result_stale(tmp_path, monkeypatch):
    _stored(tmp_path)
    original = EXPERIMENTS["z_loss"]

    def changed(size):
        return [replace(r, train=replace(r.train, lr=r.train.lr / 2)) for r in original.build(size)]

    monkeypatch.setitem(EXPERIMENTS, "z_loss", Experiment("z_loss", original.description, changed, original.seeds))
    with pytest.raises(StaleResultError, match=r"stale.*python -m moe_course.experiments run z_loss --size smoke"):
        load_result("z_loss", "smoke", tmp_path)


def test_a_new_code_version_makes_the_stored_result_stale(tmp_path, monkeypatch):
    _stored(tmp_path)
    before = fingerprint("z_loss", "smoke")
    monkeypatch.setattr(ex, "CODE_VERSION", ex.CODE_VERSION + 1)
    assert fingerprint("z_loss", "smoke") != before
    with pytest.raises(StaleResultError, match="fingerprint"):
        load_result("z_loss", "smoke", tmp_path)


def test_an_edited_fingerprint_is_refused(tmp_path):
    path = _stored(tmp_path)
    blob = json.loads(path.read_text())
    blob["fingerprint"] = "0" * 16
    path.write_text(json.dumps(blob))
    with pytest.raises(StaleResultError):
        load_result("z_loss", "smoke", tmp_path)


def test_fingerprint_depends_on_size_and_experiment_only():
    assert fingerprint("z_loss", "smoke") == fingerprint("z_loss", "smoke")
    assert fingerprint("z_loss", "smoke") != fingerprint("z_loss", "cpu")
    assert fingerprint("z_loss", "cpu") != fingerprint("aux_sweep", "cpu")


def test_missing_result_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m moe_course.experiments run aux_sweep --size cpu"):
        load_result("aux_sweep", "cpu", tmp_path)


def test_bad_arguments_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match="unknown experiment 'nope'; known experiments: .*aux_sweep"):
        ex.get_experiment("nope")
    with pytest.raises(ValueError, match="unknown size 'huge'; use one of smoke, cpu, gpu"):
        base_model("huge")
    with pytest.raises(ValueError, match="seeds is empty"):
        run_experiment("z_loss", "smoke", seeds=[], progress=False, save=False)
    with pytest.raises(ValueError, match="seeds must be ints >= 0"):
        run_experiment("z_loss", "smoke", seeds=[-1], progress=False, save=False)
    with pytest.raises(ValueError, match="repeat a seed"):
        run_experiment("z_loss", "smoke", seeds=[1, 1], progress=False, save=False)


def test_every_size_builds_valid_configurations():
    for name, exp in EXPERIMENTS.items():
        for size in SIZES:
            runs = exp.runs(size)
            assert runs, name
            assert len({r.label for r in runs}) == len(runs)


def test_stored_results_match_the_code():
    """A stored result that no longer matches its configurations fails here first, naming the command."""
    stored = [(name, size) for name in EXPERIMENTS for size in SIZES
              if result_path(name, size, ROOT / "data" / "results").exists()]
    assert ("aux_sweep", "cpu") in stored  # notebook 04 loads it
    for name, size in stored:
        result = load_result(name, size, ROOT / "data" / "results")
        assert result.records and result.seeds
        assert len(result.records) == len(result.runs) * len(result.seeds)


def test_recorder_logs_on_the_training_loop_schedule():
    recorder = ex._Recorder(log_every=3, steps=7)
    model = torch.nn.Module()
    model.moe_layers = lambda: []
    for step in range(7):
        recorder(step, model)
    assert all(len(v) == 3 for v in recorder.points.values())  # after steps 3, 6 and the last one (7)


def test_recorder_reads_signed_logits_their_spread_gap_and_entropy():
    from types import SimpleNamespace

    logits = torch.tensor([[3.0, -1.0, 0.0], [-2.0, -4.0, 1.0]])
    layer = SimpleNamespace(last_dropped=0.0, last_routing=SimpleNamespace(logits=logits))
    model = SimpleNamespace(moe_layers=lambda: [layer])
    recorder = ex._Recorder(log_every=1, steps=1)
    recorder(0, model)
    p = recorder.points
    assert (p["logit_top"], p["logit_bottom"], p["logit_max"]) == ([3.0], [-4.0], [4.0])
    assert p["logit_range"] == [pytest.approx((4.0 + 5.0) / 2)] and p["logit_gap"] == [pytest.approx((3 + 3) / 2)]
    q = logits.softmax(-1)
    assert p["gate_entropy"] == [pytest.approx(float(-(q * q.log()).sum(-1).mean()))]


@pytest.mark.parametrize(
    "argv",
    [[], ["run"], ["run", "nope"], ["run", "z_loss", "--size", "huge"], ["show", "nope"], ["frobnicate"],
     ["run", "z_loss", "--seeds", "x"], ["run", "z_loss", "--size", "smoke", "--seeds", "-1"],
     ["run", "z_loss", "--size", "smoke", "--seeds", "0", "0"], ["run", "z_loss", "--device", "tpu"]],
)
def test_cli_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_cli_list_run_and_show(tmp_path, capsys):
    assert main(["list"]) == 0
    assert "aux_sweep" in capsys.readouterr().out
    assert main(["show", "z_loss", "--size", "smoke", "--results-dir", str(tmp_path)]) == 1
    assert "python -m moe_course.experiments run z_loss --size smoke" in capsys.readouterr().err
    assert main(["run", "z_loss", "--size", "smoke", "--seeds", "3", "--results-dir", str(tmp_path),
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "z=0.001" in out and "wrote" in out
    assert main(["show", "z_loss", "--size", "smoke", "--results-dir", str(tmp_path)]) == 0
    assert load_result("z_loss", "smoke", tmp_path).seeds == [3]


@pytest.mark.parametrize("name", ["routers", "aux_sweep", "aux_sweep_capacity", "fine_grained", "loss_free_06"])
def test_every_arm_trains_at_the_learning_rate_its_tuning_chose(name):
    from moe_course.experiments import load_result
    from moe_course.experiments.tuning import LRS, TUNED_LR, lr_choice

    tuning = load_result(f"{name}_tuning", "cpu")
    assert tuning.seeds == [0] and {r["train"]["lr"] for r in tuning.runs} == set(LRS)  # the same search for all
    choice = lr_choice(tuning)
    assert choice == TUNED_LR[name]
    assert all(min(LRS) < lr < max(LRS) for lr in choice.values()), choice  # every choice inside the grid
    race = load_result(name, "cpu")
    assert {run["label"]: run["train"]["lr"] for run in race.runs} == TUNED_LR[name]


def test_tuned_experiment_without_a_table_names_the_fix(monkeypatch):
    from moe_course.experiments import get_experiment
    from moe_course.experiments.tuning import TUNED_LR

    monkeypatch.setitem(TUNED_LR, "routers", {})
    with pytest.raises(ValueError, match=r"run routers_tuning --size cpu"):
        get_experiment("routers").runs("cpu")
    assert len(get_experiment("routers").runs("smoke")) == 6  # other sizes train at their base rate


@pytest.mark.parametrize("name", ["aux_sweep", "aux_sweep_capacity"])
def test_alpha_chosen_on_the_tuning_half_is_not_the_grids_largest(name):
    from moe_course.experiments import load_result

    sweep = load_result(name, "cpu")
    tune = {label: sum(sweep.tune_losses(label)) / len(sweep.seeds) for label in sweep.labels}
    assert min(tune, key=tune.get) != sweep.labels[-1]  # α = 0 is the axis's floor; the top must be widened
