"""moe_course.analysis: masking, routing tables, mutual information and its random baseline behave as defined."""

from __future__ import annotations

import math

import pytest
import torch

from moe_course.analysis import (
    expert_output_similarity,
    mask_top_experts,
    mutual_information,
    random_router_table,
    redundancy,
    routing_tables,
    shared_as_routed,
    shared_output_share,
    specialisation,
)
from moe_course.model import ModelConfig, TinyLM


def tiny(**kw) -> TinyLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, d_model=16, n_experts=6, top_k=2,
                      expert_hidden=16, **kw)
    return TinyLM(cfg)


def test_mutual_information_known_values() -> None:
    assert mutual_information(torch.tensor([[10, 20], [30, 60]])) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information(torch.eye(4, dtype=torch.long) * 5) == pytest.approx(2.0)
    assert math.isfinite(mutual_information(torch.tensor([[3, 0], [0, 0]])))


def test_random_router_table_keeps_marginals() -> None:
    table = torch.tensor([[50, 0, 0], [0, 40, 10], [5, 5, 30]])
    rand = random_router_table(table, seed=1)
    assert torch.equal(rand.sum(0), table.sum(0)) and torch.equal(rand.sum(1), table.sum(1))
    assert mutual_information(rand) < 0.2 * mutual_information(table)


def test_mask_top_changes_routing_and_restores() -> None:
    model = tiny().eval()
    x = torch.randint(0, 32, (3, 8))
    model(x)
    first = [layer.last_routing.indices[:, 0].clone() for layer in model.moe_layers()]
    with mask_top_experts(model, 1):
        model(x)
        masked = [layer.last_routing.indices for layer in model.moe_layers()]
    for f, m in zip(first, masked, strict=True):
        assert not (m == f[:, None]).any()  # the first choice is never used while masked
    assert all(layer.router.mask_top == 0 for layer in model.moe_layers())


def test_redundancy_and_probes_on_a_small_model() -> None:
    model = tiny(n_shared=1)
    data = torch.randint(0, 32, (500,), dtype=torch.uint8)
    types = torch.randint(0, 3, (500,), dtype=torch.uint8)
    out = redundancy(model, data, masks=(1, 2, 5), batch_size=4)
    assert set(out) == {"base", "mask_1", "mask_2"}  # mask 5 > N - k = 4 is left out
    assert out["mask_1"] != out["base"]
    tables = routing_tables(model, data, types, n_types=3, batch_size=4, n_batches=2)
    assert len(tables) == 2 and all(t.shape == (3, 6) and int(t.sum()) == 64 for t in tables)
    spec = specialisation(tables)
    assert len(spec["mi"]) == 2 and all(0 <= v <= math.log2(3) + 1e-9 for v in spec["mi"])
    sims = expert_output_similarity(model, data, n_tokens=16)
    assert len(sims) == 2 and all(-1 <= s <= 1 for s in sims)
    shares = shared_output_share(model, data, n_tokens=16)
    assert len(shares) == 2 and all(0 < s < 1 for s in shares)


def test_shared_as_routed_drops_the_shared_expert_for_one_more_routed_and_restores() -> None:
    model = tiny(n_shared=1).eval()
    x = torch.randint(0, 32, (3, 8))
    before = model(x)[0].detach().clone()
    layers = model.moe_layers()
    shared = [layer.shared for layer in layers]
    with shared_as_routed(model):
        swapped = model(x)[0].detach()
        assert all(layer.shared is None and layer.router.k == 3 and layer.top_k == 3 for layer in layers)
        assert all(layer.last_routing.indices.shape[-1] == 3 for layer in layers)
    assert not torch.allclose(before, swapped)
    restored = zip(layers, shared, strict=True)
    assert all(layer.shared is s and layer.router.k == 2 and layer.top_k == 2 for layer, s in restored)
    torch.testing.assert_close(model(x)[0], before)  # restored exactly
    with pytest.raises(ValueError, match="needs a model with shared experts"):
        with shared_as_routed(tiny()):
            pass


def test_identical_experts_have_similarity_one() -> None:
    model = tiny()
    for layer in model.moe_layers():
        with torch.no_grad():
            for w in (layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down):
                w.copy_(w[0:1].expand_as(w))
    sims = expert_output_similarity(model, torch.randint(0, 32, (100,), dtype=torch.uint8), n_tokens=16)
    assert sims == pytest.approx([1.0, 1.0])
