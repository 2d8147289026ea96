"""check.recipe_build (notebook 08's ★★★): correct layers and steps pass, each known wiring mistake is named."""

from __future__ import annotations

import re
from functools import partial

import pytest
import torch
from torch import nn

from moe_course import check
from moe_course.balancing import bias_update
from moe_course.check.recipe import LAYER_MISTAKES, STEP_MISTAKES, _Wired, reference_step
from moe_course.dispatch import dispatch_loop
from moe_course.experts import GroupedExperts, SwiGLU
from moe_course.routing import Routing, select_topk


class PackageParts(nn.Module):
    """A correct answer in another style: the package's select_topk and bias_update, a loop over the experts."""

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, top_k: int, n_shared: int, u: float) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.u = n_experts, top_k, u
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.experts = GroupedExperts(n_experts, d_model, d_hidden)
        self.shared = SwiGLU(d_model, n_shared * d_hidden) if n_shared else None
        self.register_buffer("expert_bias", torch.zeros(n_experts))
        self.last_routing, self.aux_loss, self.counts = None, torch.zeros(()), torch.zeros(n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = self.gate(flat)
        scores = logits.sigmoid()
        weights, indices = select_topk(scores, self.top_k, self.expert_bias)
        y = dispatch_loop(flat, weights, indices, list(self.experts))
        if self.shared is not None:
            y = y + self.shared(flat)
        self.last_routing = Routing(weights.detach(), indices, logits.detach(), scores.detach())
        if self.training:
            self.counts = self.counts + torch.bincount(indices.reshape(-1), minlength=self.n_experts)
        return y.reshape(x.shape)

    @torch.no_grad()
    def after_step(self) -> None:
        self.expert_bias.copy_(bias_update(self.expert_bias, self.counts.to(self.expert_bias.dtype), self.u))
        self.counts = torch.zeros_like(self.counts)


def my_step(model, x, y, optimizer) -> float:
    optimizer.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    optimizer.step()
    model.after_step()
    return loss.item()


def _wired(mistake: str) -> type:
    return type(f"Wired_{mistake.replace(' ', '_')}", (_Wired,),
                {"__init__": lambda self, *a, m=mistake: _Wired.__init__(self, *a, mistake=m)})


def test_correct_layers_and_steps_pass(capsys) -> None:
    check.recipe_build(_Wired, reference_step)
    check.recipe_build(PackageParts, my_step)
    assert capsys.readouterr().out.count("OK  recipe_build") == 2


def test_the_wired_reference_is_the_packages_build() -> None:
    from moe_course.check.recipe import CASES, _batches, _build, _mapped, _package, _train

    for case in CASES:
        mine, ref = _build(_Wired, case, 7, "x"), _package(case, 7)
        batches = _batches(*case[7], seed=7)
        got, want = _train(mine, batches, reference_step), _train(ref, batches, reference_step)
        assert got[0] == pytest.approx(want[0], abs=1e-6)
        want_state = {_mapped(k): v for k, v in want[1][-1].items()}
        assert all(torch.allclose(got[1][-1][k], want_state[k], atol=1e-6) for k in want_state)


@pytest.mark.parametrize("mistake", list(LAYER_MISTAKES))
def test_each_layer_mistake_is_named(mistake: str) -> None:
    with pytest.raises(check.CheckError, match=re.escape("it looks like you " + LAYER_MISTAKES[mistake])):
        check.recipe_build(_wired(mistake), reference_step)


@pytest.mark.parametrize("mistake", list(STEP_MISTAKES))
def test_each_step_mistake_is_named(mistake: str) -> None:
    with pytest.raises(check.CheckError, match=re.escape("it looks like you " + STEP_MISTAKES[mistake])):
        check.recipe_build(_Wired, partial(reference_step, mistake=mistake))


def test_structural_mistakes_are_named() -> None:
    class BiasParameter(_Wired):
        def __init__(self, *a) -> None:
            super().__init__(*a)
            del self.expert_bias
            self.expert_bias = nn.Parameter(torch.zeros(self.n_experts))

    with pytest.raises(check.CheckError, match="nn.Parameter, so the optimizer trains it by gradient"):
        check.recipe_build(BiasParameter, reference_step)

    class SharedFirst(_Wired):
        def __init__(self, d_model, d_hidden, n_experts, top_k, n_shared, u) -> None:
            nn.Module.__init__(self)
            self.n_experts, self.top_k, self.u, self.mistake = n_experts, top_k, u, "right"
            self.shared = SwiGLU(d_model, n_shared * d_hidden) if n_shared else None
            self.gate = nn.Linear(d_model, n_experts, bias=False)
            self.experts = GroupedExperts(n_experts, d_model, d_hidden)
            self.register_buffer("expert_bias", torch.zeros(n_experts))
            self.last_routing, self.aux_loss, self.step_counts = None, torch.zeros(()), None

    with pytest.raises(check.CheckError, match="create gate, then experts, then shared"):
        check.recipe_build(SharedFirst, reference_step)

    class SharedPerExpert(_Wired):  # n_shared experts of width d_hidden each: other weight names
        def __init__(self, d_model, d_hidden, n_experts, top_k, n_shared, u) -> None:
            super().__init__(d_model, d_hidden, n_experts, top_k, n_shared, u)
            self.shared = nn.ModuleList(SwiGLU(d_model, d_hidden) for _ in range(n_shared)) if n_shared else None

    with pytest.raises(check.CheckError, match="named differently"):
        check.recipe_build(SharedPerExpert, reference_step)

    class NoAfterStep(nn.Module):
        def __init__(self, d_model, d_hidden, n_experts, top_k, n_shared, u) -> None:
            super().__init__()
            self.gate = nn.Linear(d_model, n_experts, bias=False)
            self.experts = GroupedExperts(n_experts, d_model, d_hidden)
            self.register_buffer("expert_bias", torch.zeros(n_experts))

        def forward(self, x):
            return x

    with pytest.raises(check.CheckError, match="last_routing"):
        check.recipe_build(NoAfterStep, reference_step)
    with pytest.raises(check.CheckError, match="class itself"):
        check.recipe_build(_Wired(16, 8, 4, 2, 1, 0.01), reference_step)


def test_a_step_that_changes_its_batch_or_returns_no_loss_is_named() -> None:
    def shifts(model, x, y, optimizer):
        loss = reference_step(model, x, y, optimizer)
        x.add_(1).remainder_(64)
        return loss

    with pytest.raises(check.CheckError, match="changed its input batch in place"):
        check.recipe_build(_Wired, shifts)
    with pytest.raises(check.CheckError, match="return the batch's loss as a float"):
        check.recipe_build(_Wired, lambda model, x, y, opt: None if reference_step(model, x, y, opt) else None)


def test_an_unfinished_layer_raises_not_implemented() -> None:
    class Stub(_Wired):
        def forward(self, x):
            raise NotImplementedError

    with pytest.raises(NotImplementedError):
        check.recipe_build(Stub, reference_step)
