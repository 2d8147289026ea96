"""The experiment runner of notebooks 04-09: named training sweeps, run from the command line, stored as JSON.

A training sweep does not fit into one notebook cell on a 2-core CPU. So an experiment is a named list of
runs, each a ``(label, ModelConfig, TrainConfig)``, trained once per seed, with a fixed set of records: the
validation loss curve, every MoE layer's expert load over training, MaxVio, the drop rate, router-logit
statistics and tokens/s. ``python -m moe_course.experiments run NAME --size cpu`` trains it with a progress
bar and writes ``data/results/NAME-SIZE.json``. A notebook loads that file with :func:`load_result` and
re-runs a reduced version live. The experiments themselves are registered by one module per notebook
beside this one (:mod:`moe_course.experiments`).

Every result carries a *fingerprint*: a hash of its configurations, its size, the code version
(:data:`CODE_VERSION` and the experiment's own ``version``) and the SHA-256 of the frozen corpus it trained
on (:data:`CORPUS_NAME`, :func:`moe_course.corpus.corpus_sha256`). :func:`load_result` refuses a file whose
fingerprint differs from what the code would produce now, so a stored figure cannot silently go stale:
change a configuration, the recording code or the text and the notebook says which command re-creates it.

Sizes: ``smoke`` (seconds; the tests run every experiment at this size), ``cpu`` (minutes on a laptop CPU;
the stored results; both train on the ``course`` corpus) and ``gpu`` (a larger model for one GPU, on the
``large`` corpus).

Command line::

    python -m moe_course.experiments list
    python -m moe_course.experiments run aux_sweep --size cpu --seeds 0 1 2
    python -m moe_course.experiments show aux_sweep --size cpu
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moe_course.corpus import corpus_sha256, load_corpus
from moe_course.device import pick_device, seed_everything
from moe_course.loss_free import SIZES
from moe_course.loss_free import check_size as _check_size
from moe_course.metrics import load_entropy, max_violation
from moe_course.model import ModelConfig, TinyLM
from moe_course.train import TrainConfig, evaluate_text, train
from moe_course.validate import check_output_path

__all__ = [
    "CODE_VERSION",
    "CORPUS_NAME",
    "EXPERIMENTS",
    "RESULTS_DIR",
    "SIZES",
    "Experiment",
    "ExperimentResult",
    "Run",
    "RunRecord",
    "StaleResultError",
    "fingerprint",
    "get_experiment",
    "load_result",
    "main",
    "register",
    "result_path",
    "run_experiment",
]

CODE_VERSION = 1
"""Bump when the recording code changes what a stored result means (new metric definition, new training loop)."""

RESULTS_DIR = Path(os.environ.get("MOE_RESULTS_DIR", Path(__file__).resolve().parents[2] / "data" / "results"))
"""Where results are written and read: ``data/results`` in the repository (``MOE_RESULTS_DIR`` overrides)."""

LOG_EVERY = {"smoke": 2, "cpu": 20, "gpu": 50}  # training steps per recorded point
CORPUS_BYTES = {"smoke": 40_000, "cpu": None, "gpu": None}  # None: the whole corpus
CORPUS_NAME = {"smoke": "course", "cpu": "course", "gpu": "large"}  # which frozen corpus (moe_course.corpus)


class StaleResultError(ValueError):
    """A stored result was made by other configurations or an older version of the code."""


# ---------------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One configuration of an experiment, trained once per seed."""

    label: str
    model: ModelConfig
    train: TrainConfig
    probe: Callable[[TinyLM, Any], dict[str, Any]] | None = field(default=None, compare=False)  # after training:
    # probe(model, corpus) -> extra measurements stored in RunRecord.extra (bump the experiment's version if it changes)
    tracker: Callable[..., Any] | None = field(default=None, compare=False)  # during training: tracker(corpus,
    # cfg, log_every, size, device) -> a train callback with .record() -> dict, stored in RunRecord.extra
    log_every: int | None = None  # training steps per recorded point (default: LOG_EVERY[size])
    val: str = "all"  # validation text: "all", or the "tune" or "test" half of the files (corpus.VAL_PARTS)


