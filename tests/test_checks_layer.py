"""check.expert_ffn / check.soft_mixture / check.model_params: the reference passes, each typical mistake is named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_course import check
from moe_course.check import CheckError
from moe_course.check import layer as layer_checks
from moe_course.experts import SwiGLU
from moe_course.model import ModelConfig, TinyLM
from moe_course.moe import MoE
from moe_course.params import count_model

# ----------------------------------------------------------------------------------------------------
# expert_ffn
# ----------------------------------------------------------------------------------------------------


def make_expert(
    *,
    act=F.silu,
    act_on: str = "gate",
    multiply: bool = True,
    bias: bool = False,
    swap_sizes: bool = False,
    with_up: bool = True,
) -> type[nn.Module]:
    """A learner-style SwiGLU expert class with one optional mistake switched on."""

    class Expert(nn.Module):
        def __init__(self, d_model: int, d_hidden: int) -> None:
            super().__init__()
            d_in, d_mid = (d_hidden, d_model) if swap_sizes else (d_model, d_hidden)
            self.gate = nn.Linear(d_in, d_mid, bias=bias)
            if with_up:
                self.up = nn.Linear(d_in, d_mid, bias=bias)
            self.down = nn.Linear(d_mid, d_in, bias=bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not with_up:
                return self.down(act(self.gate(x)))
            g, u = self.gate(x), self.up(x)
            if act_on == "up":
                g, u = u, g
            h = act(g) * u if multiply else act(g)
            return self.down(h)

    return Expert


def test_expert_reference_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check.expert_ffn(SwiGLU)
    check.expert_ffn(make_expert())
    assert capsys.readouterr().out.count("OK  expert_ffn") == 2


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        (make_expert(act=F.gelu), "GELU"),
        (make_expert(act=F.relu), "ReLU"),
        (make_expert(act_on="up"), "activation to up(x) instead of gate(x)"),
        (make_expert(multiply=False), "plain two-matrix MLP"),
        (make_expert(with_up=False), "no `up` layer"),
        (make_expert(bias=True), "experts in Mixtral/DeepSeek have no biases"),
        (make_expert(swap_sizes=True), "swapped"),
        (make_expert(act=lambda h: h), "forgot the activation"),
    ],
)
def test_expert_mistakes_are_named(variant: type[nn.Module], message: str) -> None:
    with pytest.raises(CheckError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check.expert_ffn(variant)


class DetachedInput(SwiGLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.detach())


class FrozenDown(SwiGLU):
    """The down projection used as a constant: its weight never learns."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(self.gate(x)) * self.up(x), self.down.weight.detach())


class NumpyExpert(SwiGLU):
    """Right values computed in NumPy and turned back into a tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.detach().numpy()
        g, u = a @ self.gate.weight.detach().numpy().T, a @ self.up.weight.detach().numpy().T
        h = g / (1 + np.exp(-g)) * u
        return torch.tensor(h @ self.down.weight.detach().numpy().T)


class StraightThroughGate(SwiGLU):
    """Right output, but the gate's gradient is that of a ReLU (non-zero, and wrong)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x)
        act = F.silu(g).detach() + F.relu(g) - F.relu(g).detach()
        return self.down(act * self.up(x))


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        (DetachedInput, "no gradient reaches x "),
        (FrozenDown, "no gradient reaches down.weight"),
        (NumpyExpert, "autograd cannot differentiate"),
        (StraightThroughGate, "gradient with respect to x is not"),
    ],
)
def test_expert_gradient_mistakes_are_named(variant: type[nn.Module], message: str) -> None:
    with pytest.raises(CheckError, match=message):
        check.expert_ffn(variant)


def test_expert_bias_message_gives_parameter_counts() -> None:
    with pytest.raises(CheckError) as info:
        check.expert_ffn(make_expert(bias=True))
    assert "180" in str(info.value)  # 3 * 6 * 10 weights expected


