"""Notebook 06's measurements: auxiliary-loss-free balancing (DeepSeek-V3's routing bias) against the aux loss.

=============================  ==================================================================================
``router_gradients``           the LM loss's and the Switch aux loss's gradients on the router weights: norms, cosine
``max_vio_batch``              MaxVio of the last training batch, averaged over the MoE layers
``global_counts``              assignments per expert over fixed validation windows (for MaxVio_global)
``LossFreeRecorder``           the ``train`` callback recording all of the above plus the routing biases
``simulate_bias``              a fixed skewed router whose bias follows bᵢ ← bᵢ + u·sign(c̄ − cᵢ), no training
``track``, ``final``, ``stats``  the ``loss_free_06`` experiment's tracker and its headline numbers
``SIZES``, ``course_*``        the course's experiment sizes and settings (``experiments.base_model``/``base_train``)
=============================  ==================================================================================

The stored comparison is the experiment ``loss_free_06`` of :mod:`moe_course.experiments`, whose runs use
:func:`track` to record all of the above during training::

    python -m moe_course.experiments run loss_free_06 --size cpu --seeds 0 1 2 --threads 1

MaxVio = (max load − mean load) / mean load (Wang et al. 2024, arXiv:2408.15664): ``MaxVio_batch`` on each
training batch, ``MaxVio_global`` on the counts of a whole validation set.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from moe_course.balancing import bias_update, switch_aux_loss
from moe_course.corpus import get_batch
from moe_course.metrics import max_violation
from moe_course.model import ModelConfig, TinyLM
from moe_course.train import TrainConfig
from moe_course.validate import check_int

__all__ = [
    "LOG_EVERY",
    "PROBE_BATCH",
    "SIZES",
    "BiasSimulation",
    "GradientInterference",
    "LossFreeRecorder",
    "base_model",
    "base_train",
    "bias_flips",
    "bias_probe",
    "check_size",
    "course_model",
    "course_train",
    "final",
    "global_counts",
    "max_vio_batch",
    "max_vio_global",
    "router_gradients",
    "simulate_bias",
    "stats",
    "track",
]

PROBE_BATCH = {"smoke": 2, "cpu": 16, "gpu": 32}  # sequences in the fixed batch of the gradient probe


# ---------------------------------------------------------------------------------------------------------
# Measurements on a model
# ---------------------------------------------------------------------------------------------------------


@dataclass
class GradientInterference:
    """Gradients on the routers' weights (all MoE layers, concatenated) of the LM loss and the aux loss.

    ``aux_norm`` is the gradient of the *unweighted* Switch loss (α = 1), so the ratio at any α is
    ``alpha * aux_norm / lm_norm``; the cosine does not depend on α.
    """

    lm_norm: float
    aux_norm: float
    cosine: float
    lm: torch.Tensor | None = None  # the two gradients themselves (flattened, float64), for Adam's view of them
    aux: torch.Tensor | None = None

    def ratio(self, alpha: float) -> float:
        """‖∇(α·L_aux)‖ / ‖∇L_LM‖ on the router weights."""
        return alpha * self.aux_norm / self.lm_norm if self.lm_norm > 0 else math.inf


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_batch(x: object, y: object) -> None:
    """x, y: (B, S) integer token ids and their targets, of the same shape."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dtype == torch.bool or t.is_floating_point() or t.dim() != 2:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a (B, S) tensor of integer token ids, got {got}; take x, y from "
                             "corpus.get_batch")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape (targets are x shifted by one), got x {tuple(x.shape)} "
                         f"and y {tuple(y.shape)}")


def _routers(model: TinyLM) -> list[torch.nn.Module]:
    routers = [layer.router for layer in model.moe_layers() if hasattr(getattr(layer, "router", None), "gate")]
    if not routers:
        raise ValueError("the model has no MoE layer with a linear router (router.gate); use ffn='moe', router='topk'")
    return routers