@dataclass(frozen=True)
class Experiment:
    """A named list of runs (built per size), the seeds to train each with, and a version to bump."""

    name: str
    description: str
    build: Callable[[str], list[Run]]
    seeds: tuple[int, ...] = (0, 1)
    version: int = 1

    def runs(self, size: str) -> list[Run]:
        """The runs at ``size`` ("smoke", "cpu" or "gpu")."""
        _check_size(size)
        runs = self.build(size)
        labels = [r.label for r in runs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"experiment {self.name!r} has duplicate run labels: {labels}")
        return runs


# ---------------------------------------------------------------------------------------------------------
# The registry: each notebook's module of runs (moe_course/experiments/*.py) registers its experiments
# ---------------------------------------------------------------------------------------------------------

EXPERIMENTS: dict[str, Experiment] = {}


def _check_seeds(seeds: Sequence[int]) -> None:
    """Raise ValueError unless ``seeds`` are distinct ints >= 0 (at least one)."""
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed (e.g. --seeds 0 1)")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be ints >= 0, got {list(seeds)}; e.g. --seeds 0 1 2")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {list(seeds)} repeat a seed: a repeated seed trains the same run twice; give "
                         "distinct seeds")


def register(name: str, description: str, seeds: tuple[int, ...] = (0, 1), version: int = 1):
    """Decorator: register ``build(size) -> list[Run]`` as the experiment ``name``."""

    _check_seeds(list(seeds))
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be an int >= 1 (bump it when the experiment changes), got {version!r}")

    def wrap(build: Callable[[str], list[Run]]) -> Callable[[str], list[Run]]:
        if name in EXPERIMENTS:
            raise ValueError(f"experiment {name!r} is registered twice")
        EXPERIMENTS[name] = Experiment(name, description, build, tuple(seeds), version)
        return build

    return wrap


def get_experiment(name: str) -> Experiment:
    """Look up an experiment by name, listing the known names in the error."""
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ValueError(f"unknown experiment {name!r}; known experiments: {', '.join(sorted(EXPERIMENTS))}") from None


# ---------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """What one run of one seed produced (lists are indexed by log point)."""

    label: str
    seed: int
    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    load: list[list[list[float]]] = field(default_factory=list)  # [log point][moe layer][expert] fractions
    max_vio: list[list[float]] = field(default_factory=list)  # [log point][moe layer]
    drop_rate: list[float] = field(default_factory=list)  # mean over the interval and the MoE layers
    logit_max: list[float] = field(default_factory=list)  # largest |router logit| in the interval, any layer
    logit_lse: list[float] = field(default_factory=list)  # mean logsumexp of the router logits (z-loss = its square)
    logit_top: list[float] = field(default_factory=list)  # largest signed router logit in the interval, any layer
    logit_bottom: list[float] = field(default_factory=list)  # smallest signed router logit in the interval
    logit_range: list[float] = field(default_factory=list)  # mean per-token spread, max − min over the experts
    logit_gap: list[float] = field(default_factory=list)  # mean per-token gap, 1st − 2nd largest logit
    gate_entropy: list[float] = field(default_factory=list)  # mean per-token entropy (nats) of softmax(logits)
    skipped: list[float] = field(default_factory=list)  # fraction of tokens no expert processed (expert choice)
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # what the run's probe measured on the trained model
    test_loss: float = math.nan  # the protocol's score: the whole test half of the validation files, every byte once
    tune_loss: float = math.nan  # the same on the whole tuning half: what settings are chosen by

    @property
    def final(self) -> dict[str, float]:
        """The run's headline numbers: last val loss, and MaxVio / load entropy at the last log point."""
        last = self.load[-1] if self.load else []
        return {
            "val_loss": self.val_loss[-1] if self.val_loss else math.nan,
            "test_loss": self.test_loss,
            "tune_loss": self.tune_loss,
            "max_vio": _mean(self.max_vio[-1]) if self.max_vio else math.nan,
            "load_entropy": _mean([load_entropy(torch.tensor(layer)) for layer in last]) if last else math.nan,
            "drop_rate": self.drop_rate[-1] if self.drop_rate else math.nan,
            "skipped": self.skipped[-1] if self.skipped else math.nan,
            "logit_max": self.logit_max[-1] if self.logit_max else math.nan,
            "tokens_per_s": self.tokens_per_s,
        }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


