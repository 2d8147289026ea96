"""check.gating_forward / check.competitive_loss: the reference passes, typical mistakes are named."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from moe_course import check
from moe_course.check import CheckError
from moe_course.check.local_experts import _loss_inputs, _loss_mistakes
from moe_course.local_experts import competitive_loss, cooperative_loss

# ----------------------------------------------------------------------------------------------------------
# gating_forward
# ----------------------------------------------------------------------------------------------------------


def gate_reference(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x @ W + b, dim=-1)


def gate_manual_stable(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    z = x @ W + b
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def test_gate_reference_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check.gating_forward(gate_reference)
    assert capsys.readouterr().out.startswith("OK  gating_forward")


def test_gate_hand_written_stable_softmax_passes() -> None:
    check.gating_forward(gate_manual_stable)


GATE_MISTAKES: list[tuple[Callable[..., torch.Tensor], str]] = [
    (lambda x, W, b: torch.softmax(x @ W + b, dim=0), "softmax over the samples (dim=0)"),
    (lambda x, W, b: x @ W + b, "returned the logits"),
    (lambda x, W, b: torch.sigmoid(x @ W + b), "used a sigmoid"),
    (lambda x, W, b: torch.softmax(x @ W, dim=-1), "forgot the bias b"),
    (lambda x, W, b: torch.log_softmax(x @ W + b, dim=-1), "log-probabilities"),
    (lambda x, W, b: torch.softmax(x @ W + b, dim=-1).T,
     "returned shape (n_experts, cases) = (4, 5); return one row per case"),
    (lambda x, W, b: torch.exp(x @ W + b) / torch.exp(x @ W + b).sum(-1, keepdim=True), "exp overflows"),
    (lambda x, W, b: torch.softmax(x @ W - b, dim=-1), "differs from softmax(x @ W + b"),
    (lambda x, W, b: torch.softmax(x @ W + b, dim=-1)[:, :3], "has shape (5, 3)"),
    # right values, wrong or missing gradients
    (lambda x, W, b: torch.softmax(x @ W.detach() + b, dim=-1), "no gradient reaches W "),
    (lambda x, W, b: torch.softmax(x.detach() @ W + b, dim=-1), "no gradient reaches x "),
    (lambda x, W, b: torch.softmax((x @ W + b).detach(), dim=-1), "no gradient reaches x, W and b"),
    (lambda x, W, b: torch.tensor(_numpy_softmax((x @ W + b).detach().numpy())), "autograd cannot differentiate"),
    (lambda x, W, b: torch.tensor(_numpy_softmax((x @ W + b).detach().numpy()), requires_grad=True),
     "new leaf tensor"),
    (lambda x, W, b: torch.softmax(x @ W + b, dim=-1).detach() + (x @ W + b) - (x @ W + b).detach(),
     "gradient with respect to x is not"),
]


def _numpy_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize(("fn", "message"), GATE_MISTAKES)
def test_gate_mistakes_are_named(fn: Callable[..., torch.Tensor], message: str) -> None:
    with pytest.raises(CheckError) as info:
        check.gating_forward(fn)
    assert message in str(info.value)


def test_gate_crash_is_reported() -> None:
    def transposed(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x @ W.T + b, dim=-1)  # W is (d_in, n): this does not multiply

    with pytest.raises(CheckError, match="raised RuntimeError"):
        check.gating_forward(transposed)


def test_gate_stub_raises_not_implemented() -> None:
    def stub(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError()

    with pytest.raises(NotImplementedError):
        check.gating_forward(stub)


# ----------------------------------------------------------------------------------------------------------
# competitive_loss
# ----------------------------------------------------------------------------------------------------------


def loss_naive(p: torch.Tensor, o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Right formula, but exp underflows for large errors."""
    sq = ((d[:, None, :] - o) ** 2).sum(-1)
    return -torch.log((p * torch.exp(-0.5 * sq)).sum(-1)).mean()


def _numpy_loss(p: torch.Tensor, o: torch.Tensor, d: torch.Tensor) -> float:
    p, o, d = (t.detach().numpy().astype(np.float64) for t in (p, o, d))
    a = np.log(p) - 0.5 * ((d[:, None, :] - o) ** 2).sum(-1)
    m = a.max(-1, keepdims=True)
    return float(-(m[:, 0] + np.log(np.exp(a - m).sum(-1))).mean())


