"""Checks for notebook 06's exercises: DeepSeek-V3's auxiliary-loss-free balancing.

* ``check.bias_update(fn)``: ``fn(bias (N,), routing, u) -> new bias (N,)``: bᵢ + u·sign(c̄ − cᵢ) with cᵢ the
  number of the batch's assignments (``routing.indices``) that went to expert i and c̄ their mean (Wang et al.
  2024, arXiv:2408.15664; DeepSeek-V3, arXiv:2412.19437). A plain tensor, never a trained parameter.
* ``check.biased_topk(fn)``: ``fn(logits (T, N), bias (N,), k) -> (weights (T, k), indices (T, k))``: sigmoid
  scores s; the top-k of s + b are chosen; the weights are the *unbiased* s of the chosen, renormalised.
* ``check.bias_training_loop(fn)``: ``fn(model, batches, u, lr) -> None`` trains ``model`` in place with SGD and,
  after every optimizer step, moves each MoE layer's ``router.expert_bias`` by u·sign(c̄ − c) with that batch's
  counts (★★★; the reference and eight mistakes are recomputed on a tiny TinyLM).
* ``check.group_limited_topk(fn)``: ``fn(logits, bias, k, n_groups, topk_groups)``: the same gate, but each token
  may only use its ``topk_groups`` best groups of contiguous experts, a group scored by the sum of its two
  highest biased scores (DeepSeek-V3's reference ``Gate``).

Each check runs fixed inputs (a fractional mean count; logits and biases with many tied scores), fails naming the
input when the learner's function changed one in place, names the usual mistakes by recomputing them, names the
token or expert that is wrong otherwise, and compares the gradient with respect to the logits with the reference's
(and checks that no gradient reaches the bias).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations
from typing import Any

import torch
from torch import nn

from moe_course.balancing import bias_update as ref_bias_update
from moe_course.check._core import (
    CheckError,
    as_tensor,
    call,
    call_unchanged,
    close,
    compare_grads,
    expect_shape,
    expect_unchanged,
    fail,
    fn_name,
    ok,
    same_choices,
    snapshot,
    weights_and_ids,
)
from moe_course.routing import Routing, sigmoid_topk

__all__ = ["bias_training_loop", "bias_update", "biased_topk", "group_limited_topk"]

NOT_TRAINED = ("the bias is not a trained parameter: no optimizer and no gradient touch it. Compute the new "
               "bias from the counts under torch.no_grad() (or from detached counts) and return a plain tensor, "
               "never an nn.Parameter or a tensor that requires grad")


# ---------------------------------------------------------------------------------------------------------
# The bias update
# ---------------------------------------------------------------------------------------------------------


def _routing(indices: torch.Tensor, n_experts: int, seed: int) -> Routing:
    """A batch's routing with the given choices; the scores are random and require grad, as in training."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(indices.shape[0], n_experts, generator=g)
    scores = logits.sigmoid().requires_grad_(True)
    weights = scores.gather(-1, indices)
    return Routing(weights=weights / weights.sum(-1, keepdim=True), indices=indices, logits=logits, scores=scores)


def _bias_cases() -> list[tuple[str, torch.Tensor, Routing, float]]:
    # case 1: 9 tokens, k = 2, N = 6: counts [6, 3, 1, 3, 5, 0], mean 3 (two experts exactly at the mean)
    idx1 = torch.tensor([[0, 4], [0, 1], [0, 4], [1, 0], [4, 3], [0, 2], [3, 4], [0, 1], [4, 3]])
    # case 2: 12 tokens, k = 1, N = 4: counts [1, 7, 0, 4], mean 3
    idx2 = torch.tensor([[1], [1], [3], [1], [0], [3], [1], [1], [3], [1], [3], [1]])
    # case 3: 10 tokens, k = 2, N = 6: counts [6, 3, 4, 3, 4, 0], mean 20/6 = 3.33 (not an integer: experts 1 and 3
    # are below it, which a mean rounded to 3 would miss)
    idx3 = torch.tensor([[0, 1], [2, 0], [0, 3], [4, 0], [0, 2], [0, 4], [1, 2], [3, 1], [2, 4], [4, 3]])
    return [
        ("9 tokens, k=2, 6 experts, u=1e-3", torch.tensor([0.1, -0.2, 0.0, 0.05, 0.0, -0.1]), _routing(idx1, 6, 0),
         1e-3),
        ("12 tokens, k=1, 4 experts, u=0.01", torch.tensor([0.0, 0.3, -0.05, 0.02]), _routing(idx2, 4, 1), 0.01),
        ("10 tokens, k=2, 6 experts, u=0.02, mean count 20/6", torch.tensor([0.05, 0.0, -0.1, 0.2, 0.0, 0.1]),
         _routing(idx3, 6, 2), 0.02),
    ]


