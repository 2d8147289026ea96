"""Notebook 08's experiments, figures, MFU and the course-wide results table."""

import json
import math
from dataclasses import replace

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from moe_course.course import course_table  # noqa: E402
from moe_course.experiments import EXPERIMENTS, load_result  # noqa: E402
from moe_course.experiments.capstone import EQUAL_TIME_STEPS  # noqa: E402
from moe_course.metrics import mfu, paired_gaps  # noqa: E402
from moe_course.model import ModelConfig, TinyLM  # noqa: E402
from moe_course.params import count_model, train_flops_per_token  # noqa: E402
from moe_course.plots.capstone import plot_expert_sweep, plot_seed_curves, plot_tuning  # noqa: E402


@pytest.mark.parametrize("size", ["smoke", "cpu", "gpu"])
def test_capstone_models_have_equal_active_parameters_and_tokens(size):
    runs = {r.label: r for r in EXPERIMENTS["capstone"].runs(size)}
    dense_active = count_model(TinyLM(runs["dense"].model))[1]
    for label in ("MoE top-2", "MoE recipe"):
        total, active = count_model(TinyLM(runs[label].model))
        cfg = runs[label].model
        router = cfg.n_layer * cfg.d_model * cfg.n_experts  # the only extra active weights
        assert active == dense_active + router, label
        assert size == "smoke" or total > 2.5 * dense_active, label  # smoke: the embeddings dominate
        # equal tokens and schedule; each model trains at its own tuned learning rate (the presets')
        assert replace(runs[label].train, lr=0, warmup=0) == replace(runs["dense"].train, lr=0, warmup=0)
        assert runs[label].val == runs["dense"].val == ("all" if size == "smoke" else "test")
    # the recipe and the plain MoE hold the same expert parameters: they differ in recipe only
    moe, best = runs["MoE top-2"].model, runs["MoE recipe"].model
    assert moe.n_experts * moe.expert_hidden == best.n_experts * best.expert_hidden
    if size != "gpu":
        assert runs["dense, equal time"].train.steps == round(EQUAL_TIME_STEPS * runs["dense"].train.steps)
    else:
        assert "dense, equal time" not in runs


def test_expert_sweep_keeps_active_width_and_grows_total():
    runs = EXPERIMENTS["experts_sweep"].runs("cpu")
    best = {r.label: r for r in EXPERIMENTS["capstone"].runs("cpu")}["MoE recipe"].model
    actives, totals = set(), []
    for run in runs:
        total, active = count_model(TinyLM(run.model))
        actives.add(active - run.model.n_layer * run.model.d_model * run.model.n_experts)  # minus the router
        totals.append(total)
        assert (run.model.top_k, run.model.expert_hidden, run.model.n_shared) == (best.top_k, best.expert_hidden,
                                                                                   best.n_shared)
    assert len(actives) == 1 and totals == sorted(totals) and len(set(totals)) == len(totals)


def test_train_flops_and_mfu_by_hand():
    cfg = ModelConfig(ffn="dense", vocab_size=256, block_size=8, n_layer=1, n_head=1, d_model=4, d_hidden=8)
    model = TinyLM(cfg)
    # matmul weights: tied embedding/head 256*4, qkv 4*12, proj 4*4, SwiGLU 3*4*8, norms 3*4 -> 1,196
    assert count_model(model)[1] - 8 * 4 == 1196
    assert train_flops_per_token(model) == 6 * 1196 + 6 * 1 * 8 * 4
    flops = 6_196_608
    assert mfu(1e6, flops, "NVIDIA H100 80GB HBM3") == pytest.approx(1e6 * flops / 989e12)
    assert mfu(1e6, 1.0, "NVIDIA H100 PCIe") == pytest.approx(1e6 / 756e12)
    assert mfu(1e6, 1.0, "some accelerator") is None


def test_seed_curves_draw_a_line_per_seed_and_a_mean():
    curves = {"dense": [([1, 2, 3], [3.0, 2.5, 2.0]), ([1, 2, 3], [3.2, 2.4, 2.2])],
              "MoE": [([1, 2, 3], [2.9, 2.2, 1.8])]}
    fig = plot_seed_curves(curves)
    ax = fig.axes[0]
    means = [line for line in ax.get_lines() if line.get_linewidth() > 2]
    assert len(ax.get_lines()) == 4 and len(means) == 2
    assert means[0].get_ydata().tolist() == pytest.approx([3.1, 2.45, 2.1])
    # every legend entry is a line that is drawn: no "mean of 1" for a single seed
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dense (mean of 2 seeds)", "MoE"]
    with pytest.raises(ValueError, match="curves\\['x'\\] is empty"):
        plot_seed_curves({"x": []})