def router_gradients(model: TinyLM, x: torch.Tensor, y: torch.Tensor) -> GradientInterference:
    """Norms and cosine of ∇L_LM and ∇L_aux (Switch loss, α = 1, summed over layers) w.r.t. the router weights.

    x, y: (B, S) token ids and targets. Runs the model in eval mode (no balancing state changes: the bias
    counts of the training step are left alone) and leaves the parameters' ``.grad`` untouched.
    """
    _check_batch(x, y)
    routers = _routers(model)
    captured: list[Any] = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: captured.append(out)) for r in routers]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits, _ = model(x)
            lm = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            aux = sum(switch_aux_loss(r.scores, r.indices, r.scores.shape[-1]) for r in captured)
            weights = [r.gate.weight for r in routers]
            g_lm = torch.cat([g.reshape(-1) for g in torch.autograd.grad(lm, weights, retain_graph=True)])
            g_aux = torch.cat([g.reshape(-1) for g in torch.autograd.grad(aux, weights)])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    g_lm, g_aux = g_lm.double(), g_aux.double()
    cosine = float(F.cosine_similarity(g_lm, g_aux, dim=0)) if g_aux.norm() > 0 and g_lm.norm() > 0 else 0.0
    return GradientInterference(float(g_lm.norm()), float(g_aux.norm()), cosine, g_lm, g_aux)


def max_vio_batch(model: TinyLM) -> float:
    """MaxVio of the last forward pass's routing (one batch), averaged over the MoE layers."""
    vios = [max_violation(layer.last_routing.counts(layer.n_experts))
            for layer in model.moe_layers() if layer.last_routing is not None]
    return sum(vios) / len(vios) if vios else math.nan


def _fixed_windows(model: TinyLM, data: torch.Tensor, batch_size: int, n_batches: int, seed: int,
                   device: torch.device) -> Iterator[None]:
    """Run ``model`` in eval mode on ``n_batches`` fixed windows of ``data`` (seeded), yielding after each forward
    pass; the training mode is restored afterwards, also when the caller stops early."""
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for _ in range(n_batches):
            x, _ = get_batch(data, batch_size, model.cfg.block_size, gen, device)
            model(x)
            yield
    finally:
        model.train(was_training)


@torch.no_grad()
def global_counts(model: TinyLM, data: torch.Tensor, batch_size: int = 16, n_batches: int = 8, seed: int = 1234,
                  device: torch.device | None = None) -> list[torch.Tensor]:
    """Assignments per expert (one (N,) tensor per MoE layer) over ``n_batches`` fixed windows of ``data``.

    Uses the same windows as :func:`moe_course.train.evaluate` (same seed), in eval mode.
    """
    check_int("batch_size", batch_size, 1)
    check_int("n_batches", n_batches, 1)
    device = device or next(model.parameters()).device
    layers = model.moe_layers()
    counts = [torch.zeros(layer.n_experts, dtype=torch.long, device=device) for layer in layers]
    for _ in _fixed_windows(model, data, batch_size, n_batches, seed, device):
        for c, layer in zip(counts, layers, strict=True):
            c += layer.last_routing.counts(layer.n_experts)
    return [c.cpu() for c in counts]


def max_vio_global(model: TinyLM, data: torch.Tensor, batch_size: int = 16, n_batches: int = 8,
                   device: torch.device | None = None) -> float:
    """MaxVio of the counts over the validation windows, averaged over the MoE layers (MaxVio_global)."""
    if not model.moe_layers():
        raise ValueError("model has no MoE layers, so there is no load to measure; pass a TinyLM with ffn='moe'")
    counts = global_counts(model, data, batch_size, n_batches, device=device)
    return sum(max_violation(c) for c in counts) / len(counts)