def _bias_mistakes(bias: torch.Tensor, routing: Routing, u: float) -> list[tuple[str, torch.Tensor]]:
    n = bias.shape[0]
    counts = torch.bincount(routing.indices.reshape(-1), minlength=n).to(bias.dtype)
    gap = counts.mean() - counts  # > 0: underloaded
    scores = routing.scores.detach()
    by_score = scores.sum(dim=0)
    by_weight = torch.zeros(n).index_add_(0, routing.indices.reshape(-1), routing.weights.detach().reshape(-1))
    share = counts / counts.sum()
    first = torch.bincount(routing.indices[:, 0], minlength=n).to(bias.dtype)
    return [
        ("reversed the sign: an overloaded expert (cᵢ > c̄) must get a *lower* bias, so it is chosen less; "
         "b + u·sign(c̄ − cᵢ)", bias + u * torch.sign(-gap)),
        ("used the experts' scores instead of their counts: the rule balances the *load*, the number of "
         "assignments cᵢ each expert received (count routing.indices), not the router's scores",
         bias + u * torch.sign(by_score.mean() - by_score)),
        ("weighted the counts by the combine weights: cᵢ counts every assignment once (the load an expert "
         "must compute), whatever its weight", bias + u * torch.sign(by_weight.mean() - by_weight)),
        ("made a step proportional to the imbalance (a gradient step on Σᵢ bᵢ·(cᵢ − c̄)); the rule moves every "
         "bias by exactly ±u: u·sign(c̄ − cᵢ), and no gradient or optimizer is involved", bias + u * gap),
        ("made a step proportional to the imbalance of the load shares; the rule moves every bias by exactly "
         "±u: u·sign(c̄ − cᵢ)", bias + u * (1.0 / n - share)),
        ("returned only the change u·sign(c̄ − cᵢ); return the new bias b + u·sign(c̄ − cᵢ)", u * torch.sign(gap)),
        ("moved the bias of an expert whose count equals the mean: sign(0) = 0, so it keeps its bias "
         "(use torch.sign, not a two-way choice)", bias + torch.where(gap > 0, u, -u)),
        ("compared with the mean score or share instead of the mean count c̄ = T·k/N of the same counts",
         bias + u * torch.sign(1.0 / n - counts)),
        (f"rounded the mean count to an integer (// or round()): c̄ = T·k/N = {int(counts.sum())}/{n} = "
         f"{float(counts.mean()):.3g} is a fraction, so an expert with {int(counts.mean())} assignments is below it "
         "and moves up; compute c̄ = counts.float().mean()", bias + u * torch.sign(counts.mean().floor() - counts)),
        (f"rounded the mean count to the nearest integer: c̄ = T·k/N = {float(counts.mean()):.3g} is a fraction; "
         "compute c̄ = counts.float().mean()", bias + u * torch.sign(counts.mean().round() - counts)),
        ("counted only each token's first choice (routing.indices[:, 0]); cᵢ counts all k choices of every token",
         bias + u * torch.sign(first.mean() - first)),
    ]


_MINLENGTH = ("the counts have fewer entries than there are experts: torch.bincount stops at the last expert used, "
              "so an expert nobody chose at the end goes missing; count with torch.bincount(indices.reshape(-1), "
              "minlength=n_experts), n_experts = bias.shape[0]")


def _call_bias_update(fn: Callable[..., Any], inputs: dict[str, Any], n_experts: int, what: str) -> Any:  # noqa: ANN401
    """Call the learner's update; a size mismatch against the bias is named as bincount without minlength."""
    try:
        return call_unchanged(fn, inputs, what=what)
    except CheckError as exc:
        cause = exc.__cause__
        if isinstance(cause, RuntimeError) and "size of tensor" in str(cause) and f"({n_experts})" in str(cause):
            fail(f"{what} raised RuntimeError ({cause}): {_MINLENGTH}")
        raise


