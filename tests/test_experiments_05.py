"""The fine_grained experiment (notebook 05): equal expert parameters, a probe stored per run, a stored cpu result."""

from __future__ import annotations

import pytest

from moe_course.device import cpu_threads
from moe_course.experiments import get_experiment, load_result, run_experiment
from moe_course.experiments.fine_grained import REGIMES
from moe_course.fine_grained import param_table


@pytest.fixture(autouse=True)
def _one_thread():
    with cpu_threads(1):
        yield


@pytest.mark.parametrize("size", ["smoke", "cpu", "gpu"])
def test_runs_have_equal_expert_parameters(size):
    runs = get_experiment("fine_grained").runs(size)
    assert [r.label.split()[0] for r in runs[:4]] == ["GShard", "fine", "DeepSeekMoE", "dense"]
    assert len(runs) == 3 * len(REGIMES) + 1  # three layouts under every regime, one dense twin
    for i, (regime, settings) in enumerate(REGIMES.items()):
        block = [runs[0], runs[1], runs[2]] if i == 0 else runs[4 + 3 * (i - 1):4 + 3 * i]
        assert all(r.label.endswith(f", {regime}") for r in block)
        for r in block:
            assert {k: getattr(r.model, k) for k in settings} == settings
    rows = param_table({r.label: r.model for r in runs[:3]})
    gshard = rows[0]
    for row, run in zip(rows[1:], runs[1:3], strict=True):
        extra_router = run.model.n_layer * run.model.d_model * (run.model.n_experts - runs[0].model.n_experts)
        assert row["total"] - gshard["total"] == extra_router  # the experts match exactly; only the router grows
        assert row["active"] - gshard["active"] == extra_router
    assert runs[2].model.n_shared == 1 and runs[2].model.top_k + 1 == runs[1].model.top_k


def test_smoke_run_stores_the_probe(tmp_path):
    result = run_experiment("fine_grained", "smoke", seeds=[0], progress=False, results_dir=tmp_path)
    by_label = {r.label: r for r in result.records}
    gshard, ds = by_label["GShard 4 top-2, none"], by_label["DeepSeekMoE 1+15 top-7, aux 1e-2"]
    dense = by_label["dense (width 32)"]
    assert set(gshard.extra["redundancy"]) == {"base", "mask_1"}  # mask 4 > N - k = 2 is left out
    assert set(ds.extra["redundancy"]) == {"base", "mask_1", "mask_4", "shared_as_routed"}
    assert len(ds.extra["similarity_blocks"]) == 1 and "similarity_blocks" not in gshard.extra
    assert len(ds.extra["shared_share"]) == 1 and gshard.extra["shared_share"] == []
    assert len(ds.extra["tables"][0]) == 9 and len(ds.extra["tables"][0][0]) == 15
    assert dense.extra == {}
    again = load_result("fine_grained", "smoke", tmp_path)
    assert again.records[0].extra == result.records[0].extra


def test_stored_cpu_result_is_current():
    result = load_result("fine_grained", "cpu")
    assert len(result.seeds) >= 3
    assert {r.label for r in result.records} == {r.label for r in get_experiment("fine_grained").runs("cpu")}
