import math
from dataclasses import replace

import pytest
import torch

from moe_course.model import TinyLM
from moe_course.train import (
    PRESETS,
    TrainConfig,
    evaluate,
    get_preset,
    load_checkpoint,
    lr_at,
    main,
    save_checkpoint,
    train,
)

# a tiny, very learnable "corpus": a repeated sentence
TEXT = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 60), dtype=torch.uint8)


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


def test_cli_lists_presets(capsys):
    assert main(["--list"]) == 0
    assert "cpu-moe" in capsys.readouterr().out


def test_cli_trains_a_preset_on_the_corpus_and_saves_a_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOE_COURSE_CACHE", str(tmp_path / "cache"))
    rc = main(["--preset", "smoke", "--steps", "4", "--max-bytes", "30000", "--out", str(tmp_path), "--device", "cpu"])
    assert rc == 0
    assert "final val loss" in capsys.readouterr().out
    model, hist = load_checkpoint(tmp_path / "smoke.pt")
    assert hist.step[-1] == 4 and model.cfg.n_layer == 2
