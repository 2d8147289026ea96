"""Checks for notebook 05 (shared and fine-grained experts): ``check.shared_moe(fn)``,
``check.fine_grained_config(fn)`` and ``check.mutual_information(fn)``.

``shared_moe`` compares the learner's ``fn(x, gate_weight, experts, shared, k)`` with DeepSeekMoE's layer
(:func:`moe_course.fine_grained.shared_moe_forward`), outputs and gradients w.r.t. the input, the router and
every expert's parameters. ``fine_grained_config`` compares ``fn(n_experts, top_k, m, n_shared, width) ->
(n_routed, top_k_routed, expert_hidden)`` with :func:`moe_course.fine_grained.fine_grained_config` on several
layouts, DeepSeekMoE 2B's among them. ``mutual_information`` compares ``fn(table) -> bits`` with
:func:`moe_course.analysis.mutual_information`. When an answer is wrong, each check recomputes the usual
mistakes and names the one that matches; each fails naming the input when the learner's function changed one
in place, and ``fine_grained_config`` calls the learner's function on every kind of bad layout that must raise
ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from moe_course.analysis import mutual_information as ref_mutual_information
from moe_course.check._core import (
    as_tensor,
    call,
    call_unchanged,
    close,
    compare_grads,
    expect_shape,
    fail,
    fn_name,
    ok,
)
from moe_course.experts import make_experts
from moe_course.fine_grained import fine_grained_config as ref_fine_grained_config
from moe_course.fine_grained import shared_moe_forward

__all__ = ["fine_grained_config", "mutual_information", "shared_moe"]


# ----------------------------------------------------------------------------------------------------------
# shared_moe: shared experts (unweighted, always on) + top-k routed experts weighted by their softmax score
# ----------------------------------------------------------------------------------------------------------


def _routed(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: Any) -> torch.Tensor:
    outs = torch.stack([e(x) for e in experts], dim=1)  # (T, N, d)
    return (weights.unsqueeze(-1) * outs.gather(1, indices.unsqueeze(-1).expand(-1, -1, x.shape[1]))).sum(dim=1)


def _shared_sum(x: torch.Tensor, shared: Any) -> torch.Tensor:
    return sum((s(x) for s in shared), torch.zeros_like(x))


def _shared_mistakes(x: torch.Tensor, gate: torch.Tensor, experts: Any, shared: Any,
                     k: int) -> list[tuple[str, torch.Tensor]]:
    """Outputs of the usual wrong layers, computed with the reference's weights."""
    logits = x @ gate.T
    probs = logits.softmax(dim=-1)
    w, idx = probs.topk(k, dim=-1)
    sh = _shared_sum(x, shared)
    n_s = len(shared)
    out = [
        ("left out the shared experts: every token also passes through each shared expert, added with weight 1",
         _routed(x, w, idx, experts)),
        ("renormalised the k routed gates to sum to 1. DeepSeekMoE's gate is the softmax score itself, "
         "g_i = s_i for the top-k experts (eq. 10), so the routed gates sum to less than 1",
         _routed(x, w / w.sum(-1, keepdim=True), idx, experts) + sh),
        ("took the softmax over the k chosen logits only: the scores s are a softmax over all N routed experts, "
         "then the top k are kept as they are", _routed(x, logits.topk(k, -1).values.softmax(-1), idx, experts) + sh),
        ("weighted the shared experts by the router (by the sum of the routed gates): a shared expert is not "
         "routed, its output is added with weight 1", _routed(x, w, idx, experts) + w.sum(-1, keepdim=True) * sh),
        ("averaged the shared experts with the routed output instead of adding them: y = Σ shared(x) + "
         "Σ_topk s_i E_i(x)", 0.5 * (_routed(x, w, idx, experts) + sh)),
        ("took the softmax over the tokens (dim=0); the scores are a distribution over the experts of each "
         "token", _routed(x, *logits.softmax(dim=0).topk(k, dim=-1), experts) + sh),
    ]
    if n_s > 1:
        out.append(("added only the first shared expert: every token passes through each of the K_s shared "
                    f"experts (here {n_s}), each added with weight 1", _routed(x, w, idx, experts) + shared[0](x)))
    if k > n_s:
        w2, idx2 = probs.topk(k - n_s, dim=-1)
        out.append(("counted the shared experts in top-k: k is the number of *routed* experts per token; the "
                    "shared ones come on top of them", _routed(x, w2, idx2, experts) + sh))
    # shared experts routed: scored by a router column of their own, as if they were routed experts
    n = gate.shape[0]
    all_experts = list(experts) + list(shared)
    extra = torch.zeros(n_s, x.shape[1], dtype=x.dtype)
    logits_all = torch.cat([logits, x @ extra.T], dim=-1)
    p_all = logits_all.softmax(-1)
    w3, idx3 = p_all.topk(k, dim=-1)
    out.append(("routed the shared experts (put them among the candidates of the top-k); they skip the router: "
                "every token uses every shared expert", _routed(x, w3, idx3, all_experts)))
    w4 = p_all[:, n:]
    out.append(("weighted the shared experts by a softmax score of their own: a shared expert is not routed, "
                "its output is added with weight 1",
                _routed(x, w, idx, experts) + sum((w4[:, j:j + 1] * s(x) for j, s in enumerate(shared)),
                                                  torch.zeros_like(x))))
    return out


