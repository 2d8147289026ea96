import json
import math
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from moe_course import train as train_module
from moe_course.device import cpu_threads
from moe_course.model import ModelConfig, TinyLM
from moe_course.params import count_model
from moe_course.train import (
    PRESETS,
    History,
    TrainConfig,
    evaluate,
    get_preset,
    load_checkpoint,
    lr_at,
    main,
    read_checkpoint,
    save_checkpoint,
    train,
)

# a tiny, very learnable "corpus": a repeated sentence
TEXT = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 60), dtype=torch.uint8)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: bit-exact comparisons, and tiny models run many times faster on a busy machine."""
    with cpu_threads(1):
        yield


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="available presets: .*cpu-moe"):
        get_preset("huge")
    with pytest.raises(SystemExit):
        main(["--preset", "huge"])


def test_presets_dense_and_moe_twins_have_equal_active_ffn_width():
    for size in ("cpu", "gpu"):
        dense = PRESETS[f"{size}-dense"].model
        moe, best = PRESETS[f"{size}-moe"].model, PRESETS[f"{size}-best"].model
        for m in (moe, best):
            assert (m.top_k + m.n_shared) * m.expert_hidden == dense.d_hidden
            assert (m.d_model, m.n_layer, m.block_size) == (dense.d_model, dense.n_layer, dense.block_size)
        # the recipe and the plain MoE hold the same total routed width, so they compare at equal size too
        assert moe.n_experts * moe.expert_hidden == best.n_experts * best.expert_hidden
        assert best.bias_update_rate > 0 and best.aux_loss_coef == 0 and best.router_score == "sigmoid"
        # equal tokens and schedule; each model keeps its own tuned learning rate
        trains = [replace(PRESETS[f"{size}-{name}"].train, lr=0) for name in ("dense", "moe", "best")]
        assert trains[0] == trains[1] == trains[2]


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_smoke_training_learns_records_load_and_checkpoints(tmp_path):
    preset = get_preset("smoke")
    cfg = replace(preset.train, steps=60, lr=1e-2, eval_every=30)
    torch.manual_seed(0)
    model = TinyLM(preset.model)
    before = evaluate(model, TEXT, batch_size=4, n_batches=2)
    hist = train(model, TEXT, TEXT, cfg, device=torch.device("cpu"), progress=False)
    assert before == pytest.approx(math.log(256), abs=0.3)
    assert hist.val_loss[-1] < before - 2.0  # a repeated sentence is easy
    assert hist.val_step == [30, 60]
    assert len(hist.load) == len(hist.step) == 6
    assert len(hist.load[0]) == len(model.moe_layers()) == 2
    assert all(sum(layer) == pytest.approx(1.0) for point in hist.load for layer in point)
    assert hist.tokens_per_s > 0
    path = save_checkpoint(tmp_path / "ck.pt", model, hist, cfg)
    loaded, hist2 = load_checkpoint(path)
    assert hist2.val_loss == hist.val_loss
    x = TEXT[:32].long().unsqueeze(0)
    model.eval()
    assert torch.allclose(loaded(x)[0], model(x)[0], atol=1e-6)


def test_training_is_deterministic():
    preset = get_preset("smoke")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = TinyLM(preset.model)
        runs.append(train(model, TEXT, TEXT, preset.train, device=torch.device("cpu"), progress=False).train_loss)
    assert runs[0] == runs[1]


# --------------------------------------------------------------------------------------------- resuming

def weights(model: TinyLM) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_run(a: History, b: History) -> bool:
    """Every number of the two histories but the timings is identical."""
    timing = ("seconds", "tokens_per_s")
    return {k: v for k, v in asdict(a).items() if k not in timing} == {
        k: v for k, v in asdict(b).items() if k not in timing}


# smoke as it is, and smoke with dropout (draws from torch's RNG) and the loss-free routing bias (a buffer)
RESUME_MODELS = {
    "smoke": get_preset("smoke").model,
    "smoke+dropout+bias": replace(get_preset("smoke").model, dropout=0.1, router_score="sigmoid",
                                  aux_loss_coef=0.0, bias_update_rate=1e-2),
}


@pytest.mark.parametrize("name", sorted(RESUME_MODELS))
def test_resume_is_bit_exact_with_one_go(name, tmp_path):
    model_cfg, cfg = RESUME_MODELS[name], get_preset("smoke").train  # 20 steps, log every 10, eval every 10
    torch.manual_seed(0)
    plain = train(TinyLM(model_cfg), TEXT, TEXT, cfg, device=CPU, progress=False)
    torch.manual_seed(0)
    model = TinyLM(model_cfg)

    def save(hist: History, state: dict) -> None:  # every 7 steps: mid log interval, with pending sums
        save_checkpoint(tmp_path / f"step{state['step']}.pt", model, hist, cfg, state=state)

    one_go = train(model, TEXT, TEXT, cfg, device=CPU, progress=False, checkpoint_every=7, on_checkpoint=save)
    assert same_run(one_go, plain)  # checkpointing does not disturb the run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step14.pt", "step20.pt", "step7.pt"]  # no .tmp left
    final = weights(model)
    for done in (7, 14):
        blob = read_checkpoint(tmp_path / f"step{done}.pt")
        assert blob["train_state"]["step"] == done
        assert blob["history"]["step"] == ([10] if done == 14 else [])
        for _ in range(2):  # the blob is not changed by resuming from it
            torch.manual_seed(123)  # a different init and RNG: all of it must come from the checkpoint
            resumed_model = TinyLM(model_cfg)
            resumed = train(resumed_model, TEXT, TEXT, cfg, device=CPU, progress=False, resume=blob)
            assert same_run(resumed, one_go)
            assert resumed.step == [10, 20] and resumed.val_step == [10, 20]  # the history continues
            assert all(torch.equal(final[k], v) for k, v in resumed_model.state_dict().items())
            # tokens/s and seconds are of the whole run, the part before the checkpoint included
            assert resumed.seconds > blob["history"]["seconds"] > 0
            assert resumed.tokens_per_s * resumed.seconds == pytest.approx(20 * 4 * 32)


def test_resume_without_the_rng_state_would_differ(tmp_path):
    """The bit-exact test can fail: drop the batch sampler's state and the resumed run changes."""
    model_cfg, cfg = RESUME_MODELS["smoke"], get_preset("smoke").train
    torch.manual_seed(0)
    model = TinyLM(model_cfg)
    blobs = {}
    one_go = train(model, TEXT, TEXT, cfg, device=CPU, progress=False, checkpoint_every=10,
                   on_checkpoint=lambda h, s: blobs.setdefault(s["step"], save_checkpoint(
                       tmp_path / f"{s['step']}.pt", model, h, cfg, state=s)))
    blob = read_checkpoint(blobs[10])
    blob["train_state"]["generator"] = torch.Generator().manual_seed(cfg.seed).get_state()
    resumed = train(TinyLM(model_cfg), TEXT, TEXT, cfg, device=CPU, progress=False, resume=blob)
    assert resumed.train_loss[0] == one_go.train_loss[0] and resumed.train_loss[1] != one_go.train_loss[1]