def test_expert_without_down_projection() -> None:
    class NoDown(SwiGLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.silu(self.gate(x)) * self.up(x)

    with pytest.raises(CheckError, match="finish with self.down"):
        check.expert_ffn(NoDown)


def test_expert_not_a_module() -> None:
    with pytest.raises(CheckError, match="nn.Module"):
        check.expert_ffn(lambda d, h: (lambda x: x))


def test_expert_stub_propagates_not_implemented() -> None:
    class Stub(nn.Module):
        def __init__(self, d_model: int, d_hidden: int) -> None:
            raise NotImplementedError()

    with pytest.raises(NotImplementedError):
        check.expert_ffn(Stub)


# ----------------------------------------------------------------------------------------------------
# soft_mixture
# ----------------------------------------------------------------------------------------------------


def reference_mixture(x: torch.Tensor, gate_weight: torch.Tensor, experts) -> torch.Tensor:
    gates = (x @ gate_weight.T).softmax(dim=-1)
    return sum(gates[:, i : i + 1] * expert(x) for i, expert in enumerate(experts))


def softmax_over_tokens(x, gate_weight, experts):
    gates = (x @ gate_weight.T).softmax(dim=0)
    return sum(gates[:, i : i + 1] * expert(x) for i, expert in enumerate(experts))


def raw_logits(x, gate_weight, experts):
    gates = x @ gate_weight.T
    return sum(gates[:, i : i + 1] * expert(x) for i, expert in enumerate(experts))


def uniform_average(x, gate_weight, experts):
    return torch.stack([expert(x) for expert in experts]).mean(dim=0)


def argmax_only(x, gate_weight, experts):
    choice = (x @ gate_weight.T).argmax(dim=-1)
    outs = torch.stack([expert(x) for expert in experts], dim=1)
    return outs[torch.arange(x.shape[0]), choice]


def argmax_weighted(x, gate_weight, experts):
    probs = (x @ gate_weight.T).softmax(dim=-1)
    weight, choice = probs.max(dim=-1)
    outs = torch.stack([expert(x) for expert in experts], dim=1)
    return weight[:, None] * outs[torch.arange(x.shape[0]), choice]


def sigmoid_gate(x, gate_weight, experts):
    gates = (x @ gate_weight.T).sigmoid()
    return sum(gates[:, i : i + 1] * expert(x) for i, expert in enumerate(experts))


def detached_gate(x, gate_weight, experts):
    gates = (x @ gate_weight.T).softmax(dim=-1).detach()
    return sum(gates[:, i : i + 1] * expert(x) for i, expert in enumerate(experts))


def detached_inputs(x, gate_weight, experts):
    return reference_mixture(x.detach(), gate_weight, experts)


def detached_experts(x, gate_weight, experts):
    gates = (x @ gate_weight.T).softmax(dim=-1)
    return sum(gates[:, i : i + 1] * expert(x).detach() for i, expert in enumerate(experts))


def numpy_mixture(x, gate_weight, experts):
    z = (x @ gate_weight.T).detach().numpy()
    gates = np.exp(z - z.max(-1, keepdims=True))
    gates /= gates.sum(-1, keepdims=True)
    outs = np.stack([expert(x).detach().numpy() for expert in experts], axis=1)
    return torch.tensor((gates[..., None] * outs).sum(axis=1))


def straight_through_gate(x, gate_weight, experts):
    """Right output; the gate's gradient is that of the raw logits (non-zero, and wrong)."""
    logits = x @ gate_weight.T
    gates = logits.softmax(dim=-1).detach() + logits - logits.detach()
    return sum(gates[:, i : i + 1] * expert(x) for i, expert in enumerate(experts))


def no_transpose(x, gate_weight, experts):
    gates = (x @ gate_weight).softmax(dim=-1)
    return sum(gates[:, i : i + 1] * expert(x) for i, expert in enumerate(experts))


def test_soft_mixture_reference_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check.soft_mixture(reference_mixture)
    assert "OK  soft_mixture" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (softmax_over_tokens, "softmax over the tokens"),
        (raw_logits, "raw logits"),
        (uniform_average, "averaged the experts and ignored the gate"),
        (argmax_only, "sparse top-1"),
        (argmax_weighted, "sparse top-1"),
        (sigmoid_gate, "sigmoid"),
        (detached_gate, "no gradient reaches gate_weight"),
        (detached_inputs, "no gradient reaches x "),
        (detached_experts, "no gradient reaches the experts' parameters"),
        (numpy_mixture, "autograd cannot differentiate"),
        (straight_through_gate, "gradient with respect to x is not"),
        (no_transpose, r"gate_weight\.T"),
    ],
)
def test_soft_mixture_mistakes_are_named(fn, message: str) -> None:
    with pytest.raises(CheckError, match=message):
        check.soft_mixture(fn)


