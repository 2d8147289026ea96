"""Notebook 06's measurements: auxiliary-loss-free balancing (DeepSeek-V3's routing bias) against the aux loss.

=============================  ==================================================================================
``router_gradients``           the LM loss's and the Switch aux loss's gradients on the router weights: norms, cosine
``max_vio_batch``              MaxVio of the last training batch, averaged over the MoE layers
``global_counts``              assignments per expert over fixed validation windows (for MaxVio_global)
``LossFreeRecorder``           the ``train`` callback recording all of the above plus the routing biases
``simulate_bias``              a fixed skewed router whose bias follows bᵢ ← bᵢ + u·sign(c̄ − cᵢ), no training
``EXPERIMENTS``                the trained comparison, the update-rate sweep and DeepSeek-V3's complements
=============================  ==================================================================================

The experiments follow the course's experiment pattern: a named list of runs per size, trained once per seed,
stored as ``data/results/NAME-SIZE.json`` with a fingerprint of the configurations and of this code, so that a
stale file is refused. Command line::

    python -m moe_course.loss_free run loss_free_06 --size cpu --seeds 0 1 2
    python -m moe_course.loss_free show loss_free_06 --size cpu

MaxVio = (max load − mean load) / mean load (Wang et al. 2024, arXiv:2408.15664): ``MaxVio_batch`` on each
training batch, ``MaxVio_global`` on the counts of a whole validation set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moe_course.balancing import bias_update, switch_aux_loss
from moe_course.corpus import get_batch, load_corpus
from moe_course.device import pick_device, seed_everything
from moe_course.metrics import max_violation
from moe_course.model import ModelConfig, TinyLM
from moe_course.train import TrainConfig, train

__all__ = [
    "CODE_VERSION",
    "EXPERIMENTS",
    "RESULTS_DIR",
    "SIZES",
    "BiasSimulation",
    "GradientInterference",
    "LossFreeRecord",
    "LossFreeRecorder",
    "LossFreeResult",
    "Run",
    "StaleResultError",
    "fingerprint",
    "global_counts",
    "load_result",
    "main",
    "max_vio_batch",
    "max_vio_global",
    "result_path",
    "router_gradients",
    "run_experiment",
    "simulate_bias",
    "train_run",
]

CODE_VERSION = 1
"""Bump when the recording code changes what a stored result means."""

SIZES = ("smoke", "cpu", "gpu")
RESULTS_DIR = Path(os.environ.get("MOE_RESULTS_DIR", Path(__file__).resolve().parents[1] / "data" / "results"))
LOG_EVERY = {"smoke": 2, "cpu": 10, "gpu": 50}  # training steps per recorded point
CORPUS_BYTES = {"smoke": 40_000, "cpu": None, "gpu": None}  # None: the whole corpus
PROBE_BATCH = {"smoke": 2, "cpu": 16, "gpu": 32}  # sequences in the fixed batch of the gradient probe


class StaleResultError(ValueError):
    """A stored result was made by other configurations or an older version of the code."""


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

    def ratio(self, alpha: float) -> float:
        """‖∇(α·L_aux)‖ / ‖∇L_LM‖ on the router weights."""
        return alpha * self.aux_norm / self.lm_norm if self.lm_norm > 0 else math.inf


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
    return GradientInterference(float(g_lm.norm()), float(g_aux.norm()), cosine)


def max_vio_batch(model: TinyLM) -> float:
    """MaxVio of the last forward pass's routing (one batch), averaged over the MoE layers."""
    vios = [max_violation(layer.last_routing.counts(layer.n_experts))
            for layer in model.moe_layers() if layer.last_routing is not None]
    return sum(vios) / len(vios) if vios else math.nan