class _Recorder:
    """The ``train`` callback: accumulates drop rate and router-logit statistics between log points."""

    KEYS = ("drop_rate", "logit_max", "logit_lse", "skipped", "logit_top", "logit_bottom", "logit_range",
            "logit_gap", "gate_entropy")
    EXTREMES = {"logit_max": max, "logit_top": max, "logit_bottom": min}  # the interval's extreme, not its mean

    def __init__(self, log_every: int, steps: int) -> None:
        self.log_every, self.steps = log_every, steps
        self.points: dict[str, list[float]] = {k: [] for k in self.KEYS}
        self._reset()

    def _reset(self) -> None:
        self._acc: dict[str, float] = {k: 0.0 for k in self.KEYS}
        self._acc.update(logit_top=-math.inf, logit_bottom=math.inf)
        self._n = 0

    @torch.no_grad()
    def __call__(self, step: int, model: TinyLM) -> None:
        per_layer: dict[str, list[float]] = {k: [] for k in self.KEYS}
        for layer in model.moe_layers():
            per_layer["drop_rate"].append(float(getattr(layer, "last_dropped", 0.0)))
            routing = getattr(layer, "last_routing", None)
            if hasattr(routing, "experts_per_token"):
                per_layer["skipped"].append(float((routing.experts_per_token() == 0).float().mean()))
            logits = getattr(routing, "logits", None)
            if logits is None:
                continue
            logits = logits.float().reshape(-1, logits.shape[-1])  # (T, N)
            per_layer["logit_max"].append(float(logits.abs().max()))
            per_layer["logit_top"].append(float(logits.max()))
            per_layer["logit_bottom"].append(float(logits.min()))
            per_layer["logit_lse"].append(float(torch.logsumexp(logits, dim=-1).mean()))
            per_layer["logit_range"].append(float((logits.max(-1).values - logits.min(-1).values).mean()))
            if logits.shape[-1] > 1:
                top2 = logits.topk(2, dim=-1).values
                per_layer["logit_gap"].append(float((top2[:, 0] - top2[:, 1]).mean()))
            p = logits.softmax(-1)
            per_layer["gate_entropy"].append(float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean()))
        for key, values in per_layer.items():
            if key in self.EXTREMES:
                if values:
                    self._acc[key] = self.EXTREMES[key](self._acc[key], self.EXTREMES[key](values))
            else:
                self._acc[key] += _mean(values) if values else 0.0
        self._n += 1
        done = step + 1  # the callback receives the 0-based index of the step just taken
        if done % self.log_every == 0 or done == self.steps:
            for key in self.KEYS:
                value = self._acc[key] if key in self.EXTREMES else self._acc[key] / self._n
                self.points[key].append(value if math.isfinite(value) else 0.0)
            self._reset()