def test_soft_mixture_wrong_shape() -> None:
    with pytest.raises(CheckError, match="shape"):
        check.soft_mixture(lambda x, w, experts: torch.stack([e(x) for e in experts], dim=1))


def test_soft_mixture_stub_propagates_not_implemented() -> None:
    def stub(x, gate_weight, experts):
        raise NotImplementedError()

    with pytest.raises(NotImplementedError):
        check.soft_mixture(stub)


def test_checks_leave_the_global_random_state_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check.expert_ffn(SwiGLU)
    check.soft_mixture(reference_mixture)
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------------------------------
# model_params
# ----------------------------------------------------------------------------------------------------


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def reference_count(model: nn.Module) -> tuple[int, int]:
    """The notebook's solution: total from parameters(), then subtract the experts a token skips."""
    total = sum(p.numel() for p in model.parameters())
    inactive = sum((m.n_experts - m.top_k) * _numel(m.experts[0]) for m in _moe_layers(model))
    return total, total - inactive


def all_experts_active(model):
    total = sum(p.numel() for p in model.parameters())
    return total, total


def one_expert_per_token(model):
    total = sum(p.numel() for p in model.parameters())
    return total, total - sum((m.n_experts - 1) * _numel(m.experts[0]) for m in _moe_layers(model))


def tied_counted_twice(model):
    # each module's own weights: tok_emb and head hold the same matrix, so it is counted twice
    total = sum(p.numel() for m in model.modules() for p in m.parameters(recurse=False))
    inactive = sum((m.n_experts - m.top_k) * _numel(m.experts[0]) for m in _moe_layers(model))
    return total, total - inactive


def state_dict_count(model):
    total = sum(t.numel() for t in model.state_dict().values())
    return total, reference_count(model)[1] + model.tok_emb.weight.numel()


def _bottom_up_active(model, shared: bool = True, dense: bool = True, non_ffn: bool = True) -> int:
    """Active counted piece by piece, with switches that forget pieces."""
    active = 0
    if non_ffn:
        active += _numel(model.tok_emb) + _numel(model.pos_emb) + _numel(model.norm)
        active += sum(_numel(b.attn) + _numel(b.norm1) + _numel(b.norm2) for b in model.blocks)
    for block in model.blocks:
        ffn = block.ffn
        if isinstance(ffn, MoE):
            active += _numel(ffn.router) + ffn.top_k * _numel(ffn.experts[0])
            active += _numel(ffn.shared) if shared else 0
        elif dense:
            active += _numel(ffn)
    return active


def forgot_shared_expert(model):
    return sum(p.numel() for p in model.parameters()), _bottom_up_active(model, shared=False)


def only_ffn_weights(model):
    return sum(p.numel() for p in model.parameters()), _bottom_up_active(model, non_ffn=False)


def dense_layers_left_out(model):
    return sum(p.numel() for p in model.parameters()), _bottom_up_active(model, dense=False)


