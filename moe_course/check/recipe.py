"""Check of notebook 08's ★★★ exercise: the learner builds the recipe's MoE layer from its parts and trains it.

``cls(d_model, d_hidden, n_experts, top_k, n_shared, bias_update_rate)`` is an ``nn.Module`` holding ``gate``
(``nn.Linear(d_model, n_experts, bias=False)``), ``experts`` (:class:`~moe_course.experts.GroupedExperts`),
``shared`` (a :class:`~moe_course.experts.SwiGLU` of width ``n_shared · d_hidden``, or ``None``) and the buffer
``expert_bias``; its ``forward`` routes with DeepSeek-V3's sigmoid gate (choose the top-k of score + bias, weigh
by the score, renormalised), adds the shared expert, and keeps ``last_routing``; ``after_step()`` moves the bias
by ±u from the training counts since the last call. ``step(model, x, y, optimizer) -> float`` is one training
step: forward, backward, optimizer step, then the post-step balancing.

Both are compared with the package's build: ``TinyLM(cfg)`` of the same seed must hold the same weights as
``TinyLM(cfg, ffn_factory=...)`` with the learner's layer, and three SGD steps (with an evaluation pass between
them) must leave the same weights, biases and losses. On a mismatch the check re-runs the same steps with each
wiring mistake it knows (:data:`LAYER_MISTAKES`, :data:`STEP_MISTAKES`) and names the one that matches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moe_course.check._core import call, fail, ok
from moe_course.dispatch import dispatch_grouped
from moe_course.experts import GroupedExperts, SwiGLU
from moe_course.model import ModelConfig, TinyLM
from moe_course.routing import Routing

__all__ = ["recipe_build"]

SHAPE = dict(vocab_size=64, block_size=8, n_layer=2, n_head=2, d_model=16)
CASES = (  # (what, n_experts, top_k, n_shared, d_hidden, u, dtype, (B, T))
    ("16 experts top-2 + 2 shared (the recipe's layout)", 16, 2, 2, 8, 1e-2, torch.float32, (4, 8)),
    ("4 experts, top-4 = N (every expert chosen: equal counts, no bias moves), 1 shared", 4, 4, 1, 8, 1e-2,
     torch.float32, (3, 8)),
    ("8 experts top-1, no shared expert, float64", 8, 1, 0, 8, 3e-2, torch.float64, (2, 5)),
    ("8 experts top-2, 1 shared, u = 0", 8, 2, 1, 8, 0.0, torch.float32, (4, 8)),
    ("6 experts top-3, 1 shared, one token per batch (B = 1, T = 1)", 6, 3, 1, 8, 1e-2, torch.float64, (1, 1)),
)
STEPS, LR = 3, 0.3

LAYER_MISTAKES = {
    "bias on logits": "added the bias to the logits before the sigmoid; DeepSeek-V3 adds it to the scores "
                      "s = sigmoid(logits) and only to choose: top-k of s + b",
    "bias in weights": "weighed the experts by s + b; the bias only chooses, the weights are the plain scores "
                       "s of the chosen experts (renormalised)",
    "bias ignored": "chose the top-k of the scores alone; choose by s + expert_bias, or the bias balances nothing",
    "softmax": "used a softmax gate; the recipe's gate is the sigmoid of each logit (DeepSeek-V3)",
    "no renormalize": "did not renormalise the chosen scores; divide them by their sum over the k choices",
    "router not trained": "detached the scores from the gate, so the router never learns; keep the weights "
                          "s.gather(...) in the autograd graph",
    "shared per choice": "added the shared expert once per chosen expert (k times); add shared(x) once per token",
    "shared weighted": "multiplied the shared expert's output by a routing weight; every token passes through it "
                       "unweighted: y = routed + shared(x)",
    "no shared": "left out the shared expert; add self.shared(x) to the routed output (when it exists)",
    "bias reversed": "moved each bias the wrong way: an overloaded expert (cᵢ > c̄) must get a lower bias, "
                     "bᵢ + u·sign(c̄ − cᵢ)",
    "top-1 counts": "counted only each token's first choice; count all k choices",
    "cumulative counts": "never reset the counts after an update; each after_step uses the counts since the "
                         "previous one (set them back to None or zeros)",
    "proportional": "moved each bias in proportion to its imbalance; the rule moves it by exactly ±u (torch.sign)",
    "eval counted": "also counted the evaluation pass; count only while self.training",
}
STEP_MISTAKES = {
    "aux twice": "added model.aux_loss() to the loss TinyLM returns, which already holds it: the balancing loss "
                 "counted twice; use _, loss = model(x, y) as it is",
    "no after_step": "never called model.after_step(), so no routing bias moved; call it after optimizer.step()",
    "late": "called model.after_step() before the forward pass, one step late; call it after optimizer.step()",
    "no zero_grad": "never reset the gradients; call optimizer.zero_grad() before loss.backward()",
    "no step": "never stepped the optimizer; call optimizer.step() after loss.backward()",
}


class _Wired(nn.Module):
    """The recipe layer written out (the right wiring or one named mistake), for telling mistakes apart."""

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, top_k: int, n_shared: int, u: float,
                 mistake: str = "right") -> None:
        super().__init__()
        self.n_experts, self.top_k, self.u, self.mistake = n_experts, top_k, u, mistake
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.experts = GroupedExperts(n_experts, d_model, d_hidden)
        self.shared = SwiGLU(d_model, n_shared * d_hidden) if n_shared else None
        self.register_buffer("expert_bias", torch.zeros(n_experts))
        self.last_routing: Routing | None = None
        self.aux_loss = torch.zeros(())
        self.step_counts: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        m = self.mistake
        flat = x.reshape(-1, x.shape[-1])  # (T, d)
        logits = self.gate(flat)  # (T, N)
        if m == "softmax":
            scores = logits.softmax(-1)
        elif m == "bias on logits":
            scores = torch.sigmoid(logits + self.expert_bias)
        else:
            scores = torch.sigmoid(logits)
        if m == "router not trained":
            scores = scores.detach()
        choice = scores if m in ("bias ignored", "bias on logits") else scores + self.expert_bias
        indices = choice.topk(self.top_k, dim=-1).indices  # (T, k)
        weights = (choice if m == "bias in weights" else scores).gather(1, indices)  # (T, k)
        if m != "no renormalize":
            weights = weights / weights.sum(-1, keepdim=True)
        y = dispatch_grouped(flat, weights, indices, self.experts)  # (T, d)
        if self.shared is not None and m != "no shared":
            shared = self.shared(flat)
            if m == "shared per choice":
                shared = shared * self.top_k
            elif m == "shared weighted":
                shared = shared * weights[:, :1]
            y = y + shared
        self.last_routing = Routing(weights.detach(), indices, logits.detach(), scores.detach())
        if self.training or m == "eval counted":
            chosen = indices[:, :1] if m == "top-1 counts" else indices
            counts = torch.bincount(chosen.reshape(-1), minlength=self.n_experts)
            self.step_counts = counts if self.step_counts is None else self.step_counts + counts
        return y.reshape(x.shape)

    @torch.no_grad()
    def after_step(self) -> None:
        if self.step_counts is None:
            return
        c = self.step_counts.to(self.expert_bias.dtype)
        if self.mistake == "bias reversed":
            move = torch.sign(c - c.mean())
        elif self.mistake == "proportional":
            move = (c.mean() - c) / c.mean()
        else:
            move = torch.sign(c.mean() - c)
        self.expert_bias += self.u * move
        if self.mistake != "cumulative counts":
            self.step_counts = None


def reference_step(model: TinyLM, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                   mistake: str = "right") -> float:
    """One training step of the recipe (or one named mistake of it): forward, backward, step, post-step update."""
    if mistake == "late":
        model.after_step()
    if mistake != "no zero_grad":
        optimizer.zero_grad()
    _, loss = model(x, y)
    if mistake == "aux twice":
        loss = loss + model.aux_loss()
    loss.backward()
    if mistake != "no step":
        optimizer.step()
    if mistake not in ("no after_step", "late"):
        model.after_step()
    return float(loss.detach())


def _cfg(n_experts: int, top_k: int, n_shared: int, d_hidden: int, u: float, **kw: Any) -> ModelConfig:
    return ModelConfig(ffn="moe", n_experts=n_experts, top_k=top_k, n_shared=n_shared, expert_hidden=d_hidden,
                       router_score="sigmoid", aux_loss_coef=0.0, bias_update_rate=u, **SHAPE, **kw)


def _mapped(name: str) -> str:
    """A package TinyLM's state name as the learner's layer names it (router.gate -> gate, router.expert_bias)."""
    return name.replace(".ffn.router.gate.", ".ffn.gate.").replace(".ffn.router.expert_bias", ".ffn.expert_bias")


def _state(model: nn.Module, package: bool = False) -> dict[str, torch.Tensor]:
    return {(_mapped(k) if package else k): v.detach().clone() for k, v in model.state_dict().items()}


def _batches(b: int, t: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        seq = torch.randint(0, SHAPE["vocab_size"], (b, t + 1), generator=g)
        out.append((seq[:, :-1].clone(), seq[:, 1:].clone()))
    return out


def _train(model: TinyLM, batches: list, step: Callable[..., Any], what: str | None = None,
           mistake: str = "right") -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """STEPS SGD steps, an evaluation pass after each (it must not count): losses and the state after each."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, states = [], []
    for x, y in batches:
        model.train()
        if what is None:
            loss = step(model, x, y, opt, mistake)
        else:
            loss = call(step, model, x, y, opt, what=what)
        if not isinstance(loss, (float, int, torch.Tensor)) or (isinstance(loss, torch.Tensor) and loss.numel() != 1):
            fail(f"{what}: the step must return the batch's loss as a float (float(loss)), got {type(loss).__name__}")
        losses.append(float(loss))
        model.eval()
        with torch.no_grad():
            model(x)
        states.append(_state(model))
    model.train()
    return losses, states


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].double(), b[k].double(), atol=tol, rtol=tol) for k in a)