def test_resume_refuses_a_finished_run_and_an_old_checkpoint(tmp_path):
    preset = get_preset("smoke")
    cfg = replace(preset.train, steps=4)
    model = TinyLM(preset.model)
    states = []
    train(model, TEXT, TEXT, cfg, device=CPU, progress=False, on_checkpoint=lambda h, s: states.append(
        save_checkpoint(tmp_path / "done.pt", model, h, cfg, state=s)))
    blob = read_checkpoint(states[-1])
    with pytest.raises(ValueError, match=r"has done 4 of cfg.steps=4 steps; raise cfg.steps"):
        train(TinyLM(preset.model), TEXT, TEXT, cfg, device=CPU, progress=False, resume=blob)
    longer = train(TinyLM(preset.model), TEXT, TEXT, replace(cfg, steps=6), device=CPU, progress=False,
                   resume=blob)
    assert longer.step == [4, 6]
    save_checkpoint(tmp_path / "plain.pt", model)  # no training state
    with pytest.raises(ValueError, match="holds no training state"):
        train(TinyLM(preset.model), TEXT, TEXT, cfg, device=CPU, progress=False,
              resume=read_checkpoint(tmp_path / "plain.pt"))
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
        train(TinyLM(preset.model), TEXT, TEXT, cfg, device=CPU, progress=False, checkpoint_every=0)