def shared_moe(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(x (T, d), gate_weight (N, d), experts, shared, k) -> (T, d)``, DeepSeekMoE's shared + routed layer."""
    with torch.random.fork_rng(devices=[]):  # leave the notebook's random stream untouched
        _check_shared_moe(fn)
    ok("shared_moe", "shared experts always on with weight 1, plus the top-k routed experts weighted by their "
       "softmax score")


def _check_shared_moe(fn: Callable[..., torch.Tensor]) -> None:
    for n_tokens, d_model, n_experts, n_shared, k in ((9, 6, 6, 1, 3), (7, 8, 5, 2, 2), (5, 4, 4, 1, 1)):
        torch.manual_seed(10 * n_experts + k)
        experts = make_experts(n_experts, d_model, 2 * d_model)
        shared = make_experts(n_shared, d_model, 2 * d_model)
        x = torch.randn(n_tokens, d_model).requires_grad_(True)
        gate = (2 * torch.randn(n_experts, d_model)).requires_grad_(True)
        what = (f"{fn_name(fn)}(x {tuple(x.shape)}, gate_weight {tuple(gate.shape)}, {n_experts} routed experts, "
                f"{n_shared} shared, k={k})")
        inputs = {"x": x, "gate_weight": gate, "experts": experts, "shared": shared, "k": k}
        got = as_tensor(call_unchanged(fn, inputs, what=what), "fn")
        expect_shape(got, (n_tokens, d_model), what)
        with torch.no_grad():
            expected = shared_moe_forward(x, gate, experts, shared, k)
        if not close(got, expected):
            with torch.no_grad():
                for hint, wrong in _shared_mistakes(x.detach(), gate.detach(), experts, shared, k):
                    if close(got, wrong):
                        fail(f"the shared + routed layer is wrong ({what}): it looks like you {hint}")
            t = next(i for i in range(n_tokens) if not close(got[i], expected[i]))
            fail(f"the shared + routed layer is wrong ({what}): token {t}'s output is "
                 f"{[round(v, 3) for v in got[t].tolist()]}, expected {[round(v, 3) for v in expected[t].tolist()]}. "
                 "Expected y = Σ_j shared[j](x) + Σ_(i in top-k) s_i · experts[i](x) with s = softmax(x @ "
                 "gate_weight.T, dim=-1) over the routed experts")
        x_ref, gate_ref = x.detach().clone().requires_grad_(True), gate.detach().clone().requires_grad_(True)
        ref = shared_moe_forward(x_ref, gate_ref, experts, shared, k)
        compare_grads("the shared + routed layer", got, ref,
                      {"x": x, "gate_weight": gate, "the routed experts' parameters": list(experts.parameters()),
                       "the shared experts' parameters": list(shared.parameters())},
                      {"x": x_ref, "gate_weight": gate_ref,
                       "the routed experts' parameters": list(experts.parameters()),
                       "the shared experts' parameters": list(shared.parameters())})


# ----------------------------------------------------------------------------------------------------------
# fine_grained_config: (N, k, m, K_s, width) -> (m·N − K_s, m·k − K_s, width / m)
# ----------------------------------------------------------------------------------------------------------

# (N, k, m, K_s, width): the notebook's layouts, DeepSeekMoE 2B's (16 experts top-2 split by 4, one shared:
# 63 routed, top-7) and cases where K_s > 1 and m = 1 tell the mistakes apart.
CONFIG_CASES = ((8, 2, 4, 1, 128), (8, 2, 4, 0, 128), (16, 2, 4, 1, 1024), (8, 2, 1, 0, 96), (6, 2, 3, 2, 96),
                (4, 1, 8, 3, 64))


# Layouts that must raise ValueError: m does not divide the width, K_s = m·k (none left to route), K_s > m·k.
BAD_LAYOUTS = ((8, 2, 3, 0, 128, "m=3 does not divide width=128"),
               (8, 2, 1, 2, 128, "n_shared=2 leaves no routed expert out of m·k=2"),
               (4, 1, 2, 3, 64, "n_shared=3 is more than the m·k=2 experts a token uses"))


def _config_mistakes(n: int, k: int, m: int, ks: int, h: int) -> list[tuple[str, tuple[int, int, int]]]:
    return [
        ("kept the width: each of the m·N experts is h / m wide, so that the total expert parameters stay N·h",
         (m * n - ks, m * k - ks, h)),
        ("multiplied the width by m: splitting an expert into m makes each piece h / m wide",
         (m * n - ks, m * k - ks, h * m)),
        ("did not subtract the shared experts from the routed top-k: a token uses m·k experts in all, K_s of "
         "them shared, so it routes to m·k − K_s", (m * n - ks, m * k, h // m)),
        ("did not subtract the shared experts from the routed experts: K_s of the m·N fine experts become "
         "shared, leaving m·N − K_s routed", (m * n, m * k - ks, h // m)),
        ("subtracted the shared experts from neither count: they come out of the m·N experts and out of the "
         "m·k active ones", (m * n, m * k, h // m)),
        ("did not multiply top_k by m: with experts m times narrower, a token needs m·k of them for the same "
         "active parameters", (m * n - ks, k - ks, h // m)),
        ("did not multiply the number of experts by m", (n - ks, m * k - ks, h // m)),
        ("subtracted m·K_s instead of K_s: each shared expert is one fine expert", (m * n - m * ks, m * k - m * ks,
                                                                                     h // m)),
    ]


def fine_grained_config(fn: Callable[[int, int, int, int, int], Any]) -> None:
    """Check ``fn(n_experts, top_k, m, n_shared, width) -> (n_routed, top_k_routed, expert_hidden)`` (DeepSeekMoE)."""
    for n, k, m, ks, h in CONFIG_CASES:
        what = f"{fn_name(fn)}(n_experts={n}, top_k={k}, m={m}, n_shared={ks}, width={h})"
        got = call(fn, n, k, m, ks, h, what=what)
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            fail(f"{what} should return a tuple (n_routed, top_k_routed, expert_hidden), got {got!r}")
        if any(isinstance(v, float) and v.is_integer() for v in got):
            fail(f"{what} returned {tuple(got)}: return ints (use // for the width, after checking that m divides "
                 "it)")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in got):
            fail(f"{what} returned {tuple(got)}: all three numbers must be ints")
        ref = ref_fine_grained_config(n, k, m, ks, h)
        expected = (ref.n_routed, ref.top_k, ref.expert_hidden)
        if tuple(got) != expected:
            for hint, wrong in _config_mistakes(n, k, m, ks, h):
                if tuple(got) == wrong:
                    fail(f"{what} returned {tuple(got)}, expected {expected}: it looks like you {hint}")
            fail(f"{what} returned {tuple(got)}, expected {expected} = (m·N − K_s, m·k − K_s, width / m)")
    for n, k, m, ks, h, why in BAD_LAYOUTS:
        what = f"{fn_name(fn)}(n_experts={n}, top_k={k}, m={m}, n_shared={ks}, width={h})"
        try:
            got = fn(n, k, m, ks, h)
        except ValueError:
            continue
        except NotImplementedError:
            raise
        except Exception as exc:  # noqa: BLE001
            fail(f"{what} raised {type(exc).__name__}: {exc}; raise a ValueError that says why ({why})")
        fail(f"{what} returned {got!r}; it should raise ValueError because {why}")
    ok("fine_grained_config", "m·N − K_s routed experts, m·k − K_s routed per token, width / m: the same total and "
       "active expert parameters")


# ----------------------------------------------------------------------------------------------------------
# mutual_information: I(type; expert) in bits from a table of counts
# ----------------------------------------------------------------------------------------------------------


def _entropy(p: torch.Tensor, log: Callable[[torch.Tensor], torch.Tensor]) -> float:
    p = p[p > 0]
    return float(-(p * log(p)).sum())


def _mi_mistakes(table: torch.Tensor) -> list[tuple[str, float]]:
    p = table.double() / table.sum()
    pr, pc = p.sum(1), p.sum(0)
    h_joint, h_r, h_c = _entropy(p.flatten(), torch.log2), _entropy(pr, torch.log2), _entropy(pc, torch.log2)
    nat = h_r + h_c - h_joint
    out = [
        ("used the natural log: the course reports bits, use torch.log2", nat * math.log(2)),
        ("returned H(expert | type), the entropy left in the expert once the type is known; I = H(expert) − "
         "H(expert | type)", h_joint - h_r),
        ("returned H(type | expert); I = H(type) − H(type | expert)", h_joint - h_c),
        ("returned the entropy of the experts H(expert), not the information shared with the type", h_c),
        ("returned the joint entropy H(type, expert); I = H(type) + H(expert) − H(type, expert)", h_joint),
        ("summed log p(r,c) / (p(r) p(c)) without weighting each cell by p(r,c)",
         float(torch.log2(p[p > 0] / torch.outer(pr, pc)[p > 0]).sum())),
        ("normalised each row to sum to 1 before the sum (p(c | r) in place of p(r, c))",
         float(((p / pr[:, None])[p > 0] * torch.log2(p[p > 0] / torch.outer(pr, pc)[p > 0])).sum())),
        ("returned 0 bits: if you divided with floor division (// or rounding_mode='floor'), every p(r,c) = "
         "count // total is 0; p = table / table.sum() is a fraction (divide a float table with /)", 0.0),
    ]
    if p.shape[0] == p.shape[1]:
        swapped = torch.outer(pc, pr)
        out.append(("multiplied the marginals the wrong way round: the cell [r, c] needs p(r)·p(c), "
                    "torch.outer(p.sum(dim=1), p.sum(dim=0)) (row sums first)",
                    float((p[p > 0] * torch.log2(p[p > 0] / swapped[p > 0])).sum())))
    return out


def mutual_information(fn: Callable[[torch.Tensor], Any]) -> None:
    """Check ``fn(table (R, C) of counts) -> I(row; column) in bits`` (reference: analysis.mutual_information)."""
    tables = [  # the square one first: there a swapped outer product of the marginals runs, with a wrong value
        ("a square float64 table whose row sums (9, 9, 7) and column sums (10, 10, 5) differ",
         torch.tensor([[8.0, 1.0, 0.0], [2.0, 3.0, 4.0], [0.0, 6.0, 1.0]], dtype=torch.float64)),
        ("a table with empty cells", torch.tensor([[12, 0, 3, 1], [0, 9, 4, 0], [2, 2, 0, 15]])),
        ("a random 9 × 8 table", torch.randint(0, 50, (9, 8), generator=torch.Generator().manual_seed(5))),
        ("a perfect match of 3 types to 3 experts", torch.tensor([[5, 0, 0], [0, 7, 0], [0, 0, 9]])),
        ("independent rows and columns", torch.tensor([[10, 20, 30], [20, 40, 60]])),
    ]
    for name, table in tables:
        what = f"{fn_name(fn)}({name})"
        got = call_unchanged(fn, {"table": table.clone()}, what=what)
        if isinstance(got, torch.Tensor):
            if got.numel() != 1:
                fail(f"{what} returned a tensor of shape {tuple(got.shape)}; return one number (bits)")
            got = got.item()
        try:
            got = float(got)
        except (TypeError, ValueError):
            fail(f"{what} should return a number, got {type(got).__name__}")
        if math.isnan(got):
            fail(f"{what} returned NaN: skip the empty cells (0 · log 0 counts as 0), e.g. sum only where p > 0")
        expected = ref_mutual_information(table)
        if not math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9):
            for hint, wrong in _mi_mistakes(table):
                if math.isclose(got, wrong, rel_tol=1e-6, abs_tol=1e-9):
                    fail(f"{what} returned {got:.4f} bits, expected {expected:.4f}: it looks like you {hint}")
            fail(f"{what} returned {got:.4f} bits, expected {expected:.4f} = Σ p(r,c) log2(p(r,c) / (p(r) p(c))) "
                 "with p = table / table.sum()")
    ok("mutual_information", "I(type; expert) in bits, 0 for independent tables, log2(3) for a perfect 3-way match")
