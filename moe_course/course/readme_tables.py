"""The README's notebook table and RESULTS.md, generated from every notebook's stored results so no number is typed.

A generated block sits between ``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->`` in README.md or
RESULTS.md; :func:`render` rewrites every such block from :data:`TABLES` (stored results in ``data/results/``, the
notebooks themselves and the notebook timings ``make execute`` records), and ``tests/test_readme_tables.py`` fails
when a page differs from what they give, or when RESULTS.md holds a digit outside its generated blocks. After
re-running an experiment or re-executing notebooks::

    python -m moe_course.course.readme_tables          # rewrite the generated blocks of README.md and RESULTS.md
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from moe_course.course.notebooks import NOTEBOOK_TIMES, learner_minutes
from moe_course.experiments import ExperimentResult, load_result
from moe_course.experiments.capstone import BIAS_RATES, CAPSTONE_LABELS, TUNING_LRS, TUNING_WARMUPS, tuning_choice
from moe_course.experiments.fine_grained import M
from moe_course.experiments.loss_free import BALANCE_TARGETS, balanced_choice
from moe_course.metrics import PairedGaps, mean_std, paired_gaps

__all__ = [
    "PAGES", "TABLES", "balancing_table", "bench_table", "capstone_table", "describe", "experts_table",
    "fine_grained_table", "gpu_table", "learner_minutes", "loss_free_table", "main", "notebook_table",
    "protocol_text", "render", "schedule_table", "timings_table",
]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RESULTS = ROOT / "RESULTS.md"
INSTRUCTORS = ROOT / "INSTRUCTORS.md"
PAGES = (README, RESULTS, INSTRUCTORS)


TOPICS = {
    "00_welcome": "welcome; dense vs sparse; total vs active parameters",
    "01_local_experts_1991": "adaptive mixtures of local experts (Jacobs, Jordan, Nowlan & Hinton 1991)",
    "02_moe_layer": "the MoE layer inside a transformer: SwiGLU experts, soft mixture, parameter and FLOP counts",
    "03_topk_routing": "top-k routing, token dispatch, expert capacity",
    "04_load_balancing": "router collapse, Switch auxiliary loss, z-loss, expert choice, hash routing",
    "05_shared_fine_grained": "shared and fine-grained experts (DeepSeekMoE)",
    "06_aux_loss_free": "auxiliary-loss-free balancing with a routing bias (DeepSeek-V3)",
    "07_expert_parallelism": "expert parallelism over real `torch.distributed` processes: two all-to-alls",
    "08_capstone": "capstone: tiny MoE language models against their dense twin, and a look inside",
    "09_serving": "serving an MoE: memory, batching, KV-cache decoding, expert offloading",
}
"""One line per notebook for the README's table (the learning objectives are in each notebook)."""
HARDWARE = {
    "07_expert_parallelism": "CPU; starts 2–4 processes",
    "08_capstone": "CPU; a GPU grows the live run",
    "09_serving": "CPU",
}
"""What a notebook needs beyond a CPU (default: a CPU)."""


