"""Checks for notebook 02 (the MoE layer): ``check.expert_ffn(MyExpert)`` and ``check.soft_mixture(fn)``.

``expert_ffn`` builds the learner's SwiGLU expert, gives it the weights of the reference
:class:`~moe_course.experts.SwiGLU` and compares the outputs. ``soft_mixture`` calls the learner's
``fn(x, gate_weight, experts)`` and compares it with ``Σ_i softmax(x·Wᵀ)_i · E_i(x)``. When an answer is
wrong, both checks recompute the usual mistakes with the same weights and name the one that matches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_course.check._core import as_tensor, call, close, expect_shape, fail, ok
from moe_course.experts import SwiGLU, make_experts

__all__ = ["expert_ffn", "soft_mixture"]

# Small, deliberately non-square sizes so that a swapped d_model/d_hidden cannot go unnoticed.
D_MODEL, D_HIDDEN = 6, 10


def _describe_linear(layer: nn.Module) -> str:
    return f"nn.Linear({layer.in_features}, {layer.out_features}, bias={layer.bias is not None})"


def _expected_linears() -> dict[str, tuple[int, int]]:
    return {"gate": (D_MODEL, D_HIDDEN), "up": (D_MODEL, D_HIDDEN), "down": (D_HIDDEN, D_MODEL)}


def _check_structure(module: nn.Module) -> None:
    """gate, up and down must exist, be bias-free nn.Linear layers of the right shapes."""
    expected = _expected_linears()
    missing = [name for name in expected if not isinstance(getattr(module, name, None), nn.Module)]
    if missing == ["up"]:
        fail("MyExpert has no `up` layer. A SwiGLU expert has three matrices: gate and up (both d_model -> "
             "d_hidden) and down (d_hidden -> d_model); a plain two-matrix MLP is not what Mixtral and "
             "DeepSeek use")
    if missing:
        fail(f"MyExpert is missing the layer(s) {', '.join(missing)}: define self.gate, self.up and self.down "
             "as nn.Linear in __init__")
    for name in expected:
        if not isinstance(getattr(module, name), nn.Linear):
            fail(f"MyExpert.{name} should be an nn.Linear, got {type(getattr(module, name)).__name__}")
    with_bias = [name for name in expected if getattr(module, name).bias is not None]
    if with_bias:
        n_params = sum(p.numel() for p in module.parameters())
        fail(f"MyExpert has {n_params} parameters but a SwiGLU expert with d_model={D_MODEL}, "
             f"d_hidden={D_HIDDEN} has 3 * {D_MODEL} * {D_HIDDEN} = {3 * D_MODEL * D_HIDDEN}: "
             f"{', '.join(with_bias)} carr{'ies' if len(with_bias) == 1 else 'y'} a bias. The experts in "
             "Mixtral/DeepSeek have no biases: use nn.Linear(..., bias=False)")
    for name, (n_in, n_out) in expected.items():
        layer = getattr(module, name)
        if (layer.in_features, layer.out_features) == (n_in, n_out):
            continue
        if (layer.in_features, layer.out_features) == (n_out, n_in):
            fail(f"MyExpert.{name} is {_describe_linear(layer)}: its sizes are swapped. With "
                 f"MyExpert(d_model={D_MODEL}, d_hidden={D_HIDDEN}), {name} should be "
                 f"nn.Linear({'d_model, d_hidden' if name != 'down' else 'd_hidden, d_model'}) = "
                 f"nn.Linear({n_in}, {n_out}); gate and up widen to d_hidden, down projects back to d_model")
        fail(f"MyExpert.{name} is {_describe_linear(layer)}; with MyExpert(d_model={D_MODEL}, "
             f"d_hidden={D_HIDDEN}) it should be nn.Linear({n_in}, {n_out})")
    extra = sum(p.numel() for p in module.parameters()) - 3 * D_MODEL * D_HIDDEN
    if extra:
        fail(f"MyExpert has {extra} parameters besides gate, up and down; a SwiGLU expert has only those three "
             "bias-free matrices")


def _expert_mistakes(ref: SwiGLU, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Outputs of the usual wrong experts, computed with the reference weights."""
    g, u, down = ref.gate(x), ref.up(x), ref.down
    return [
        ("used GELU where SwiGLU uses SiLU: the gate is F.silu(self.gate(x)) (x * sigmoid(x)), not F.gelu",
         down(F.gelu(g) * u)),
        ("used ReLU where SwiGLU uses SiLU: the gate is F.silu(self.gate(x)) (x * sigmoid(x)), not F.relu",
         down(F.relu(g) * u)),
        ("applied the activation to up(x) instead of gate(x): it is silu(gate(x)) * up(x)",
         down(F.silu(u) * g)),
        ("applied SiLU after the product: SiLU goes on gate(x) alone, then multiply by up(x)",
         down(F.silu(g * u))),
        ("forgot the activation: multiply silu(gate(x)) by up(x), not gate(x) by up(x)", down(g * u)),
        ("left out the multiplication by up(x): down(silu(gate(x))) is a plain two-matrix MLP; SwiGLU "
         "multiplies silu(gate(x)) elementwise by up(x) before down", down(F.silu(g))),
        ("left out the multiplication by up(x) and used the up matrix as a plain MLP: SwiGLU is "
         "down(silu(gate(x)) * up(x))", down(F.silu(u))),
        ("built a plain GELU MLP (down(gelu(...))): SwiGLU is down(silu(gate(x)) * up(x))", down(F.gelu(g))),
        ("built a plain GELU MLP (down(gelu(up(x)))): SwiGLU is down(silu(gate(x)) * up(x))", down(F.gelu(u))),
    ]


