"""check.shared_moe / check.fine_grained_config / check.mutual_information: the reference passes, mistakes are named."""

from __future__ import annotations

import math

import pytest
import torch

from moe_course import check
from moe_course.analysis import mutual_information as ref_mi
from moe_course.check import CheckError
from moe_course.fine_grained import fine_grained_config, shared_moe_forward

# ----------------------------------------------------------------------------------------------------------
# shared_moe
# ----------------------------------------------------------------------------------------------------------


def make_shared_moe(*, renormalize=False, shared_weight=None, k_minus_shared=False, route_shared=False,
                    no_shared=False, detach_gate=False, softmax_dim=-1):
    """A learner-style shared + routed layer with one optional mistake switched on."""

    def fn(x, gate_weight, experts, shared, k):
        logits = x @ (gate_weight.detach() if detach_gate else gate_weight).T
        if route_shared:
            logits = torch.cat([logits, torch.zeros(x.shape[0], len(shared))], dim=-1)
            experts = list(experts) + list(shared)
        probs = logits.softmax(dim=softmax_dim)
        kk = k - len(shared) if k_minus_shared else k
        w, idx = probs.topk(kk, dim=-1)
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for j in range(kk):
            for e, expert in enumerate(experts):
                mask = idx[:, j] == e
                if mask.any():
                    y = y.index_put((mask.nonzero().squeeze(1),), y[mask] + w[mask, j, None] * expert(x[mask]))
        if no_shared or route_shared:
            return y
        for s in shared:
            out = s(x)
            y = y + (w.sum(-1, keepdim=True) * out if shared_weight == "sum" else out)
        return y

    return fn


def test_shared_moe_reference_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check.shared_moe(shared_moe_forward)
    check.shared_moe(make_shared_moe())
    assert capsys.readouterr().out.count("OK  shared_moe") == 2


@pytest.mark.parametrize(("wrong", "message"), [
    (make_shared_moe(no_shared=True), "left out the shared experts"),
    (make_shared_moe(renormalize=True), "renormalised the k routed gates"),
    (make_shared_moe(shared_weight="sum"), "weighted the shared experts by the router"),
    (make_shared_moe(k_minus_shared=True), "counted the shared experts in top-k"),
    (make_shared_moe(route_shared=True), "routed the shared experts"),
    (make_shared_moe(softmax_dim=0), "softmax over the tokens"),
    (make_shared_moe(detach_gate=True), "gradient reaches gate_weight"),
])
def test_shared_moe_rejects_mistakes(wrong, message: str) -> None:
    with pytest.raises(CheckError, match=message):
        check.shared_moe(wrong)


def test_shared_moe_rejects_unfinished_stub() -> None:
    def stub(x, gate_weight, experts, shared, k):
        raise NotImplementedError()

    with pytest.raises(NotImplementedError):
        check.shared_moe(stub)


# ----------------------------------------------------------------------------------------------------------
# fine_grained_config
# ----------------------------------------------------------------------------------------------------------


def reference_config(n, k, m, ks, h):
    cfg = fine_grained_config(n, k, m, ks, h)
    return cfg.n_routed, cfg.top_k, cfg.expert_hidden


def make_config(*, width="divide", subtract_k=True, subtract_n=True, validate=True, k_times_m=True):
    def fn(n, k, m, ks, h):
        if validate and (h % m or ks >= m * k):
            raise ValueError("bad layout")
        hidden = {"divide": h // m, "keep": h, "float": h / m}[width]
        return m * n - (ks if subtract_n else 0), (m * k if k_times_m else k) - (ks if subtract_k else 0), hidden

    return fn


def test_fine_grained_config_reference_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check.fine_grained_config(reference_config)
    check.fine_grained_config(make_config())
    assert capsys.readouterr().out.count("OK  fine_grained_config") == 2


@pytest.mark.parametrize(("wrong", "message"), [
    (make_config(width="keep"), "kept the width"),
    (make_config(width="float"), "return ints"),
    (make_config(subtract_k=False), "did not subtract the shared experts from the routed top-k"),
    (make_config(subtract_n=False), "did not subtract the shared experts from the routed experts"),
    (make_config(subtract_k=False, subtract_n=False), "subtracted the shared experts from neither"),
    (make_config(k_times_m=False), "did not multiply top_k by m"),
    (make_config(validate=False), "should raise ValueError because m=3 does not divide"),
])
def test_fine_grained_config_rejects_mistakes(wrong, message: str) -> None:
    with pytest.raises(CheckError, match=message):
        check.fine_grained_config(wrong)


def test_fine_grained_config_keeps_expert_parameters() -> None:
    for n, k, m, ks, h in ((8, 2, 4, 1, 128), (16, 2, 4, 1, 1024), (6, 2, 3, 2, 96)):
        cfg = fine_grained_config(n, k, m, ks, h)
        assert cfg.expert_params(d_model=10) == (n * 3 * 10 * h, k * 3 * 10 * h)


# ----------------------------------------------------------------------------------------------------------
# mutual_information
# ----------------------------------------------------------------------------------------------------------


def mi_nats(table):
    return ref_mi(table) * math.log(2)


def mi_nan(table):
    p = table.double() / table.sum()
    return float((p * torch.log2(p / torch.outer(p.sum(1), p.sum(0)))).sum())


def mi_conditional(table):
    p = table.double() / table.sum()
    h = -(p[p > 0] * torch.log2(p[p > 0])).sum()
    pr = p.sum(1)
    return float(h + (pr[pr > 0] * torch.log2(pr[pr > 0])).sum())


def mi_expert_entropy(table):
    pc = table.double().sum(0) / table.sum()
    return float(-(pc[pc > 0] * torch.log2(pc[pc > 0])).sum())


def test_mutual_information_reference_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check.mutual_information(ref_mi)
    check.mutual_information(lambda t: torch.tensor(ref_mi(t)))
    assert capsys.readouterr().out.count("OK  mutual_information") == 2


@pytest.mark.parametrize(("wrong", "message"), [
    (mi_nats, "natural log"),
    (mi_nan, "NaN"),
    (mi_conditional, r"H\(expert \| type\)"),
    (mi_expert_entropy, r"entropy of the experts H\(expert\)"),
])
def test_mutual_information_rejects_mistakes(wrong, message: str) -> None:
    with pytest.raises(CheckError, match=message):
        check.mutual_information(wrong)