def _build(cls: type, case: tuple, seed: int, what: str) -> TinyLM:
    _, n, k, s, h, u, dtype, _ = case
    cfg = _cfg(n, k, s, h, u)
    torch.manual_seed(seed)
    model = call(lambda: TinyLM(cfg, ffn_factory=lambda i: cls(cfg.d_model, h, n, k, s, u)), what=f"building {what}")
    return model.to(dtype)


def _package(case: tuple, seed: int) -> TinyLM:
    _, n, k, s, h, u, dtype, _ = case
    torch.manual_seed(seed)
    return TinyLM(_cfg(n, k, s, h, u)).to(dtype)


def _check_structure(model: TinyLM, ref: TinyLM, cls: type, what: str) -> None:
    """The learner's layer holds the parts under the names the check reads, with the package's initial weights."""
    for i, block in enumerate(model.blocks):
        layer = block.ffn
        if not isinstance(layer, cls):
            fail(f"{what}: block {i}'s feed-forward is a {type(layer).__name__}, not your layer")
        names = dict(layer.named_parameters())
        if any(name.endswith("expert_bias") for name in names):
            fail(f"{what}: expert_bias is an nn.Parameter, so the optimizer trains it by gradient; the bias moves "
                 "only by the ±u rule: register it with self.register_buffer('expert_bias', torch.zeros(n_experts))")
        for part, kind in (("gate", nn.Linear), ("experts", GroupedExperts)):
            if not isinstance(getattr(layer, part, None), kind):
                fail(f"{what}: the layer needs self.{part} = {kind.__name__}(...) (the check copies and compares it)")
        if not isinstance(getattr(layer, "expert_bias", None), torch.Tensor):
            fail(f"{what}: the layer needs the buffer self.expert_bias (n_experts,)")
        if not hasattr(layer, "last_routing") or not callable(getattr(layer, "after_step", None)):
            fail(f"{what}: the layer needs self.last_routing (set in forward) and after_step(); TinyLM finds its "
                 "MoE layers by last_routing and calls after_step() on them")
    mine, theirs = _state(model), _state(ref, package=True)
    if mine.keys() != theirs.keys():
        extra, missing = sorted(mine.keys() - theirs.keys()), sorted(theirs.keys() - mine.keys())
        fail(f"{what}: the model's weights are named differently from the package's build: extra {extra[:4]}, "
             f"missing {missing[:4]}. Hold exactly gate, experts, shared (None without shared experts) and the "
             "buffer expert_bias")
    bad = [k for k in mine if mine[k].shape != theirs[k].shape]
    if bad:
        fail(f"{what}: {bad[0]} has shape {tuple(mine[bad[0]].shape)}, the package's {tuple(theirs[bad[0]].shape)}; "
             "the shared expert is one SwiGLU of width n_shared · d_hidden")
    if not _close(mine, theirs, 0.0):
        fail(f"{what}: from the same seed the initial weights differ from the package's build; TinyLM initialises "
             "modules in the order they are created: create gate, then experts, then shared (and no other "
             "random draws)")


