"""Checks for notebook 02 (the MoE layer): ``check.expert_ffn(MyExpert)``, ``check.soft_mixture(fn)`` and
``check.model_params(fn)``.

``expert_ffn`` builds the learner's SwiGLU expert, gives it the weights of the reference
:class:`~moe_course.experts.SwiGLU` and compares the outputs. ``soft_mixture`` calls the learner's
``fn(x, gate_weight, experts)`` and compares it with ``Σ_i softmax(x·Wᵀ)_i · E_i(x)``. ``model_params``
calls the learner's ``fn(model) -> (total, active)`` on three small :class:`~moe_course.model.TinyLM`
models and compares with :func:`moe_course.params.count_model`. When an answer is wrong, each check
recomputes the usual mistakes and names the one that matches.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_course.check._core import as_count, as_tensor, call, close, compare_grads, expect_shape, fail, fn_name, ok
from moe_course.experts import SwiGLU, make_experts
from moe_course.model import ModelConfig, TinyLM
from moe_course.moe import MoE
from moe_course.params import count_model

__all__ = ["expert_ffn", "model_params", "soft_mixture"]

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
    x_mine, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    expected = ref(x_ref)
    got = as_tensor(call(mine, x_mine, what="MyExpert(...)(x)"), "MyExpert.forward")
    if tuple(got.shape) == (*x.shape[:-1], D_HIDDEN):
        fail(f"MyExpert returns {D_HIDDEN} = d_hidden features per token; finish with self.down to map "
             f"back to d_model = {D_MODEL}")
    expect_shape(got, tuple(x.shape), f"MyExpert(...)(x) for x of shape {tuple(x.shape)}")
    if not close(got, expected):
        with torch.no_grad():
            mistakes = _expert_mistakes(ref, x)
        for hint, wrong in mistakes:
            if wrong.shape == got.shape and close(got, wrong):
                fail(f"MyExpert gives the wrong output: it looks like you {hint}")
        fail("MyExpert gives the wrong output. Expected self.down(F.silu(self.gate(x)) * self.up(x))")
    names = ("gate.weight", "up.weight", "down.weight")
    compare_grads("MyExpert(...)(x)", got, expected,
                  {"x": x_mine, **{n: mine.get_parameter(n) for n in names}},
                  {"x": x_ref, **{n: ref.get_parameter(n) for n in names}})


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
        x = torch.randn(n_tokens, d_model).requires_grad_(True)
        gate_weight = torch.randn(n_experts, d_model).requires_grad_(True)
        what = f"{fn_name(fn)}(x of shape {tuple(x.shape)}, gate_weight of shape {tuple(gate_weight.shape)}, experts)"
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
        x_ref, gate_ref = x.detach().clone().requires_grad_(True), gate_weight.detach().clone().requires_grad_(True)
        ref = _mixture(x_ref, (x_ref @ gate_ref.T).softmax(dim=-1), torch.stack([e(x_ref) for e in experts], dim=1))
        params = list(experts.parameters())
        compare_grads("the soft mixture", got, ref,
                      {"x": x, "gate_weight": gate_weight, "the experts' parameters": params},
                      {"x": x_ref, "gate_weight": gate_ref, "the experts' parameters": params})


# ----------------------------------------------------------------------------------------------------
# model_params: total and active parameters of a TinyLM, counted by walking its modules
# ----------------------------------------------------------------------------------------------------

# Three small TinyLMs; every TinyLM ties its output head to the token embedding. The first is MoE in every
# layer; the second only in every second layer (dense SwiGLU FFNs in between); the third adds a shared
# expert. top_k >= 2 everywhere so that "one expert per token" gives a different number, and top_k = 3 next
# to the shared expert (as wide as one routed expert) so that leaving it out is not the same as k = 1.
MODEL_CONFIGS: list[dict[str, Any]] = [
    dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=16, ffn="moe", n_experts=4, top_k=2,
         expert_hidden=12),
    dict(vocab_size=48, block_size=8, n_layer=4, n_head=2, d_model=12, ffn="moe", d_hidden=40, n_experts=6,
         top_k=3, expert_hidden=10, moe_every=2),
    dict(vocab_size=40, block_size=12, n_layer=3, n_head=2, d_model=8, ffn="moe", n_experts=8, top_k=3,
         expert_hidden=6, n_shared=1),
]
_LABEL_KEYS = ("n_layer", "d_model", "n_experts", "top_k", "expert_hidden", "moe_every", "n_shared")

_ALL_ACTIVE = ("counted every routed expert as active (active == total). A token runs only top_k of the "
               "n_experts experts of an MoE layer: subtract the n_experts - top_k experts it skips, in every "
               "MoE layer")
_NO_SHARED = ("left out the shared expert (the MoE layer's `shared` module): every token passes through it "
              "besides its top_k routed experts, so all of it is active")
_NO_ROUTER = ("left out the router: it scores all n_experts experts for every token, so all of its "
              "d_model x n_experts weights are active")
_FFN_ONLY = ("counted only feed-forward weights as active. Attention, the embeddings and the norms are used "
             "by every token too: active = total minus the routed experts a token skips")
_NO_ATTENTION = "left out the attention weights: every token goes through attention in every block"
_NO_EMBEDDINGS = ("left out the embeddings: like the model cards (and params.count_model), the course counts "
                  "the token and position embeddings as active")
_DENSE_AS_MOE = ("treated the dense FFN layers as MoE layers: with moe_every=2 only every second block holds "
                 "an MoE layer, so subtract skipped experts only in the blocks whose FFN has experts "
                 "(model.cfg.n_layer counts all blocks)")
_DENSE_LEFT_OUT = ("left the dense FFN layers out of active: with moe_every=2 the other blocks hold one plain "
                   "SwiGLU FFN, which every token uses in full")
_TIED_TWICE = ("counted the tied embedding twice. TinyLM's output head is the token-embedding matrix itself "
               "(model.head.weight is model.tok_emb.weight); model.parameters() yields a shared parameter "
               "once, whereas summing each module's own weights or named_parameters(remove_duplicate=False) "
               "counts it twice")
_STATE_DICT = ("summed the state_dict: it lists the tied embedding twice (as tok_emb.weight and head.weight) "
               "and also holds buffers such as the router's expert_bias, which are not parameters. Use "
               "model.parameters(), which yields a shared parameter once")
_TOTAL_IS_ACTIVE = ("returned the active count as the total: the total holds all n_experts routed experts of "
                    "every MoE layer, whether a token uses them or not")


def _size(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _model_label(cfg: dict[str, Any]) -> str:
    fields = ", ".join(f"{key}={cfg[key]}" for key in _LABEL_KEYS if key in cfg)
    return f"TinyLM(ModelConfig(ffn='moe', {fields}))"


def _anatomy(model: TinyLM) -> dict[str, int]:
    """The reference counts and the pieces the usual mistakes add or leave out."""
    total, active = count_model(model)
    moe = [block.ffn for block in model.blocks if isinstance(block.ffn, MoE)]
    n_experts, top_k = moe[0].n_experts, moe[0].top_k
    per_expert = _size(moe[0].experts) // n_experts  # a ModuleList of experts or one grouped weight tensor
    with_duplicates = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    return {
        "total": total,
        "active": active,
        "tied": with_duplicates - total,
        "buffers": sum(b.numel() for b in model.buffers()),
        "embeddings": _size(model.tok_emb) + _size(model.pos_emb),
        "attention": sum(_size(block.attn) for block in model.blocks),
        "router": sum(_size(layer.router) for layer in moe),
        "shared": sum(_size(layer.shared) for layer in moe),
        "dense_ffn": sum(_size(block.ffn) for block in model.blocks if not isinstance(block.ffn, MoE)),
        "chosen_experts": len(moe) * top_k * per_expert,
        "one_expert_active": total - len(moe) * (n_experts - 1) * per_expert,
        "every_block_moe": total - len(model.blocks) * (n_experts - top_k) * per_expert,
    }


def _active_mistakes(parts: dict[str, int]) -> list[tuple[str, int]]:
    """(hint, wrong active count) for one model; the total is assumed right."""
    active = parts["active"]
    out = [
        (_ALL_ACTIVE, parts["total"]),
        ("counted one routed expert per token; each token uses top_k experts in every MoE layer, so only "
         "n_experts - top_k of them are idle", parts["one_expert_active"]),
        (_NO_SHARED, active - parts["shared"]),
        (_NO_ROUTER, active - parts["router"]),
        (_NO_ATTENTION, active - parts["attention"]),
        (_NO_EMBEDDINGS, active - parts["embeddings"]),
        (_DENSE_AS_MOE, parts["every_block_moe"]),
        (_DENSE_LEFT_OUT, active - parts["dense_ffn"]),
        (_TIED_TWICE, active + parts["tied"]),
    ]
    extras = ("shared", "router", "dense_ffn")
    for n in range(len(extras) + 1):  # the chosen experts plus any of the other feed-forward pieces
        for chosen in combinations(extras, n):
            out.append((_FFN_ONLY, parts["chosen_experts"] + sum(parts[key] for key in chosen)))
    return out


def _as_pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, torch.Tensor) and value.numel() == 2:
        value = value.tolist()
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        kind = f"a {type(value).__name__}" if not isinstance(value, (tuple, list)) else f"{len(value)} values"
        fail(f"{what} should return a pair (total, active), e.g. `return total, total - inactive`; got {kind}")
    return as_count(value[0], f"the total from {what}"), as_count(value[1], f"the active count from {what}")


def _hinted(head: str, hints: list[str], fallback: str) -> None:
    unique = list(dict.fromkeys(hints))
    if unique:
        fail(f"{head}. It looks like you " + "; or you ".join(unique) + ".")
    fail(f"{head}. {fallback}")


def model_params(fn: Callable[[nn.Module], Any]) -> None:
    """Check ``fn(model) -> (total, active)`` against :func:`~moe_course.params.count_model` on three TinyLMs."""
    with torch.random.fork_rng(devices=[]):  # building the models draws random weights
        torch.manual_seed(0)
        for cfg in MODEL_CONFIGS:
            _check_model_params(fn, cfg)
    ok("model_params", "matches params.count_model on TinyLMs with MoE in every layer, in every second layer, "
       "and with a shared expert")


def _check_model_params(fn: Callable[[nn.Module], Any], cfg: dict[str, Any]) -> None:
    model = TinyLM(ModelConfig(**cfg))
    parts = _anatomy(model)
    total, active = parts["total"], parts["active"]
    label = _model_label(cfg)
    what = f"my_count_params({label})"
    got_total, got_active = _as_pair(call(fn, model, what=what), what)
    if (got_total, got_active) == (total, active):
        return
    head = (f"{what} returned (total={got_total:,}, active={got_active:,}) but the answer is "
            f"(total={total:,}, active={active:,})")
    if (got_total, got_active) == (active, total):
        fail(f"{head}: the two numbers are swapped; return (total, active) in that order")
    if got_total != total:
        mistakes = [(_TIED_TWICE, total + parts["tied"]), (_STATE_DICT, total + parts["tied"] + parts["buffers"]),
                    (_TOTAL_IS_ACTIVE, active)]
        hints = [hint for hint, wrong in mistakes if wrong == got_total]
        _hinted(head, hints, "Count every parameter of the model once: sum(p.numel() for p in model.parameters())")
    if got_active > got_total:
        fail(f"{head}: active cannot exceed total; active = total minus the routed experts a token skips")
    hints = [hint for hint, wrong in _active_mistakes(parts) if wrong == got_active and wrong != active]
    _hinted(head, hints, "Active = total minus, in every MoE layer, the n_experts - top_k routed experts a token "
            "does not use; everything else (embeddings, attention, norms, router, shared experts, dense "
            "FFNs) is active")
