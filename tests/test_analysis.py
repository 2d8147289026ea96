"""moe_course.analysis: masking, routing tables, mutual information and its random baseline behave as defined."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_course.analysis import (
    byte_lookup_table,
    byte_routing_tables,
    conditional_mutual_information,
    expert_output_similarity,
    mask_top_experts,
    mutual_information,
    random_router_table,
    redundancy,
    routing_tables,
    shared_as_routed,
    shared_output_share,
    shuffled_within_bytes,
    specialisation,
    specialisation_by_byte,
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


def _entropy(counts) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def test_conditional_mutual_information_hand_values_and_entropy_identity() -> None:
    table = torch.zeros(256, 2, 2, dtype=torch.long)
    table[0] = torch.tensor([[5, 0], [0, 5]])  # byte 0: the expert is the type, 1 bit
    table[1] = torch.tensor([[5, 5], [0, 0]])  # byte 1: one type, 0 bits
    assert conditional_mutual_information(table) == pytest.approx(0.5)  # p(byte 0) = 1/2
    # byte 0's experts tie (5 and 5): the lookup takes expert 0, as does byte 1's tie
    assert torch.equal(byte_lookup_table(table), torch.tensor([[15, 0], [5, 0]]))
    gen = torch.Generator().manual_seed(3)
    rand = torch.randint(0, 7, (256, 5, 6), generator=gen) * (torch.rand(256, 1, 1, generator=gen) < 0.3)
    n = rand.double().numpy()
    # I(T; E | B) = H(T, B) + H(E, B) - H(T, E, B) - H(B), from numpy counts: an independent formula
    expected = _entropy(n.sum(2)) + _entropy(n.sum(1)) - _entropy(n.reshape(-1)) - _entropy(n.sum((1, 2)))
    assert conditional_mutual_information(rand) == pytest.approx(expected, abs=1e-9)


def test_a_router_that_reads_only_the_byte_has_no_conditional_information() -> None:
    gen = torch.Generator().manual_seed(0)
    by_type = torch.randint(0, 20, (256, 4), generator=gen)  # tokens of each byte and type
    expert_of_byte = torch.randint(0, 8, (256,), generator=gen)
    table = torch.zeros(256, 4, 8, dtype=torch.long)
    table[torch.arange(256), :, expert_of_byte] = by_type
    assert conditional_mutual_information(table) == pytest.approx(0.0, abs=1e-12)
    assert torch.equal(byte_lookup_table(table), table.sum(0))  # the lookup copies such a router exactly
    out = specialisation_by_byte([table])
    assert out["mi_byte_lookup"][0] == pytest.approx(out["mi"][0])
    assert out["mi_given_byte"][0] == pytest.approx(0.0, abs=1e-12)


def test_shuffled_within_bytes_keeps_each_bytes_loads_and_loses_context() -> None:
    table = torch.zeros(256, 2, 2, dtype=torch.long)
    table[65] = torch.tensor([[400, 0], [0, 400]])  # byte 'A': context decides the expert
    table[32] = torch.tensor([[0, 300], [100, 0]])
    shuffled = shuffled_within_bytes(table, seed=1)
    for b in (65, 32):
        assert torch.equal(shuffled[b].sum(0), table[b].sum(0)) and torch.equal(shuffled[b].sum(1), table[b].sum(1))
    assert conditional_mutual_information(shuffled) < 0.02 < 0.5 < conditional_mutual_information(table)


def test_specialisation_by_byte_whitespace_and_errors() -> None:
    table = torch.zeros(256, 2, 3, dtype=torch.long)
    table[32, 0, 1] = 50  # spaces are type 0
    table[ord("x"), 1, 2] = 50  # x is type 1
    out = specialisation_by_byte([table])
    assert out["mi_type_byte"] == pytest.approx(1.0) and out["mi_type_whitespace"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="3-D"):
        conditional_mutual_information(table.sum(0))
    with pytest.raises(ValueError, match="empty"):
        byte_lookup_table(torch.zeros(256, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="tables is empty"):
        specialisation_by_byte([])


def test_byte_routing_tables_add_up_to_the_type_tables() -> None:
    model = tiny()
    data = torch.randint(0, 32, (500,), dtype=torch.uint8)
    types = torch.randint(0, 3, (500,), dtype=torch.uint8)
    by_byte = byte_routing_tables(model, data, types, 3, batch_size=4, n_batches=3)
    flat = routing_tables(model, data, types, 3, batch_size=4, n_batches=3)
    assert [tuple(t.shape) for t in by_byte] == [(256, 3, 6)] * 2
    assert all(torch.equal(a.sum(0), b) for a, b in zip(by_byte, flat, strict=True))
    assert int(by_byte[0][32:].sum()) == 0  # bytes >= the vocabulary never occur