def bias_update(fn: Callable[[torch.Tensor, Routing, float], Any]) -> None:
    """Check ``fn(bias (N,), routing, u) -> (N,)``: bᵢ + u·sign(c̄ − cᵢ) from the batch's counts."""
    for label, bias, routing, u in _bias_cases():
        what = f"bias_update on {label}"
        result = _call_bias_update(fn, {"bias": bias.clone(), "routing": routing, "u": u}, bias.shape[0], what)
        if result is None:
            fail(f"{what} returned None; return the new bias (an (N,) tensor)")
        if isinstance(result, nn.Parameter):
            fail(f"{what} returned an nn.Parameter; {NOT_TRAINED}")
        result = as_tensor(result, what)
        expect_shape(result, tuple(bias.shape), what)
        if not result.is_floating_point():
            fail(f"{what} returned {result.dtype}; the bias is a float tensor like the scores it is added to")
        expected = ref_bias_update(bias, routing.counts(bias.shape[0]), u)
        if not close(result, expected, atol=1e-7, rtol=1e-6):
            for hint, wrong in _bias_mistakes(bias, routing, u):
                if close(result, wrong, atol=1e-7, rtol=1e-6):
                    fail(f"{what}: it looks like you {hint}.")
            counts = routing.counts(bias.shape[0]).double()
            i = next(i for i in range(bias.shape[0]) if not close(result[i], expected[i], atol=1e-7, rtol=1e-6))
            fail(f"{what}: expert {i} ({int(counts[i])} assignments, mean c̄ = {float(counts.mean()):.3g}) got "
                 f"{float(result[i]):.4g}, expected {float(expected[i]):.4g}; all: expected "
                 f"{[round(v, 4) for v in expected.tolist()]}, got {[round(v, 4) for v in result.detach().tolist()]}. "
                 "Count each expert's assignments in routing.indices (all k choices), compare with their mean, and "
                 "move each bias by ±u")
        if result.requires_grad:
            fail(f"{what}: the values are right but the result requires grad (it is connected to autograd); "
                 f"{NOT_TRAINED}")
    ok("bias_update", "bᵢ + u·sign(c̄ − cᵢ) from the counts, ties kept, no gradient")


# ---------------------------------------------------------------------------------------------------------
# Biased top-k with unbiased weights, and its group-limited version
# ---------------------------------------------------------------------------------------------------------


def _renorm(w: torch.Tensor) -> torch.Tensor:
    return w / w.sum(dim=-1, keepdim=True)