def _diagnose_layer(got: tuple, case: tuple, seed: int, batches: list, ref: tuple, what: str) -> None:
    _, n, k, s, h, u, dtype, _ = case
    cfg = _cfg(n, k, s, h, u)
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    for mistake, hint in LAYER_MISTAKES.items():
        torch.manual_seed(seed)
        wrong = TinyLM(cfg, ffn_factory=lambda i, m=mistake: _Wired(cfg.d_model, h, n, k, s, u, m)).to(dtype)
        losses, states = _train(wrong, batches, reference_step)
        if _close(got[1][-1], states[-1], tol) and not _close(ref[1][-1], states[-1], tol):
            fail(f"{what}: it looks like you {hint}.")
    for j, (g, r) in enumerate(zip(got[1], ref[1], strict=True)):
        if not _close(g, r, tol):
            key = next(key for key in r if not torch.allclose(g[key].double(), r[key].double(), atol=tol, rtol=tol))
            fail(f"{what}: after training step {j + 1} {key} differs from the package's build (largest difference "
                 f"{float((g[key].double() - r[key].double()).abs().max()):.3g}). Choose the top-k of "
                 "sigmoid(logits) + expert_bias, weigh by the sigmoid scores renormalised over the k, add "
                 "shared(x) once, count all k choices while training and move each bias by u·sign(c̄ − cᵢ)")