def every_layer_as_moe(model):
    cfg = model.cfg
    total = sum(p.numel() for p in model.parameters())
    per_expert = 3 * cfg.d_model * cfg.expert_hidden
    return total, total - cfg.n_layer * (cfg.n_experts - cfg.top_k) * per_expert


def no_embeddings_in_active(model):
    total, active = reference_count(model)
    return total, active - _numel(model.tok_emb) - _numel(model.pos_emb)


def no_attention_in_active(model):
    total, active = reference_count(model)
    return total, active - sum(_numel(b.attn) for b in model.blocks)


def swapped(model):
    total, active = reference_count(model)
    return active, total


def active_as_total(model):
    return reference_count(model)[1], reference_count(model)[1]


def test_model_params_reference_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check.model_params(count_model)
    check.model_params(reference_count)
    check.model_params(lambda model: torch.tensor(reference_count(model)))  # tensors and lists are fine
    check.model_params(lambda model: [float(n) for n in reference_count(model)])
    assert capsys.readouterr().out.count("OK  model_params") == 4


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (all_experts_active, r"counted every routed expert as active \(active == total\)"),
        (forgot_shared_expert, "left out the shared expert"),
        (tied_counted_twice, "counted the tied embedding twice"),
        (state_dict_count, "summed the state_dict"),
        (one_expert_per_token, "counted one routed expert per token"),
        (only_ffn_weights, "counted only feed-forward weights as active"),
        (every_layer_as_moe, "treated the dense FFN layers as MoE layers"),
        (dense_layers_left_out, "left the dense FFN layers out of active"),
        (no_embeddings_in_active, "left out the embeddings"),
        (no_attention_in_active, "left out the attention weights"),
        (swapped, "swapped"),
        (active_as_total, "returned the active count as the total"),
    ],
)
def test_model_params_mistakes_are_named(fn, message: str) -> None:
    with pytest.raises(CheckError, match=message):
        check.model_params(fn)


def test_model_params_names_the_model_and_both_answers() -> None:
    with pytest.raises(CheckError) as info:
        check.model_params(forgot_shared_expert)
    text = str(info.value)
    assert "n_shared=1" in text and "answer is (total=" in text
    assert "It looks like you left out the shared expert" in text and "; or you" not in text


def test_model_params_each_mistake_has_one_explanation() -> None:
    """In every check model, two different mistakes never give the same wrong active count."""
    for cfg in layer_checks.MODEL_CONFIGS:
        parts = layer_checks._anatomy(TinyLM(ModelConfig(**cfg)))
        assert count_model(TinyLM(ModelConfig(**cfg))) == (parts["total"], parts["active"])
        seen: dict[int, str] = {}
        for hint, wrong in layer_checks._active_mistakes(parts):
            if wrong != parts["active"]:
                assert seen.setdefault(wrong, hint) == hint, (cfg, wrong)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda model: reference_count(model)[1], "should return a pair"),
        (lambda model: (*reference_count(model), 0), "got 3 values"),
        (lambda model: (reference_count(model)[0] + 0.5, 0), "whole number"),
        (lambda model: ("many", 1), "should be an int"),
        (lambda model: (reference_count(model)[0], reference_count(model)[0] + 1), "cannot exceed total"),
        (lambda model: (reference_count(model)[0], 1), "n_experts - top_k routed experts"),
        (lambda model: (sum(p.numel() for p in model.blocks.parameters()), 1), r"model\.parameters\(\)"),
        (lambda model: model.missing_attribute, "raised AttributeError"),
    ],
)
def test_model_params_bad_answers(fn, message: str) -> None:
    with pytest.raises(CheckError, match=message):
        check.model_params(fn)


def test_model_params_stub_propagates_not_implemented() -> None:
    def stub(model):
        raise NotImplementedError()

    with pytest.raises(NotImplementedError):
        check.model_params(stub)


def test_model_params_leaves_the_global_random_state_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check.model_params(reference_count)
    assert torch.equal(torch.rand(3), expected)
