"""Parameter accounting: published models against their authors' figures, and counts of real modules."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_course.params import (
    PUBLISHED,
    MoEConfig,
    active_params,
    active_params_from_config,
    count_model,
    flops_per_token,
    get_published,
    memory_bytes,
    moe_layer_indices,
    param_breakdown,
    published_table,
    total_params,
    total_params_from_config,
)

REQUIRED = [
    "Mixtral 8x7B", "Mixtral 8x22B", "DeepSeek-V3", "Qwen3-235B-A22B", "DBRX", "Llama 4 Maverick", "Grok-1",
]


def tiny_config(**overrides: object) -> MoEConfig:
    base = dict(name="tiny", vocab_size=10, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4,
                moe_intermediate_size=6, n_routed_experts=4, top_k=2)
    base.update(overrides)
    return MoEConfig(**base)  # type: ignore[arg-type]


# -- published models ---------------------------------------------------------------------------------


def test_required_models_present() -> None:
    for name in REQUIRED:
        assert name in PUBLISHED
    for cfg in PUBLISHED.values():
        assert cfg.source and len(cfg.release) == 7 and cfg.published_total


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_total_within_2_percent(name: str) -> None:
    cfg = PUBLISHED[name]
    assert total_params(cfg) == pytest.approx(cfg.published_total, rel=0.02)


@pytest.mark.parametrize("name", [n for n, c in PUBLISHED.items() if c.published_active is not None])
def test_published_active_within_2_percent(name: str) -> None:
    cfg = PUBLISHED[name]
    assert active_params(cfg) == pytest.approx(cfg.published_active, rel=0.02)


def test_grok_active_is_derived_not_published() -> None:
    grok = PUBLISHED["Grok-1"]
    assert grok.published_active is None and "25%" in grok.notes
    share = active_params(grok) / total_params(grok)
    assert 0.2 < share < 0.3  # "25% of the weights active on a given token"


def test_deepseek_v3_layout_and_attention() -> None:
    cfg = PUBLISHED["DeepSeek-V3"]
    assert cfg.n_moe_layers == 58 and cfg.n_dense_layers == 3 and "14B" in cfg.notes
    # q_a 7168x1536, q_b 1536x(128*192), kv_a 7168x576, kv_b 512x(128*256), o (128*128)x7168
    per_layer = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    assert per_layer == 187_105_280
    assert param_breakdown(cfg)["attention"] == 61 * per_layer


def test_llama4_maverick_alternates_layers() -> None:
    cfg = PUBLISHED["Llama 4 Maverick"]
    assert moe_layer_indices(cfg) == list(range(1, 48, 2))
    parts = param_breakdown(cfg)
    assert parts["dense_ffn"] == 24 * 3 * 5120 * 16384
    assert parts["shared_experts"] == 24 * 3 * 5120 * 8192


def test_mixtral_config_agrees_with_exercise_reference() -> None:
    cfg = PUBLISHED["Mixtral 8x7B"]
    kwargs = dict(d_model=4096, n_layers=32, vocab_size=32000, n_heads=32, n_kv_heads=8, head_dim=128,
                  ffn_hidden=14336, n_experts=8, top_k=2)
    assert total_params_from_config(**kwargs) == total_params(cfg)
    assert active_params_from_config(**kwargs) == active_params(cfg)
    assert round(total_params(cfg) / 1e9, 1) == 46.7 and round(active_params(cfg) / 1e9, 1) == 12.9


def test_exercise_reference_by_hand() -> None:
    kwargs = dict(d_model=8, n_layers=2, vocab_size=10, n_heads=2, n_kv_heads=1, head_dim=4, ffn_hidden=6,
                  n_experts=4, top_k=2)
    attention = 8 * 8 + 2 * 8 * 4 + 8 * 8  # 192
    expert = 3 * 8 * 6  # 144
    layer_total = attention + 4 * expert + 8 * 4 + 2 * 8
    layer_active = attention + 2 * expert + 8 * 4 + 2 * 8
    assert total_params_from_config(**kwargs) == 2 * 10 * 8 + 2 * layer_total + 8
    assert active_params_from_config(**kwargs) == 2 * 10 * 8 + 2 * layer_active + 8
    assert active_params_from_config(**kwargs, tied_embeddings=True) == 10 * 8 + 2 * layer_active + 8
    with pytest.raises(ValueError, match="top_k"):
        active_params_from_config(**{**kwargs, "top_k": 5})


# -- breakdown, FLOPs, memory --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_breakdown_sums_to_total_and_active(name: str) -> None:
    cfg = PUBLISHED[name]
    total, active = param_breakdown(cfg), param_breakdown(cfg, active=True)
    assert set(total) == {"embeddings", "attention", "dense_ffn", "routed_experts", "shared_experts",
                          "router", "norms"}
    assert sum(total.values()) == total_params(cfg)
    assert sum(active.values()) == active_params(cfg)
    assert all(v >= 0 for v in total.values())
    assert total["norms"] < 1e-4 * total_params(cfg)


def test_flops_by_hand() -> None:
    cfg = tiny_config()
    # active matmul weights per layer: attention 192, two experts 2*3*8*6=288, router 8*4=32 -> 512
    matmul = 2 * 512 + 10 * 8  # plus the output head; the input embedding is a lookup
    seq_len = 5
    attention_scores = 2 * 2 * seq_len * (2 * 4 + 2 * 4)
    assert flops_per_token(cfg, seq_len=seq_len) == 2 * matmul + attention_scores
    tied = tiny_config(tied_embeddings=True)
    assert flops_per_token(tied, seq_len=seq_len) == 2 * matmul + attention_scores  # head still runs
    assert flops_per_token(cfg, seq_len=0) == 2 * matmul


def test_flops_mla_uses_head_dims() -> None:
    cfg = PUBLISHED["DeepSeek-V3"]
    diff = flops_per_token(cfg, seq_len=1001) - flops_per_token(cfg, seq_len=1000)
    assert diff == 2 * 61 * 128 * (192 + 128)


def test_memory_bytes() -> None:
    cfg = PUBLISHED["Mixtral 8x7B"]
    assert memory_bytes(cfg) == 2 * total_params(cfg)
    assert memory_bytes(cfg, "fp32") == 4 * total_params(cfg)
    assert memory_bytes(cfg, "int4", active=True) == (active_params(cfg) + 1) // 2
    with pytest.raises(ValueError, match="unknown dtype"):
        memory_bytes(cfg, "fp12")


def test_published_table_rows() -> None:
    rows = published_table()
    assert [row["name"] for row in rows] == list(PUBLISHED)
    assert all(row["total"] >= row["active"] for row in rows)


# -- bad input -----------------------------------------------------------------------------------------


def test_top_k_larger_than_experts_is_rejected() -> None:
    with pytest.raises(ValueError, match="top_k=5 is larger than n_routed_experts=4"):
        tiny_config(top_k=5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ffn": "relu"}, "ffn must be"),
        ({"n_kv_heads": 3, "n_heads": 4}, "multiple of n_kv_heads"),
        ({"first_k_dense": 1}, "need an intermediate_size"),
        ({"d_model": 0}, "d_model must be a positive integer"),
        ({"attention": "mla"}, "MLA needs"),
    ],
)
def test_bad_configs(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_get_published() -> None:
    assert get_published("deepseek v3") is PUBLISHED["DeepSeek-V3"]
    assert get_published("Mixtral 8x7B") is PUBLISHED["Mixtral 8x7B"]
    with pytest.raises(ValueError, match="unknown model 'GPT-5'.*Mixtral 8x7B.*DeepSeek-V3"):
        get_published("GPT-5")


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PUBLISHED["DBRX"].top_k = 1  # type: ignore[misc]


# -- count_model on real modules -----------------------------------------------------------------------


class Expert(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d, h, bias=False)
        self.up = nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class TinyMoE(nn.Module):
    """The duck type count_model relies on: experts (ModuleList), n_experts, top_k, optional shared."""

    def __init__(self, d: int, h: int, n_experts: int, top_k: int, shared: bool = False) -> None:
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.router = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(d, h) for _ in range(n_experts))
        self.shared = Expert(d, h) if shared else None


class StackedMoE(nn.Module):
    """Experts stored as one stacked weight bank instead of a ModuleList."""

    def __init__(self, d: int, h: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.experts = nn.Module()
        self.experts.w_in = nn.Parameter(torch.zeros(n_experts, d, 2 * h))
        self.experts.w_out = nn.Parameter(torch.zeros(n_experts, h, d))


class TinyLM(nn.Module):
    def __init__(self, moe: type[nn.Module] = TinyMoE, **kwargs: object) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(moe(8, 6, 4, 2, **kwargs) for _ in range(2))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10, bias=False)


def test_count_model_by_hand() -> None:
    expert = 3 * 8 * 6  # 144
    layer = 8 * 4 + 4 * expert  # router + 4 experts
    total = 10 * 8 + 2 * layer + 2 * 8 + 8 * 10
    assert count_model(TinyLM()) == (total, total - 2 * (4 - 2) * expert)


def test_count_model_shared_expert_is_always_active() -> None:
    expert = 3 * 8 * 6
    plain_total, plain_active = count_model(TinyLM())
    total, active = count_model(TinyLM(shared=True))
    assert total == plain_total + 2 * expert and active == plain_active + 2 * expert


def test_count_model_stacked_experts() -> None:
    expert = 3 * 8 * 6
    total, active = count_model(TinyLM(moe=StackedMoE))
    assert total - active == 2 * (4 - 2) * expert


def test_count_model_dense_model_all_active() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    assert count_model(model) == (37, 37)


def test_count_model_rejects_bad_moe() -> None:
    bad = TinyMoE(8, 6, 4, 2)
    bad.top_k = 5
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and n_experts=4"):
        count_model(bad)
    short = TinyMoE(8, 6, 4, 2)
    short.n_experts = 3
    with pytest.raises(ValueError, match="n_experts=3 but the ModuleList holds 4"):
        count_model(short)
    uneven = TinyMoE(8, 6, 4, 2)
    uneven.experts[0] = Expert(8, 7)
    with pytest.raises(ValueError, match="experts differ in size"):
        count_model(uneven)


def test_count_model_with_course_experts() -> None:
    from moe_course.experts import make_experts

    moe = nn.Module()
    moe.experts, moe.n_experts, moe.top_k = make_experts(8, 16, 32), 8, 2
    per_expert = 3 * 16 * 32
    assert count_model(moe) == (8 * per_expert, 2 * per_expert)


# -- the data file -------------------------------------------------------------------------------------


def test_published_models_come_from_the_packaged_data_file() -> None:
    import json

    from moe_course.params import PUBLISHED_MODELS_PATH, load_published

    package_dir = PUBLISHED_MODELS_PATH.parents[1]
    assert package_dir.name == "moe_course" and PUBLISHED_MODELS_PATH.is_file()  # package data: pip carries it
    entries = json.loads(PUBLISHED_MODELS_PATH.read_text(encoding="utf-8"))["models"]
    assert sorted(e["name"] for e in entries) == sorted(PUBLISHED)
    assert load_published() == PUBLISHED
    releases = [cfg.release for cfg in PUBLISHED.values()]
    assert releases == sorted(releases)


def test_load_published_rejects_bad_files(tmp_path) -> None:
    import json

    from moe_course.params import load_published

    good = dict(name="tiny", vocab_size=10, d_model=8, n_layers=2, n_heads=2, moe_intermediate_size=6,
                n_routed_experts=4, top_k=2, release="2025-01", comment="ignored")
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [good]}))
    assert load_published(path)["tiny"] == tiny_config(n_kv_heads=None, head_dim=None, release="2025-01")
    for models, message in [
        ([{**good, "n_expert": 4}], r"tiny has unknown field\(s\) \['n_expert'\]"),
        ([{k: v for k, v in good.items() if k != "top_k"}], "tiny: .*missing .*top_k"),
        ([good, good], "model names must be unique"),
        ([{**good, "top_k": 0}], "top_k must be a positive integer"),
    ]:
        path.write_text(json.dumps({"models": models}))
        with pytest.raises(ValueError, match=message):
            load_published(path)
    path.write_text(json.dumps([good]))
    with pytest.raises(ValueError, match='top-level "models" list'):
        load_published(path)


def test_kv_cache_bytes_per_token_by_hand():
    from moe_course.params import kv_cache_bytes_per_token

    v3, mixtral = get_published("DeepSeek-V3"), get_published("Mixtral 8x7B")
    assert kv_cache_bytes_per_token(v3) == (512 + 64) * 61 * 2 == 70_272  # MLA: latent + RoPE key, bf16
    assert kv_cache_bytes_per_token(v3, as_mha=True) == 128 * (128 + 64 + 128) * 61 * 2  # per-head K and V
    assert kv_cache_bytes_per_token(mixtral) == 2 * 8 * 128 * 32 * 2 == 131_072  # GQA: 8 KV heads of 128
    assert kv_cache_bytes_per_token(mixtral, as_mha=True) == 4 * kv_cache_bytes_per_token(mixtral)  # 32 / 8 heads
    assert kv_cache_bytes_per_token(mixtral, bytes_per_value=1) == 65_536  # FP8 cache
    with pytest.raises(ValueError, match="bytes_per_value"):
        kv_cache_bytes_per_token(mixtral, bytes_per_value=0)


def test_kv_attention_intensity_by_hand():
    from moe_course.params import kv_attention_intensity

    v3, mixtral = get_published("DeepSeek-V3"), get_published("Mixtral 8x7B")
    assert kv_attention_intensity(mixtral) == pytest.approx(4.0)  # 32 query heads share 8 KV heads, bf16
    assert kv_attention_intensity(mixtral, as_mha=True) == pytest.approx(1.0)
    assert kv_attention_intensity(mixtral, bytes_per_value=1) == pytest.approx(8.0)  # an FP8 cache
    # absorbed MLA: 128 heads x 2 x (512 + 64 scored, 512 summed) FLOPs per 576 bf16 values read
    assert kv_attention_intensity(v3) == pytest.approx(128 * 2 * (576 + 512) / (576 * 2))
    assert kv_attention_intensity(v3, as_mha=True) == pytest.approx(1.0)
