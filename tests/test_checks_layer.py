"""check.expert_ffn / check.soft_mixture: the reference passes and each typical mistake is named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_course import check
from moe_course.check import CheckError
from moe_course.experts import SwiGLU

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