def recipe_build(cls: type, step: Callable[..., Any]) -> None:
    """Check the learner's recipe layer ``cls`` and training ``step`` against the package's TinyLM build."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        fail(f"pass the layer's class itself (an nn.Module subclass, e.g. MyRecipeMoE), got {cls!r}")
    if not callable(step):
        fail(f"step must be your training-step function step(model, x, y, optimizer) -> float, got {step!r}")
    for n_case, case in enumerate(CASES):
        label, dtype, (b, t) = case[0], case[6], case[7]
        what = f"{cls.__name__} on {label}"
        tol = 1e-5 if dtype == torch.float32 else 1e-9
        seed = 100 + n_case
        mine, ref = _build(cls, case, seed, what), _package(case, seed)
        _check_structure(mine, ref, cls, what)
        batches = _batches(b, t, seed)
        # the layer alone, trained with the reference step
        want = _train(ref, batches, reference_step)
        want = (want[0], [{_mapped(k): v for k, v in s.items()} for s in want[1]])
        got = _train(mine, batches, reference_step)
        same_losses = all(abs(a - c) <= 1e-4 for a, c in zip(got[0], want[0], strict=True))
        if not _close(got[1][-1], want[1][-1], tol) or not same_losses:
            _diagnose_layer(got, case, seed, batches, want, what)
            fail(f"{what}: the losses {[round(v, 5) for v in got[0]]} differ from the package's "
                 f"{[round(v, 5) for v in want[0]]}")
        if any(layer.expert_bias.requires_grad for layer in (blk.ffn for blk in mine.blocks)):
            fail(f"{what}: expert_bias requires grad; it is a buffer moved by the ±u rule, not trained")
    _check_step(step)
    ok("recipe_build", "sigmoid scores choose with the bias and weigh without it, grouped experts + one shared "
       "expert, bias moved by ±u from each step's training counts; the same weights, losses and biases as the "
       "package's TinyLM after 3 steps in every case")


def _step_cases() -> list[tuple[str, ModelConfig]]:
    return [("the recipe (bias update, no auxiliary loss)", _cfg(8, 2, 1, 8, 1e-2)),
            ("a top-2 softmax MoE with an auxiliary loss (α = 0.1)",
             ModelConfig(ffn="moe", n_experts=8, top_k=2, expert_hidden=8, aux_loss_coef=0.1, **SHAPE))]


def _same_run(a: tuple, b: tuple) -> bool:
    """Two (losses, states) of the step check: the same losses and the same final state."""
    return _close(a[1][-1], b[1][-1], 1e-5) and all(abs(x - y) <= 1e-5 for x, y in zip(a[0], b[0], strict=True))


def _check_step(step: Callable[..., Any]) -> None:
    for n_case, (label, cfg) in enumerate(_step_cases()):
        what = f"{getattr(step, '__name__', 'your step')} on {label}"
        torch.manual_seed(200 + n_case)
        model = TinyLM(cfg)
        batches = _batches(4, 8, 200 + n_case)
        before = [(x.clone(), y.clone()) for x, y in batches]
        want = _train(copy.deepcopy(model), batches, reference_step)
        got = _train(copy.deepcopy(model), batches, step, what=what)
        if any(not (torch.equal(x, bx) and torch.equal(y, by))
               for (x, y), (bx, by) in zip(batches, before, strict=True)):
            fail(f"{what}: the step changed its input batch in place; leave x and y as they are")
        if _same_run(got, want):
            continue
        for mistake, hint in STEP_MISTAKES.items():
            wrong = _train(copy.deepcopy(model), batches, reference_step, mistake=mistake)
            if _same_run(got, wrong):
                fail(f"{what}: it looks like you {hint}.")
        fail(f"{what}: the losses {[round(v, 5) for v in got[0]]} or the weights after 3 steps differ from the "
             f"reference's {[round(v, 5) for v in want[0]]}: zero_grad; _, loss = model(x, y); loss.backward(); "
             "optimizer.step(); model.after_step(); return float(loss)")