def _gate(logits: torch.Tensor, bias: torch.Tensor, k: int, *, choose: str = "s+b", weigh: str = "s",
          renorm: str = "chosen", score: str = "sigmoid", mask: torch.Tensor | None = None,
          fill: float = -torch.inf) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate with each design choice switchable (the correct one is all defaults)."""
    s = logits.sigmoid() if score == "sigmoid" else logits.softmax(dim=-1)
    choice = {"s+b": s + bias, "s": s, "s-b": s - bias, "sig(l+b)": (logits + bias).sigmoid()}[choose]
    if mask is not None:
        choice = choice.masked_fill(mask, fill)
    indices = choice.topk(k, dim=-1).indices
    source = {"s": s, "s+b": s + bias, "sig(l+b)": (logits + bias).sigmoid()}[weigh]
    w = source.gather(-1, indices)
    if renorm == "chosen":
        w = _renorm(w)
    elif renorm == "all":
        w = w / source.sum(dim=-1, keepdim=True)
    return w, indices


def _topk_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, int]]:
    g = torch.Generator().manual_seed(606)
    ties = torch.Generator().manual_seed(6061)
    return [
        ("7 tokens x 5 experts, k=2", 1.5 * torch.randn(7, 5, generator=g), 0.3 * torch.randn(5, generator=g), 2),
        ("6 tokens x 8 experts, k=3", 1.5 * torch.randn(6, 8, generator=g), 0.3 * torch.randn(8, generator=g), 3),
        ("9 tokens x 4 experts, k=1", 1.5 * torch.randn(9, 4, generator=g), 0.4 * torch.randn(4, generator=g), 1),
        ("10 tokens x 8 experts, k=3, logits in {-1, 0, 1} and biases in {0, 0.1} (many tied scores)",
         torch.randint(-1, 2, (10, 8), generator=ties).float(), torch.tensor([0.0, 0.1, 0.0, 0.1, 0.0, 0.0, 0.1, 0.0]),
         3),
    ]


def _topk_mistakes(logits: torch.Tensor, bias: torch.Tensor, k: int) -> list[tuple[str, tuple]]:
    s = logits.sigmoid()
    return [
        ("added the bias to the combine weights; the bias only decides *which* experts are chosen, the weights "
         "are the plain sigmoid scores of the chosen experts, renormalised",
         _gate(logits, bias, k, weigh="s+b")),
        ("added the bias to the combine weights and did not renormalise them; the weights are the plain "
         "sigmoid scores of the chosen experts divided by their sum", _gate(logits, bias, k, weigh="s+b", renorm="no")),
        ("did not renormalise: the weights must sum to 1 over the k chosen experts (divide the chosen scores "
         "by their sum)", _gate(logits, bias, k, renorm="no")),
        ("renormalised over all N experts; divide by the sum over the k *chosen* experts only",
         _gate(logits, bias, k, renorm="all")),
        ("ignored the bias when choosing: take the top-k of scores + bias (the weights stay unbiased)",
         _gate(logits, bias, k, choose="s")),
        ("subtracted the bias; it is added: top-k of s + b (a raised bias attracts tokens)",
         _gate(logits, bias, k, choose="s-b")),
        ("added the bias to the logits before the sigmoid; DeepSeek-V3 adds it to the sigmoid scores: "
         "top-k of sigmoid(logits) + b", _gate(logits, bias, k, choose="sig(l+b)")),
        ("added the bias to the logits before the sigmoid (for the choice and the weights); the bias is added "
         "to the sigmoid scores and only for the choice", _gate(logits, bias, k, choose="sig(l+b)", weigh="sig(l+b)")),
        ("used a softmax; DeepSeek-V3's affinities are sigmoid scores, one per expert: s = sigmoid(logits)",
         _gate(logits, bias, k, score="softmax")),
        ("took the weights from s.topk(k), the k largest unbiased scores, which pairs them with the wrong experts "
         "once the bias changes the choice: the weights are the scores of the experts chosen by s + b, "
         "s.gather(-1, indices)", (_renorm(s.topk(k, dim=-1).values), (s + bias).topk(k, dim=-1).indices)),
    ]


def _tie_alternative(experts: torch.Tensor, row: torch.Tensor, n_groups: int, topk_groups: int) -> bool:
    """Whether distinct ``experts`` are a top-k of the biased scores ``row`` inside some topk_groups best groups,
    ties between experts and between groups allowed (one group of all experts without group limits)."""
    size = row.numel() // n_groups
    grouped = row.view(n_groups, size)
    scores = grouped.topk(min(2, size), dim=-1).values.sum(-1)
    threshold = scores.topk(topk_groups).values[-1]
    must = [g for g in range(n_groups) if scores[g] > threshold]
    may = [g for g in range(n_groups) if scores[g] == threshold]
    mine = row[experts].sort().values
    if len(set(experts.tolist())) != len(experts):
        return False
    for extra in combinations(may, topk_groups - len(must)):
        kept = must + list(extra)
        inside = set((experts // size).tolist()) <= set(kept)
        if inside and torch.equal(mine, grouped[kept].flatten().topk(len(experts)).values.sort().values):
            return True
    return False


def _ties_only(indices: torch.Tensor, ref: torch.Tensor, choice: torch.Tensor, n_groups: int,
               topk_groups: int) -> int | None:
    """The first token whose experts differ from the reference's, when every difference is a tie broken otherwise."""
    differ = (indices.sort(-1).values != ref.sort(-1).values).any(-1).nonzero().flatten().tolist()
    if differ and all(_tie_alternative(indices[t], choice[t], n_groups, topk_groups) for t in differ):
        return differ[0]
    return None


def _gate_values(what: str, weights: torch.Tensor, indices: torch.Tensor, logits: torch.Tensor, bias: torch.Tensor,
                 expected: tuple[torch.Tensor, torch.Tensor], mistakes: list[tuple[str, tuple]],
                 groups: tuple[int, int]) -> None:
    """Fail naming a tie broken differently, the mistake, or the first token with wrong experts or weights."""
    n = logits.shape[1]
    if indices.min() < 0 or indices.max() >= n:
        fail(f"{what}: indices must be expert ids 0..{n - 1}, got values from {int(indices.min())} to "
             f"{int(indices.max())}")
    s = logits.sigmoid()
    if close(weights, _renorm(s.gather(-1, indices))):
        t = _ties_only(indices, expected[1], s + bias, *groups)
        if t is not None:
            kind, too = ("biased scores s + b or group scores", " (the groups too)") if groups[0] > 1 else \
                ("biased scores s + b", "")
            fail(f"{what}: token {t} got experts {sorted(indices[t].tolist())}, expected "
                 f"{sorted(expected[1][t].tolist())}. They differ only among experts with equal {kind} (ties); ties "
                 f"must be broken as the reference does: choose with torch.topk{too}, as sort-based "
                 "selections (argsort(descending=True)[..., :k], or sorting ascending and taking the last k) pick "
                 "other experts among equal scores")
    for hint, (w_bad, i_bad) in mistakes:
        if same_choices(weights, indices, w_bad, i_bad):
            fail(f"{what}: it looks like you {hint}.")
    mine, ref = indices.sort(-1).values, expected[1].sort(-1).values
    wrong = (mine != ref).any(-1).nonzero().flatten().tolist()
    if wrong:
        fail(f"{what}: wrong experts chosen. Token {wrong[0]} should get experts {ref[wrong[0]].tolist()}, got "
             f"{mine[wrong[0]].tolist()}")
    t = next(t for t in range(len(weights)) if not same_choices(weights[t:t + 1], indices[t:t + 1],
                                                                expected[0][t:t + 1], expected[1][t:t + 1]))
    if close(weights[t].sort().values, expected[0][t].sort().values):
        fail(f"{what}: token {t} has the right experts and the right weights, but not paired: weights[t, j] must be "
             f"the weight of expert indices[t, j] (expected {[round(v, 3) for v in expected[0][t].tolist()]} for "
             f"experts {expected[1][t].tolist()}, got {[round(v, 3) for v in weights[t].tolist()]} for "
             f"{indices[t].tolist()}); keep the two in the same column order")
    fail(f"{what}: the right experts, wrong weights. Token {t}: expected "
         f"{[round(v, 3) for v in expected[0][t].tolist()]} for experts {expected[1][t].tolist()}, got "
         f"{[round(v, 3) for v in weights[t].tolist()]} for {indices[t].tolist()}")