def expert_ffn(expert_cls: Callable[[int, int], nn.Module]) -> None:
    """Check a learner's SwiGLU expert class ``MyExpert(d_model, d_hidden)`` against :class:`SwiGLU`."""
    with torch.random.fork_rng(devices=[]):  # leave the notebook's random stream untouched
        torch.manual_seed(0)
        _check_expert(expert_cls)
    ok("expert_ffn", "MyExpert matches SwiGLU: down(silu(gate(x)) * up(x)), 3 bias-free matrices")


def _check_expert(expert_cls: Callable[[int, int], nn.Module]) -> None:
    mine = call(expert_cls, D_MODEL, D_HIDDEN, what=f"MyExpert({D_MODEL}, {D_HIDDEN})")
    if not isinstance(mine, nn.Module):
        fail(f"MyExpert({D_MODEL}, {D_HIDDEN}) should build an nn.Module (subclass nn.Module and call "
             f"super().__init__()), got {type(mine).__name__}")
    _check_structure(mine)
    ref = SwiGLU(D_MODEL, D_HIDDEN)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in ("gate", "up", "down"):  # scaled up so that SiLU, GELU and ReLU differ clearly
            getattr(ref, name).weight.copy_(torch.randn(getattr(ref, name).weight.shape, generator=gen))
            getattr(mine, name).weight.copy_(getattr(ref, name).weight)
    x = torch.randn(2, 3, D_MODEL, generator=gen)  # (batch, tokens, d): an expert works on any leading dims
    with torch.no_grad():
        expected = ref(x)
        got = as_tensor(call(mine, x, what="MyExpert(...)(x)"), "MyExpert.forward")
        if tuple(got.shape) == (*x.shape[:-1], D_HIDDEN):
            fail(f"MyExpert returns {D_HIDDEN} = d_hidden features per token; finish with self.down to map "
                 f"back to d_model = {D_MODEL}")
        expect_shape(got, tuple(x.shape), f"MyExpert(...)(x) for x of shape {tuple(x.shape)}")
        if not close(got, expected):
            for hint, wrong in _expert_mistakes(ref, x):
                if wrong.shape == got.shape and close(got, wrong):
                    fail(f"MyExpert gives the wrong output: it looks like you {hint}")
            fail("MyExpert gives the wrong output. Expected self.down(F.silu(self.gate(x)) * self.up(x))")