def test_expert_sweep_plot_means_and_labels():
    fig = plot_expert_sweep({1: [2.0, 2.2], 4: [1.9, 1.9], 16: [1.7]}, totals={1: 700_000, 16: 2_100_000})
    ax = fig.axes[0]
    mean_line = [line for line in ax.get_lines() if line.get_marker() == "o"][0]
    assert mean_line.get_ydata().tolist() == pytest.approx([2.1, 1.9, 1.7])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1 (dense)", "4", "16"]
    assert {t.get_text() for t in ax.texts} == {"0.7M", "2.1M"}
    with pytest.raises(ValueError, match="points is empty"):
        plot_expert_sweep({})
    fig = plot_expert_sweep({4: [2.0], 16: [1.8]}, fit=(math.log(2.0), -0.076, [4, 16]))
    dashed = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"][0]
    assert dashed.get_ydata()[0] == pytest.approx(2.0 * 4 ** -0.076) and dashed.get_label() == "fit: L ∝ E^-0.076"


def test_course_table_reads_every_source():
    rows = course_table.course_rows()
    assert [r.notebook for r in rows] == [f"{i:02d}" for i in range(10)]
    assert all(r.measured and not r.measured.startswith("missing") for r in rows), [r.measured for r in rows]
    # the numbers are the stored ones, not typed in
    capped = load_result("aux_sweep_capacity", "cpu")
    assert f"MaxVio {capped.mean('alpha=0', 'max_vio'):.2f}" in rows[4].measured
    assert f"dropped {capped.mean('alpha=0', 'drop_rate'):.1%}" in rows[4].measured
    free = load_result("aux_sweep", "cpu")
    dropless = paired_gaps(free.test_losses("alpha=0"), free.test_losses("alpha=0.01"))
    assert f"dropless: paired gap {dropless.interval()}" in rows[4].measured
    assert "671B total" in rows[0].measured
    text = course_table.format_rows(rows)
    assert text.count("measured") == 10 and "arXiv:2401.06066" in text


def test_course_table_names_the_missing_source(tmp_path):
    rows = course_table.course_rows(results_dir=tmp_path, solutions_dir=tmp_path)
    by_nb = {r.notebook: r for r in rows}
    assert "671B" in by_nb["00"].measured  # computed, needs no file
    assert "python -m moe_course.experiments run aux_sweep_capacity --size cpu" in by_nb["04"].measured
    assert "no executed solution notebook 01_" in by_nb["01"].measured


def test_course_table_reads_the_notebook_output(tmp_path):
    cell = {"cell_type": "code", "source": "", "metadata": {}, "outputs": [
        {"output_type": "stream", "name": "stdout",
         "text": "competitive: specialised in 3 of 5 runs\ncooperative: specialised in 0 of 5 runs\n"}]}
    (tmp_path / "01_x.ipynb").write_text(json.dumps({"cells": [cell]}))
    row = {r.notebook: r for r in course_table.course_rows(solutions_dir=tmp_path)}["01"]
    assert row.measured.startswith("one expert per regime in 3/5 runs (competitive) vs 0/5")
    (tmp_path / "01_x.ipynb").write_text(json.dumps({"cells": []}))
    row = {r.notebook: r for r in course_table.course_rows(solutions_dir=tmp_path)}["01"]
    assert "re-execute it" in row.measured


def test_capstone_probe_records_tables_and_a_sample():
    from moe_course.corpus import load_corpus
    from moe_course.experiments import train_run

    torch.set_num_threads(1)
    run = {r.label: r for r in EXPERIMENTS["capstone"].runs("smoke")}["MoE recipe"]
    rec = train_run(run, 0, load_corpus(max_bytes=40_000), "smoke")
    tables = rec.extra["type_tables"]
    assert len(tables) == run.model.n_layer and len(tables[0][0]) == run.model.n_experts
    assert sum(map(sum, tables[0])) == 32 * 16 * run.model.block_size  # n_batches x batch x block
    by_byte = rec.extra["by_byte"]
    assert len(by_byte["mi_given_byte"]) == run.model.n_layer and 0 <= by_byte["mi_type_whitespace"] <= by_byte[
        "mi_type_byte"] + 1e-9  # a function of the byte tells at most what the byte does
    assert rec.extra["sample"].startswith("def ") and len(rec.extra["sample"].encode("utf-8", "replace")) >= 4
    assert all(math.isfinite(v) for v in rec.extra["mi"])


def test_tuning_gives_every_model_the_same_grid_on_the_tuning_half():
    from moe_course.experiments.capstone import CAPSTONE_LABELS, TUNING_LRS, TUNING_WARMUPS, tuning_label

    runs = {r.label: r for r in EXPERIMENTS["capstone_tuning"].runs("cpu")}
    race = {r.label: r for r in EXPERIMENTS["capstone"].runs("cpu")}
    assert len(TUNING_LRS) * len(TUNING_WARMUPS) >= 6 and len(runs) == 3 * len(TUNING_LRS) * len(TUNING_WARMUPS)
    for label in CAPSTONE_LABELS:
        for lr in TUNING_LRS:
            for w in TUNING_WARMUPS:
                run = runs[tuning_label(label, lr, w)]
                assert run.val == "tune" and (run.train.lr, run.train.warmup) == (lr, w)
                assert run.model == race[label].model  # the same model the race reports
                assert replace(run.train, lr=0, warmup=0) == replace(race[label].train, lr=0, warmup=0)


