"""Notebook 09's experiment (serving): the capstone's top-2 MoE and recipe trained as in ``capstone``, then probed
for routing traces, expert-cache counts (hits, loads, prefetches; cold and warm), prefetch recall and KV-cache
decoding speed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from moe_course.experiments.capstone import capstone_shapes
from moe_course.experiments.runner import Run, register
from moe_course.model import TinyLM

__all__: list[str] = []

def _serving_probe(size: str) -> Callable[[TinyLM, Any], dict[str, Any]]:
    def probe(model: TinyLM, corpus: Any) -> dict[str, Any]:
        from moe_course.serving import serving_probe

        return serving_probe(model, corpus, size)

    return probe


@register("serving_traces", "notebook 09: the capstone's top-2 MoE and recipe (seed 0, trained as in `capstone`), "
          "then their routing traces, expert-cache hit rates, prefetch recall and KV-cache decoding speed",
          seeds=(0,), version=2)
def _serving_traces(size: str) -> list[Run]:
    _, moe, best = capstone_shapes(size)
    return [replace(run, probe=_serving_probe(size)) for run in (moe, best)]