def _check_gate(what: str, result: Any, logits: torch.Tensor, given: torch.Tensor, given_bias: torch.Tensor,
                expected: tuple[torch.Tensor, torch.Tensor], mistakes: list[tuple[str, tuple]],
                reference: Callable[[torch.Tensor], torch.Tensor], groups: tuple[int, int] = (1, 1)) -> None:
    """Values (any column order), then the gradient w.r.t. the logits, then no gradient into the bias."""
    t, k = expected[1].shape
    weights, indices = weights_and_ids(result, what)
    expect_shape(weights, (t, k), what + "'s weights")
    expect_shape(indices, (t, k), what + "'s indices")
    if not same_choices(weights, indices, *expected):
        _gate_values(what, weights.detach(), indices.long(), logits, given_bias.detach(), expected, mistakes, groups)
    if given_bias.requires_grad and weights.requires_grad:
        (g_bias,) = torch.autograd.grad(weights.sum(), given_bias, retain_graph=True, allow_unused=True)
        if g_bias is not None and bool(g_bias.abs().max() > 0):
            fail(f"{what}: the values are right but a gradient reaches the bias; the bias only selects "
                 "experts and must get no gradient (it is updated by the sign rule, outside autograd)")
    perm, r_perm = indices.long().argsort(dim=-1), expected[1].argsort(dim=-1)
    ref_logits = logits.clone().requires_grad_(True)
    w_ref = reference(ref_logits)
    compare_grads(what, weights.gather(-1, perm), w_ref.gather(-1, r_perm), {"the logits": given},
                  {"the logits": ref_logits})


def biased_topk(fn: Callable[[torch.Tensor, torch.Tensor, int], Any]) -> None:
    """Check ``fn(logits (T, N), bias (N,), k) -> (weights, indices)``: choose on s + b, weigh by s renormalised."""
    for label, logits, bias, k in _topk_cases():
        what = f"biased_topk on {label}"
        given, given_bias = logits.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        result = call_unchanged(fn, {"logits": given, "bias": given_bias, "k": k}, what=what)
        expected = sigmoid_topk(logits, k, bias)
        _check_gate(what, result, logits, given, given_bias, expected, _topk_mistakes(logits, bias, k),
                    lambda lg, bias=bias, k=k: sigmoid_topk(lg, k, bias)[0])
    ok("biased_topk", "top-k of sigmoid + bias, weights from the unbiased scores renormalised; k = 1, 2, 3; ties as "
       "topk")


