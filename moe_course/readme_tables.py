"""README tables generated from the stored results, so that no measured number in the README is typed by hand.

A generated block sits between ``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->`` in README.md;
:func:`render` rewrites every such block from :data:`TABLES`, and ``tests/test_readme_tables.py`` fails when the
README differs from what the stored results give. After re-running an experiment::

    python -m moe_course.readme_tables          # rewrite README.md's generated blocks
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from moe_course.experiments import BIAS_RATES, CAPSTONE_LABELS, load_result, tuning_choice
from moe_course.metrics import mean_std

__all__ = ["TABLES", "capstone_table", "loss_free_table", "main", "render"]

README = Path(__file__).resolve().parents[1] / "README.md"


def _pm(values: Sequence[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def capstone_table(results_dir: str | Path | None = None) -> str:
    """Notebook 08's tuned race, equal-time run, paired gaps and bias rates, from the stored results."""
    from moe_course.model import ModelConfig, TinyLM
    from moe_course.params import count_model

    tuning = load_result("capstone_tuning", "cpu", results_dir)
    race = load_result("capstone", "cpu", results_dir)
    rates = load_result("recipe_bias_rate", "cpu", results_dir)
    choice = tuning_choice(tuning)
    runs = {r["label"]: r for r in race.runs}
    final = {label: [r.val_loss[-1] for r in race.records_of(label)] for label in runs}
    lines = ["| model | total params | lr, warm-up (chosen on the tuning half) | val loss, test half (nats/byte) "
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
    lines += ["", "Paired per-seed gaps (positive: the second model is better), and the worst-against-best margin "
              "next to the largest seed spread:", ""]
    for a, b in (("dense", "MoE top-2"), ("dense", "MoE recipe"), ("MoE top-2", "MoE recipe"),
                 ("dense, equal time", "MoE recipe")):
        gaps = [x - y for x, y in zip(final[a], final[b], strict=True)]
        margin = min(final[a]) - max(final[b])
        spread = max(max(final[k]) - min(final[k]) for k in (a, b))
        lines.append(f"- {a} − {b}: {', '.join(f'{g:+.3f}' for g in gaps)} (mean {_pm(gaps)}); margin "
                     f"{margin:+.3f} against spread {spread:.3f}{'' if margin > spread else ': within the noise'}")
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
    """Notebook 06's comparison, mean ± sample std over seeds, from the stored ``loss_free_06`` result."""
    from moe_course.loss_free import stats

    result = load_result("loss_free_06", "cpu", results_dir)
    names = {"no balancing": "no balancing", "aux alpha=1e-3": "Switch aux loss α = 1e-3",
             "aux alpha=1e-2": "Switch aux loss α = 1e-2", "aux alpha=1e-1": "Switch aux loss α = 1e-1",
             "loss-free u=1e-3": "routing bias, u = 1e-3", "loss-free u=1e-4": "routing bias, u = 1e-4",
             "loss-free u=1e-2": "routing bias, u = 1e-2",
             "loss-free + seq aux 1e-4": "bias u = 1e-3 + sequence-wise aux 1e-4",
             "loss-free, best 2 of 4 groups": "bias u = 1e-3, best 2 of 4 expert groups"}
    lines = ["| run | MaxVio_global | MaxVio_batch | val loss (nats/byte) |", "|---|---|---|---|"]
    for label, name in names.items():
        cells = []
        for key, digits in (("max_vio_global", 2), ("max_vio_batch", 2), ("val_loss", 3)):
            m, s = stats(result, label, key)
            cells.append(f"{m:.{digits}f} ± {s:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TABLES: dict[str, Callable[[str | Path | None], str]] = {"capstone": capstone_table, "loss_free": loss_free_table}
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
    """Rewrite README.md's generated blocks; ``--check`` only reports (exit 1) when they are out of date."""
    args = list(sys.argv[1:] if argv is None else argv)
    text = README.read_text(encoding="utf-8")
    new = render(text)
    if args == ["--check"]:
        print("README.md tables are up to date" if new == text else "README.md tables are out of date")
        return 0 if new == text else 1
    if args:
        print("usage: python -m moe_course.readme_tables [--check]", file=sys.stderr)
        return 2
    if new != text:
        README.write_text(new, encoding="utf-8")
        print(f"rewrote {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