def _mixture(x: torch.Tensor, gates: torch.Tensor, outs: torch.Tensor) -> torch.Tensor:
    return (gates.unsqueeze(-1) * outs).sum(dim=1)


def _soft_mistakes(x: torch.Tensor, logits: torch.Tensor, outs: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    n = outs.shape[1]
    probs = logits.softmax(dim=-1)
    top1 = F.one_hot(logits.argmax(dim=-1), n).to(x.dtype)
    return [
        ("took the softmax over the tokens (dim=0); the gate is a distribution over the experts of each "
         "token: softmax(x @ gate_weight.T, dim=-1)", _mixture(x, logits.softmax(dim=0), outs)),
        ("used the raw logits x @ gate_weight.T as weights; pass them through a softmax over the experts "
         "so that each token's weights are positive and sum to 1", _mixture(x, logits, outs)),
        ("averaged the experts and ignored the gate: the weights must depend on the token, "
         "softmax(x @ gate_weight.T, dim=-1)", outs.mean(dim=1)),
        ("summed the experts and ignored the gate: weight each expert by softmax(x @ gate_weight.T, dim=-1)",
         outs.sum(dim=1)),
        ("kept only the argmax expert: that is sparse top-1 routing, not the soft mixture; every expert "
         "contributes, weighted by its softmax probability", _mixture(x, top1, outs)),
        ("kept only the argmax expert (weighted by its probability): that is sparse top-1 routing, not the "
         "soft mixture; sum over all experts", _mixture(x, top1 * probs, outs)),
        ("used a sigmoid per expert; the soft mixture uses a softmax over the experts, so that the weights "
         "sum to 1", _mixture(x, logits.sigmoid(), outs)),
    ]


def soft_mixture(fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]) -> None:
    """Check ``fn(x (T, d), gate_weight (N, d), experts) -> (T, d)`` = Σ_i softmax(x·Wᵀ)_i · E_i(x)."""
    with torch.random.fork_rng(devices=[]):  # leave the notebook's random stream untouched
        _check_soft_mixture(fn)
    ok("soft_mixture", "every expert runs on every token, weighted by a softmax over the experts")


def _check_soft_mixture(fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]) -> None:
    for n_tokens, d_model, n_experts in ((7, 6, 4), (5, 8, 3)):
        torch.manual_seed(n_experts)
        experts = make_experts(n_experts, d_model, 2 * d_model)
        x = torch.randn(n_tokens, d_model)
        gate_weight = torch.randn(n_experts, d_model, requires_grad=True)
        what = f"fn(x of shape {tuple(x.shape)}, gate_weight of shape {tuple(gate_weight.shape)}, experts)"
        try:
            got = call(fn, x, gate_weight, experts, what=what)
        except NotImplementedError:
            raise
        except AssertionError as err:
            fail(f"{err}. Shapes: x is (T, d) and gate_weight is (N, d), so the logits x @ gate_weight.T "
                 "are (T, N)")
        got = as_tensor(got, "fn")
        expect_shape(got, (n_tokens, d_model), what)
        with torch.no_grad():
            logits = x @ gate_weight.T
            outs = torch.stack([expert(x) for expert in experts], dim=1)  # (T, N, d)
            expected = _mixture(x, logits.softmax(dim=-1), outs)
        if not close(got, expected):
            for hint, wrong in _soft_mistakes(x, logits, outs):
                if close(got, wrong):
                    fail(f"the soft mixture is wrong: it looks like you {hint}")
            fail("the soft mixture is wrong. Expected sum over i of softmax(x @ gate_weight.T, dim=-1)[:, i:i+1] "
                 "* experts[i](x)")
        if not got.requires_grad:
            fail("the output carries no gradient: do not detach the gate or wrap the computation in "
                 "torch.no_grad(); the router learns through these weights")
        got.sum().backward()
        if gate_weight.grad is None or not bool(gate_weight.grad.abs().sum() > 0):
            fail("no gradient reaches gate_weight: compute the gate from gate_weight with differentiable "
                 "operations (no .detach(), no argmax)")