@torch.no_grad()
def global_counts(model: TinyLM, data: torch.Tensor, batch_size: int = 16, n_batches: int = 8, seed: int = 1234,
                  device: torch.device | None = None) -> list[torch.Tensor]:
    """Assignments per expert (one (N,) tensor per MoE layer) over ``n_batches`` fixed windows of ``data``.

    Uses the same windows as :func:`moe_course.train.evaluate` (same seed), in eval mode.
    """
    device = device or next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    layers = model.moe_layers()
    counts = [torch.zeros(layer.n_experts, dtype=torch.long, device=device) for layer in layers]
    was_training = model.training
    model.eval()
    try:
        for _ in range(n_batches):
            x, _ = get_batch(data, batch_size, model.cfg.block_size, gen, device)
            model(x)
            for c, layer in zip(counts, layers, strict=True):
                c += layer.last_routing.counts(layer.n_experts)
    finally:
        model.train(was_training)
    return [c.cpu() for c in counts]


def max_vio_global(model: TinyLM, data: torch.Tensor, batch_size: int = 16, n_batches: int = 8,
                   device: torch.device | None = None) -> float:
    """MaxVio of the counts over the validation windows, averaged over the MoE layers (MaxVio_global)."""
    counts = global_counts(model, data, batch_size, n_batches, device=device)
    return sum(max_violation(c) for c in counts) / len(counts)