def test_cpu_presets_hold_the_tuning_sweeps_choice():
    from moe_course.experiments.capstone import tuning_choice
    from moe_course.train import get_preset

    choice = tuning_choice(load_result("capstone_tuning", "cpu"))
    for label, name in (("dense", "cpu-dense"), ("MoE top-2", "cpu-moe"), ("MoE recipe", "cpu-best")):
        train = get_preset(name).train
        assert (train.lr, train.warmup) == (choice[label]["lr"], choice[label]["warmup"]), name


def test_tuning_choice_takes_the_lowest_tuning_loss():
    from moe_course.experiments.capstone import tuning_choice, tuning_label
    from moe_course.experiments.runner import ExperimentResult, RunRecord, _configs, fingerprint

    runs = EXPERIMENTS["capstone_tuning"].runs("smoke")
    losses = {r.label: 3.0 + i / 100 for i, r in enumerate(runs)}
    losses[tuning_label("MoE recipe", 3e-3, 100)] = 1.0
    result = ExperimentResult("capstone_tuning", "smoke", [0], fingerprint("capstone_tuning", "smoke"), _configs(runs),
                              [RunRecord(label, 0, val_loss=[loss]) for label, loss in losses.items()])
    choice = tuning_choice(result)
    assert choice["MoE recipe"] == {"lr": 3e-3, "warmup": 100, "val_loss": 1.0}
    assert choice["dense"] == {"lr": 1.5e-3, "warmup": 30, "val_loss": 3.0}


def test_tuning_plot_rings_the_choice():
    grid = {"a": {(1e-3, 30): 2.0, (1e-3, 100): 1.9, (3e-3, 30): 1.8, (3e-3, 100): 2.2},
            "b": {(1e-3, 30): 2.5, (1e-3, 100): 2.4, (3e-3, 30): 2.6, (3e-3, 100): 2.3}}
    fig = plot_tuning(grid, {"a": (3e-3, 30), "b": (3e-3, 100)})
    assert len(fig.axes) == 2 and [ax.get_title() for ax in fig.axes] == ["a", "b"]
    ringed = [c.get_offsets().tolist() for c in fig.axes[0].collections]
    assert [[3e-3, 1.8]] in ringed
    with pytest.raises(ValueError, match="losses is empty"):
        plot_tuning({}, {})


def test_validation_halves_split_the_files_by_path():
    from moe_course.corpus import load_corpus, val_part_of

    c = load_corpus()
    tune, test = c.val_part("tune"), c.val_part("test")
    assert len(tune[0]) + len(test[0]) == len(c.val) and len(tune[0]) == len(tune[1])
    parts = {val_part_of(name) for name in c.files_val}
    assert parts == {"tune", "test"}
    text = c.decode(test[0])
    assert all((f"# ==== {n} ====" in text) == (val_part_of(n) == "test") for n in c.files_val)
    with pytest.raises(ValueError, match="part must be one of 'tune', 'test'"):
        c.val_part("train")
    small = load_corpus(max_bytes=40_000)  # its validation tenth holds one file, a test file
    with pytest.raises(ValueError, match="no validation file of part 'tune'"):
        small.val_part("tune")


def test_a_run_can_validate_on_one_half():
    from moe_course.corpus import load_corpus
    from moe_course.experiments import Run, base_model, base_train, train_run

    torch.set_num_threads(1)
    c = load_corpus(max_bytes=700_000)  # enough validation text for both halves
    run = Run("x", base_model("smoke"), base_train("smoke"), val="tune")
    a, b = train_run(run, 0, c, "smoke"), train_run(replace(run, val="test"), 0, c, "smoke")
    assert a.train_loss == b.train_loss and a.val_loss != b.val_loss  # same training, other validation text


PROSE_CELLS = ("tuning-prose", "race-prose", "moe-diff-prose", "time-prose", "sweep-prose", "load-prose",
               "rates-prose", "gpt4-prose", "recap", "4e564fd7")


def test_notebook_08_prose_numbers_are_printed_by_its_cells():
    """Every number with two or more decimals in 08's result paragraphs is one its cells print (or a stored
    result gives), so prose and outputs cannot drift apart."""
    import re
    from pathlib import Path

    import nbformat

    nb = nbformat.read(Path(__file__).resolve().parents[1] / "solutions" / "08_capstone.ipynb", as_version=4)
    printed = "\n".join(o.get("text", "") or o.get("data", {}).get("text/plain", "")
                        for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    prose = {c.get("id"): c.source for c in nb.cells if c.cell_type == "markdown"}
    missing = []
    for cid in PROSE_CELLS:
        assert cid in prose, f"08 has no markdown cell {cid!r}"
        assert "@@" not in prose[cid], f"cell {cid} still holds a placeholder"
        for number in re.findall(r"(?<![\d.])[-+−]?\d+\.\d{2,}(?![\d])", prose[cid]):
            bare = number.replace("−", "-").lstrip("+")
            if bare not in printed and bare.lstrip("-") not in printed:
                missing.append(f"{cid}: {number}")
    assert not missing, "numbers in 08's prose that no cell prints: " + ", ".join(missing)