def _group_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, int, int, int]]:
    g = torch.Generator().manual_seed(6060)
    ties = torch.Generator().manual_seed(6062)
    strong = torch.tensor([0.1, -0.9, 0.0, -0.8, -0.9, 0.2, -0.7, -0.95, 0.05, -0.85, -0.9, 0.0])
    return [
        ("10 tokens, 12 experts in 4 groups, top-2 groups, k=3", 1.5 * torch.randn(10, 12, generator=g),
         0.3 * torch.randn(12, generator=g), 3, 4, 2),
        ("8 tokens, 8 experts in 4 groups, top-2 groups, k=2", 1.5 * torch.randn(8, 8, generator=g),
         0.3 * torch.randn(8, generator=g), 2, 4, 2),
        ("9 tokens, 12 experts in 3 groups, top-1 group, k=2", 2.0 * torch.randn(9, 12, generator=g),
         0.3 * torch.randn(12, generator=g), 2, 3, 1),
        ("12 tokens, 12 experts in 4 groups, top-2 groups, k=3, large negative biases",
         1.5 * torch.randn(12, 12, generator=g), strong, 3, 4, 2),
        ("12 tokens, 12 experts in 4 groups, top-2 groups, k=3, logits in {-1, 0, 1} and biases in {0, 0.1} (many "
         "tied expert and group scores)", torch.randint(-1, 2, (12, 12), generator=ties).float(),
         torch.tensor([0.0, 0.1, 0.0] * 4), 3, 4, 2),
    ]


def _group_mask(choice: torch.Tensor, n_groups: int, topk_groups: int, score: str = "top2",
                layout: str = "contiguous") -> torch.Tensor:
    """(T, N) True outside the token's chosen groups, with the group score and layout switchable."""
    t, n = choice.shape
    size = n // n_groups
    if layout == "contiguous":
        grouped = choice.view(t, n_groups, size)
    else:  # expert e in group e % G
        grouped = choice.view(t, size, n_groups).transpose(1, 2)
    group_scores = {"top2": lambda: grouped.topk(min(2, size), dim=-1).values.sum(-1),
                    "max": lambda: grouped.amax(-1), "sum": lambda: grouped.sum(-1)}[score]()
    best = group_scores.topk(topk_groups, dim=-1).indices
    outside = torch.ones(t, n_groups, dtype=torch.bool).scatter(1, best, False)  # (T, G)
    if layout == "contiguous":
        return outside.repeat_interleave(size, dim=1)
    return outside.repeat(1, size)  # expert e belongs to group e % G


def _group_mistakes(logits: torch.Tensor, bias: torch.Tensor, k: int, n_groups: int,
                    topk_groups: int) -> list[tuple[str, tuple]]:
    s = logits.sigmoid()
    right = _group_mask(s + bias, n_groups, topk_groups)
    return [
        ("scored each group by its single best expert (max); DeepSeek-V3 scores a group by the sum of its two "
         "highest biased scores", _gate(logits, bias, k, mask=_group_mask(s + bias, n_groups, topk_groups, "max"))),
        ("scored each group by the sum of all its experts' scores; use the sum of its two highest biased scores",
         _gate(logits, bias, k, mask=_group_mask(s + bias, n_groups, topk_groups, "sum"))),
        ("scored the groups with the unbiased scores; the group score uses the biased scores s + b too",
         _gate(logits, bias, k, mask=_group_mask(s, n_groups, topk_groups))),
        ("did not limit the tokens to their best groups (or kept too many, e.g. k groups instead of topk_groups): "
         "mask the experts outside the topk_groups best groups before the top-k", _gate(logits, bias, k)),
        ("grouped the experts round-robin (expert e in group e % G); groups are contiguous blocks: experts "
         "0 .. N/G − 1 form group 0, i.e. view(T, G, N/G)",
         _gate(logits, bias, k, mask=_group_mask(s + bias, n_groups, topk_groups, layout="round-robin"))),
        ("filled the masked experts with 0; biased scores can be negative, so a masked expert could still be "
         "chosen: fill with -inf", _gate(logits, bias, k, mask=right, fill=0.0)),
        ("added the bias to the combine weights; it only decides which experts are chosen",
         _gate(logits, bias, k, mask=right, weigh="s+b")),
        ("did not renormalise the weights over the k chosen experts", _gate(logits, bias, k, mask=right, renorm="no")),
        (f"kept the k={k} best groups; keep the topk_groups={topk_groups} best groups, then choose k experts in them",
         _gate(logits, bias, k, mask=_group_mask(s + bias, n_groups, min(k, n_groups)))),
    ]


def group_limited_topk(fn: Callable[..., Any]) -> None:
    """Check ``fn(logits, bias, k, n_groups, topk_groups) -> (weights, indices)``: DeepSeek-V3's gate."""
    for label, logits, bias, k, n_groups, topk_groups in _group_cases():
        what = f"group_limited_topk on {label}"
        given, given_bias = logits.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        inputs = {"logits": given, "bias": given_bias, "k": k, "n_groups": n_groups, "topk_groups": topk_groups}
        result = call_unchanged(fn, inputs, what=what)
        expected = sigmoid_topk(logits, k, bias, n_groups=n_groups, topk_groups=topk_groups)

        def reference(lg: torch.Tensor, bias=bias, k=k, g=n_groups, tg=topk_groups) -> torch.Tensor:
            return sigmoid_topk(lg, k, bias, n_groups=g, topk_groups=tg)[0]

        _check_gate(what, result, logits, given, given_bias, expected,
                    _group_mistakes(logits, bias, k, n_groups, topk_groups), reference, (n_groups, topk_groups))
    ok("group_limited_topk", "best groups by top-2 biased scores, then biased top-k, unbiased renormalised weights; "
       "ties as topk")