def _pm(values: Sequence[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def describe(result: ExperimentResult) -> str:
    """One sentence: the command that made ``result``, its model and training sizes, seeds and run time."""
    model, train = result.runs[0]["model"], result.runs[0]["train"]
    moe = (f", {model['n_experts']} experts top-{model['top_k']}" if model.get("ffn") == "moe" else "")
    return (f"`{result.command}`: {model['n_layer']} layers, d_model {model['d_model']}{moe} (first run), "
            f"{train['steps']:,} steps of {train['batch_size']} × {model['block_size']} bytes, "
            f"{len(result.seeds)} seed{'s' if len(result.seeds) > 1 else ''}; "
            f"{result.seconds / 60:.0f} minutes to run, stored in `data/results/{result.experiment}-"
            f"{result.size}.json`.")


def _grid() -> str:
    """The learning rates every tuned arm is tried at, as prose: "7.5e-4, 1.5e-3, … and 1.2e-2"."""
    from moe_course.experiments.tuning import LRS

    rates = [f"{lr:.1e}".replace(".0e", "e").replace("e-0", "e-") for lr in LRS]
    return ", ".join(rates[:-1]) + " and " + rates[-1]


def _tuned_lrs(name: str) -> str:
    """A sentence naming each arm's tuned learning rate of experiment ``name``: the common one, then the others."""
    from collections import Counter

    from moe_course.experiments.tuning import TUNED_LR

    table = TUNED_LR[name]
    common = Counter(table.values()).most_common(1)[0][0]
    others = "; ".join(f"{label} {lr:g}" for label, lr in table.items() if lr != common)
    return (f"each arm at the learning rate `{name}_tuning` chose for it on the tuning half (seed 0, from {_grid()}, "
            f"every choice inside that grid): {common:g}" + (f", except {others}" if others else " for every arm"))


def _tune_mean(result: ExperimentResult, label: str) -> float:
    return mean_std(result.tune_losses(label))[0]


def _gap_cell(pg: PairedGaps, a: str, b: str) -> str:
    """A table cell: the paired gap a − b with its 95% interval and the protocol's reading of it."""
    winner = pg.better(a, b)
    return f"{pg.interval()}: {winner + ' better' if winner else 'none detected'}"


def _final_mean(result: ExperimentResult, label: str, key: str) -> float:
    """Mean over seeds of the last logged value of a per-step list of the records (``max_vio`` averaged over layers)."""
    values = []
    for r in result.records_of(label):
        last = getattr(r, key)[-1]
        values.append(sum(last) / len(last) if isinstance(last, list) else last)
    return mean_std(values)[0]


def protocol_text(_: str | Path | None = None) -> str:
    """RESULTS.md's statement of the evidence protocol every trained comparison follows."""
    return ("Every trained comparison follows one protocol. Each model is scored on the whole test half of the "
            "validation files (`Corpus.val_part(\"test\")`, cut into non-overlapping windows, every byte after the "
            "first scored once); choices (a loss weight, a learning rate) are made on the tuning half only. Arms are "
            "trained with the same seeds (data order and, where shapes allow, initialisation), at least 5 of them "
            "(10 in notebook 06), and compared by their per-seed differences: the mean difference with a 95% "
            "Student-t interval (`moe_course.metrics.paired_gaps`). \"A beats B\" is written only when that interval "
            "excludes 0; otherwise \"no difference detected at this scale\", with the interval and the smallest "
            "difference the seeds could have detected (80% power). In the tables a gap A − B is positive when B has "
            "the lower loss. The capstone (notebook 08) still has 3 seeds.")


def balancing_table(results_dir: str | Path | None = None) -> str:
    """Notebook 04's stored experiments under the protocol: collapse, the α sweeps, the z-loss and five routers."""
    sweep = load_result("aux_sweep", "cpu", results_dir)
    cap = load_result("aux_sweep_capacity", "cpu", results_dir)
    collapse = load_result("collapse", "cpu", results_dir)
    zl = load_result("z_loss", "cpu", results_dir)
    routers = load_result("routers", "cpu", results_dir)
    lines = [f"- α sweep: {describe(sweep)}", f"- α sweep with capacity: {describe(cap)}",
             f"- collapse: {describe(collapse)}", f"- z-loss: {describe(zl)}", f"- routers: {describe(routers)}", "",
             "**The Switch loss weight α** (MaxVio at the end, mean over layers and seeds; losses mean ± sample std; "
             "the gap to α = 0 is paired over the seeds; each α at the learning rate `aux_sweep_tuning` chose for "
             f"it on the tuning half, seed 0, from {_grid()}, every choice inside that grid):", "",
             "| α | lr | MaxVio | tuning half | test half (nats/byte) | α = 0 − this α, 95% interval |",
             "|---|---|---|---|---|---|"]
    cf = cap.runs[0]["model"]["capacity_factor"]
    for name, result in (("no capacity limit", sweep), (f"capacity factor {cf:g}", cap)):
        labels = result.labels
        ref = result.test_losses(labels[0])
        if result is cap:
            lines += ["", f"With a capacity limit ({name}; the share of token assignments dropped at the end in the "
                      "last column; learning rates from `aux_sweep_capacity_tuning`):", "",
                      "| α | lr | MaxVio | tuning half | test half (nats/byte) | α = 0 − this α, 95% interval | "
                      "dropped |", "|---|---|---|---|---|---|---|"]
        for label in labels:
            alpha = label.split("=")[1]
            gap = "" if label == labels[0] else _gap_cell(paired_gaps(ref, result.test_losses(label)), "α = 0", alpha)
            lr = result.run_of(label)["train"]["lr"]
            row = (f"| {alpha} | {lr:g} | {_final_mean(result, label, 'max_vio'):.2f} | "
                   f"{_tune_mean(result, label):.3f} | "
                   f"{_pm(result.test_losses(label))} | {gap} |")
            lines.append(row + (f" {_final_mean(result, label, 'drop_rate'):.3f} |" if result is cap else ""))
        best = min(labels, key=lambda lab: _tune_mean(result, lab))
        where = ("α = 0 is the floor of the axis" if best == labels[0] else "inside the grid" if best != labels[-1]
                 else "the grid's largest value")
        lines += ["", f"Chosen on the tuning half: {best} ({where}; the grid reaches up to "
                  f"{labels[-1].split('=')[1]})."]
    ref_label = collapse.labels[0]
    lines += ["", f"**Collapse** (no balancing; gaps against {ref_label}):", "",
              "| run | MaxVio | test half (nats/byte) | gap, 95% interval |", "|---|---|---|---|"]
    for label in collapse.labels:
        gap = "" if label == ref_label else _gap_cell(
            paired_gaps(collapse.test_losses(ref_label), collapse.test_losses(label)), ref_label, label)
        lines.append(f"| {label} | {_final_mean(collapse, label, 'max_vio'):.2f} | "
                     f"{_pm(collapse.test_losses(label))} | {gap} |")
    z0, z1 = zl.labels[0], zl.labels[1]
    lines += ["", f"**The router z-loss** (trained at learning rate {zl.runs[0]['train']['lr']:g} to provoke large "
              "logits; router statistics at the last logged step, on the training batch: the largest and smallest "
              "logit, the mean per-token range max − min over the experts, the top-1 − top-2 gap, the gate entropy "
              "in nats and the mean logsumexp):", "",
              f"| statistic | {z0} | {z1} | {z0} − {z1}, 95% interval |", "|---|---|---|---|"]
    stats_z = (("test loss (nats/byte)", "test_loss"), ("largest logit", "logit_top"),
               ("smallest logit", "logit_bottom"), ("per-token range", "logit_range"),
               ("top-1 − top-2 gap", "logit_gap"), ("gate entropy", "gate_entropy"), ("logsumexp", "logit_lse"))
    for name, key in stats_z:
        a, b = ([getattr(r, key) if key == "test_loss" else getattr(r, key)[-1] for r in zl.records_of(lab)]
                for lab in (z0, z1))
        lines.append(f"| {name} | {_pm(a, 3 if key == 'test_loss' else 2)} | {_pm(b, 3 if key == 'test_loss' else 2)} "
                     f"| {_gap_cell(paired_gaps(a, b), z0, z1)} |")
    dense = "dense (same active width)"
    lines += ["", f"**Routers** against the {dense} twin (gaps: dense − router), {_tuned_lrs('routers')}.", "",
              "| router | MaxVio | test half (nats/byte) | dense − router, 95% interval |", "|---|---|---|---|"]
    for label in routers.labels:
        mv = "" if label == dense else f"{_final_mean(routers, label, 'max_vio'):.2f}"
        gap = "" if label == dense else _gap_cell(
            paired_gaps(routers.test_losses(dense), routers.test_losses(label)), "dense", label)
        lines.append(f"| {label} | {mv} | {_pm(routers.test_losses(label))} | {gap} |")
    leak = [r.extra["leak"] for r in routers.records_of("expert choice")]
    b1 = paired_gaps([x["batch1"] for x in leak], [x["batch16"] for x in leak])
    causal = paired_gaps([x["causal"] for x in leak], [x["batch16_same"] for x in leak])
    lines += ["", "Expert choice sees the whole batch when it routes, later tokens included. The same trained models "
              f"scored with one window per batch instead of 16: {b1.interval()} nats/byte (batch 1 − batch 16); "
              "with every position routed from its own prefix only (causal), against batch 16 on the same windows: "
              f"{causal.interval()}."]
    return "\n".join(lines)


def capstone_table(results_dir: str | Path | None = None) -> str:
    """Notebook 08's tuned race, equal-time run, paired gaps (with their 95% intervals) and bias rates."""
    from moe_course.model import ModelConfig, TinyLM
    from moe_course.params import count_model

    tuning = load_result("capstone_tuning", "cpu", results_dir)
    race = load_result("capstone", "cpu", results_dir)
    rates = load_result("recipe_bias_rate", "cpu", results_dir)
    choice = tuning_choice(tuning)
    runs = {r["label"]: r for r in race.runs}
    final = {label: [r.val_loss[-1] for r in race.records_of(label)] for label in runs}
    lrs = "/".join(f"{lr:g}" for lr in TUNING_LRS)
    warmups = "/".join(str(w) for w in TUNING_WARMUPS)
    lines = [f"- tuning: {describe(tuning)} Learning rate {lrs} × warm-up {warmups} steps for every model, "
             "scored on the tuning half of the validation files; each model trains at its best pair.",
             f"- race: {describe(race)} Reported on the test half of the validation files, which no choice saw.",
             f"- routing-bias rate: {describe(rates)}", "",
             "| model | total params | lr, warm-up (chosen on the tuning half) | val loss, test half (nats/byte) "
             "| bits/byte | seeds |", "|---|---|---|---|---|---|"]
    for label in (*CAPSTONE_LABELS, "dense, equal time"):
        cfg = ModelConfig(**runs[label]["model"])
        total = count_model(TinyLM(cfg))[0]
        train = runs[label]["train"]
        tuned = choice.get(label, choice["dense"])
        assert (train["lr"], train["warmup"]) == (tuned["lr"], tuned["warmup"]), label
        name = f"{label}, {train['steps']:,} steps" if label == "dense, equal time" else label
        m = mean_std(final[label])[0]
        lines.append(f"| {name} | {total / 1e6:.2f} M | {train['lr']:g}, {train['warmup']} | {_pm(final[label])} "
                     f"| {m / math.log(2):.3f} | {', '.join(f'{v:.3f}' for v in final[label])} |")
    lines += ["", "Paired per-seed gaps (positive: the second model is better) and the protocol's reading of their 95% "
              "interval:", ""]
    for a, b in (("dense", "MoE top-2"), ("dense", "MoE recipe"), ("MoE top-2", "MoE recipe"),
                 ("dense, equal time", "MoE recipe")):
        pg = paired_gaps(final[a], final[b])
        lines.append(f"- {', '.join(f'{g:+.3f}' for g in pg.gaps)}: {pg.verdict(a, b)}")
    per_step = {label: mean_std([r.seconds / runs[label]["train"]["steps"] for r in race.records_of(label)])[0]
                for label in ("dense", "MoE recipe")}
    lines += ["", f"Seconds per step measured in the same runs (two sharing the 2-core machine): the recipe "
              f"{1000 * per_step['MoE recipe']:.0f} ms, the dense twin {1000 * per_step['dense']:.0f} ms "
              f"({per_step['MoE recipe'] / per_step['dense']:.2f}x; the equal-time run used 1.2x the steps).", "",
              "The recipe's routing-bias rate u (`recipe_bias_rate`, 2 seeds; MaxVio mean over layers and seeds):", "",
              "| u | first logged step with MaxVio < 1 | MaxVio at the end | val loss, test half |",
              "|---|---|---|---|"]
    for u in BIAS_RATES:
        recs = rates.records_of(f"u={u:g}")
        mv = [sum(sum(p) / len(p) for p in (r.max_vio[t] for r in recs)) / len(recs) for t in range(len(recs[0].step))]
        first = next((s for s, v in zip(recs[0].step, mv, strict=True) if v < 1), None)
        lines.append(f"| {u:g} | {first if first is not None else 'never'} | {mv[-1]:.2f} | "
                     f"{_pm([r.val_loss[-1] for r in recs])} |")
    return "\n".join(lines)


def loss_free_table(results_dir: str | Path | None = None) -> str:
    """Notebook 06's comparison under the protocol: every α and u, paired gaps to no balancing and to the bias."""
    from moe_course.loss_free import stats

    result = load_result("loss_free_06", "cpu", results_dir)
    pub = LOSS_FREE_PAPER_1B
    bias = "loss-free u=0.001"
    lines = [describe(result) + f" The same sigmoid gate in every run, {_tuned_lrs('loss_free_06')}. "
             "MaxVio_global on validation batches at the end; "
             "MaxVio_batch averaged over the last quarter of training; losses on the test half, mean ± sample std; "
             "gaps paired over the seeds.", "",
             "| run | MaxVio_global | MaxVio_batch | tuning half | test half (nats/byte) | no balancing − run | "
             "run − bias u = 1e-3 |", "|---|---|---|---|---|---|---|"]
    none = result.test_losses("no balancing")
    for label in result.labels:
        cells = [f"{stats(result, label, key)[0]:.2f} ± {stats(result, label, key)[1]:.2f}"
                 for key in ("max_vio_global", "max_vio_batch")]
        t = result.test_losses(label)
        to_none = "" if label == "no balancing" else _gap_cell(paired_gaps(none, t), "none", "run")
        to_bias = "" if label == bias else _gap_cell(paired_gaps(t, result.test_losses(bias)), "run", "bias")
        lines.append(f"| {label} | {' | '.join(cells)} | {_tune_mean(result, label):.3f} | {_pm(t)} | {to_none} | "
                     f"{to_bias} |")
    matched = f"aux alpha={pub['aux_alpha']:g}"
    lines += ["", "On the tuning half alone the lowest loss needs no balancing at all, so each method's setting is the "
              "one with the lowest tuning-half loss among those that meet a balance requirement, MaxVio_global at most "
              "a target (both methods alike):", ""]
    for target in BALANCE_TARGETS:
        aux, free = (balanced_choice(result, prefix, target) for prefix in ("aux alpha=", "loss-free u="))
        if aux is None or free is None:
            lines.append(f"- target {target:g}: no setting of the {'α' if aux is None else 'u'} grid meets it.")
            continue
        pg = paired_gaps(result.test_losses(aux), result.test_losses(free))
        lines.append(f"- target {target:g}: {aux} and {free}; {pg.verdict(aux, free)}.")
    pg = paired_gaps(result.test_losses(matched), result.test_losses(bias))
    lines += ["", f"Against Wang et al.'s loss-controlled baseline weight (α = {pub['aux_alpha']:g}): "
              f"{pg.verdict(matched, bias)}. Wang et al. (arXiv:2408.15664, their 1B model) report MaxVio_global "
              f"{pub['loss_free_maxvio']:.2f} against {pub['aux_maxvio']:.2f} and perplexity "
              f"{pub['loss_free_ppl']:.2f} against {pub['aux_ppl']:.2f}. On the sigmoid gate the Switch loss uses "
              "each token's scores normalised to sum to one, as DeepSeek-V3's balance losses do."]
    return "\n".join(lines)


LOSS_FREE_PAPER_1B = {"loss_free_maxvio": 0.04, "aux_maxvio": 0.72, "loss_free_ppl": 9.50, "aux_ppl": 9.56,
                      "aux_alpha": 1e-3}
"""Wang et al. 2024 (arXiv:2408.15664), Table 2, the 1B model: loss-free balancing against the loss-controlled one,
whose auxiliary-loss weight α they set to 0.001 (their experimental setup)."""


def _notebook_paths(solutions_dir: Path | None = None) -> list[Path]:
    return sorted((solutions_dir or ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))


def _timings() -> dict:
    if not NOTEBOOK_TIMES.exists():
        return {"notebooks": {}}
    return json.loads(NOTEBOOK_TIMES.read_text(encoding="utf-8"))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def notebook_table(_: str | Path | None = None) -> str:
    """README's table: each notebook with its topic, learner time, CPU run time and hardware, and the totals."""
    from moe_course.course.links import colab_badge

    times = _timings()["notebooks"]
    lines = ["| # | notebook | topic | learner time | run time (CPU) | needs |", "|---|---|---|---|---|---|"]
    total_min, total_s = 0, 0.0
    paths = _notebook_paths()
    for path in paths:
        stem = path.stem
        minutes = learner_minutes(path)
        seconds = times.get(path.name, {}).get("seconds")
        total_min += minutes
        total_s += seconds or 0.0
        run = _duration(seconds) if seconds is not None else "not measured"
        lines.append(f"| {stem[:2]} | [`{stem}`](notebooks/{path.name}) {colab_badge(f'notebooks/{path.name}')} | "
                     f"{TOPICS.get(stem, '')} | about {minutes} min | {run} | {HARDWARE.get(stem, 'CPU')} |")
    complete = all(p.name in times for p in paths)
    lines.append(f"| | **all {len(paths)}** | | **about {total_min / 60:.0f} hours** | "
                 f"**{_duration(total_s) if complete else 'not measured'}** | |")
    return "\n".join(lines)


def timings_table(_: str | Path | None = None) -> str:
    """RESULTS.md's notebook timings: wall time of each solution notebook's last execution and the machine's load."""
    data = _timings()
    lines = ["| notebook | run time | load average (1 min) at the start |", "|---|---|---|"]
    for name, entry in sorted(data["notebooks"].items()):
        lines.append(f"| `{name}` | {entry['seconds']:.1f} s | {entry['load_1min']:.1f} |")
    env = data.get("environment", {})
    if env:
        lines += ["", f"Measured with `make execute` on {env.get('cpus')} CPU cores ({env.get('machine')}), Python "
                  f"{env.get('python')}, PyTorch {env.get('torch')}, `MOE_DEVICE=cpu`, kernel start included."]
    return "\n".join(lines)


def experts_table(results_dir: str | Path | None = None) -> str:
    """Notebook 08's sweep of the number of experts at fixed active parameters (with the race's E = 1 and 16)."""
    from dataclasses import replace

    from moe_course.model import ModelConfig, TinyLM
    from moe_course.params import count_model
    from moe_course.train import get_preset

    sweep = load_result("experts_sweep", "cpu", results_dir)
    race = load_result("capstone", "cpu", results_dir)
    best = get_preset("cpu-best").model
    points = {1: ("dense twin", count_model(TinyLM(get_preset("cpu-dense").model))[0],
                  [r.val_loss[-1] for r in race.records_of("dense")][: len(sweep.seeds)]),
              best.n_experts: ("the recipe (race)", count_model(TinyLM(best))[0],
                               [r.val_loss[-1] for r in race.records_of("MoE recipe")][: len(sweep.seeds)])}
    for run in sweep.runs:
        e = run["model"]["n_experts"]
        points[e] = (run["label"], count_model(TinyLM(ModelConfig(**run["model"])))[0],
                     [r.val_loss[-1] for r in sweep.records_of(run["label"])])
    assert all(ModelConfig(**r["model"]) == replace(best, n_experts=r["model"]["n_experts"]) for r in sweep.runs)
    lines = [describe(sweep) + " The recipe's layout with E routed experts, the same active parameters; E = 1 is "
             "the dense twin and the recipe's own E comes from the race (its first seeds).", "",
             "| routed experts E | run | total params | val loss per seed | mean |", "|---|---|---|---|---|"]
    for e in sorted(points):
        label, total, losses = points[e]
        lines.append(f"| {e} | {label} | {total / 1e6:.2f} M | {', '.join(f'{v:.3f}' for v in losses)} | "
                     f"{sum(losses) / len(losses):.3f} |")
    return "\n".join(lines)


BENCH_STEP = ROOT / "data" / "results" / "bench_model_step-cpu.json"
"""``benchmarks/bench_model_step.py --threads 1 --clock cpu --json`` on the CPU, with the AVX2 kernels."""
BENCH_STEP_GPU_PRESETS = ROOT / "data" / "results" / "bench_model_step-gpu_presets-cpu.json"
"""The same benchmark of the gpu presets on the CPU (``--size gpu --device cpu``): the widest models measured."""
STEP_TARGET = 1.10
"""Issue 19's target for the CPU training step of an MoE preset against its dense twin."""


def bench_table(_: str | Path | None = None) -> str:
    """RESULTS.md's training-step benchmark: step times, MoE / dense ratios, the profile and other layouts."""
    data = json.loads(BENCH_STEP.read_text(encoding="utf-8"))
    flags = (" --variants" if "variants" in data else "") + \
        (f" --profile {data['profile']['dense']['steps']}" if "profile" in data else "")
    lines = [f"`ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_model_step.py --threads {data['threads']} --clock "
             f"{data['clock']}{flags} --json data/results/{BENCH_STEP.name}`: forward, loss, backward, clipping and "
             f"the AdamW step of each `cpu-*` preset on one batch, {data['repeats']} interleaved repeats, "
             f"{data['threads']} thread, the process's CPU time (PyTorch {data['torch'].split('+')[0]}).", "",
             "| preset | active params | total params | fastest step | median step | tokens/s |",
             "|---|---|---|---|---|---|"]
    for kind, row in data["rows"].items():
        lines.append(f"| cpu-{kind} | {row['active'] / 1e6:.2f} M | {row['total'] / 1e6:.2f} M | "
                     f"{row['best_ms']:.1f} ms | {row['median_ms']:.1f} ms | {row['tokens_per_s']:,.0f} |")
    lines += ["", f"Step time against the dense twin: cpu-moe {data['ratio_best']:.2f} (median "
              f"{data['ratio_median']:.2f}), cpu-best {data['recipe_ratio_best']:.2f} (median "
              f"{data['recipe_ratio_median']:.2f}); the target of at most {STEP_TARGET:.2f} is "
              f"{'met' if max(data['ratio_best'], data['recipe_ratio_best']) <= STEP_TARGET else 'not met'}."]
    if "profile" in data:
        lines += ["", *_profile_lines(data["profile"])]
    if "variants" in data:
        lines += ["", *_variant_lines(data)]
    if "widths" in data:
        gpu_file = BENCH_STEP_GPU_PRESETS
        gpu = json.loads(gpu_file.read_text(encoding="utf-8")) if gpu_file.exists() else None
        lines += ["", *_width_lines(data, gpu)]
    return "\n".join(lines)


def _width_lines(data: dict, gpu: dict | None) -> list[str]:
    """The step-time ratios of the cpu presets widened (and of the gpu presets) on the same CPU."""
    from moe_course.train import get_preset

    d0 = get_preset("cpu-dense").model.d_model
    rows = [(f"{d0} (the cpu presets)", data["rows"]["dense"]["best_ms"], data["ratio_best"],
             data["recipe_ratio_best"], d0)]
    rows += [(width, row["dense_ms"], row["ratio_best"], row["recipe_ratio_best"], int(width))
             for width, row in data["widths"].items()]
    text = ("The same three presets widened: the token width and every FFN and expert width scaled together, with "
            "layers, tokens per batch and expert counts unchanged")
    if gpu is not None:
        g = get_preset("gpu-dense")
        rows.append((f"{g.model.d_model} (the gpu presets: {g.model.n_layer} layers, "
                     f"{gpu['rows']['dense']['tokens']:,} tokens a batch)", gpu["rows"]["dense"]["best_ms"],
                     gpu["ratio_best"], gpu["recipe_ratio_best"], g.model.d_model))
        text += (f"; and the gpu presets on this CPU (`--size gpu --device cpu --repeats {gpu['repeats']} --json "
                 f"data/results/{BENCH_STEP_GPU_PRESETS.name}`)")
    lines = [text + ", all with one thread and the CPU clock:", "",
             "| d_model | dense step | moe / dense | best / dense |", "|---|---|---|---|"]
    lines += [f"| {label} | {ms:,.1f} ms | {moe:.2f} | {best:.2f} |" for label, ms, moe, best, _ in rows]
    within = []
    for i in (2, 3):
        widths = [str(row[4]) for row in rows if row[i] <= STEP_TARGET]
        listed = ", ".join(widths[:-1]) + " and " + widths[-1] if len(widths) > 1 else "".join(widths)
        within.append(f"at d_model {listed}" if widths else "at none of these widths")
    lines += ["", f"Within {STEP_TARGET:.2f} of the dense twin: the top-2 MoE {within[0]}, the recipe {within[1]}. "
              "Routing a token costs work in proportion to its width; the multiply-adds it buys grow with the square "
              "of the width."]
    return lines


PROFILE_ROWS = {"all matrix multiplies": "all matrix multiplies",
                "grouped GEMM": "of which per expert (`grouped_mm`)",
                "GEMM": "of which plain (attention projections, dense or shared FFN, router, output)"}
"""The first rows of RESULTS.md's profile table: category -> row label; the other categories follow by extra time."""


def _profile_lines(profile: dict) -> list[str]:
    """The per-category profile of each cpu preset and what the MoE presets spend beyond the dense twin."""
    cats = {kind: dict(p["categories_ms"]) for kind, p in profile.items()}
    for by_cat in cats.values():  # the grouped (per-expert) multiplies and the plain ones, together
        by_cat["all matrix multiplies"] = by_cat.get("GEMM", 0.0) + by_cat.get("grouped GEMM", 0.0)
    rest = sorted({c for by_cat in cats.values() for c in by_cat} - set(PROFILE_ROWS),
                  key=lambda c: -(cats["moe"].get(c, 0.0) - cats["dense"].get(c, 0.0)))
    totals = ", ".join(f"cpu-{kind} {p['ms_per_step']:.1f} ms" for kind, p in profile.items())
    lines = [f"Where the time goes: `torch.profiler`, self CPU time per step over {profile['dense']['steps']} steps "
             f"(the profiler's own cost per op raises the totals: {totals}).", "",
             "| ops | cpu-dense | cpu-moe | cpu-best | moe − dense | best − dense |", "|---|---|---|---|---|---|"]
    for cat in [*PROFILE_ROWS, *rest]:
        d, m, b = (cats[kind].get(cat, 0.0) for kind in ("dense", "moe", "best"))
        lines.append(f"| {PROFILE_ROWS.get(cat, cat)} | {d:.1f} ms | {m:.1f} ms | {b:.1f} ms | "
                     f"{round(m - d, 1) + 0.0:+.1f} ms | {round(b - d, 1) + 0.0:+.1f} ms |")  # + 0.0: no "-0.0"
    return lines


def _variant_lines(data: dict) -> list[str]:
    """Other layouts of cpu-moe at the same active width, from the same interleaved run."""
    variants = data["variants"]
    lines = ["Other layouts of cpu-moe's experts at the same active width (top-k times expert width), timed in the "
             "same interleaved run:", "", "| experts | total params | fastest step | against cpu-dense |",
             "|---|---|---|---|",
             f"| cpu-moe's own | {data['rows']['moe']['total'] / 1e6:.2f} M | {data['rows']['moe']['best_ms']:.1f} ms "
             f"| {data['ratio_best']:.2f} |"]
    for name, row in variants.items():
        lines.append(f"| {name} | {row['total'] / 1e6:.2f} M | {row['best_ms']:.1f} ms | {row['ratio_best']:.2f} |")
    closest = min(variants, key=lambda n: variants[n]["ratio_best"])
    met = [n for n, row in variants.items() if row["ratio_best"] <= STEP_TARGET]
    lines += ["", f"Closest to the dense twin: {closest} at {variants[closest]['ratio_best']:.2f}; "
              + (f"within {STEP_TARGET:.2f}: {', '.join(met)}." if met else
                 f"none of the layouts reaches {STEP_TARGET:.2f}.")]
    return lines


def gpu_table(results_dir: str | Path | None = None) -> str:
    """RESULTS.md's GPU section: the suite's stored capstone at GPU size, or how to produce it."""
    from moe_course.course.gpu_results import format_gpu_summary, load_gpu_capstone

    result = load_gpu_capstone(results_dir)
    if result is None:
        return ("Not measured yet: no `data/results/capstone-gpu.json` is stored. On a machine with an NVIDIA GPU, "
                "`PYTHONPATH=. python benchmarks/gpu_suite.py --out gpu-out --budget-s 480` measures it; copy "
                "`gpu-out/capstone-gpu.json` into `data/results/` and run `python -m moe_course.course.readme_tables`.")
    return format_gpu_summary(result)


WORKSHOP_DAYS = {
    "one day": [("morning", ["00_welcome", "02_moe_layer"]), ("afternoon", ["03_topk_routing", "04_load_balancing"]),
                ("homework", ["05_shared_fine_grained", "06_aux_loss_free", "08_capstone"])],
    "two days": [("day 1, morning", ["00_welcome", "01_local_experts_1991"]),
                 ("day 1, afternoon", ["02_moe_layer", "03_topk_routing"]),
                 ("day 2, morning", ["04_load_balancing", "06_aux_loss_free"]),
                 ("day 2, afternoon", ["07_expert_parallelism", "08_capstone"]),
                 ("homework", ["05_shared_fine_grained", "09_serving"])],
}
"""The workshop plans of INSTRUCTORS.md: (block, notebooks) in teaching order."""


def schedule_table(_: str | Path | None = None) -> str:
    """INSTRUCTORS.md's workshop plans: each block's notebooks and their learner time, from :func:`learner_minutes`."""
    paths = {p.stem: p for p in _notebook_paths()}
    lines = []
    for plan, blocks in WORKSHOP_DAYS.items():
        lines += [f"**{plan[0].upper()}{plan[1:]}**", "", "| block | notebooks | learner time |", "|---|---|---|"]
        for when, block in blocks:
            present = [stem for stem in block if stem in paths]
            minutes = sum(learner_minutes(paths[stem]) for stem in present)
            lines.append(f"| {when} | {', '.join(present)} | about {minutes} min |")
        lines.append("")
    return "\n".join(lines).rstrip()


DEEPSEEKMOE_PILE_LOSS = {"GShard": 1.867, "DeepSeekMoE": 1.808}
"""DeepSeekMoE paper (Dai et al. 2024, arXiv:2401.06066), Table 1: Pile loss of the 2B models, which were trained
on 100B tokens of DeepSeek's own multilingual corpus; the Pile is only the evaluation set."""
FINE_GRAINED_NAMES = {"GShard 8 top-2": "GShard-style, 8 experts top-2", "fine 32 top-8": "fine-grained, 32 top-8",
                      "DeepSeekMoE 1+31 top-7": "DeepSeekMoE, 1 shared + 31 routed top-7",
                      "dense (width 128)": "dense twin (same active width)"}


def fine_grained_table(results_dir: str | Path | None = None) -> str:
    """Notebook 05's layout race under every balancing regime, the shared-expert swap and the probes (protocol)."""
    from moe_course.experiments.fine_grained import LAYOUTS, REGIMES, TUNED, tuned_regime

    result = load_result("fine_grained", "cpu", results_dir)
    short = {"GShard 8 top-2": "GShard", "fine 32 top-8": "fine", "DeepSeekMoE 1+31 top-7": "DeepSeekMoE"}
    dense = "dense (width 128)"
    lines = [f"{describe(result)} Equal expert parameters, total and active; each layout trained under every "
             "balancing regime (Switch aux loss at α, or the routing bias of notebook 06 at rate u), "
             f"{_tuned_lrs('fine_grained')}. Test-half loss, mean ± sample std over the seeds:", "",
             "| regime | " + " | ".join(FINE_GRAINED_NAMES[k] for k in LAYOUTS)
             + " | GShard − fine | GShard − DeepSeekMoE | fine − DeepSeekMoE |", "|---|---|---|---|---|---|---|"]
    for regime in REGIMES:
        t = {k: result.test_losses(f"{k}, {regime}") for k in LAYOUTS}
        g, f, d = LAYOUTS
        gaps = [_gap_cell(paired_gaps(t[a], t[b]), short[a], short[b]) for a, b in ((g, f), (g, d), (f, d))]
        lines.append(f"| {regime} | " + " | ".join(_pm(t[k]) for k in LAYOUTS) + " | " + " | ".join(gaps) + " |")
    lines += ["", f"{FINE_GRAINED_NAMES[dense]}: {_pm(result.test_losses(dense))}.", ""]
    chosen = {k: tuned_regime(result, k) for k in LAYOUTS}
    grid = ", ".join(f"{REGIMES[r].get('aux_loss_coef', 0.0):g}" for r in TUNED)
    lines += [f"Each layout at its own Switch-loss weight, chosen on the tuning half from α = {grid} (the same "
              "search for every layout; α = 0 is the floor of the axis): "
              + "; ".join(f"{short[k]} {chosen[k]}" for k in LAYOUTS) + ".", "",
              "| tuned layouts | gap, 95% interval |", "|---|---|"]
    tuned = {k: result.test_losses(f"{k}, {chosen[k]}") for k in LAYOUTS}
    g, f, d = LAYOUTS
    for a, b in ((g, f), (g, d), (f, d)):
        lines.append(f"| {short[a]} − {short[b]} | {_gap_cell(paired_gaps(tuned[a], tuned[b]), short[a], short[b])} |")
    for k in LAYOUTS:
        lines.append(f"| dense − {short[k]} | "
                     f"{_gap_cell(paired_gaps(result.test_losses(dense), tuned[k]), 'dense', short[k])} |")
    lines += ["", "The shared expert, tested as DeepSeekMoE §4.5 does: the trained DeepSeekMoE model with its shared "
              "expert switched off and one more routed expert per token (top-8 of 31), on the whole test half "
              "(swap − base, paired over the seeds); and masking each token's best routed experts (the next-ranked "
              "experts take their place, gates renormalised), as a loss increase relative to the model's own base "
              "loss:", "",
              "| regime | shared off, one more routed | " + " | ".join(
                  f"{short[k]}: mask top-1 / top-4" for k in LAYOUTS) + " |", "|---|---|---|---|---|"]
    for regime in REGIMES:
        red = {k: [r.extra["redundancy"] for r in result.records_of(f"{k}, {regime}")] for k in LAYOUTS}
        swap = paired_gaps([x["shared_as_routed"] for x in red[d]], [x["base"] for x in red[d]])
        cells = []
        for k in LAYOUTS:
            rel = [f"{100 * mean_std([(x[f'mask_{m}'] - x['base']) / x['base'] for x in red[k]])[0]:+.1f}%"
                   for m in (1, 4)]
            cells.append(" / ".join(rel))
        lines.append(f"| {regime} | {swap.interval()} | " + " | ".join(cells) + " |")
    fine = [r.extra for r in result.records_of(f"{f}, none")]
    if fine and "similarity_blocks" in fine[0]:
        layers = range(len(fine[0]["similarity_blocks"]))
        blocks = ", ".join(_pm([x["similarity_blocks"][i] for x in fine], 2) for i in layers)
        gs = [r.extra for r in result.records_of(f"{g}, none")]
        per = ", ".join(_pm([x["similarity"][i] for x in gs], 2) for i in layers)
        lines += ["", f"Expert output similarity at equal width (no balancing; mean cosine between experts' outputs on "
                  f"the same tokens, per layer, mean ± std over the seeds): GShard's 8 experts {per}; the fine-grained "
                  f"layout's 8 blocks of {M} fine experts {blocks}."]
    pub = DEEPSEEKMOE_PILE_LOSS
    lines += ["", f"For scale: the DeepSeekMoE paper's 2B models, trained on 100B tokens of DeepSeek's own corpus, "
              f"reach Pile loss {pub['GShard']:.3f} (GShard) and {pub['DeepSeekMoE']:.3f} (DeepSeekMoE) (Dai et al. "
              "2024, arXiv:2401.06066, Table 1)."]
    return "\n".join(lines)


TABLES: dict[str, Callable[[str | Path | None], str]] = {
    "protocol": protocol_text, "balancing": balancing_table,
    "capstone": capstone_table, "loss_free": loss_free_table, "fine_grained": fine_grained_table,
    "notebooks": notebook_table, "timings": timings_table, "experts": experts_table, "schedule": schedule_table,
    "bench_step": bench_table, "gpu": gpu_table,
}
_BLOCK = re.compile(r"(<!-- generated: (\w+) -->)\n(.*?)\n?(<!-- end generated: \2 -->)", re.S)


def render(text: str, results_dir: str | Path | None = None) -> str:
    """``text`` with every generated block rewritten from the stored results; raises on an unknown block name."""
    def block(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in TABLES:
            raise ValueError(f"unknown generated block {name!r}; known: {', '.join(TABLES)}")
        return f"{match.group(1)}\n{TABLES[name](results_dir)}\n{match.group(4)}"

    return _BLOCK.sub(block, text)


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the generated blocks of README.md and RESULTS.md; ``--check`` only reports (exit 1) stale ones."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in ([], ["--check"]):
        print("usage: python -m moe_course.course.readme_tables [--check]", file=sys.stderr)
        return 2
    stale = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        new = render(text)
        if new == text:
            continue
        stale.append(page.name)
        if not args:
            page.write_text(new, encoding="utf-8")
            print(f"rewrote {page}")
    if args == ["--check"]:
        print(f"out of date: {', '.join(stale)}" if stale else "README.md and RESULTS.md are up to date")
        return 1 if stale else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