def test_old_checkpoint_without_the_new_keys_still_loads(tmp_path):
    model = TinyLM(get_preset("smoke").model)
    hist = History(step=[10], train_loss=[3.0], aux_loss=[0.01], val_step=[10], val_loss=[3.1], load=[[[0.5, 0.5]]])
    old = {"model_config": model.cfg.to_dict(), "state_dict": model.state_dict(),  # the format before resuming
           "train_config": asdict(get_preset("smoke").train), "history": hist.to_dict()}
    torch.save(old, tmp_path / "old.pt")
    loaded, loaded_hist = load_checkpoint(tmp_path / "old.pt")
    assert loaded_hist == hist
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                 strict=True))


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    model = TinyLM(get_preset("smoke").model)
    path = save_checkpoint(tmp_path / "ck.pt", model)
    before = path.read_bytes()

    def dies_half_way(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model)
    assert path.read_bytes() == before  # the old checkpoint is intact


# ------------------------------------------------------------------------------------------ command line

def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """Run the CLI on 30 kB of the corpus, on the CPU; return its summary line's fields."""
    assert main([*argv, "--max-bytes", "30000", "--device", "cpu"] if "--resume" not in argv
                else [*argv, "--device", "cpu"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("summary ")
    return dict(item.split("=", 1) for item in last.split()[1:])


@pytest.fixture
def corpus_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_COURSE_CACHE", str(tmp_path / "cache"))


def test_cli_summary_line_and_json_match_the_saved_history(tmp_path, corpus_cache, capsys):
    summary = run_cli(["--preset", "smoke", "--steps", "6", "--top-k", "1", "--out", str(tmp_path),
                       "--json", str(tmp_path / "run.json")], capsys)
    model, hist = load_checkpoint(tmp_path / "smoke.pt")
    assert list(summary) == ["preset", "steps", "tokens", "val_loss", "val_bpb", "total_params", "active_params",
                             "tokens_per_s", "seconds", "device", "checkpoint"]
    total, active = count_model(model)
    assert summary["preset"] == "smoke" and summary["device"] == "cpu"
    assert int(summary["steps"]) == hist.step[-1] == 6
    assert int(summary["tokens"]) == 6 * 4 * 32
    assert float(summary["val_loss"]) == pytest.approx(hist.val_loss[-1], abs=5e-4)
    assert float(summary["val_bpb"]) == pytest.approx(hist.val_loss[-1] / math.log(2), abs=5e-4)
    assert (int(summary["total_params"]), int(summary["active_params"])) == (total, active)
    assert active < count_model(TinyLM(get_preset("smoke").model))[1]  # --top-k 1 reached the model
    assert float(summary["tokens_per_s"]) == pytest.approx(hist.tokens_per_s, abs=0.5)
    assert float(summary["seconds"]) == pytest.approx(hist.seconds, abs=0.05)
    assert summary["checkpoint"] == str(tmp_path / "smoke.pt")
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["history"] == hist.to_dict()
    assert data["val_loss"] == hist.val_loss[-1] and data["tokens"] == 6 * 4 * 32
    assert (data["total_params"], data["active_params"]) == (total, active)
    assert data["overrides"] == {"top_k": 1, "steps": 6}
    assert ModelConfig(**data["model_config"]) == model.cfg and data["train_config"]["steps"] == 6
    blob = read_checkpoint(tmp_path / "smoke.pt")
    assert (blob["preset"], blob["overrides"], blob["max_bytes"]) == ("smoke", {"top_k": 1, "steps": 6}, 30000)


def test_cli_resume_is_bit_exact_with_one_go(tmp_path, corpus_cache, capsys, monkeypatch):
    saved = []

    def keep_a_copy(path, *args, **kwargs):  # the CLI rewrites one file; keep each version
        out = save_checkpoint(path, *args, **kwargs)
        saved.append(shutil.copy(out, tmp_path / f"copy{kwargs['state']['step']}.pt"))
        return out

    monkeypatch.setattr(train_module, "save_checkpoint", keep_a_copy)
    one_go = run_cli(["--preset", "smoke", "--lr", "0.01", "--save-every", "8", "--out", str(tmp_path / "a")],
                     capsys)
    assert [Path(p).name for p in saved] == ["copy8.pt", "copy16.pt", "copy20.pt"]  # every 8 steps and the end
    monkeypatch.undo()
    resumed = run_cli(["--resume", str(tmp_path / "copy8.pt"), "--out", str(tmp_path / "b")], capsys)
    a, b = read_checkpoint(tmp_path / "a" / "smoke.pt"), read_checkpoint(tmp_path / "b" / "smoke.pt")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert same_run(History(**a["history"]), History(**b["history"]))
    assert b["train_config"]["lr"] == 0.01 and b["overrides"] == {"lr": 0.01}  # kept from the checkpoint
    assert {k: v for k, v in resumed.items() if k not in ("tokens_per_s", "seconds", "checkpoint")} == {
        k: v for k, v in one_go.items() if k not in ("tokens_per_s", "seconds", "checkpoint")}
    # without --out the resumed run writes back to the file it came from
    run_cli(["--resume", str(tmp_path / "copy16.pt")], capsys)
    assert read_checkpoint(tmp_path / "copy16.pt")["train_state"]["step"] == 20


def test_cli_resume_refusals(tmp_path, corpus_cache, capsys):
    run_cli(["--preset", "smoke", "--steps", "4", "--out", str(tmp_path)], capsys)
    ck = str(tmp_path / "smoke.pt")

    def refused(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    assert f"argument --resume: {ck} is complete (4 of 4 steps); pass --steps larger than 4" in refused(
        ["--resume", ck])
    err = refused(["--resume", ck, "--steps", "8", "--set", "n_experts=8", "--aux-loss", "0.02"])
    assert "argument --resume: n_experts=8 would change the model's shape (the checkpoint has n_experts=4)" in err
    err = refused(["--resume", ck, "--steps", "8", "--set", "d_model=64", "--expert-hidden", "16"])
    assert "d_model=64, expert_hidden=16 would change the model's shape (the checkpoint has d_model=32, " \
           "expert_hidden=32)" in err
    assert "argument --preset: not allowed with --resume" in refused(["--resume", ck, "--preset", "smoke"])
    assert "was trained with --max-bytes 30000" in refused(["--resume", ck, "--steps", "8", "--max-bytes", "40000"])
    assert "argument --resume: no checkpoint file at" in refused(["--resume", str(tmp_path / "nope.pt")])
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert "argument --resume: cannot read" in refused(["--resume", str(tmp_path / "junk.pt")])
    old = read_checkpoint(ck)
    torch.save({k: old[k] for k in ("model_config", "state_dict", "train_config", "history")}, tmp_path / "old.pt")
    assert "holds no training state" in refused(["--resume", str(tmp_path / "old.pt"), "--steps", "8"])
    # settings that keep every shape may change: a dry run shows what would resume
    assert main(["--resume", ck, "--steps", "8", "--aux-loss", "0.02", "--top-k", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"preset smoke from step 4 of {ck}" in out and "aux_loss_coef=0.02" in out and "steps=8" in out


@pytest.mark.parametrize(("native", "emulated", "expected"), [
    (True, True, torch.bfloat16),    # Ampere and newer: native bf16, no scaler
    (False, True, torch.float16),    # Colab's T4 (sm_75): bf16 only emulated, so fp16 with a GradScaler
    (False, False, torch.float16),   # older GPUs
])
def test_amp_dtype_uses_native_bf16_only(monkeypatch, native, emulated, expected):
    from moe_course.train import amp_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: emulated if including_emulation else native)
    assert amp_dtype(torch.device("cuda")) == expected
    assert amp_dtype(torch.device("cuda"), enabled=False) == torch.float32
    assert amp_dtype(torch.device("cpu")) == torch.float32


def test_amp_dtype_on_a_torch_without_the_emulation_flag(monkeypatch):
    from moe_course.train import amp_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # torch < 2.3: native support only
    assert amp_dtype(torch.device("cuda")) == torch.float16