class LossFreeRecorder:
    """``train`` callback: MaxVio_batch (mean per interval), routing biases and router gradients at log points,
    MaxVio_global at evaluation points."""

    def __init__(self, log_every: int, cfg: TrainConfig, val_data: torch.Tensor,
                 probe: tuple[torch.Tensor, torch.Tensor] | None = None, probe_batch: int = 0) -> None:
        check_int("log_every", log_every, 1)
        check_int("probe_batch", probe_batch, 0)
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be the run's TrainConfig, got {type(cfg).__name__}")
        if probe is not None:
            if not isinstance(probe, (tuple, list)) or len(probe) != 2:
                raise ValueError(f"probe must be None or a pair (x, y) of token ids and targets, got "
                                 f"{type(probe).__name__}")
            _check_batch(*probe)
        self.log_every, self.cfg, self.val_data, self.probe = log_every, cfg, val_data, probe
        self.probe_batch = probe_batch  # with no probe given: draw a fixed one of this many sequences at first use
        self.step: list[int] = []
        self.max_vio_batch: list[float] = []
        self.bias: list[list[list[float]]] = []  # [log point][moe layer][expert]
        self.grad_lm: list[float] = []
        self.grad_aux: list[float] = []
        self.grad_cos: list[float] = []
        self.lm_step: list[float] = []  # Adam's step along the LM gradient with the aux term / without it
        self._v_lm: torch.Tensor | None = None  # second-moment estimates of the LM-only and the total gradient
        self._v_all: torch.Tensor | None = None
        self.val_step: list[int] = []
        self.max_vio_global: list[float] = []
        self._vio, self._n = 0.0, 0

    @torch.no_grad()
    def __call__(self, step: int, model: TinyLM) -> None:
        layers = model.moe_layers()
        saved = [layer.last_routing for layer in layers]  # the training loop reads them after this callback
        try:
            self._record(step, model)
        finally:
            for layer, routing in zip(layers, saved, strict=True):
                layer.last_routing = routing

    def _record(self, step: int, model: TinyLM) -> None:
        self._vio += max_vio_batch(model)
        self._n += 1
        done = step + 1  # the callback receives the 0-based index of the step just taken
        last = done == self.cfg.steps
        if done % self.log_every == 0 or last:
            self.step.append(done)
            self.max_vio_batch.append(self._vio / self._n)
            self._vio, self._n = 0.0, 0
            self.bias.append([layer.router.expert_bias.tolist() for layer in model.moe_layers()
                              if hasattr(layer.router, "expert_bias")])
            if self.probe is None and self.probe_batch:
                self.probe = get_batch(self.val_data, self.probe_batch, model.cfg.block_size,
                                       torch.Generator().manual_seed(99), next(model.parameters()).device)
            if self.probe is not None:
                grads = router_gradients(model, *self.probe)
                self.grad_lm.append(grads.lm_norm)
                self.grad_aux.append(grads.aux_norm)
                self.grad_cos.append(grads.cosine)
                self.lm_step.append(self._adam_step_ratio(grads, model.cfg.aux_loss_coef))
        if done % self.cfg.eval_every == 0 or last:
            self.val_step.append(done)
            self.max_vio_global.append(max_vio_global(model, self.val_data, self.cfg.batch_size,
                                                      self.cfg.eval_batches))

    def _adam_step_ratio(self, grads: GradientInterference, alpha: float) -> float:
        """How much the aux term shrinks Adam's step along the LM gradient on the router weights.

        Adam divides each weight's gradient by √v, the running mean of its squared *total* gradient, so an aux
        gradient that is orthogonal to the LM gradient (cosine ≈ 0) still slows the LM's learning where it is
        large. Two second-moment estimates, of g_LM² and of (g_LM + α·g_aux)², are kept from the probe batch's
        gradients at each log point (β₂ = 0.95 per step, so 0.95^log_every between points), and the ratio
        ‖g_LM / √v_total‖ / ‖g_LM / √v_LM‖ is recorded: 1 means no effect, 0.5 a halved LM step.
        """
        g_lm, g_all = grads.lm, grads.lm + alpha * grads.aux
        beta = 0.95 ** self.log_every
        if self._v_lm is None:
            self._v_lm, self._v_all = g_lm ** 2, g_all ** 2
        else:
            self._v_lm = beta * self._v_lm + (1 - beta) * g_lm ** 2
            self._v_all = beta * self._v_all + (1 - beta) * g_all ** 2
        eps = 1e-8
        with_aux = (g_lm / (self._v_all.sqrt() + eps)).norm()
        without = (g_lm / (self._v_lm.sqrt() + eps)).norm()
        return float(with_aux / without) if without > 0 else 1.0

    def record(self) -> dict[str, list]:
        """What was recorded, for ``RunRecord.extra`` (lists indexed by log point; ``max_vio_global`` by
        evaluation point)."""
        return {"max_vio_batch": self.max_vio_batch, "bias": self.bias, "grad_lm": self.grad_lm,
                "grad_aux": self.grad_aux, "grad_cos": self.grad_cos, "lm_step": self.lm_step,
                "max_vio_global": self.max_vio_global}