# ---------------------------------------------------------------------------------------------------------
# The bias update inside a training loop (★★★)
# ---------------------------------------------------------------------------------------------------------


def _loop_model(n_experts: int, k: int, seed: int) -> Any:  # noqa: ANN401
    """A tiny sigmoid-gated TinyLM with 2 MoE layers and no balancing policy of its own."""
    from moe_course.model import ModelConfig, TinyLM

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, d_model=16, ffn="moe", n_experts=n_experts,
                      top_k=k, expert_hidden=8, router_score="sigmoid", aux_loss_coef=0.0)
    return TinyLM(cfg)


def _loop_batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = torch.randint(0, 64, (4, 9), generator=g)
        out.append((seq[:, :-1].clone(), seq[:, 1:].clone()))
    return out


def _ref_loop(model: Any, batches: list, u: float, lr: float, variant: str = "right") -> None:  # noqa: ANN401
    """The reference training loop with each mistake switchable: forward, backward, SGD step, then the bias."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    layers = model.moe_layers()
    pending = [None for _ in layers]  # the one-step-late variant's counts
    total = [torch.zeros(layer.n_experts) for layer in layers]
    model.train()
    for x, y in batches:
        if variant == "late":  # updates before the forward pass, with the previous step's counts
            with torch.no_grad():
                for layer, counts in zip(layers, pending, strict=True):
                    if counts is not None:
                        layer.router.expert_bias += u * torch.sign(counts.mean() - counts)
        _, loss = model(x, y)
        if variant != "no zero_grad":
            opt.zero_grad()
        loss.backward()
        if variant != "no step":
            opt.step()
        with torch.no_grad():
            for i, layer in enumerate(layers):
                idx = layer.last_routing.indices
                if variant == "top-1 only":
                    idx = idx[:, :1]
                counts = torch.bincount(idx.reshape(-1), minlength=layer.n_experts).float()
                total[i] += counts
                if variant == "cumulative":
                    counts = total[i].clone()
                if variant == "late":
                    pending[i] = counts
                    continue
                if (variant == "first layer only" and i > 0) or variant == "not written back":
                    continue
                tokens_mean = torch.full_like(counts, idx.shape[0] / layer.n_experts)  # T / N: forgets the k choices
                step = {"reversed": torch.sign(counts - counts.mean()),
                        "proportional": (counts.mean() - counts) / counts.mean(),
                        "tokens mean": torch.sign(tokens_mean - counts)}.get(
                    variant, torch.sign(counts.mean() - counts))
                layer.router.expert_bias += u * step


_LOOP_MISTAKES = {
    "reversed": "moved each bias the wrong way: an overloaded expert (cᵢ > c̄) must get a *lower* bias, "
                "bᵢ + u·sign(c̄ − cᵢ)",
    "proportional": "moved each bias in proportion to its imbalance; the rule moves every bias by exactly ±u "
                    "(torch.sign), however large the imbalance",
    "late": "updated the bias before the forward pass with the previous step's counts, one step late; update "
            "it right after optimizer.step(), with the counts of the batch just trained on",
    "top-1 only": "counted only each token's first choice; count all k choices in layer.last_routing.indices",
    "cumulative": "counted the assignments of all steps so far; each update uses the counts of its own batch only",
    "first layer only": "updated only the first MoE layer; every layer in model.moe_layers() has its own bias",
    "tokens mean": "compared the counts with T / N (tokens per expert); the mean c̄ is over the k·T assignments, "
                   "counts.mean() = k·T / N",
    "not written back": "never changed the router's bias (a new tensor bound to a local name is not the buffer); "
                        "add to layer.router.expert_bias in place, under torch.no_grad()",
    "no zero_grad": "never reset the gradients, so each step used the sum of all earlier gradients; call "
                    "optimizer.zero_grad() before loss.backward()",
    "no step": "never stepped the optimizer: the weights did not train; call optimizer.step() after loss.backward()",
}


def _state(model: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str]) -> bool:
    return all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in keys)


def _first_difference(fn: Callable[..., Any], model: Any, batches: list, u: float, what: str,  # noqa: ANN401
                      biases: list[str], weights: list[str]) -> None:
    """Step by step (plain SGD keeps no state between calls): fail at the first step where the learner differs."""
    import copy

    mine, ref = copy.deepcopy(model), copy.deepcopy(model)
    for j, batch in enumerate(batches):
        call(fn, mine, [batch], u, 0.1, what=what)
        _ref_loop(ref, [batch], u, 0.1)
        got, want = _state(mine), _state(ref)
        if not _same_state(got, want, weights):
            fail(f"{what}: after training step {j + 1} the weights differ from the reference's; use "
                 "torch.optim.SGD(model.parameters(), lr=lr): _, loss = model(x, y); zero_grad; loss.backward(); step")
        bad = next((k for k in biases if not _same_state(got, want, [k])), None)
        if bad is not None:
            fail(f"{what}: after training step {j + 1}, {bad} is {[round(v, 4) for v in got[bad].tolist()]}, "
                 f"expected {[round(v, 4) for v in want[bad].tolist()]}. After optimizer.step(), count each layer's "
                 "assignments in layer.last_routing.indices (all k choices; an expert exactly at the mean c̄ keeps "
                 "its bias) and add u·sign(c̄ − c) to layer.router.expert_bias under torch.no_grad()")


def bias_training_loop(fn: Callable[..., Any]) -> None:
    """Check ``fn(model, batches, u, lr) -> None``: SGD training with DeepSeek-V3's bias update after every step."""
    import copy

    cases = [("8 experts top-2, 4 batches", 8, 2, 4, 1e-2), ("4 experts top-1, 3 batches", 4, 1, 3, 3e-2),
             ("4 experts top-4 (every expert chosen: counts equal, no bias moves)", 4, 4, 2, 1e-2),
             ("8 experts top-2, no batches", 8, 2, 0, 1e-2), ("8 experts top-2, u = 0", 8, 2, 3, 0.0)]
    for n, (label, n_experts, k, n_batches, u) in enumerate(cases):
        what = f"{fn_name(fn)} on {label}"
        model = _loop_model(n_experts, k, seed=n)
        if any(name.endswith("expert_bias") for name, _ in model.named_parameters()):
            raise AssertionError("the check's model must hold the bias as a buffer")
        batches = _loop_batches(n_batches, seed=10 + n)
        start = _state(model)
        expected = copy.deepcopy(model)
        _ref_loop(expected, batches, u, 0.1)
        want = _state(expected)
        learner = copy.deepcopy(model)
        before = snapshot(batches)  # the model is trained in place; the batches must stay as they were
        call(fn, learner, batches, u, 0.1, what=what)
        expect_unchanged(what, {"batches": batches}, {"batches": before})
        if any(name.endswith("expert_bias") for name, _ in learner.named_parameters()):
            fail(f"{what}: expert_bias became an nn.Parameter; {NOT_TRAINED}")
        got = _state(learner)
        if set(got) != set(want):
            fail(f"{what}: the model's state has other entries than before ({sorted(set(got) ^ set(want))}); "
                 "train the model you were given and change only its weights and its routers' expert_bias")
        biases = [k_ for k_ in want if k_.endswith("expert_bias")]
        weights = [k_ for k_ in want if not k_.endswith("expert_bias")]
        if n_batches and _same_state(got, start, weights) and not _same_state(want, start, weights):
            fail(f"{what}: {_LOOP_MISTAKES['no step']}")
        if not _same_state(got, want, biases + weights):
            for variant, hint in _LOOP_MISTAKES.items():
                wrong = copy.deepcopy(model)
                _ref_loop(wrong, batches, u, 0.1, variant)
                if _same_state(got, _state(wrong), biases + weights) and not _same_state(want, _state(wrong),
                                                                                          biases + weights):
                    fail(f"{what}: it looks like you {hint}.")
            _first_difference(fn, model, batches, u, what, biases, weights)
            fail(f"{what}: the trained weights or biases differ from the reference's. Use "
                 "torch.optim.SGD(model.parameters(), lr=lr), and for each (x, y): _, loss = model(x, y); zero_grad; "
                 "loss.backward(); step; then update the biases")
        if any(layer.router.expert_bias.requires_grad for layer in learner.moe_layers()):
            fail(f"{what}: the bias requires grad afterwards; {NOT_TRAINED}")
    ok("bias_training_loop", "forward, backward, SGD step, then bᵢ += u·sign(c̄ − cᵢ) per layer from that batch's "
       "counts; equal counts and u = 0 leave the bias alone")
