"""The whole course in one table (shown in notebook 08): each notebook's headline experiment, its measured
number, and the paper result it miniaturises.

Numbers are never typed in here. They come from the stored experiment results (``data/results/*.json``, checked
against the code by their fingerprint), from the package's calculators, or, for notebooks whose experiment runs
live in a few seconds, from the executed solution notebook's printed output (``solutions/NN_*.ipynb``), so the
table cannot drift from what the notebooks show. A missing source gives a row that says how to produce it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moe_course.experiments import StaleResultError, load_result

__all__ = ["SOLUTIONS_DIR", "Row", "course_rows", "format_rows", "notebook_output"]

SOLUTIONS_DIR = Path(__file__).resolve().parents[2] / "solutions"
"""The executed solution notebooks (present in a clone of the repository, not in a pip install)."""


@dataclass(frozen=True)
class Row:
    """One notebook's headline: what was run, what we measured, and what the paper reports."""

    notebook: str
    experiment: str
    measured: str
    paper: str
    source: str


def notebook_output(notebook: str, solutions_dir: str | Path | None = None) -> str:
    """All printed text (stream and plain-text results) of an executed solution notebook, in cell order."""
    paths = sorted(Path(solutions_dir or SOLUTIONS_DIR).glob(f"{notebook}_*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no executed solution notebook {notebook}_*.ipynb in {solutions_dir or SOLUTIONS_DIR}")
    cells = json.loads(paths[0].read_text(encoding="utf-8"))["cells"]
    parts = []
    for cell in cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append("".join(out.get("text", "")))
            elif out.get("output_type") == "execute_result":
                parts.append("".join(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def _search(pattern: str, text: str, what: str) -> re.Match[str]:
    match = re.search(pattern, text)
    if match is None:
        raise LookupError(f"{what}: the pattern {pattern!r} is not in the notebook's output; re-execute it")
    return match


def _row_00(_: Path | None, solutions: Path | None) -> Row:
    from moe_course.params import active_params, get_published, total_params

    cfg = get_published("DeepSeek-V3")
    total, active = total_params(cfg), active_params(cfg)
    return Row("00", "total vs active parameters of DeepSeek-V3 (the package's calculator)",
               f"{total / 1e9:.0f}B total, {active / 1e9:.1f}B active ({active / total:.1%})",
               "671B total, 37B active (DeepSeek-AI 2024, arXiv:2412.19437, §1)", "moe_course.params")


def _row_01(_: Path | None, solutions: Path | None) -> Row:
    text = notebook_output("01", solutions)
    comp = _search(r"competitive: specialised in (\d+) of (\d+) runs", text, "notebook 01")
    coop = _search(r"cooperative: specialised in (\d+) of (\d+) runs", text, "notebook 01")
    return Row("01", "competitive vs cooperative error, 4 local experts on a 4-regime task, 5 seeds",
               f"one expert per regime in {comp[1]}/{comp[2]} runs (competitive) vs {coop[1]}/{coop[2]} "
               "(cooperative)",
               "the competitive error makes experts specialise, the cooperative one couples them "
               "(Jacobs, Jordan, Nowlan & Hinton 1991, §2)", "solutions/01 output")


def _row_02(_: Path | None, solutions: Path | None) -> Row:
    text = notebook_output("02", solutions)
    ratio = _search(r"the MoE stores ([\d.]+)x the parameters of the dense twin", text, "notebook 02")
    return Row("02", "a TinyLM with an MoE FFN (8 experts, top-2) vs its dense twin",
               f"{ratio[1]}x the parameters at equal active parameters per token (+0.6% for the router)",
               "Mixtral 8x7B: 46.7B total, 12.9B active per token (Jiang et al. 2024, arXiv:2401.04088)",
               "solutions/02 output")


def _row_03(_: Path | None, solutions: Path | None) -> Row:
    text = notebook_output("03", solutions)
    times = _search(r"sparse / dense = ([\d.]+),\s+soft / sparse = ([\d.]+)", text, "notebook 03")
    return Row("03", "time of a sparse top-2 layer (8 experts) vs its dense twin and the soft mixture",
               f"sparse / dense {times[1]}x, soft / sparse {times[2]}x (CPU)",
               "conditional computation: capacity grows without compute growing (Shazeer et al. 2017, "
               "arXiv:1701.06538, §1)", "solutions/03 output")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _gap(result, a: str, b: str, a_name: str, b_name: str) -> str:
    """The paired 95% interval of two arms' test-half losses (a − b) and the protocol's reading of it."""
    from moe_course.metrics import paired_gaps

    pg = paired_gaps(result.test_losses(a), result.test_losses(b))
    winner = pg.better(a_name, b_name)
    return f"paired gap {pg.interval()}: " + (f"{winner} better" if winner else "no difference detected")


def _compare(result, a: str, b: str, a_name: str, b_name: str) -> str:
    """Test-half losses of two arms, then their paired gap and its reading."""
    return (f"test loss {_mean(result.test_losses(a)):.3f} ({a_name}) vs {_mean(result.test_losses(b)):.3f} "
            f"({b_name}), " + _gap(result, a, b, a_name, b_name))


def _quality(result, a: str, b: str) -> str:
    """Whether the paired interval of a − b says that b costs quality at this scale."""
    from moe_course.metrics import paired_gaps

    pg = paired_gaps(result.test_losses(a), result.test_losses(b))
    return {a: "a quality cost at our scale", b: "a quality gain at our scale"}.get(
        pg.better(a, b), "no quality difference detected at our scale")


def _row_04(results: Path | None, _: Path | None) -> Row:
    r = load_result("aux_sweep_capacity", "cpu", results)
    free = load_result("aux_sweep", "cpu", results)
    cf = r.runs[0]["model"]["capacity_factor"]
    return Row("04", f"Switch loss alpha 0 vs 0.01, capacity {cf:g} and dropless, {len(r.seeds)} paired seeds, "
               "tuned learning rates",
               f"capacity {cf:g}: MaxVio {r.mean('alpha=0', 'max_vio'):.2f} -> {r.mean('alpha=0.01', 'max_vio'):.2f}, "
               f"dropped {r.mean('alpha=0', 'drop_rate'):.1%} -> {r.mean('alpha=0.01', 'drop_rate'):.1%}; "
               + _compare(r, "alpha=0", "alpha=0.01", "alpha 0", "alpha 0.01")
               + "; dropless: " + _gap(free, "alpha=0", "alpha=0.01", "alpha 0", "alpha 0.01"),
               "alpha = 0.01 balances experts without hurting quality (Fedus, Zoph & Shazeer 2021, "
               f"arXiv:2101.03961, §2.2); balance reproduced; with a capacity limit "
               f"{_quality(r, 'alpha=0', 'alpha=0.01')}, dropless {_quality(free, 'alpha=0', 'alpha=0.01')}",
               "data/results/aux_sweep_capacity-cpu.json, aux_sweep-cpu.json")


def _row_05(results: Path | None, _: Path | None) -> Row:
    from moe_course.experiments.fine_grained import tuned_regime

    r = load_result("fine_grained", "cpu", results)
    g, d = "GShard 8 top-2", "DeepSeekMoE 1+31 top-7"
    rg, rd = tuned_regime(r, g), tuned_regime(r, d)
    return Row("05", f"GShard 8 top-2 vs DeepSeekMoE 1 shared + 31 top-7, equal total and active, each at its "
               f"Switch-loss weight chosen on the tuning half ({rg}; {rd}), {len(r.seeds)} paired seeds",
               _compare(r, f"{g}, {rg}", f"{d}, {rd}", "GShard", "DeepSeekMoE"),
               "DeepSeekMoE beats GShard at equal parameters (Dai et al. 2024, arXiv:2401.06066, Table 1)",
               "data/results/fine_grained-cpu.json")


def _row_06(results: Path | None, _: Path | None) -> Row:
    from moe_course.course.readme_tables import LOSS_FREE_PAPER_1B
    from moe_course.loss_free import stats

    r = load_result("loss_free_06", "cpu", results)
    aux, free = f"aux alpha={LOSS_FREE_PAPER_1B['aux_alpha']:g}", "loss-free u=0.001"
    return Row("06", f"sigmoid gate: aux loss (alpha {LOSS_FREE_PAPER_1B['aux_alpha']:g}, Wang et al.'s baseline) vs "
               f"loss-free bias (u 1e-3), {len(r.seeds)} paired seeds, test half",
               f"MaxVio_global {stats(r, aux, 'max_vio_global')[0]:.2f} -> {stats(r, free, 'max_vio_global')[0]:.2f}; "
               + _compare(r, aux, free, "aux", "bias"),
               "loss-free: better balance and lower perplexity (Wang et al. 2024, arXiv:2408.15664, Table 2)",
               "data/results/loss_free_06-cpu.json")


def _row_07(_: Path | None, solutions: Path | None) -> Row:
    text = notebook_output("07", solutions)
    skew = _search(r"after\s+0 bias updates: rows received \[\d+, \d+\], busiest / mean ([\d.]+)", text, "notebook 07")
    even = _search(r"after\s+10 bias updates: rows received \[\d+, \d+\], busiest / mean ([\d.]+)", text,
                   "notebook 07")
    return Row("07", "expert parallelism on 2-4 gloo processes: all-to-all dispatch, the busiest rank",
               f"equal to one process (output and gradients); busiest rank / mean {skew[1]} -> {even[1]} after 10 "
               "bias updates", "balanced expert load keeps every GPU busy (DeepSeek-AI 2024, arXiv:2412.19437, "
               "§2.1.2, §3.2)", "solutions/07 output")


def _row_08(results: Path | None, _: Path | None) -> Row:
    from moe_course.metrics import paired_gaps

    r = load_result("capstone", "cpu", results)
    d = [x.val_loss[-1] for x in r.records_of("dense")]
    b = [x.val_loss[-1] for x in r.records_of("MoE recipe")]
    return Row("08", f"dense twin vs the course's recipe MoE, equal active parameters, tokens and tuning, {len(d)} "
               "paired seeds, test half of the validation files",
               f"val loss {_mean(d):.3f} -> {_mean(b):.3f} nats/byte, paired gap {paired_gaps(d, b).interval()}",
               "more experts at equal compute lower the loss (Shazeer et al. 2017, arXiv:1701.06538, Fig. 2; "
               "Dai et al. 2024)", "data/results/capstone-cpu.json")


def _row_09(results: Path | None, _: Path | None) -> Row:
    r = load_result("serving_traces", "cpu", results)
    extra = r.records_of("MoE recipe")[0].extra
    n = extra["n_experts"]
    c = extra["capacities"].index(n // 2)

    def mean(key: str) -> float:
        layers = [per_layer[c] for per_layer in extra[key] if per_layer is not None]
        return sum(layers) / len(layers)

    return Row("09", f"an expert cache holding {n // 2} of {n} experts per layer, on the recipe MoE's routing traces",
               f"LRU hit rate {mean('lru'):.3f} (random routing {mean('random_lru'):.3f}, Belady's optimum "
               f"{mean('belady'):.3f})", "LRU expert caching and speculative prefetch make offloaded Mixtral "
               "decoding practical on one consumer GPU (Eliseev & Mazur 2023, arXiv:2312.17238)",
               "data/results/serving_traces-cpu.json")


ROWS: list[Callable[[Path | None, Path | None], Row]] = [
    _row_00, _row_01, _row_02, _row_03, _row_04, _row_05, _row_06, _row_07, _row_08, _row_09,
]


def course_rows(results_dir: str | Path | None = None, solutions_dir: str | Path | None = None) -> list[Row]:
    """One :class:`Row` per notebook; a row whose source is missing or stale says what to run instead."""
    rows = []
    results = Path(results_dir) if results_dir else None
    solutions = Path(solutions_dir) if solutions_dir else None
    for i, make in enumerate(ROWS):
        try:
            rows.append(make(results, solutions))
        except (FileNotFoundError, StaleResultError, LookupError) as err:
            rows.append(Row(f"{i:02d}", "(not available)", f"missing: {err}", "", ""))
    return rows


def format_rows(rows: list[Row], width: int = 60) -> str:
    """A plain-text table (notebook, experiment, measured, paper), long cells wrapped at ``width``."""
    import textwrap

    lines = []
    for row in rows:
        lines.append(f"{row.notebook}  {row.experiment}")
        for key, value in (("measured", row.measured), ("paper", row.paper)):
            wrapped = textwrap.wrap(value, width) or [""]
            lines.append(f"    {key:<9}{wrapped[0]}")
            lines.extend(f"    {'':<9}{w}" for w in wrapped[1:])
    return "\n".join(lines)
