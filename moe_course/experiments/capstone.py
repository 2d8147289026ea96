"""Notebook 08's experiments (the capstone): the tuning grid, the race of the dense twin, the top-2 MoE and the
recipe at equal active parameters (and a dense run at equal time), the recipe's bias rate, and the number of
experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from moe_course.experiments.runner import ExperimentResult, Run, _has_parts, register
from moe_course.loss_free import course_train as base_train
from moe_course.model import ModelConfig, TinyLM

__all__ = [
    "BIAS_RATES",
    "PreferenceTracker",
    "CAPSTONE_LABELS",
    "CAPSTONE_SAMPLE_PROMPT",
    "EQUAL_TIME_STEPS",
    "EXPERT_COUNTS",
    "TUNING_LRS",
    "TUNING_WARMUPS",
    "capstone_experts",
    "capstone_race",
    "capstone_shapes",
    "tuning_choice",
    "tuning_label",
]

CAPSTONE_LABELS = ("dense", "MoE top-2", "MoE recipe")
TUNING_LRS = (1.5e-3, 3e-3, 6e-3, 1.2e-2)
TUNING_WARMUPS = (30, 100)
"""Notebook 08's tuning grid: every model of the race gets the same 4 x 2 learning rates x warm-up steps."""
SEARCH_LRS = TUNING_LRS
SEARCH_WARMUPS = (30, 100, 300, 600)
"""Stage 1 of ``capstone_search``: every model of the race gets the same 4 x 4 learning rates x warm-up steps (300
added when all three chose 100, the edge of ``capstone_tuning``; 600 when the dense twin chose 300)."""
KNOBS: dict[str, tuple[str, tuple[float, ...]]] = {
    "dense": ("weight_decay", (0.0, 0.03, 0.1, 0.3)),
    "MoE top-2": ("aux_loss_coef", (0.0, 1e-3, 1e-2, 1e-1)),
    "MoE recipe": ("bias_update_rate", (1e-4, 1e-3, 3e-3, 1e-2)),
}
"""Stage 2: each model's own knob, four values (one of them the preset's, already trained in stage 1) at its
stage-1 choice: the top-2 MoE's auxiliary-loss weight α (0 = no balancing), the recipe's bias rate u, and, since
the dense twin balances nothing, its weight decay, so that every model gets the same number of runs."""
GRID_CHOICE: dict[str, tuple[float, int]] = {}
"""Each model's stage-1 choice (lr, warm-up) from the stored ``capstone_search`` (a test keeps them equal): the
point where stage 2 searches the knob. Empty until stage 2 is run (stage 1 alone is stored)."""


def capstone_shapes(size: str) -> tuple[Run, Run, Run]:
    """Notebook 08's dense twin, plain top-2 MoE and recipe MoE as the train presets define them (the models, the
    tokens, the schedule); tiny models at smoke size."""
    from moe_course.train import get_preset

    if size == "smoke":
        shape = dict(block_size=16, n_layer=1, n_head=2, d_model=16)
        t = base_train("smoke")
        return (Run("dense", ModelConfig(ffn="dense", d_hidden=32, **shape), t, probe=_probe_08),
                Run("MoE top-2", ModelConfig(ffn="moe", n_experts=4, top_k=2, expert_hidden=16, **shape), t,
                    probe=_probe_08),
                Run("MoE recipe", ModelConfig(ffn="moe", n_experts=8, top_k=2, expert_hidden=8, n_shared=2,
                                              router_score="sigmoid", aux_loss_coef=0.0, bias_update_rate=1e-3,
                                              **shape), t, probe=_probe_08))
    presets = [get_preset(f"{size}-{name}") for name in ("dense", "moe", "best")]
    return tuple(Run(label, p.model, replace(p.train, eval_batches=16), probe=_probe_08, val="test")
                 for label, p in zip(CAPSTONE_LABELS, presets, strict=True))


def knob_of(run: Run) -> float:
    """The value of the model's stage-2 knob in ``run`` (weight decay, α or u)."""
    name = KNOBS[run.label.split(" lr=")[0]][0]
    return getattr(run.train, name) if name == "weight_decay" else getattr(run.model, name)


def with_knob(run: Run, label: str, value: float) -> Run:
    """``run`` (a model of the race called ``label``) with its stage-2 knob set to ``value``."""
    name = KNOBS[label][0]
    if name == "weight_decay":
        return replace(run, train=replace(run.train, weight_decay=value))
    return replace(run, model=replace(run.model, **{name: value}))


