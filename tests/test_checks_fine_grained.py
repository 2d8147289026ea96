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
                    no_shared=False, detach_gate=False, softmax_dim=-1, first_shared_only=False):
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
        for s in shared[:1] if first_shared_only else shared:
            out = s(x)
            y = y + (w.sum(-1, keepdim=True) * out if shared_weight == "sum" else out)
        return y

    return fn


def output_in_x(x, gate_weight, experts, shared, k):  # "reuse x's memory": autograd refuses, the check names x
    return x.copy_(shared_moe_forward(x, gate_weight, experts, shared, k))


def extends_experts(x, gate_weight, experts, shared, k):  # one list of all experts, built in the caller's list
    y = shared_moe_forward(x, gate_weight, experts, shared, k)
    experts.extend(shared)
    return y


def transposes_gate_in_place(x, gate_weight, experts, shared, k):
    with torch.no_grad():
        gate_weight.t_()
    return shared_moe_forward(x, gate_weight.t(), experts, shared, k)


def trains_an_expert(x, gate_weight, experts, shared, k):  # a stray update of the caller's expert
    with torch.no_grad():
        experts[1].up.weight.mul_(0.5)
    return shared_moe_forward(x, gate_weight, experts, shared, k)


def one_token_off(x, gate_weight, experts, shared, k):
    y = shared_moe_forward(x, gate_weight, experts, shared, k)
    return y + torch.eye(x.shape[0], 1).roll(4, 0) * 0.5  # token 4 of each case is off


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
    (make_shared_moe(first_shared_only=True), r"2 shared, k=2\)\): it looks like you added only the first shared "
                                              "expert"),
    (output_in_x, r"output_in_x\(x \(9, 6\), gate_weight \(6, 6\), 6 routed experts, 1 shared, k=3\) changed "
                  r"its input x \(its values"),
    (extends_experts, r"changed its input experts \(its length, from 6 to 7\) in place: append, extend"),
    (transposes_gate_in_place, r"changed its input gate_weight \(its values: gate_weight\[0\]\[1\]"),
    (trains_an_expert, r"changed its input experts\[1\]\.up\.weight \(its values"),
    (one_token_off, r"the shared \+ routed layer is wrong \(one_token_off\(x \(9, 6\), .*k=3\)\): token 4's output is"),
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
        if validate == "assert" and (h % m or ks >= m * k):
            raise AssertionError("bad layout")  # what `assert` raises
        bad_width, bad_shared = h % m != 0, {True: ks >= m * k, "gt": ks > m * k, "eq": ks == m * k}.get(validate)
        if validate in (True, "width", "gt", "eq") and bad_width or validate in (True, "shared", "gt", "eq") and \
                bad_shared:
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
    (make_config(validate="width"), r"fn\(n_experts=8, top_k=2, m=1, n_shared=2, width=128\) returned \(6, 0, 128\); "
                                    "it should raise ValueError because n_shared=2 leaves no routed expert"),
    (make_config(validate="shared"), "it should raise ValueError because m=3 does not divide width=128"),
    (make_config(validate="gt"), r"n_shared=2, width=128\) returned \(6, 0, 128\); it should raise ValueError"),
    (make_config(validate="eq"), r"fn\(n_experts=4, top_k=1, m=2, n_shared=3, width=64\) returned \(5, -1, 32\); it "
                                 "should raise ValueError because n_shared=3 is more than the m·k=2 experts"),
    (make_config(validate="assert"), r"width=128\) raised AssertionError: bad layout; raise a ValueError that says why "
                                     r"\(m=3 does not divide width=128\)"),
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


def mi_divides_in_place(table):  # .double() of a float64 table is the table itself: /= changes the caller's
    p = table.double()
    p /= p.sum()
    nz = p > 0
    return float((p[nz] * torch.log2(p[nz] / torch.outer(p.sum(1), p.sum(0))[nz])).sum())


def mi_swapped_marginals(table):
    p = table.double() / table.sum()
    nz = p > 0
    return float((p[nz] * torch.log2(p[nz] / torch.outer(p.sum(0), p.sum(1))[nz])).sum())


def mi_floor_division(table):
    p = table.div(table.sum(), rounding_mode="floor").double()
    nz = p > 0
    return float((p[nz] * torch.log2(p[nz] / torch.outer(p.sum(1), p.sum(0))[nz])).sum())


def mi_keepdim(table):  # right: the marginals broadcast either way round
    p = table.double() / table.sum()
    pe, pt = p.sum(dim=0, keepdim=True), p.sum(dim=1, keepdim=True)
    nz = p > 0
    return float((p[nz] * torch.log2(p[nz] / (pe * pt)[nz])).sum())


def test_mutual_information_reference_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check.mutual_information(ref_mi)
    check.mutual_information(lambda t: torch.tensor(ref_mi(t)))
    check.mutual_information(mi_keepdim)
    assert capsys.readouterr().out.count("OK  mutual_information") == 3


@pytest.mark.parametrize(("wrong", "message"), [
    (mi_nats, "natural log"),
    (mi_nan, "NaN"),
    (mi_conditional, r"H\(expert \| type\)"),
    (mi_expert_entropy, r"entropy of the experts H\(expert\)"),
    (mi_divides_in_place, r"mi_divides_in_place\(a square float64 table whose row sums \(9, 9, 7\) and column "
                          r"sums \(10, 10, 5\) differ\) changed its input table \(its values: table\[0\]\[0\] went "
                          r"from 8 to"),
    (mi_swapped_marginals, "multiplied the marginals the wrong way round"),
    (mi_floor_division, r"returned 0\.0000 bits, expected .*: it looks like you returned 0 bits: if you divided with "
                        "floor division"),
])
def test_mutual_information_rejects_mistakes(wrong, message: str) -> None:
    with pytest.raises(CheckError, match=message):
        check.mutual_information(wrong)
