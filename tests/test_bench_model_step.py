"""The training-step benchmark (benchmarks/bench_model_step.py): layouts, the profile breakdown, the command line."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_model_step as bench  # noqa: E402

from moe_course.experts import HAS_GROUPED_MM  # noqa: E402
from moe_course.model import TinyLM  # noqa: E402
from moe_course.train import get_preset  # noqa: E402


def _smoke_configs(size: str = "cpu", experts: str = "grouped") -> dict:
    """Smoke-sized stand-ins for the three presets: a dense twin, a top-2 MoE and a recipe-like MoE."""
    moe = replace(get_preset("smoke").model, experts=experts)
    dense = replace(moe, ffn="dense", d_hidden=moe.top_k * moe.expert_hidden)
    best = replace(moe, n_experts=8, expert_hidden=moe.expert_hidden // 2, n_shared=2, router_score="sigmoid")
    return {"dense": (dense, 2), "moe": (moe, 2), "best": (best, 2)}


def test_variants_keep_the_active_width_and_name_their_shape():
    moe = get_preset("cpu-moe").model
    variants = bench.variant_configs(moe)
    assert list(variants) == ["4 experts, top-2, width 128", "16 experts, top-2, width 128",
                              "8 experts, top-1, width 256", "16 experts, top-4, width 64",
                              "8 experts, top-2, width 128, ModuleList"]
    for name, cfg in variants.items():
        assert cfg.top_k * cfg.expert_hidden == moe.top_k * moe.expert_hidden, name
        assert (cfg.d_model, cfg.n_layer, cfg.aux_loss_coef) == (moe.d_model, moe.n_layer, moe.aux_loss_coef)
    assert variants["8 experts, top-2, width 128, ModuleList"].experts == "list"
    top1 = bench.variant_configs(replace(moe, top_k=1))  # no top-0 layouts; half of the experts still >= top-k
    assert all(cfg.top_k >= 1 and cfg.n_experts >= cfg.top_k for cfg in top1.values())


def test_widened_presets_scale_every_width_together_and_keep_active_parameters_equal():
    from moe_course.params import count_model

    configs = bench.preset_configs("cpu")
    wide = bench.widened_configs(configs, 256)
    assert wide["dense"][0].d_model == 256 and wide["dense"][0].d_hidden == 2 * configs["dense"][0].d_hidden
    assert wide["moe"][0].expert_hidden == 2 * configs["moe"][0].expert_hidden
    for kind in ("moe", "best"):
        cfg, batch = wide[kind]
        assert (cfg.n_experts, cfg.top_k, cfg.n_shared, cfg.n_layer, batch) == \
            (configs[kind][0].n_experts, configs[kind][0].top_k, configs[kind][0].n_shared, 4, configs[kind][1])
    active = {kind: count_model(TinyLM(cfg))[1] for kind, (cfg, _) in wide.items()}
    assert max(active.values()) / min(active.values()) < 1.02  # equal but for the routers
    with pytest.raises(ValueError, match="d_model=130 must be a multiple of n_head=4"):
        bench.widened_configs(configs, 130)


@pytest.mark.parametrize("experts", ["grouped", "list"])
def test_profile_counts_the_per_expert_multiplies_as_grouped_gemm(experts):
    torch.manual_seed(0)
    cfg, batch = _smoke_configs(experts=experts)["moe"]
    model = TinyLM(cfg).train()
    x, y = bench.make_batch(cfg, batch, torch.device("cpu"))
    prof = bench.profile_step(bench.train_step(model, x, y, amp=False), torch.device("cpu"), steps=2)
    cats = prof["categories_ms"]
    assert prof["steps"] == 2 and prof["clock"] == "CPU"
    assert prof["ms_per_step"] == pytest.approx(sum(cats.values()), rel=1e-2)
    grouped_ops = [row["op"] for row in prof["top_ops"] if row["op"].endswith(bench.IN_GROUPED)]
    if experts == "grouped" and HAS_GROUPED_MM:
        # forward: 3 projections x n_experts per layer; backward: 2 per projection and expert
        assert cats["grouped GEMM"] > 0 and "aten::mm" + bench.IN_GROUPED in grouped_ops
        mm = next(r for r in prof["top_ops"] if r["op"] == "aten::mm" + bench.IN_GROUPED)
        assert mm["calls"] == cfg.n_layer * 3 * cfg.n_experts * 3
    else:  # the list layout, or GroupedExperts' per-expert loop on a torch without grouped_mm: plain GEMMs
        assert "grouped GEMM" not in cats and not grouped_ops
    assert cats["GEMM"] > 0 and cats["optimizer"] > 0


def test_extra_time_subtracts_the_reference_category_by_category():
    profiles = {"dense": {"categories_ms": {"GEMM": 10.0, "optimizer": 1.0}},
                "moe": {"categories_ms": {"GEMM": 4.0, "grouped GEMM": 8.0, "optimizer": 1.5}}}
    assert bench.extra_time(profiles) == {"moe": {"GEMM": -6.0, "grouped GEMM": 8.0, "optimizer": 0.5}}


def test_the_command_line_writes_rows_variants_and_profile(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "preset_configs", _smoke_configs)
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--threads", "1", "--repeats", "1", "--clock", "cpu", "--variants",
                       "--profile", "1", "--widths", "48", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert list(data["rows"]) == ["dense", "moe", "best"]  # the variants have their own section
    assert set(data["variants"]) == set(bench.variant_configs(_smoke_configs()["moe"][0]))
    for row in data["variants"].values():
        assert row["ratio_best"] == pytest.approx(row["best_ms"] / data["rows"]["dense"]["best_ms"])
    assert set(data["profile"]) == {"dense", "moe", "best"}
    assert ("grouped GEMM" in data["profile"]["moe"]["categories_ms"]) is HAS_GROUPED_MM
    assert set(data["widths"]) == {"48"} and data["widths"]["48"]["ratio_best"] > 0
    assert data["widths"]["48"]["dense_ms"] > 0 and data["widths"]["48"]["recipe_ratio_best"] > 0
    assert "all matrix multiplies" in printed and "variant 2 experts, top-2, width 32" in printed
    assert "widened to d_model 48" in printed