class LossFreeRecorder:
    """``train`` callback: MaxVio_batch (mean per interval), routing biases and router gradients at log points,
    MaxVio_global at evaluation points."""

    def __init__(self, log_every: int, cfg: TrainConfig, val_data: torch.Tensor,
                 probe: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.log_every, self.cfg, self.val_data, self.probe = log_every, cfg, val_data, probe
        self.step: list[int] = []
        self.max_vio_batch: list[float] = []
        self.bias: list[list[list[float]]] = []  # [log point][moe layer][expert]
        self.grad_lm: list[float] = []
        self.grad_aux: list[float] = []
        self.grad_cos: list[float] = []
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
            if self.probe is not None:
                grads = router_gradients(model, *self.probe)
                self.grad_lm.append(grads.lm_norm)
                self.grad_aux.append(grads.aux_norm)
                self.grad_cos.append(grads.cosine)
        if done % self.cfg.eval_every == 0 or last:
            self.val_step.append(done)
            self.max_vio_global.append(max_vio_global(model, self.val_data, self.cfg.batch_size,
                                                      self.cfg.eval_batches))


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
# Experiments
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One configuration of an experiment, trained once per seed."""

    label: str
    model: ModelConfig
    train: TrainConfig


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; use one of {', '.join(SIZES)}")


def base_model(size: str, **overrides: Any) -> ModelConfig:
    """The sigmoid-gate MoE TinyLM of each size, no balancing unless asked, with ``overrides`` applied."""
    _check_size(size)
    shapes = {
        "smoke": dict(block_size=16, n_layer=1, n_head=2, d_model=16, n_experts=4, top_k=2, expert_hidden=16,
                      d_hidden=32),
        "cpu": dict(block_size=32, n_layer=2, n_head=2, d_model=32, n_experts=8, top_k=2, expert_hidden=32,
                    d_hidden=64),
        "gpu": dict(block_size=256, n_layer=4, n_head=4, d_model=256, n_experts=16, top_k=2, expert_hidden=256,
                    d_hidden=512),
    }[size]
    return ModelConfig(**{"ffn": "moe", "router_score": "sigmoid", "aux_loss_coef": 0.0, "z_loss_coef": 0.0,
                          **shapes, **overrides})


def base_train(size: str, **overrides: Any) -> TrainConfig:
    """The training settings of each size, with ``overrides`` applied."""
    _check_size(size)
    settings = {
        "smoke": dict(steps=6, batch_size=4, warmup=1, eval_every=3, eval_batches=1),
        "cpu": dict(steps=300, batch_size=16, lr=3e-3, warmup=20, eval_every=50, eval_batches=8),
        "gpu": dict(steps=3000, batch_size=32, lr=1e-3, warmup=200, eval_every=250, eval_batches=20),
    }[size]
    return TrainConfig(**{**settings, **overrides})


EXPERIMENTS: dict[str, tuple[str, Callable[[str], list[Run]], tuple[int, ...], int]] = {}
"""name -> (description, build(size) -> runs, default seeds, version)."""

U = 1e-3  # DeepSeek-V3's bias update speed


def _loss_free_06(size: str) -> list[Run]:
    m, t = base_model, base_train(size)
    groups = 4 if m(size).n_experts >= 8 else 2  # DeepSeek-V3: 8 groups (nodes), each token uses at most 4
    return [
        Run("no balancing", m(size), t),
        Run("aux alpha=1e-3", m(size, aux_loss_coef=1e-3), t),
        Run("aux alpha=1e-2", m(size, aux_loss_coef=1e-2), t),
        Run("aux alpha=1e-1", m(size, aux_loss_coef=1e-1), t),
        Run("loss-free u=1e-3", m(size, bias_update_rate=U), t),
        Run("loss-free u=1e-4", m(size, bias_update_rate=1e-4), t),
        Run("loss-free u=1e-2", m(size, bias_update_rate=1e-2), t),
        Run("loss-free + seq aux 1e-4", m(size, bias_update_rate=U, seq_aux_loss_coef=1e-4), t),
        Run(f"loss-free, best {groups // 2} of {groups} groups",
            m(size, bias_update_rate=U, n_groups=groups, topk_groups=groups // 2), t),
    ]


EXPERIMENTS["loss_free_06"] = (
    "notebook 06: sigmoid gate with no balancing, aux loss (1e-3, 1e-2, 1e-1), loss-free bias (u = 1e-4, 1e-3, 1e-2), "
    "+ sequence-wise aux loss, + group-limited routing", _loss_free_06, (0, 1, 2), 2)


def get_runs(name: str, size: str) -> list[Run]:
    """The runs of experiment ``name`` at ``size``."""
    _check_size(size)
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known experiments: {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name][1](size)


@dataclass
class LossFreeRecord:
    """What one run of one seed produced (lists indexed by log point, or by evaluation point for val_*)."""

    label: str
    seed: int
    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)
    max_vio_batch: list[float] = field(default_factory=list)  # mean over the interval's batches and layers
    bias: list[list[list[float]]] = field(default_factory=list)  # [log point][moe layer][expert]
    grad_lm: list[float] = field(default_factory=list)  # ‖∇L_LM‖ on the router weights (fixed probe batch)
    grad_aux: list[float] = field(default_factory=list)  # ‖∇L_aux‖ at α = 1
    grad_cos: list[float] = field(default_factory=list)  # cosine of the two
    val_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    max_vio_global: list[float] = field(default_factory=list)  # over the validation windows, mean over layers
    load: list[list[list[float]]] = field(default_factory=list)  # [log point][moe layer][expert] fractions
    seconds: float = 0.0

    @property
    def final(self) -> dict[str, float]:
        """Headline numbers: last val loss and MaxVio_global; MaxVio_batch averaged over the last quarter."""
        half = self.max_vio_batch[-max(1, len(self.max_vio_batch) // 4):]
        return {
            "val_loss": self.val_loss[-1] if self.val_loss else math.nan,
            "max_vio_global": self.max_vio_global[-1] if self.max_vio_global else math.nan,
            "max_vio_batch": sum(half) / len(half) if half else math.nan,
        }


def _round(values: Any, digits: int = 5) -> Any:
    if isinstance(values, (list, tuple)):
        return [_round(v, digits) for v in values]
    if isinstance(values, float):
        return float(f"{values:.{digits}g}") if math.isfinite(values) else values
    return values


def train_run(run: Run, seed: int, corpus: Any, size: str = "cpu", device: torch.device | None = None,
              progress: bool = False, log_every: int | None = None) -> LossFreeRecord:
    """Train ``run`` once with ``seed`` and record losses, MaxVio (batch and global), biases and router gradients."""
    seed_everything(seed)
    device = device or pick_device()
    model = TinyLM(run.model)
    cfg = replace(run.train, seed=seed)
    log_every = min(log_every or LOG_EVERY[size], cfg.steps)
    probe = get_batch(corpus.val, PROBE_BATCH[size], run.model.block_size, torch.Generator().manual_seed(99), device)
    recorder = LossFreeRecorder(log_every, cfg, corpus.val, probe)
    hist = train(model, corpus.train, corpus.val, cfg, device=device, progress=progress, log_every=log_every,
                 desc=f"{run.label} seed {seed}", callback=recorder)
    return LossFreeRecord(
        label=run.label, seed=seed, step=list(hist.step), train_loss=_round(hist.train_loss),
        aux_loss=_round(hist.aux_loss), max_vio_batch=_round(recorder.max_vio_batch), bias=_round(recorder.bias),
        grad_lm=_round(recorder.grad_lm), grad_aux=_round(recorder.grad_aux), grad_cos=_round(recorder.grad_cos),
        val_step=list(hist.val_step), val_loss=_round(hist.val_loss),
        max_vio_global=_round(recorder.max_vio_global), load=_round(hist.load), seconds=round(hist.seconds, 2),
    )


def _configs(runs: Sequence[Run]) -> list[dict[str, Any]]:
    return [{"label": r.label, "model": asdict(r.model), "train": asdict(r.train)} for r in runs]


def fingerprint(name: str, size: str) -> str:
    """Hash of the experiment's configurations at ``size`` and of the code versions that record them."""
    blob = {"experiment": name, "size": size, "code_version": CODE_VERSION, "experiment_version": EXPERIMENTS[name][3],
            "corpus_bytes": CORPUS_BYTES[size], "log_every": LOG_EVERY[size], "probe": PROBE_BATCH[size],
            "runs": _configs(get_runs(name, size))}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class LossFreeResult:
    """A finished experiment: configurations, seeds, environment, fingerprint and one record per run and seed."""

    experiment: str
    size: str
    seeds: list[int]
    fingerprint: str
    runs: list[dict[str, Any]]
    records: list[LossFreeRecord]
    command: str = ""
    torch_version: str = ""
    device: str = ""
    created: str = ""
    seconds: float = 0.0

    @property
    def labels(self) -> list[str]:
        """Run labels in the experiment's order."""
        return [r["label"] for r in self.runs]

    def records_of(self, label: str) -> list[LossFreeRecord]:
        """The records (one per seed) of the run called ``label``."""
        found = [r for r in self.records if r.label == label]
        if not found:
            raise KeyError(f"no run {label!r} in {self.experiment}; runs: {', '.join(self.labels)}")
        return found

    def stats(self, label: str, key: str) -> tuple[float, float]:
        """Mean and spread (population std) over seeds of one final number of run ``label``."""
        values = [r.final[key] for r in self.records_of(label)]
        mean = sum(values) / len(values)
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["records"] = [asdict(r) for r in self.records]
        return out

    @classmethod
    def from_dict(cls, blob: dict[str, Any]) -> LossFreeResult:
        return cls(**{**blob, "records": [LossFreeRecord(**r) for r in blob["records"]]})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n", encoding="utf-8")
        return path


def result_path(name: str, size: str, results_dir: str | Path | None = None) -> Path:
    """``data/results/NAME-SIZE.json`` (or under ``results_dir``)."""
    _check_size(size)
    return Path(results_dir or RESULTS_DIR) / f"{name}-{size}.json"


def _command(name: str, size: str) -> str:
    return f"python -m moe_course.loss_free run {name} --size {size}"


def load_result(name: str, size: str = "cpu", results_dir: str | Path | None = None) -> LossFreeResult:
    """Read a stored result; raise :class:`StaleResultError` if the code would now produce a different one."""
    path = result_path(name, size, results_dir)
    if not path.exists():
        raise FileNotFoundError(f"no stored result {path}; create it with `{_command(name, size)}`")
    result = LossFreeResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
    expected = fingerprint(name, size)
    if result.fingerprint != expected:
        raise StaleResultError(f"{path} is stale: made with fingerprint {result.fingerprint}, the code now gives "
                               f"{expected}. Re-run `{_command(name, size)}` and commit the new file.")
    return result


def run_experiment(name: str, size: str = "cpu", seeds: Sequence[int] | None = None,
                   device: torch.device | str | None = None, progress: bool = True, save: bool = True,
                   results_dir: str | Path | None = None, labels: Sequence[str] | None = None) -> LossFreeResult:
    """Train every run (or those in ``labels``) of experiment ``name`` at ``size`` for each seed; save and return."""
    runs = get_runs(name, size)
    if labels is not None:
        unknown = set(labels) - {r.label for r in runs}
        if unknown:
            raise ValueError(f"unknown run labels {sorted(unknown)}; runs: {[r.label for r in runs]}")
        runs = [r for r in runs if r.label in labels]
    seeds = list(EXPERIMENTS[name][2] if seeds is None else seeds)
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed (e.g. --seeds 0 1 2)")
    device = pick_device(device) if not isinstance(device, torch.device) else device
    corpus = load_corpus(max_bytes=CORPUS_BYTES[size])
    records, start = [], time.perf_counter()
    bar = tqdm(total=len(runs) * len(seeds), desc=f"{name} ({size})", disable=not progress)
    for run in runs:
        for seed in seeds:
            bar.set_postfix_str(f"{run.label}, seed {seed}")
            records.append(train_run(run, seed, corpus, size, device))
            bar.update()
    bar.close()
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()}, {torch.get_num_threads()} threads"
    result = LossFreeResult(
        experiment=name, size=size, seeds=seeds, fingerprint=fingerprint(name, size), runs=_configs(runs),
        records=records, command=_command(name, size) + f" --seeds {' '.join(map(str, seeds))}",
        torch_version=torch.__version__, device=f"{device.type} ({dev})",
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), seconds=round(time.perf_counter() - start, 1))
    if save:
        result.save(result_path(name, size, results_dir))
    return result


