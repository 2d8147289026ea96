"""`python -m moe_course.train`: every bad argument is a usage error (exit code 2, a message, no traceback)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict, dataclass, fields, replace

import pytest
import torch

from moe_course import train
from moe_course.model import ModelConfig, TinyLM
from moe_course.params import count_model


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run main(argv), expect argparse's exit code 2, and return what it printed to stderr."""
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "argument --steps: must be a positive whole number, got 0"),
        (["--steps", "-5"], "argument --steps: must be a positive whole number, got -5"),
        (["--steps", "1.5"], "argument --steps: expected a whole number, got '1.5'"),
        (["--max-bytes", "0"], "argument --max-bytes: must be a positive whole number, got 0"),
        (["--max-bytes", "lots"], "argument --max-bytes: expected a whole number, got 'lots'"),
        (["--preset", "smoke", "--max-bytes", "100"], "preset smoke needs at least 330 bytes"),
        (["--preset", "huge"], "unknown preset 'huge'; available presets: cpu-best, cpu-dense, cpu-moe"),
        (["--device", "tpu"], "argument --device: unknown device 'tpu'; use cpu, cuda, cuda:N or mps"),
        (["--device", "meta"], "argument --device: unknown device 'meta'"),
        (["--device", ""], "argument --device: unknown device ''"),
        (["--steps"], "argument --steps: expected one argument"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        # --set: the key, the value's type, and the configs' own validation
        (["--set", "top_k"], "argument --set: expected KEY=VALUE, got 'top_k'"),
        (["--set", "=3"], "argument --set: expected KEY=VALUE, got '=3'"),
        (["--set", "top_k=two"], "argument --set: top_k expects an int, got 'two'"),
        (["--set", "top_k=1.5"], "argument --set: top_k expects an int, got '1.5'"),
        (["--set", "lr=fast"], "argument --set: lr expects a float, got 'fast'"),
        (["--set", "lr=nan"], "argument --set: lr expects a float (finite), got 'nan'"),
        (["--set", "amp=maybe"], "argument --set: amp expects a bool (true/false, yes/no, on/off, 1/0), got 'maybe'"),
        (["--set", "capacity_factor=big"], "argument --set: capacity_factor expects a float or none, got 'big'"),
        (["--set", "model.lr=1"], "argument --set: unknown key 'model.lr'"),
        (["--top-k", "x"], "argument --top-k: top_k expects an int, got 'x'"),
        (["--capacity-factor", "lots"], "argument --capacity-factor: capacity_factor expects a float or none"),
        (["--router", "magic"], "argument --router: invalid choice: 'magic'"),
        (["--top-k", "2", "--set", "top_k=1"], "--top-k 2: top_k is already set by --set top_k=1; give it once"),
        (["--steps", "5", "--set", "steps=6"], "--steps 5: steps is already set by --set steps=6; give it once"),
        (["--preset", "smoke", "--set", "n_head=3"],
         "invalid settings for smoke (n_head=3): d_model=32 must be divisible by n_head=3"),
        (["--preset", "smoke", "--top-k", "5"], "top_k=5 must be between 1 and n_experts=4"),
        (["--preset", "smoke", "--router", "hash"], "router='hash' balances without losses or a bias"),
        (["--preset", "smoke", "--set", "router_score=tanh"], "unknown router score 'tanh'"),  # checked by the layer
        (["--preset", "smoke", "--set", "vocab_size=128"], "the byte-level corpus needs vocab_size >= 256"),
        (["--set", "warmup=-1"], "TrainConfig.warmup must be an int >= 0, got -1"),
        (["--batch-size", "0"], "TrainConfig.batch_size must be an int >= 1, got 0"),
        (["--set", "min_lr_ratio=2"], "TrainConfig.min_lr_ratio must be in [0, 1], got 2.0"),
        (["--set", "train.grad_clip=-1"], "TrainConfig.grad_clip must be a finite number >= 0, got -1.0"),
        (["--json", "."], "argument --json: . is a folder; give a file name"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    assert message in usage_error(argv, capsys)


def test_cuda_without_cuda_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = usage_error(["--device", "cuda"], capsys)
    assert "argument --device: device 'cuda' was requested but CUDA is not available; use 'cpu'" in err


def test_bad_moe_device_environment_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("MOE_DEVICE", "tpu")
    assert "argument --device:" in usage_error([], capsys)


def test_out_must_not_be_a_file(tmp_path, capsys):
    target = tmp_path / "checkpoint.pt"
    target.write_text("")
    assert "is a file; give a folder" in usage_error(["--out", str(target)], capsys)


def test_module_entry_point_gives_a_usage_error_without_a_traceback():
    run = subprocess.run([sys.executable, "-m", "moe_course.train", "--device", "tpu"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert "unknown device 'tpu'" in run.stderr and "Traceback" not in run.stderr


def test_unknown_key_names_it_and_lists_the_keys_of_both_configs(capsys):
    err = usage_error(["--set", "n_expert=8"], capsys)
    assert "argument --set: unknown key 'n_expert'" in err
    for key in ("n_experts", "top_k", "capacity_factor", "bias_update_rate", "lr", "batch_size", "warmup", "amp"):
        assert key in err.split("unknown key")[1]


def test_no_field_is_in_both_configs_and_prefixed_keys_work():
    model_keys = {f.name for f in fields(ModelConfig)}
    train_keys = {f.name for f in fields(train.TrainConfig)}
    assert not model_keys & train_keys  # so every bare key is unambiguous today
    assert train.parse_override("model.top_k=1") == ("top_k", 1)
    assert train.parse_override("train.lr=0.5") == ("lr", 0.5)


def test_a_key_in_both_configs_needs_its_prefix(monkeypatch):
    @dataclass
    class WithSeed:  # a model config that also had a "seed" field
        seed: int = 0
        width: int = 8

    monkeypatch.setattr(train, "_CONFIGS", {"model": WithSeed, "train": train.TrainConfig})
    with pytest.raises(ValueError, match="'seed' is a field of both ModelConfig and TrainConfig: write model.seed"):
        train.parse_override("seed=3")
    assert train.parse_override("model.seed=3") == ("model.seed", 3)
    assert train.parse_override("train.seed=4") == ("train.seed", 4)
    assert train.parse_override("width=16") == ("width", 16)
    model_cfg, train_cfg = train.apply_overrides(WithSeed(), train.TrainConfig(), {"model.seed": 3, "train.seed": 4})
    assert (model_cfg.seed, train_cfg.seed) == (3, 4)


@pytest.mark.parametrize(
    ("item", "key", "value"),
    [
        ("n_experts=16", "n_experts", 16),  # int
        ("lr=2e-3", "lr", 2e-3),  # float
        ("aux_loss_coef=1", "aux_loss_coef", 1.0),  # float given as a whole number
        ("amp=false", "amp", False),  # bool
        ("amp=Yes", "amp", True),
        ("router_score=sigmoid", "router_score", "sigmoid"),  # str
        ("capacity_factor=1.25", "capacity_factor", 1.25),  # float | None
        ("capacity_factor=none", "capacity_factor", None),
        ("dispatch=sorted", "dispatch", "sorted"),  # str | None
        ("dispatch=None", "dispatch", None),
    ],
)
def test_each_override_type_is_parsed_and_applied(item, key, value):
    assert train.parse_override(item) == (key, value)
    assert type(train.parse_override(item)[1]) is type(value)
    preset = train.get_preset("cpu-moe")
    model_cfg, train_cfg = train.apply_overrides(preset.model, preset.train, {key: value})
    changed = model_cfg if hasattr(model_cfg, key) else train_cfg
    assert getattr(changed, key) == value
    # nothing else moved
    assert {k: v for k, v in asdict(model_cfg).items() if k != key} == {
        k: v for k, v in asdict(preset.model).items() if k != key}
    assert {k: v for k, v in asdict(train_cfg).items() if k != key} == {
        k: v for k, v in asdict(preset.train).items() if k != key}


# a value for each convenience flag (different from the smoke preset's) and what else it needs to be valid there
FLAG_VALUES = {
    "--router": ("expert_choice", ["--set", "aux_loss_coef=0"]),
    "--router-score": ("sigmoid", []),
    "--experts": ("list", []),
    "--n-experts": ("8", []),
    "--top-k": ("1", []),
    "--expert-hidden": ("48", []),
    "--n-shared": ("1", []),
    "--capacity-factor": ("1.5", []),
    "--aux-loss": ("0.02", []),
    "--z-loss": ("0.001", []),
    "--seq-aux-loss": ("0.0001", []),
    "--bias-update-rate": ("0.001", []),
    "--lr": ("0.002", []),
    "--batch-size": ("8", []),
    "--seed": ("3", []),
}


def dry_run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert train.main(["--preset", "smoke", "--device", "cpu", "--dry-run", *argv]) == 0
    return capsys.readouterr().out


def test_every_convenience_flag_has_a_case():
    assert set(FLAG_VALUES) == set(train.FLAGS)


@pytest.mark.parametrize("flag", sorted(FLAG_VALUES))
def test_convenience_flag_equals_its_set(flag, capsys):
    value, extra = FLAG_VALUES[flag]
    key = train.FLAGS[flag]
    by_flag = dry_run([flag, value, *extra], capsys)
    by_set = dry_run(["--set", f"{key}={value}", *extra], capsys)
    assert by_flag == by_set
    _, parsed = train.parse_override(f"{key}={value}")
    assert f" {key}={parsed}" in by_flag  # and it did change the config
    assert f" {key}={parsed}" not in dry_run(extra, capsys)


def test_dry_run_prints_the_resolved_configs_and_counts_without_training(tmp_path, capsys):
    out = dry_run(["--top-k", "1", "--set", "lr=1e-3", "--steps", "7", "--out", str(tmp_path)], capsys)
    lines = out.splitlines()
    assert lines[0] == f"preset smoke on cpu; checkpoint {tmp_path / 'smoke.pt'}"
    assert lines[1] == ("model  block_size=32 n_layer=2 n_head=2 d_model=32 d_hidden=64 n_experts=4 top_k=1 "
                        "expert_hidden=32")
    assert lines[2] == "train  steps=7 batch_size=4 lr=0.001 warmup=2 eval_every=10 eval_batches=2"
    preset = train.get_preset("smoke")
    total, active = count_model(TinyLM(replace(preset.model, top_k=1)))
    assert lines[3] == f"params total_params={total} active_params={active}"
    assert active < count_model(TinyLM(preset.model))[1]  # top-1 runs fewer expert parameters
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing saved


def test_list_presets_with_their_parameter_counts(capsys):
    assert train.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(train.PRESETS)
    for line in lines:
        name = line.split()[0]
        total, active = count_model(TinyLM(train.PRESETS[name].model))
        assert f"total={total:,} " in line and f"active={active:,} " in line
        assert line.endswith(train.PRESETS[name].description)