def tuning_label(label: str, lr: float, warmup: int, knob: float | None = None) -> str:
    """The run label of one point of ``capstone_tuning`` or ``capstone_search``: ``"dense lr=0.003 warmup=30"``
    (stage 1), ``"MoE top-2 lr=0.003 warmup=100 aux_loss_coef=0"`` (stage 2 of the search)."""
    base = f"{label} lr={lr:g} warmup={warmup}"
    return base if knob is None else f"{base} {KNOBS[label][0]}={knob:g}"


@register("capstone_tuning", "notebook 08: the same grid of learning rate x warm-up (4 x 2) for the dense twin, "
          "the top-2 MoE and the recipe, scored on the tuning half of the validation files", seeds=(0,))
def _capstone_tuning(size: str) -> list[Run]:
    runs = []
    for run in capstone_shapes(size):
        for lr in TUNING_LRS:
            for warmup in TUNING_WARMUPS:
                w = min(warmup, run.train.steps // 2) if size == "smoke" else warmup
                runs.append(replace(run, label=tuning_label(run.label, lr, warmup), probe=None,
                                    train=replace(run.train, lr=lr, warmup=w),
                                    val="all" if size == "smoke" else "tune"))
    return runs


def tuning_choice(result: ExperimentResult) -> dict[str, dict[str, float]]:
    """Per model of the race, the grid point of a ``capstone_tuning`` result with the lowest final tuning loss
    (mean over seeds): ``{label: {"lr", "warmup", "val_loss"}}``."""
    if not isinstance(result, ExperimentResult) or result.experiment != "capstone_tuning":
        got = result.experiment if isinstance(result, ExperimentResult) else type(result).__name__
        raise ValueError(f"result must be the capstone_tuning result (load_result('capstone_tuning', size)), "
                         f"got {got!r}")
    out: dict[str, dict[str, float]] = {}
    for label in CAPSTONE_LABELS:
        points = [(result.mean(tuning_label(label, lr, w), "val_loss"), lr, w)
                  for lr in TUNING_LRS for w in TUNING_WARMUPS]
        loss, lr, warmup = min(points)
        out[label] = {"lr": lr, "warmup": warmup, "val_loss": loss}
    return out


@register("capstone_search", "notebook 08: stage 1, the same grid of learning rate x warm-up (4 x 4) for the "
          "dense twin, the top-2 MoE and the recipe; stage 2, each model's own knob (weight decay, alpha, u; 4 "
          "values) at its stage-1 choice; scored on the whole tuning half of the validation files", seeds=(0,))
def _capstone_search(size: str) -> list[Run]:
    runs = []
    for run in capstone_shapes(size):
        label = run.label
        for lr in SEARCH_LRS:
            for warmup in SEARCH_WARMUPS:
                w = min(warmup, run.train.steps // 2) if size == "smoke" else warmup
                runs.append(replace(run, label=tuning_label(label, lr, warmup), probe=None,
                                    train=replace(run.train, lr=lr, warmup=w),
                                    val="all" if size == "smoke" else "tune"))
        if size == "cpu" and label in GRID_CHOICE:
            lr, warmup = GRID_CHOICE[label]
            point = next(r for r in runs if r.label == tuning_label(label, lr, warmup))
            runs += [replace(with_knob(point, label, v), label=tuning_label(label, lr, warmup, v))
                     for v in KNOBS[label][1] if v != knob_of(point)]
    return runs


def _score(result: ExperimentResult, label: str) -> float:
    """A tuning run's score: its loss on the whole tuning half (the last validation loss at smoke size, whose cut
    corpus has no halves)."""
    losses = result.tune_losses(label)
    if any(math.isnan(x) for x in losses):
        return result.mean(label, "val_loss")
    return sum(losses) / len(losses)


def search_grid(result: ExperimentResult) -> dict[str, dict[tuple[float, int], float]]:
    """Stage 1 of a ``capstone_search`` result: per model, the tuning loss at each (lr, warm-up)."""
    _check_search(result)
    return {label: {(lr, w): _score(result, tuning_label(label, lr, w)) for lr in SEARCH_LRS for w in SEARCH_WARMUPS}
            for label in CAPSTONE_LABELS}


def knob_losses(result: ExperimentResult) -> dict[str, dict[float, float]]:
    """Stage 2 of a ``capstone_search`` result: per model whose stage 2 is stored, the tuning loss at each knob
    value at its stage-1 choice (the preset's value is the stage-1 run itself)."""
    _check_search(result)
    stage1 = grid_choice(result)
    out: dict[str, dict[float, float]] = {}
    labels = set(result.labels)
    for label in CAPSTONE_LABELS:
        lr, warmup, preset = stage1[label]["lr"], stage1[label]["warmup"], _preset_knob(result, label)
        runs = {v: tuning_label(label, lr, warmup, None if v == preset else v) for v in KNOBS[label][1]}
        if all(run in labels for run in runs.values()):
            out[label] = {v: _score(result, run) for v, run in runs.items()}
    return out


def _preset_knob(result: ExperimentResult, label: str) -> float:
    run = result.run_of(tuning_label(label, SEARCH_LRS[0], SEARCH_WARMUPS[0]))
    name = KNOBS[label][0]
    return run["train"][name] if name == "weight_decay" else run["model"][name]


def _check_search(result: Any) -> None:
    if not isinstance(result, ExperimentResult) or result.experiment != "capstone_search":
        got = result.experiment if isinstance(result, ExperimentResult) else type(result).__name__
        raise ValueError(f"result must be the capstone_search result (load_result('capstone_search', size)), "
                         f"got {got!r}")


def grid_choice(result: ExperimentResult) -> dict[str, dict[str, float]]:
    """Per model, the stage-1 point (lr, warm-up) with the lowest tuning loss: ``{label: {"lr", "warmup",
    "loss"}}``."""
    out = {}
    for label, grid in search_grid(result).items():
        (lr, warmup), loss = min(grid.items(), key=lambda kv: kv[1])
        out[label] = {"lr": lr, "warmup": warmup, "loss": loss}
    return out


def search_choice(result: ExperimentResult) -> dict[str, dict[str, float]]:
    """Per model, what the whole search chose: its stage-1 (lr, warm-up) and, where stage 2 is stored, the knob
    value with the lowest tuning loss there: ``{label: {"lr", "warmup", "knob", "loss"}}``."""
    out = {}
    knobs = knob_losses(result)
    for label, point in grid_choice(result).items():
        value, loss = (min(knobs[label].items(), key=lambda kv: kv[1]) if label in knobs
                       else (_preset_knob(result, label), point["loss"]))
        out[label] = {"lr": point["lr"], "warmup": point["warmup"], "knob": value, "loss": loss}
    return out


CAPSTONE_SAMPLE_PROMPT = "def "
EQUAL_TIME_STEPS = 1.2
"""The recipe MoE takes about 1.2x the dense twin's time per step on one CPU thread (README benchmarks and
the stored runs' tokens/s), so the equal wall-clock dense run trains 1.2x the steps (and tokens)."""
EXPERT_COUNTS = (4, 8, 32)  # with the recipe's 16 (capstone result) and the dense twin as "1 expert"


def _probe_08(model: TinyLM, corpus: Any) -> dict[str, Any]:
    """Per MoE layer on the test half: the token type x first-choice expert table, I(type; expert) against the
    random and byte-lookup routers, I(type; expert | byte) against its within-byte shuffle; and a sample from a
    fixed prompt."""
    from moe_course.analysis import byte_routing_tables, specialisation, specialisation_by_byte
    from moe_course.corpus import TOKEN_TYPE_NAMES, encode

    out: dict[str, Any] = {}
    if model.moe_layers():
        data, types = corpus.val_part("test") if _has_parts(corpus) else (corpus.val, corpus.val_types)
        by_byte = byte_routing_tables(model, data, types, len(TOKEN_TYPE_NAMES), n_batches=32)
        tables = [t.sum(dim=0) for t in by_byte]
        out["type_tables"] = [t.tolist() for t in tables]
        out.update(specialisation(tables))
        out["by_byte"] = specialisation_by_byte(by_byte)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompt = encode(CAPSTONE_SAMPLE_PROMPT).long()[None].to(device)  # (1, T)
    gen = torch.Generator(device=device).manual_seed(0)
    sample = model.generate(prompt, 240, temperature=0.8, generator=gen)[0].tolist()
    model.train(was_training)
    out["sample"] = bytes(sample).decode("utf-8", errors="replace")
    return out


class PreferenceTracker:
    """The recipe's collapse in the units the bias acts in: at every log point, per MoE layer, the spread over
    experts of the batch-mean router *score* (the preference all tokens share; sigmoid scores for the recipe),
    of the routing bias, and of their sum (what the choice sees), and the token-dependent part of the scores
    (their std over the batch's tokens, mean over experts)."""

    KEYS = ("score_range", "bias_range", "net_range", "score_token_std")

    def __init__(self, log_every: int, steps: int) -> None:
        self.log_every, self.steps = log_every, steps
        self.points: dict[str, list[list[float]]] = {k: [] for k in self.KEYS}

    @torch.no_grad()
    def __call__(self, step: int, model: TinyLM) -> None:
        done = step + 1
        if done % self.log_every and done != self.steps:
            return
        row: dict[str, list[float]] = {k: [] for k in self.KEYS}
        for layer in model.moe_layers():
            scores = layer.last_routing.scores.float().reshape(-1, layer.n_experts)  # (T, N)
            shared = scores.mean(0)  # (N,) what every token gives each expert
            bias = layer.router.expert_bias.float()  # (N,)
            row["score_range"].append(float(shared.max() - shared.min()))
            row["bias_range"].append(float(bias.max() - bias.min()))
            row["net_range"].append(float((shared + bias).max() - (shared + bias).min()))
            row["score_token_std"].append(float(scores.std(0).mean()))
        for key in self.KEYS:
            self.points[key].append(row[key])

    def record(self) -> dict[str, list[list[float]]]:
        """Lists indexed by log point, each one value per MoE layer (for ``RunRecord.extra``)."""
        return dict(self.points)


def _preferences(corpus: Any, cfg: Any, log_every: int, size: str, device: Any) -> PreferenceTracker:
    return PreferenceTracker(log_every, cfg.steps)


def _with_equal_time(shapes: tuple[Run, Run, Run], ratio: float, size: str) -> list[Run]:
    """The race's three models, plus (except on a GPU) the dense twin trained ``ratio`` times the steps."""
    runs = list(shapes)
    if size != "gpu":  # equal time is a CPU question: on a GPU the MoE's step time depends on the kernels
        dense = shapes[0]
        steps = round(ratio * dense.train.steps)
        runs.append(replace(dense, label="dense, equal time", train=replace(dense.train, steps=steps)))
    return runs


@register("capstone", "notebook 08: dense twin vs plain top-2 MoE vs the course's recipe (fine-grained + shared + "
          "loss-free) at equal active parameters and tokens; and a dense run given the recipe's wall-clock time",
          seeds=(0, 1, 2))
def _capstone(size: str) -> list[Run]:
    return _with_equal_time(capstone_shapes(size), EQUAL_TIME_STEPS, size)


BIAS_RATES = (1e-3, 3e-3, 1e-2)
"""u of the recipe's routing-bias update tried in ``recipe_bias_rate`` (the recipe uses 1e-3, DeepSeek-V3's)."""


@register("recipe_bias_rate", "notebook 08: the recipe with bias update rate u = 1e-3 (its own), 3e-3 and 1e-2: "
          "how long the early collapse lasts and what faster balancing costs", seeds=(0, 1))
def _recipe_bias_rate(size: str) -> list[Run]:
    best = capstone_shapes(size)[2]
    return [replace(best, label=f"u={u:g}", model=replace(best.model, bias_update_rate=u), probe=None)
            for u in BIAS_RATES]


@register("experts_sweep", "notebook 08: the recipe with 4, 8 or 32 routed experts at fixed active width (more "
          "experts, more total parameters, same compute per token: Shazeer et al. 2017 in miniature)")
def _experts_sweep(size: str) -> list[Run]:
    best = capstone_shapes(size)[2]
    return [Run(f"E={n}", replace(best.model, n_experts=n), best.train, val=best.val) for n in EXPERT_COUNTS]


# ---------------------------------------------------------------------------------------------------------
# The race on the evidence protocol: every model at what capstone_search chose, 5 paired seeds, test half
# ---------------------------------------------------------------------------------------------------------

RACE_TUNED: dict[str, dict[str, float]] = {}
"""Per model, the (lr, warm-up, knob) ``capstone_search`` chose (:func:`search_choice`; a test keeps them equal).
Empty until both stages of the search are stored."""
RACE_SEEDS = (0, 1, 2, 3, 4)
EQUAL_TIME_RATIO = 1.16
"""A recipe training step over a dense one on one CPU thread, from the interleaved step benchmark on a quiet
machine (``bench_model_step-cpu.json``: ``recipe_ratio_median`` 1.156; a test keeps them within 0.01): the
equal-time dense run trains this many times the steps."""
RACE_EXPERTS = (4, 8, 32)
"""Routed experts of the recipe in ``capstone_experts`` at fixed active width; E = 16 is the race's recipe itself
(the same configuration and seeds, so its records serve as the sweep's fourth point)."""


def race_shapes(size: str) -> tuple[Run, Run, Run]:
    """The three models of the race, each at its :data:`RACE_TUNED` settings at cpu size (the presets' otherwise);
    the MoEs track their router preference (:class:`PreferenceTracker`)."""
    runs = capstone_shapes(size)
    if size == "cpu":
        missing = [r.label for r in runs if r.label not in RACE_TUNED]
        if missing:
            raise ValueError(f"no tuned settings for {missing}: run capstone_search --size cpu (both stages) and copy "
                             "search_choice(load_result('capstone_search')) into RACE_TUNED")
        runs = tuple(with_knob(replace(r, train=replace(r.train, lr=RACE_TUNED[r.label]["lr"],
                                                        warmup=int(RACE_TUNED[r.label]["warmup"]))),
                               r.label, RACE_TUNED[r.label]["knob"]) for r in runs)
    return tuple(replace(r, tracker=_preferences) if r.model.ffn == "moe" else r for r in runs)


def capstone_race(size: str) -> list[Run]:
    """The race on the protocol: the dense twin, the top-2 MoE and the recipe at equal active parameters and tokens,
    each at what ``capstone_search`` chose, scored on the whole test half over :data:`RACE_SEEDS`; and the dense
    twin given the recipe's wall-clock time. Registered as the experiment ``capstone_race`` once
    :data:`RACE_TUNED` holds stage 2's choice (until then the cpu size has no tuned settings to train)."""
    return _with_equal_time(race_shapes(size), EQUAL_TIME_RATIO, size)


def capstone_experts(size: str) -> list[Run]:
    """The race's recipe with :data:`RACE_EXPERTS` routed experts at fixed active width and its tuned settings
    (Clark et al. 2022's axis in miniature), for seeds 0-2; registered with ``capstone_race``."""
    best = race_shapes(size)[2]
    return [replace(best, label=f"E={n}", model=replace(best.model, n_experts=n), probe=None, tracker=None)
            for n in RACE_EXPERTS]


def loss_at_seconds(steps: Sequence[int], losses: Sequence[float], total_steps: int, total_seconds: float,
                    seconds: float) -> float:
    """A run's validation loss interpolated at ``seconds`` of training, assuming equal time per step: the loss
    curve (``steps``, ``losses``) read at step ``seconds / total_seconds · total_steps`` (linear between points)."""
    if len(steps) != len(losses) or len(steps) < 2:
        raise ValueError(f"steps and losses must be the same curve with at least 2 points, got {len(steps)} and "
                         f"{len(losses)}")
    if not total_seconds > 0 or not total_steps > 0:
        raise ValueError(f"total_steps and total_seconds must be > 0, got {total_steps} and {total_seconds}")
    at = seconds / total_seconds * total_steps
    if not steps[0] <= at <= steps[-1]:
        raise ValueError(f"seconds={seconds:g} is step {at:.0f} of this run, outside its curve (steps {steps[0]} to "
                         f"{steps[-1]}): compare at a time both runs reached")
    i = next(i for i in range(1, len(steps)) if at <= steps[i])
    w = (at - steps[i - 1]) / (steps[i] - steps[i - 1])
    return float(losses[i - 1] + w * (losses[i] - losses[i - 1]))


def expert_power_law(losses: dict[int, Sequence[float]]) -> dict[str, Any]:
    """Clark et al. 2022 (arXiv:2202.01169, eq. 1) at a fixed dense size N: log L = d + b·log E, fitted by least
    squares seed by seed over the expert counts E (each list holds one loss per seed, same seeds); the slope b
    with its 95% interval over seeds (:func:`~moe_course.metrics.paired_gaps` of the slopes against 0).

    Returns ``{"slopes", "intercepts", "gaps"}``: ``gaps.mean`` is the mean slope, ``gaps.low``/``gaps.high`` its
    interval; a doubling of E multiplies the loss by about 2**b.
    """
    from moe_course.metrics import paired_gaps

    if len(losses) < 3:
        raise ValueError(f"losses must hold at least 3 expert counts for a slope with residuals, got {len(losses)}")
    counts = sorted(losses)
    if counts[0] < 1:
        raise ValueError(f"expert counts must be >= 1, got {counts}")
    n_seeds = {len(losses[e]) for e in counts}
    if len(n_seeds) != 1:
        raise ValueError(f"every expert count needs the same seeds, got {[len(losses[e]) for e in counts]} losses")
    x = [math.log(e) for e in counts]
    mx = sum(x) / len(x)
    slopes, intercepts = [], []
    for s in range(n_seeds.pop()):
        y = [math.log(losses[e][s]) for e in counts]
        my = sum(y) / len(y)
        b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y, strict=True)) / sum((xi - mx) ** 2 for xi in x)
        slopes.append(b)
        intercepts.append(my - b * mx)
    return {"slopes": slopes, "intercepts": intercepts, "gaps": paired_gaps(slopes, [0.0] * len(slopes))}