def train_run(run: Run, seed: int, corpus: Any, size: str = "cpu", device: torch.device | None = None,
              progress: bool = False) -> RunRecord:
    """Train ``run`` once with ``seed`` (model init and batch order) and return its record."""
    if not isinstance(run, Run):
        raise TypeError(f"run must be a Run(label, ModelConfig, TrainConfig), got {type(run).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    _check_size(size)
    seed_everything(seed)
    model = TinyLM(run.model)
    cfg = replace(run.train, seed=seed)
    log_every = min(run.log_every or LOG_EVERY[size], cfg.steps)
    recorder = _Recorder(log_every, cfg.steps)
    tracker = run.tracker(corpus, cfg, log_every, size, device) if run.tracker is not None else None

    def callback(step: int, model: TinyLM) -> None:
        recorder(step, model)  # first: it reads the step's routing, which a tracker's own passes may replace
        if tracker is not None:
            tracker(step, model)

    whole = run.val == "all" or (size == "smoke" and not _has_parts(corpus))  # smoke's cut corpus has one half
    val = corpus.val if whole else corpus.val_part(run.val)[0]
    hist = train(model, corpus.train, val, cfg, device=device, progress=progress, log_every=log_every,
                 desc=f"{run.label} seed {seed}", callback=callback)
    extra = dict(tracker.record()) if tracker is not None else {}
    if run.probe is not None:
        extra.update(run.probe(model, corpus))
    extra = _round(extra)
    scores = {part: round(evaluate_text(model, corpus.val_part(part)[0], cfg.batch_size, amp=cfg.amp), 6)
              for part in ("test", "tune")} if _has_parts(corpus) else {}
    return RunRecord(
        label=run.label, seed=seed, step=list(hist.step), train_loss=_round(hist.train_loss),
        aux_loss=_round(hist.aux_loss), val_step=list(hist.val_step), val_loss=_round(hist.val_loss),
        load=_round(hist.load), max_vio=_round([[max_violation(torch.tensor(layer)) for layer in point]
                                                for point in hist.load]),
        **{key: _round(values) for key, values in recorder.points.items()},
        tokens_per_s=round(hist.tokens_per_s, 1), seconds=round(hist.seconds, 2), extra=extra,
        test_loss=scores.get("test", math.nan), tune_loss=scores.get("tune", math.nan),
    )


def _has_parts(corpus: Any) -> bool:
    """Whether the corpus has both validation halves (a tiny smoke corpus may hold only one)."""
    try:
        return all(corpus.val_part(part)[0].numel() >= 2 for part in ("test", "tune"))
    except (ValueError, AttributeError):
        return False


def _round(values: Any, digits: int = 5) -> Any:
    """Round floats (nested in lists) to keep the JSON small; numbers this precise are noise anyway."""
    if isinstance(values, (list, tuple)):
        return [_round(v, digits) for v in values]
    if isinstance(values, dict):
        return {k: _round(v, digits) for k, v in values.items()}
    if isinstance(values, float):
        return float(f"{values:.{digits}g}") if math.isfinite(values) else values
    return values


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------


NEW_DEFAULTS = {"noisy_router": False}  # ModelConfig fields added later: left out at their default, so that the
# fingerprints of results stored before they existed stay valid


def _model_dict(model: ModelConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(model).items() if not (k in NEW_DEFAULTS and v == NEW_DEFAULTS[k])}


def _configs(runs: Sequence[Run]) -> list[dict[str, Any]]:
    return [{"label": r.label, "model": _model_dict(r.model), "train": asdict(r.train),
             **({"log_every": r.log_every} if r.log_every else {}), **({"val": r.val} if r.val != "all" else {})}
            for r in runs]


def _fingerprint_blob(name: str, size: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    exp = get_experiment(name)
    _check_size(size)
    return {
        "experiment": name,
        "size": size,
        "code_version": CODE_VERSION,
        "experiment_version": exp.version,
        "corpus_bytes": CORPUS_BYTES[size],
        "corpus_sha256": corpus_sha256(CORPUS_NAME[size]),
        "log_every": LOG_EVERY[size],
        "runs": runs,
    }


def _hash(blob: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(name: str, size: str) -> str:
    """Hash of the experiment's configurations at ``size``, the code versions that record them and the corpus."""
    return _hash(_fingerprint_blob(name, size, _configs(get_experiment(name).runs(size))))




@dataclass
class ExperimentResult:
    """A finished experiment: configurations, seeds, environment, fingerprint and one record per run and seed."""

    experiment: str
    size: str
    seeds: list[int]
    fingerprint: str
    runs: list[dict[str, Any]]
    records: list[RunRecord]
    command: str = ""
    package_version: str = ""
    torch_version: str = ""
    device: str = ""
    created: str = ""
    seconds: float = 0.0
    corpus: str = ""
    corpus_sha256: str = ""

    @property
    def labels(self) -> list[str]:
        """Run labels in the experiment's order."""
        return [r["label"] for r in self.runs]

    def records_of(self, label: str) -> list[RunRecord]:
        """The records (one per seed) of the run called ``label``."""
        found = [r for r in self.records if r.label == label]
        if not found:
            raise KeyError(f"no run {label!r} in {self.experiment}; runs: {', '.join(self.labels)}")
        return found

    def summary(self) -> list[dict[str, Any]]:
        """One row per run and seed: label, seed and the run's final numbers."""
        return [{"label": r.label, "seed": r.seed, **r.final} for r in self.records]

    def run_of(self, label: str) -> dict[str, Any]:
        """The stored configuration (label, model, train, …) of the run called ``label``."""
        for run in self.runs:
            if run["label"] == label:
                return run
        raise KeyError(f"no run {label!r} in {self.experiment}; runs: {', '.join(self.labels)}")

    def test_losses(self, label: str) -> list[float]:
        """Each seed's loss on the whole test half of the validation files (the protocol's score), in seed order."""
        return [r.test_loss for r in self.records_of(label)]

    def tune_losses(self, label: str) -> list[float]:
        """Each seed's loss on the whole tuning half (what settings are chosen by), in seed order."""
        return [r.tune_loss for r in self.records_of(label)]

    def mean(self, label: str, key: str) -> float:
        """Mean over seeds of one final number (e.g. ``"val_loss"``) of run ``label``."""
        records = self.records_of(label)
        if key not in records[0].final:
            raise ValueError(f"key must be one of the final numbers {sorted(records[0].final)}, got {key!r}")
        return _mean([r.final[key] for r in records])

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["records"] = [asdict(r) for r in self.records]
        return out

    @classmethod
    def from_dict(cls, blob: dict[str, Any]) -> ExperimentResult:
        records = [RunRecord(**r) for r in blob["records"]]
        return cls(**{**blob, "records": records})

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (compact, one record per line region)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n", encoding="utf-8")
        return path


def result_path(name: str, size: str, results_dir: str | Path | None = None) -> Path:
    """``data/results/NAME-SIZE.json`` (or under ``results_dir``)."""
    _check_size(size)
    return Path(results_dir or RESULTS_DIR) / f"{name}-{size}.json"


def _command(name: str, size: str) -> str:
    return f"python -m moe_course.experiments run {name} --size {size}"


def load_result(name: str, size: str = "cpu", results_dir: str | Path | None = None) -> ExperimentResult:
    """Read a stored result; raise :class:`StaleResultError` if the code would now produce a different one."""
    get_experiment(name)  # an unknown name is a ValueError listing the known ones, not a missing file
    path = result_path(name, size, results_dir)
    if not path.exists():
        raise FileNotFoundError(f"no stored result {path}; create it with `{_command(name, size)}`")
    result = ExperimentResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
    expected = fingerprint(name, size)
    wanted = corpus_sha256(CORPUS_NAME[size])
    if result.corpus_sha256 != wanted:
        made = f"corpus {result.corpus_sha256[:12]}" if result.corpus_sha256 else "a corpus it does not record"
        raise StaleResultError(
            f"{path} was trained on other text ({made}) than the frozen {CORPUS_NAME[size]!r} corpus in "
            f"data/corpus/ ({wanted[:12]}); its numbers cannot be re-created from it. Re-run "
            f"`{_command(name, size)}` and commit the new file."
        )
    if result.fingerprint != expected:
        raise StaleResultError(
            f"{path} is stale: it was made with fingerprint {result.fingerprint}, but the experiment's "
            f"configurations or code now give {expected}. Re-run `{_command(name, size)}` and commit the new file."
        )
    return result


def run_experiment(
    name: str,
    size: str = "cpu",
    seeds: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    save: bool = True,
    results_dir: str | Path | None = None,
    jobs: int = 1,
) -> ExperimentResult:
    """Train every run of experiment ``name`` at ``size`` for each seed; save and return the result.

    ``jobs > 1`` trains that many (run, seed) pairs at once in separate processes with one torch thread each
    (for a machine with that many cores); the records are the same as with ``jobs=1`` on one thread.
    """
    from moe_course import __version__

    exp = get_experiment(name)
    runs = exp.runs(size)
    seeds = list(exp.seeds if seeds is None else seeds)
    _check_seeds(seeds)
    device = pick_device(device) if not isinstance(device, torch.device) else device
    if isinstance(jobs, bool) or not isinstance(jobs, int):
        raise TypeError(f"jobs must be an int (processes at once), got {type(jobs).__name__} {jobs!r}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    path = result_path(name, size, results_dir)
    if save:
        check_output_path("results_dir", path)
    start = time.perf_counter()
    fp = fingerprint(name, size)
    base = _hash(_fingerprint_blob(name, size, []))  # the code, corpus and versions, without the runs
    configs = {c["label"]: c for c in _configs(runs)}
    done = _finished_records(name, size, fp, base, configs, results_dir) if save else {}
    tasks = [(i, run, seed) for i, run in enumerate(runs) for seed in seeds if (run.label, seed) not in done]
    reused = sum(r.seconds for (label, seed), r in done.items() if seed in seeds) / jobs  # earlier sessions' share
    bar = tqdm(total=len(runs) * len(seeds), initial=len(runs) * len(seeds) - len(tasks), desc=f"{name} ({size})",
               disable=not progress)
    partial = _partial_path(name, size, results_dir)
    lock = threading.Lock()

    def keep(record: RunRecord) -> None:
        """Store a finished (run, seed) at once, so that an interrupted sweep resumes where it stopped."""
        with lock:
            done[(record.label, record.seed)] = record
            if save:
                partial.parent.mkdir(parents=True, exist_ok=True)
                with partial.open("a", encoding="utf-8") as f:
                    entry = {"fingerprint": fp, "base": base, "run": configs[record.label], "record": asdict(record)}
                    f.write(json.dumps(entry, separators=(",", ":")) + "\n")
            bar.update()

    if jobs == 1 or len(tasks) <= 1:
        corpus = load_corpus(max_bytes=CORPUS_BYTES[size], name=CORPUS_NAME[size]) if tasks else None
        for _, run, seed in tasks:
            bar.set_postfix_str(f"{run.label}, seed {seed}")
            keep(train_run(run, seed, corpus, size, device))
    else:  # one process per job, one torch thread each: a record does not depend on which process made it
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_train_in_worker, name, size, i, seed, str(device)) for i, _, seed in tasks]
            for future in futures:
                future.add_done_callback(lambda f: keep(f.result()) if f.exception() is None else None)
            for future in futures:
                future.result()  # re-raises a worker's error
    records = [done[(run.label, seed)] for run in runs for seed in seeds]
    bar.close()
    result = ExperimentResult(
        experiment=name, size=size, seeds=seeds, fingerprint=fingerprint(name, size), runs=_configs(runs),
        records=records, command=_command(name, size) + (f" --seeds {' '.join(map(str, seeds))}"
                                                         if seeds != list(exp.seeds) else ""),
        package_version=__version__, torch_version=torch.__version__,
        device=f"{device.type} ({_device_name(device)}{_jobs_note(jobs)})",
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        seconds=round(time.perf_counter() - start + reused, 1), corpus=CORPUS_NAME[size],
        corpus_sha256=corpus_sha256(CORPUS_NAME[size]),
    )
    if save:
        result.save(path)
        partial.unlink(missing_ok=True)
    return result


def _partial_path(name: str, size: str, results_dir: str | Path | None) -> Path:
    """Where a sweep in progress keeps its finished records, one JSON line each."""
    return result_path(name, size, results_dir).with_suffix(".partial.jsonl")


def _finished_records(name: str, size: str, fp: str, base: str, current: dict[str, dict[str, Any]],
                      results_dir: str | Path | None) -> dict[tuple[str, int], RunRecord]:
    """Records already trained with today's configurations: the stored result's and an interrupted sweep's.

    A record is reused when the code, corpus and experiment versions match and its own run's configuration is
    unchanged, so a changed run retrains only that run, and a sweep can be split over sessions (interrupt it, run
    the same command again), given more seeds (``--seeds 0 ... 9`` after 0 ... 4 trains only the new ones) or
    more runs (a grid widened by one point trains that point).
    """
    done: dict[tuple[str, int], RunRecord] = {}

    def same_run(label: str, config: dict[str, Any] | None) -> bool:
        return label in current and config == current[label]

    path = result_path(name, size, results_dir)
    if path.exists():
        try:
            blob = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            blob = {}
        stored = {c["label"]: c for c in blob.get("runs", [])}
        if blob.get("runs") is not None and _hash(_fingerprint_blob(name, size, blob["runs"])) == blob.get(
                "fingerprint"):  # the same code, corpus and versions: compare run by run
            for r in blob.get("records", []):
                if same_run(r["label"], stored.get(r["label"])):
                    done[(r["label"], r["seed"])] = RunRecord(**r)
    partial = _partial_path(name, size, results_dir)
    if partial.exists():
        for line in partial.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut short when the sweep was killed
                continue
            r = entry["record"]
            if entry.get("fingerprint") == fp or (entry.get("base") == base and same_run(r["label"], entry.get("run"))):
                done[(r["label"], r["seed"])] = RunRecord(**r)
    return done


def _jobs_note(jobs: int) -> str:
    return f", {jobs} jobs of 1 thread" if jobs > 1 else ""


def _train_in_worker(name: str, size: str, run_index: int, seed: int, device: str) -> RunRecord:
    """One (run, seed) of an experiment in a worker process of ``run_experiment(jobs=...)``."""
    torch.set_num_threads(1)
    run = get_experiment(name).runs(size)[run_index]
    corpus = load_corpus(max_bytes=CORPUS_BYTES[size], name=CORPUS_NAME[size])
    return train_run(run, seed, corpus, size, torch.device(device))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{platform.machine()}, {torch.get_num_threads()} threads"
    return device.type


def format_summary(result: ExperimentResult) -> str:
    """A plain-text table of the final numbers per run and seed."""
    lines = [f"{result.experiment} ({result.size}, {result.device}, {result.seconds:.0f} s)",
             f"{'run':<28} {'seed':>4} {'val loss':>9} {'test':>7} {'MaxVio':>7} {'load H':>7} {'drop':>6} {'skip':>6} "
             f"{'|logit|max':>10} {'tok/s':>8}"]
    for row in result.summary():
        lines.append(f"{row['label']:<28} {row['seed']:>4} {row['val_loss']:>9.4f} {row['test_loss']:>7.4f} "
                     f"{row['max_vio']:>7.3f} "
                     f"{row['load_entropy']:>7.3f} {row['drop_rate']:>6.3f} {row['skipped']:>6.3f} "
                     f"{row['logit_max']:>10.2f} {row['tokens_per_s']:>8.0f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moe_course.experiments list | run NAME | show NAME``; usage errors exit with status 2."""
    parser = argparse.ArgumentParser(prog="python -m moe_course.experiments", description=__doc__.splitlines()[0])
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
    run_p.add_argument("--jobs", type=int, default=1,
                       help="train this many runs at once, one process and one thread each (default 1)")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, exp in sorted(EXPERIMENTS.items()):
            print(f"{name:<12} seeds {list(exp.seeds)}  {exp.description}")
        return 0
    if args.name not in EXPERIMENTS:
        parser.error(f"unknown experiment {args.name!r}; known experiments: {', '.join(sorted(EXPERIMENTS))}")
    if args.command == "show":
        try:
            result = load_result(args.name, args.size, args.results_dir)
        except (FileNotFoundError, StaleResultError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(format_summary(result))
        return 0
    try:
        device = pick_device(args.device)
    except ValueError as err:
        if not args.device:  # a bad MOE_DEVICE: the message names the variable
            parser.error(str(err))
        parser.error(f"argument --device: {str(err).replace(f'prefer={args.device!r}', repr(args.device))}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.seeds is not None:
        try:
            _check_seeds(args.seeds)
        except ValueError as err:
            parser.error(f"argument --seeds: {err}")
    result = run_experiment(args.name, args.size, args.seeds, device, results_dir=args.results_dir, jobs=args.jobs)
    print(format_summary(result))
    print(f"wrote {result_path(args.name, args.size, args.results_dir)}")
    return 0
