"""Notebook 08's checks accept the reference and name each plausible wrong answer."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moe_course import check
from moe_course.capstone import equal_active_moe, train_flops_per_token_of, type_expert_table
from moe_course.check import CheckError
from moe_course.model import ModelConfig

# ----------------------------------------------------------------------------------------------------------
# equal_active_moe: wrong answers a learner could write
# ----------------------------------------------------------------------------------------------------------


def forgot_shared(dense, n_experts, top_k, n_shared):
    return dataclasses.replace(dense, ffn="moe", n_experts=n_experts, top_k=top_k, n_shared=n_shared,
                               expert_hidden=dense.d_hidden // top_k)


def equal_total(dense, n_experts, top_k, n_shared):
    return dataclasses.replace(dense, ffn="moe", n_experts=n_experts, top_k=top_k, n_shared=n_shared,
                               expert_hidden=dense.d_hidden // n_experts)


def dense_wide_experts(dense, n_experts, top_k, n_shared):
    return dataclasses.replace(dense, ffn="moe", n_experts=n_experts, top_k=top_k, n_shared=n_shared,
                               expert_hidden=dense.d_hidden)


def left_dense(dense, n_experts, top_k, n_shared):
    return dataclasses.replace(dense, n_experts=n_experts, top_k=top_k, n_shared=n_shared,
                               expert_hidden=dense.d_hidden // (top_k + n_shared))


def rebuilt_from_defaults(dense, n_experts, top_k, n_shared):
    return ModelConfig(n_layer=dense.n_layer, n_head=dense.n_head, d_model=dense.d_model, d_hidden=dense.d_hidden,
                       ffn="moe", n_experts=n_experts, top_k=top_k, n_shared=n_shared,
                       expert_hidden=dense.d_hidden // (top_k + n_shared))


def forgot_n_shared_field(dense, n_experts, top_k, n_shared):
    return dataclasses.replace(dense, ffn="moe", n_experts=n_experts, top_k=top_k,
                               expert_hidden=dense.d_hidden // (top_k + n_shared))


def width_in_d_hidden(dense, n_experts, top_k, n_shared):
    return dataclasses.replace(dense, ffn="moe", n_experts=n_experts, top_k=top_k, n_shared=n_shared,
                               expert_hidden=dense.d_hidden // (top_k + n_shared),
                               d_hidden=dense.d_hidden // (top_k + n_shared))


def mutates_dense(dense, n_experts, top_k, n_shared):
    dense.ffn, dense.n_experts, dense.top_k, dense.n_shared = "moe", n_experts, top_k, n_shared
    dense.expert_hidden = dense.d_hidden // (top_k + n_shared)
    return dense


def true_division(dense, n_experts, top_k, n_shared):
    return dataclasses.replace(dense, ffn="moe", n_experts=n_experts, top_k=top_k, n_shared=n_shared,
                               expert_hidden=dense.d_hidden / (top_k + n_shared))


def returns_dict(dense, n_experts, top_k, n_shared):
    return dataclasses.asdict(equal_active_moe(dense, n_experts, top_k, n_shared))


def test_equal_active_moe_accepts_reference(capsys):
    check.equal_active_moe(equal_active_moe)
    out = capsys.readouterr().out
    assert out.startswith("OK  equal_active_moe") and "36,000 + the routers' 512" in out


def test_equal_active_moe_accepts_keyword_style_answer():
    def answer(dense, n_experts, top_k, n_shared=0):
        if dense.d_hidden % (top_k + n_shared):
            raise ValueError("does not divide")
        width = dense.d_hidden // (top_k + n_shared)
        return dataclasses.replace(dense, ffn="moe", n_experts=n_experts, top_k=top_k, n_shared=n_shared,
                                   expert_hidden=width)

    check.equal_active_moe(answer)


@pytest.mark.parametrize("fn, message", [
    (forgot_shared, "forgot the shared experts"),
    (equal_total, "kept the *total* width equal"),
    (dense_wide_experts, "each expert as wide as the dense FFN"),
    (left_dense, "returned ffn='dense'"),
    (rebuilt_from_defaults, "changed block_size (block_size: 32 -> 128)"),
    (forgot_n_shared_field, "returned n_shared=0, expected 1"),
    (width_in_d_hidden, "changed d_hidden (d_hidden: 96 -> 48)"),
    (mutates_dense, "changed the dense config it was given (ffn, expert_hidden)"),
    (true_division, "use integer division"),
    (returns_dict, "should return a ModelConfig"),
])
def test_equal_active_moe_names_mistakes(fn, message):
    with pytest.raises(CheckError) as info:
        check.equal_active_moe(fn)
    assert message in str(info.value), str(info.value)


def test_equal_active_moe_width_messages_give_parameter_counts():
    with pytest.raises(CheckError) as info:
        check.equal_active_moe(equal_total)
    # d_hidden 96, 8 experts top-2: experts 12 wide instead of 48; the router adds 2 layers x 32 x 8 = 512
    assert "expert_hidden=12, expected 48" in str(info.value)
    assert "should be 36,512" in str(info.value)


def never_raises(dense, n_experts, top_k, n_shared):
    return dataclasses.replace(dense, ffn="moe", n_experts=n_experts, top_k=top_k, n_shared=n_shared,
                               expert_hidden=dense.d_hidden // (top_k + n_shared))


def asserts_instead(dense, n_experts, top_k, n_shared):
    if dense.d_hidden % (top_k + n_shared):
        raise AssertionError("uneven")
    return never_raises(dense, n_experts, top_k, n_shared)


@pytest.mark.parametrize("fn, message", [
    (never_raises, "Raise a ValueError when d_hidden % (top_k + n_shared) != 0"),
    (asserts_instead, "raised AssertionError: uneven; raise a ValueError"),
])
def test_equal_active_moe_requires_the_value_error(fn, message):
    with pytest.raises(CheckError) as info:
        check.equal_active_moe(fn)
    assert message in str(info.value), str(info.value)


def test_equal_active_moe_unfinished_stub_is_not_hidden():
    def stub(dense, n_experts, top_k, n_shared):
        raise NotImplementedError()

    with pytest.raises(NotImplementedError):
        check.equal_active_moe(stub)


# ----------------------------------------------------------------------------------------------------------
# type_expert_table: wrong answers a learner could write
# ----------------------------------------------------------------------------------------------------------


def transposed(types, indices, n_types, n_experts):
    return torch.bincount(indices[:, 0] * n_types + types, minlength=n_types * n_experts).reshape(n_experts, n_types)


def all_choices(types, indices, n_types, n_experts):
    table = torch.zeros(n_types, n_experts, dtype=torch.long)
    for j in range(indices.shape[1]):
        table.index_put_((types, indices[:, j]), torch.ones_like(types), accumulate=True)
    return table


def probabilities(types, indices, n_types, n_experts):
    table = torch.bincount(types * n_experts + indices[:, 0], minlength=n_types * n_experts)
    return (table / table.sum()).reshape(n_types, n_experts)


def row_probabilities(types, indices, n_types, n_experts):
    table = type_expert_table(types, indices, n_types, n_experts).float()
    return table / table.sum(dim=1, keepdim=True).clamp_min(1)


def bincount_without_minlength(types, indices, n_types, n_experts):
    return torch.bincount(types * n_experts + indices[:, 0]).reshape(n_types, n_experts)


def sized_by_largest_seen(types, indices, n_types, n_experts):
    table = torch.zeros(int(types.max()) + 1, int(indices[:, 0].max()) + 1, dtype=torch.long)
    table.index_put_((types, indices[:, 0]), torch.ones_like(types), accumulate=True)
    return table


def flat_bincount(types, indices, n_types, n_experts):
    return torch.bincount(types * n_experts + indices[:, 0], minlength=n_types * n_experts)


def last_choice(types, indices, n_types, n_experts):
    return torch.bincount(types * n_experts + indices[:, -1], minlength=n_types * n_experts).reshape(n_types, n_experts)


def plus_equals(types, indices, n_types, n_experts):
    table = torch.zeros(n_types, n_experts, dtype=torch.long)
    table[types, indices[:, 0]] += 1  # repeated (type, expert) pairs are written once
    return table


def float_counts(types, indices, n_types, n_experts):
    table = torch.zeros(n_types, n_experts)
    table.index_put_((types, indices[:, 0]), torch.ones(len(types)), accumulate=True)
    return table


def flattens_into_types(types, indices, n_types, n_experts):  # *= and += change the caller's types
    types *= n_experts
    types += indices[:, 0]
    return torch.bincount(types, minlength=n_types * n_experts).reshape(n_types, n_experts)


def flattens_into_indices(types, indices, n_types, n_experts):  # indices[:, 0] is a view of the caller's indices
    first = indices[:, 0]
    first += types * n_experts
    return torch.bincount(first, minlength=n_types * n_experts).reshape(n_types, n_experts)


def one_cell_off(types, indices, n_types, n_experts):
    table = type_expert_table(types, indices, n_types, n_experts)
    if n_types == 5:
        table[2, 1] += 1
    return table


def test_type_expert_table_accepts_reference(capsys):
    check.type_expert_table(type_expert_table)
    assert capsys.readouterr().out.startswith("OK  type_expert_table")


def test_type_expert_table_accepts_a_loop():
    def loop(types, indices, n_types, n_experts):
        table = torch.zeros(n_types, n_experts, dtype=torch.long)
        for t, e in zip(types.tolist(), indices[:, 0].tolist(), strict=True):
            table[t, e] += 1
        return table

    check.type_expert_table(loop)


@pytest.mark.parametrize("fn, message", [
    (transposed, "transposed the table"),
    (all_choices, "counted all k choices"),
    (probabilities, "normalised the table to probabilities"),
    (row_probabilities, "normalised each row (P(expert | type))"),
    (bincount_without_minlength, "raised RuntimeError: shape '[4, 5]' is invalid for input of size 12. It looks "
                                 "like torch.bincount without minlength"),
    (sized_by_largest_seen, "has shape (3, 4), expected (n_types, n_experts) = (4, 5): a type or an expert that "
                            "never occurs must still get"),
    (flat_bincount, "return a 2-D table"),
    (last_choice, "counted the last choice"),
    (plus_equals, "wrote table[types, experts] += 1"),
    (float_counts, "the right counts as torch.float32"),
    (flattens_into_types, "flattens_into_types(10 tokens, k=2, 4 types (type 3 never occurs), 5 experts "
                          "(expert 4 never a first choice)) changed its input types (its values: types[1] went from "
                          "1 to 7) "
                          "in place"),
    (flattens_into_indices, "changed its input indices (its values: indices[1][0] went from 2 to 7) in place"),
    (one_cell_off, "one_cell_off(7 tokens, k=1, 5 types (types 1 and 4 never occur), 6 experts (experts 3 "
                   "and 5 never chosen)): cell [type 2, expert 1] holds 3, expected 2 (the number of tokens of type "
                   "2 whose first choice"),
])
def test_type_expert_table_names_mistakes(fn, message):
    with pytest.raises(CheckError) as info:
        check.type_expert_table(fn)
    assert message in str(info.value), str(info.value)


# ----------------------------------------------------------------------------------------------------------
# train_flops_per_token: wrong answers a learner could write
# ----------------------------------------------------------------------------------------------------------


def _parts(cfg, *, experts=None, router=True, shared=True, matrices=3, every=True, head=1, pos=False, vocab=None,
           expert_width=None):
    """6·N + attention, with one piece of the count switched (the variants below)."""
    d = cfg.d_model
    n = head * (vocab or cfg.vocab_size) * d + d + (cfg.block_size * d if pos else 0)
    for layer in range(cfg.n_layer):
        n += 4 * d * d + 2 * d
        moe = cfg.ffn == "moe" and (every is False or layer % cfg.moe_every == cfg.moe_every - 1)
        if moe:
            used = (cfg.top_k if experts is None else experts) + (cfg.n_shared if shared else 0)
            n += (d * cfg.n_experts if router else 0) + matrices * d * (expert_width or cfg.expert_hidden) * used
        else:
            n += 3 * d * cfg.d_hidden
    return 6.0 * n


def _attn(cfg, per=6.0):
    return per * cfg.n_layer * cfg.block_size * cfg.d_model


def fwd_only(cfg):
    return (_parts(cfg) + _attn(cfg)) / 3


def no_attention(cfg):
    return _parts(cfg)


def full_attention(cfg):
    return _parts(cfg) + _attn(cfg, 12.0)


def with_position_table(cfg):
    return _parts(cfg, pos=True) + _attn(cfg)


def untied(cfg):
    return _parts(cfg, head=2) + _attn(cfg)


def all_experts(cfg):
    return _parts(cfg, experts=cfg.n_experts) + _attn(cfg)


def no_router(cfg):
    return _parts(cfg, router=False) + _attn(cfg)


def two_matrices(cfg):
    return _parts(cfg, matrices=2) + _attn(cfg)


def no_shared(cfg):
    return _parts(cfg, shared=False) + _attn(cfg)


def byte_vocabulary(cfg):  # V = 256 written in, as for the byte-level presets
    return _parts(cfg, vocab=256) + _attn(cfg)


def experts_at_dense_width(cfg):  # each expert a token runs as wide as the dense FFN
    return _parts(cfg, expert_width=cfg.d_hidden) + _attn(cfg)


def moe_ffn_as_dense(cfg):  # the MoE layer's experts counted as one dense FFN of width d_hidden, plus the router
    n = _parts(cfg) + _attn(cfg)
    layers = sum(1 for i in range(cfg.n_layer) if cfg.ffn == "moe" and i % cfg.moe_every == cfg.moe_every - 1)
    per_token = 3 * cfg.d_model * (cfg.d_hidden - cfg.expert_hidden * (cfg.top_k + cfg.n_shared))
    return n + 6.0 * layers * per_token


def moe_everywhere(cfg):
    return _parts(cfg, every=False) + _attn(cfg)


def moe_from_layer_zero(cfg):  # layers 0, moe_every, ...: ceil(L / moe_every) of them
    n = _parts(cfg) + _attn(cfg)
    if cfg.ffn == "moe" and cfg.moe_every > 1:
        n += _moe_layer_shift(cfg, math.ceil(cfg.n_layer / cfg.moe_every))
    return n


def rounded_moe_layers(cfg):
    n = _parts(cfg) + _attn(cfg)
    if cfg.ffn == "moe" and cfg.moe_every > 1:
        n += _moe_layer_shift(cfg, round(cfg.n_layer / cfg.moe_every))
    return n


def _moe_layer_shift(cfg, wrong):
    """FLOPs added by counting ``wrong`` MoE layers instead of floor(L / moe_every)."""
    d = cfg.d_model
    moe = d * cfg.n_experts + 3 * d * cfg.expert_hidden * (cfg.top_k + cfg.n_shared)
    return 6.0 * (wrong - cfg.n_layer // cfg.moe_every) * (moe - 3 * d * cfg.d_hidden)


def half_context_floor(cfg):  # 12·L·d·(T // 2): the mean causal context by floor division
    return _parts(cfg) + 12.0 * cfg.n_layer * cfg.d_model * (cfg.block_size // 2)


def mutates(cfg):
    value = train_flops_per_token_of(cfg)
    cfg.top_k = 1
    return value


def returns_text(cfg):
    return f"{train_flops_per_token_of(cfg):.0f}"


def test_train_flops_per_token_accepts_reference_and_a_tensor(capsys):
    check.train_flops_per_token(train_flops_per_token_of)
    out = capsys.readouterr().out
    assert out.startswith("OK  train_flops_per_token: the recipe cpu-best: 4.58 MFLOPs per token")
    check.train_flops_per_token(lambda cfg: torch.tensor(train_flops_per_token_of(cfg), dtype=torch.float64))


@pytest.mark.parametrize("fn, message", [
    (fwd_only, "counted the forward pass only"),
    (no_attention, "left out attention's scores"),
    (full_attention, "counted attention over the full T × T block"),
    (with_position_table, "counted the position embedding"),
    (untied, "counted the output head and the token embedding separately"),
    (all_experts, "counted all N experts"),
    (no_router, "left out the router"),
    (two_matrices, "counted each expert as two matrices"),
    (no_shared, "left out the shared experts"),
    (moe_everywhere, "made every layer an MoE layer"),
    (byte_vocabulary, "byte_vocabulary(a top-2 MoE over a 1,000-token vocabulary (not byte-level)) returned "
                      "162,240, expected 305,088: it looks like you used a byte-level vocabulary of 256"),
    (experts_at_dense_width, "used the dense width d_hidden for each expert"),
    (moe_ffn_as_dense, "moe_ffn_as_dense(an MoE in every 2nd of 3 layers, 1 shared + 6 routed experts top-1) returned "
                       "519,840, expected 492,192: it looks like you counted the MoE layer's experts at the dense"),
    (mutates, "changed the config it was given (top_k)"),
    (returns_text, "should return a number"),
    (moe_from_layer_zero, "moe_from_layer_zero(an MoE in every 2nd of 3 layers, 1 shared + 6 routed experts "
                          "top-1) returned 466,272, expected 492,192: it looks like you counted 2 MoE layers, from "
                          "layer 0 (layer "
                          "% moe_every == 0) or by rounding n_layer / moe_every = 1.5 up or to the nearest; the MoE "
                          "layers are those with layer % moe_every == moe_every - 1, floor(n_layer / moe_every) = 1"),
    (rounded_moe_layers, "it looks like you counted 2 MoE layers, from layer 0 (layer % moe_every == 0) or by "
                         "rounding"),
    (half_context_floor, "half_context_floor(an MoE in every 3rd of 5 layers, a block of 33 tokens (odd)) "
                         "returned 389,952, expected 390,912: it looks like you used floor division for the average "
                         "context: a token attends to "
                         "T/2 = 16.5 positions on average, not T // 2 = 16"),
])
def test_train_flops_per_token_names_mistakes(fn, message):
    with pytest.raises(CheckError) as info:
        check.train_flops_per_token(fn)
    assert message in str(info.value), str(info.value)


def test_train_flops_per_token_of_equals_the_model_count():
    from moe_course.check.capstone import FLOPS_CASES
    from moe_course.model import TinyLM
    from moe_course.params import train_flops_per_token
    from moe_course.train import PRESETS

    for cfg in [c for _, c in FLOPS_CASES] + [p.model for p in PRESETS.values()]:
        assert train_flops_per_token_of(cfg) == train_flops_per_token(TinyLM(cfg))
    with pytest.raises(ValueError, match="token-choice top-k"):
        train_flops_per_token_of(ModelConfig(router="expert_choice", aux_loss_coef=0.0))