@torch.no_grad()
def bias_flips(model: TinyLM, data: torch.Tensor, batch_size: int = 16, n_batches: int = 8,
               seed: int = 1234) -> list[float]:
    """Per MoE layer with a routing bias: the share of tokens whose chosen experts change when the bias is removed.

    The layer's real inputs on ``n_batches`` fixed windows of ``data`` (eval mode); each token's top-k set of
    the biased scores against that of the scores alone (group limits ignored): how much routing the bias
    actually decides, where its size alone (a few hundredths) says little.
    """
    check_int("batch_size", batch_size, 1)
    check_int("n_batches", n_batches, 1)
    layers = [layer for layer in model.moe_layers() if hasattr(layer.router, "expert_bias")]
    if not layers:
        raise ValueError("model has no MoE layer with a routing bias; train with ModelConfig.bias_update_rate > 0")
    inputs: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.router.register_forward_pre_hook(lambda _m, args, i=i: inputs[i].append(args[0].detach()))
             for i, layer in enumerate(layers)]
    try:
        for _ in _fixed_windows(model, data, batch_size, n_batches, seed, next(model.parameters()).device):
            pass
    finally:
        for h in hooks:
            h.remove()
    shares = []
    for layer, xs in zip(layers, inputs, strict=True):
        r = layer.router
        scores = r.gate(torch.cat(xs)).float()
        scores = scores.sigmoid() if r.score == "sigmoid" else scores.softmax(-1)
        k = r.k
        plain = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, -1).indices, True)
        biased = torch.zeros_like(plain).scatter_(1, (scores + r.expert_bias).topk(k, -1).indices, True)
        shares.append(float((plain != biased).any(-1).float().mean()))
    return shares


def bias_probe(model: TinyLM, corpus: Any) -> dict[str, Any]:
    """loss_free_06's probe after training: the share of routing decisions the bias flips, per layer."""
    if not any(hasattr(layer.router, "expert_bias") for layer in model.moe_layers()):
        return {}
    return {"bias_flips": bias_flips(model, corpus.val_part("test")[0])}


# ---------------------------------------------------------------------------------------------------------
# The bias update on a fixed router (no training): the update rate's effect in isolation
# ---------------------------------------------------------------------------------------------------------


@dataclass
class BiasSimulation:
    """What :func:`simulate_bias` recorded."""

    bias: torch.Tensor  # (steps + 1, N) the bias before each step and after the last
    load: torch.Tensor  # (steps, N) fraction of the T·k assignments each expert got at each step
    rate: float
    skew: float

    @property
    def max_vio(self) -> torch.Tensor:
        """(steps,) MaxVio_batch at each step."""
        return self.load.max(dim=1).values * self.load.shape[1] - 1.0


def simulate_bias(n_experts: int = 8, k: int = 2, rate: float = 1e-3, skew: float = 1.0, steps: int = 300,
                  n_tokens: int = 512, seed: int = 0) -> BiasSimulation:
    """A frozen, skewed sigmoid router (logits = noise + skew · ramp, fresh tokens each step) balanced by the bias.

    Each step chooses the top-k of ``sigmoid(logits) + bias`` and then applies bᵢ ← bᵢ + u·sign(c̄ − cᵢ) with
    that step's counts: the update rule alone, without any learning of the router.
    """
    check_int("n_experts", n_experts, 1)
    check_int("k", k, 1)
    _check_number("rate", rate)
    _check_number("skew", skew)
    check_int("steps", steps, 1)
    check_int("n_tokens", n_tokens, 1)
    if not 1 <= k <= n_experts:
        raise ValueError(f"k must be between 1 and n_experts={n_experts}, got {k}")
    if not (math.isfinite(rate) and rate >= 0):
        raise ValueError(f"rate must be a finite number >= 0, got {rate!r}")
    if steps < 1 or n_tokens < 1:
        raise ValueError(f"steps and n_tokens must be positive, got steps={steps}, n_tokens={n_tokens}")
    gen = torch.Generator().manual_seed(seed)
    ramp = skew * torch.linspace(1.0, -1.0, n_experts)
    bias = torch.zeros(n_experts)
    biases, loads = [bias], []
    for _ in range(steps):
        scores = (torch.randn(n_tokens, n_experts, generator=gen) + ramp).sigmoid()  # (T, N)
        indices = (scores + bias).topk(k, dim=-1).indices  # (T, k): the bias only chooses
        counts = torch.bincount(indices.reshape(-1), minlength=n_experts)
        loads.append(counts.double() / counts.sum())
        bias = bias_update(bias, counts, rate)
        biases.append(bias)
    return BiasSimulation(torch.stack(biases), torch.stack(loads), rate, skew)


# ---------------------------------------------------------------------------------------------------------
# The course's experiment sizes and their model and training settings. moe_course.experiments re-exports them
# as SIZES, base_model and base_train; they live here, below it, so that the experiment registry imports this
# module and never the reverse (no import cycle).
# ---------------------------------------------------------------------------------------------------------

SIZES = ("smoke", "cpu", "gpu")


