"""check.active_params / check.total_params: the reference passes, typical mistakes are named."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from moe_course import check
from moe_course.check import CheckError
from moe_course.params import active_params_from_config, total_params_from_config


def make_counter(
    *,
    active: bool = True,
    experts: str = "top_k",
    router: bool = True,
    attention: bool = True,
    kv_with_n_heads: bool = False,
    ffn_matrices: int = 3,
    embeddings: str = "right",
    norms: bool = True,
) -> Callable[..., int]:
    """A learner-style implementation with optional mistakes switched on."""

    def count(d_model: int, n_layers: int, vocab_size: int, n_heads: int, n_kv_heads: int, head_dim: int,
              ffn_hidden: int, n_experts: int, top_k: int, tied_embeddings: bool = False) -> int:
        kv = n_heads if kv_with_n_heads else n_kv_heads
        attn = 2 * d_model * n_heads * head_dim + 2 * d_model * kv * head_dim if attention else 0
        n_used = {"top_k": top_k if active else n_experts, "all": n_experts, "one": 1}[experts]
        layer = attn + n_used * ffn_matrices * d_model * ffn_hidden
        layer += d_model * n_experts if router else 0
        layer += 2 * d_model if norms else 0
        tables = {"right": 1 if tied_embeddings else 2, "none": 0, "always_two": 2, "always_one": 1}[embeddings]
        return tables * vocab_size * d_model + n_layers * layer + (d_model if norms else 0)

    return count


def test_reference_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check.active_params(active_params_from_config)
    check.total_params(total_params_from_config)
    out = capsys.readouterr().out
    assert "OK  active_params: Mixtral 8x7B -> 12.88B active" in out
    assert "OK  total_params: Mixtral 8x7B -> 46.70B total" in out


def test_learner_style_correct_versions_pass() -> None:
    check.active_params(make_counter())
    check.total_params(make_counter(active=False))


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        ({"experts": "all"}, "counted all n_experts experts as active"),
        ({"experts": "one"}, "used one expert per token"),
        ({"router": False}, "forgot the router"),
        ({"attention": False}, "forgot the attention weights"),
        ({"kv_with_n_heads": True}, r"grouped-query attention \(GQA\)"),
        ({"ffn_matrices": 2}, "SwiGLU expert has 3"),
        ({"embeddings": "none"}, "forgot the embeddings"),
        ({"embeddings": "always_two"}, "tied_embeddings=True"),
        ({"embeddings": "always_one"}, "second vocab_size x d_model matrix"),
        ({"norms": False}, "forgot the RMSNorm weights"),
    ],
)
def test_active_mistakes_are_named(mistake: dict[str, object], message: str) -> None:
    with pytest.raises(CheckError, match=message):
        check.active_params(make_counter(**mistake))


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        ({"experts": "top_k", "active": True}, "counted only the top_k active experts"),
        ({"router": False}, "forgot the router"),
        ({"kv_with_n_heads": True}, "n_kv_heads"),
        ({"ffn_matrices": 2}, "counted 2 matrices per expert"),
        ({"embeddings": "always_two"}, "count it once"),
    ],
)
def test_total_mistakes_are_named(mistake: dict[str, object], message: str) -> None:
    kwargs = {"active": False, **mistake}
    with pytest.raises(CheckError, match=message):
        check.total_params(make_counter(**kwargs))


def test_mixtral_mistake_is_reported_on_mixtral() -> None:
    with pytest.raises(CheckError, match=r"active_params on Mixtral 8x7B .* gave 12,\d{3},\d{3},\d{3} but the "
                       r"answer is 12,879,\d{3},\d{3}\. It looks like you forgot the router"):
        check.active_params(make_counter(router=False))


def test_two_mistakes_fall_back_to_expected_vs_got() -> None:
    wrong = make_counter(router=False, norms=False)
    with pytest.raises(CheckError, match=r"12\.8\d{3}B expected, got 12\.8\d{3}B"):
        check.active_params(wrong)


def test_billions_and_bad_types_are_explained() -> None:
    with pytest.raises(CheckError, match="looks like billions"):
        check.active_params(lambda **cfg: active_params_from_config(**cfg) / 1e9)
    with pytest.raises(CheckError, match="should be an int"):
        check.total_params(lambda **cfg: str(total_params_from_config(**cfg)))
    with pytest.raises(CheckError, match="whole number"):
        check.total_params(lambda **cfg: total_params_from_config(**cfg) + 0.5)


def test_crash_and_stub() -> None:
    def crashes(**cfg: object) -> int:
        raise KeyError("ffn")

    with pytest.raises(CheckError, match="raised KeyError"):
        check.active_params(crashes)

    def stub(**cfg: object) -> int:
        raise NotImplementedError()

    with pytest.raises(NotImplementedError):
        check.total_params(stub)


def test_integral_float_and_numpy_int_accepted() -> None:
    import numpy as np

    check.active_params(lambda **cfg: float(active_params_from_config(**cfg)))
    check.total_params(lambda **cfg: np.int64(total_params_from_config(**cfg)))