def _surrogate(p: torch.Tensor, o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return (p * sq_err(o, d)).sum(-1).mean()


def sq_err(o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return ((d[:, None, :] - o) ** 2).sum(-1)


def test_loss_reference_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check.competitive_loss(competitive_loss)
    assert capsys.readouterr().out.startswith("OK  competitive_loss")


def test_loss_learner_style_logsumexp_passes() -> None:
    def mine(p: torch.Tensor, o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return -torch.logsumexp(torch.log(p) - 0.5 * sq_err(o, d), dim=1).mean()

    check.competitive_loss(mine)


LOSS_MISTAKES: list[tuple[Callable[..., torch.Tensor], str]] = [
    (cooperative_loss, "cooperative error"),
    (lambda p, o, d: -(p * torch.exp(-0.5 * sq_err(o, d))).sum(-1).mean(), "forgot the log"),
    (lambda p, o, d: -torch.logsumexp(p.log() - sq_err(o, d), -1).mean(), "forgot the 1/2"),
    (lambda p, o, d: -torch.logsumexp(p.log() - 0.5 * sq_err(o, d), -1).sum(),
     "summed over the cases; return the mean over the cases (here "),
    (lambda p, o, d: -torch.logsumexp(-0.5 * sq_err(o, d), -1).mean(), "left out the gate probabilities"),
    (lambda p, o, d: sq_err(o, d).sum(-1).mean(), "squared errors without the gate weights"),
    (lambda p, o, d: 0.5 * sq_err(o, d).sum(-1).mean(), "squared errors without the gate weights"),
    (lambda p, o, d: sq_err(o, d).mean(), "squared errors without the gate weights"),
    (lambda p, o, d: (p * sq_err(o, d)).sum(-1).mean(), "eq. 1.2"),
    (lambda p, o, d: -torch.logsumexp(p.log() - 0.5 * sq_err(o, d).sqrt(), -1).mean(), "instead of the squared"),
    (lambda p, o, d: torch.logsumexp(p.log() - 0.5 * sq_err(o, d), -1).mean(), "sign is wrong"),
    (lambda p, o, d: -torch.logsumexp(p.log() - 0.5 * sq_err(o, d), -1), "one value per case"),
    (lambda p, o, d: -(torch.logsumexp(p.log() - 0.5 * sq_err(o, d), -1) - torch.log(torch.tensor(3.0))).mean(),
     "averaged over the experts"),
    (loss_naive, "exp underflows"),
    (lambda p, o, d: torch.tensor(competitive_loss(p, o, d).item()), "autograd cannot differentiate"),
    (lambda p, o, d: competitive_loss(p.detach(), o, d), "no gradient reaches p "),
    (lambda p, o, d: competitive_loss(p, o.detach(), d), "no gradient reaches o "),
    (lambda p, o, d: competitive_loss(p, o, d.detach()), "no gradient reaches d "),
    (lambda p, o, d: torch.tensor(_numpy_loss(p, o, d), requires_grad=True), "no gradient reaches p, o and d"),
    # right value, non-zero gradient of another loss (eq. 1.2) through a straight-through trick
    (lambda p, o, d: competitive_loss(p, o, d).detach() + _surrogate(p, o, d) - _surrogate(p, o, d).detach(),
     "gradient with respect to p is not"),
    (lambda p, o, d: -torch.logsumexp(p.log() - 0.5 * (d[:, None, :] - o).abs().sum(-1), -1).mean(),
     "The competitive error of one case"),
]


@pytest.mark.parametrize(("fn", "message"), LOSS_MISTAKES)
def test_loss_mistakes_are_named(fn: Callable[..., torch.Tensor], message: str) -> None:
    with pytest.raises(CheckError) as info:
        check.competitive_loss(fn)
    assert message in str(info.value)


def test_loss_mistake_values_are_all_different() -> None:
    """Each named mistake must give its own number on the test case, or the messages would be ambiguous."""
    p, o, d = _loss_inputs()
    reference = float(competitive_loss(p, o, d))
    values = [reference] + [float(v) for _, v in _loss_mistakes(p, o, d)]
    distinct = {round(v, 4) for v in values}
    assert len(distinct) == len(values)