def format_summary(result: LossFreeResult) -> str:
    """Plain-text table: per run, mean ± spread over seeds of val loss, MaxVio_global and MaxVio_batch."""
    lines = [f"{result.experiment} ({result.size}, {result.device}, seeds {result.seeds}, {result.seconds:.0f} s)",
             f"{'run':<34} {'val loss':>15} {'MaxVio_global':>15} {'MaxVio_batch':>15}"]
    for label in result.labels:
        cells = [result.stats(label, key) for key in ("val_loss", "max_vio_global", "max_vio_batch")]
        lines.append(f"{label:<34} " + " ".join(f"{m:>8.3f} ± {s:.3f}" for m, s in cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moe_course.loss_free list | run NAME | show NAME``; usage errors exit with status 2."""
    parser = argparse.ArgumentParser(prog="python -m moe_course.loss_free", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the experiments")
    run_p = sub.add_parser("run", help="train an experiment and write data/results/NAME-SIZE.json")
    show_p = sub.add_parser("show", help="print the final numbers of a stored result")
    for p in (run_p, show_p):
        p.add_argument("name", help="experiment name (see `list`)")
        p.add_argument("--size", default="cpu", choices=SIZES, help="model and training size (default: cpu)")
        p.add_argument("--results-dir", help=f"folder of the JSON results (default: {RESULTS_DIR})")
    run_p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the experiment's own)")
    run_p.add_argument("--device", help="cpu, cuda or mps (default: the best available)")
    run_p.add_argument("--threads", type=int, help="CPU threads for torch (1 is fastest on a busy machine)")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, (description, _, seeds, _) in sorted(EXPERIMENTS.items()):
            print(f"{name:<14} seeds {list(seeds)}  {description}")
        return 0
    if args.name not in EXPERIMENTS:
        parser.error(f"unknown experiment {args.name!r}; known experiments: {', '.join(sorted(EXPERIMENTS))}")
    if args.command == "show":
        try:
            result = load_result(args.name, args.size, args.results_dir)
        except (FileNotFoundError, StaleResultError) as err:
            print(f"error: {err}")
            return 1
        print(format_summary(result))
        return 0
    try:
        device = pick_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    result = run_experiment(args.name, args.size, args.seeds, device, results_dir=args.results_dir)
    print(format_summary(result))
    print(f"wrote {result_path(args.name, args.size, args.results_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