def check_size(size: str) -> None:
    """Raise ValueError unless ``size`` is one of :data:`SIZES`."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; use one of {', '.join(SIZES)}")


def course_model(size: str, **overrides: Any) -> ModelConfig:
    """The MoE TinyLM of each size (no balancing loss unless asked), with ``overrides`` applied.

    This is :func:`moe_course.experiments.base_model`; :func:`base_model` below is notebook 06's variant.
    """
    check_size(size)
    shapes = {
        "smoke": dict(block_size=16, n_layer=1, n_head=2, d_model=16, n_experts=4, top_k=2, expert_hidden=16,
                      d_hidden=32),
        "cpu": dict(block_size=64, n_layer=2, n_head=2, d_model=64, n_experts=8, top_k=2, expert_hidden=64,
                    d_hidden=128),
        "gpu": dict(block_size=256, n_layer=4, n_head=4, d_model=256, n_experts=16, top_k=2, expert_hidden=256,
                    d_hidden=512),
    }[size]
    return ModelConfig(**{"ffn": "moe", "aux_loss_coef": 0.0, "z_loss_coef": 0.0, **shapes, **overrides})


def course_train(size: str, **overrides: Any) -> TrainConfig:
    """The training settings of each size, with ``overrides`` applied (:func:`moe_course.experiments.base_train`)."""
    check_size(size)
    settings = {
        "smoke": dict(steps=6, batch_size=4, warmup=1, eval_every=3, eval_batches=1),
        "cpu": dict(steps=600, batch_size=16, lr=3e-3, warmup=30, eval_every=100, eval_batches=8),
        "gpu": dict(steps=3000, batch_size=32, lr=1e-3, warmup=200, eval_every=250, eval_batches=20),
    }[size]
    return TrainConfig(**{**settings, **overrides})


# ---------------------------------------------------------------------------------------------------------
# The loss_free_06 experiment's pieces (registered in moe_course.experiments)
# ---------------------------------------------------------------------------------------------------------

LOG_EVERY = {"smoke": 2, "cpu": 10, "gpu": 50}  # training steps per recorded point
U = 1e-3  # DeepSeek-V3's bias update speed
ALPHAS = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # the aux loss's trade-off curve in loss_free_06
RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # the routing bias's
SEEDS = tuple(range(10))
EVAL_EVERY = {"cpu": 50}  # notebook 06 logs its balance curves twice as often as the course's default at cpu size


def base_model(size: str, **overrides: Any) -> ModelConfig:
    """The course's MoE TinyLM (notebook 04's size) with DeepSeek-V3's sigmoid gate, ``overrides`` applied."""
    return course_model(size, **{"router_score": "sigmoid", **overrides})


def base_train(size: str, **overrides: Any) -> TrainConfig:
    """The course's training settings (600 steps at cpu size), evaluated every :data:`EVAL_EVERY` steps."""
    return course_train(size, **{**({"eval_every": EVAL_EVERY[size]} if size in EVAL_EVERY else {}), **overrides})


def track(corpus: Any, cfg: TrainConfig, log_every: int, size: str, device: torch.device | None) -> LossFreeRecorder:
    """The experiment's per-step tracker: a :class:`LossFreeRecorder` with a fixed validation probe batch."""
    check_size(size)
    return LossFreeRecorder(log_every, cfg, corpus.val_part("tune")[0] if size != "smoke" else corpus.val,
                            probe_batch=PROBE_BATCH[size])


def final(record: Any) -> dict[str, float]:
    """Headline numbers of one run of ``loss_free_06``: test- and tuning-half loss, last val loss and MaxVio_global;
    MaxVio_batch averaged over the last quarter of training."""
    batch = record.extra.get("max_vio_batch", [])
    last = batch[-max(1, len(batch) // 4):]
    glob = record.extra.get("max_vio_global", [])
    return {
        "test_loss": getattr(record, "test_loss", math.nan),
        "tune_loss": getattr(record, "tune_loss", math.nan),
        "val_loss": record.val_loss[-1] if record.val_loss else math.nan,
        "max_vio_global": glob[-1] if glob else math.nan,
        "max_vio_batch": sum(last) / len(last) if last else math.nan,
    }


def stats(result: Any, label: str, key: str) -> tuple[float, float]:
    """Mean and sample std over seeds (:func:`moe_course.metrics.mean_std`) of one :func:`final` number of ``label``."""
    from moe_course.metrics import mean_std

    keys = ("test_loss", "tune_loss", "val_loss", "max_vio_global", "max_vio_batch")
    if key not in keys:
        raise ValueError(f"key must be one of {keys} (the numbers final() reports), got {key!r}")
    return mean_std([final(r)[key] for r in result.records_of(label)])
