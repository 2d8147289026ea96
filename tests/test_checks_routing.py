"""check.topk_router: the reference passes; each typical mistake is rejected with a message naming it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_course import check
from moe_course.check import CheckError
from moe_course.routing import softmax_topk


def _renorm(w: torch.Tensor) -> torch.Tensor:
    return w / w.sum(dim=-1, keepdim=True)


def reference(logits, k):
    return softmax_topk(logits, k)


def softmax_of_top_logits(logits, k):
    top, idx = logits.topk(k, dim=-1)
    return top.softmax(dim=-1), idx


def no_renormalisation(logits, k):
    return logits.softmax(dim=-1).topk(k, dim=-1)


def softmax_over_tokens(logits, k):
    w, i = logits.softmax(dim=0).topk(k, dim=-1)
    return _renorm(w), i


def topk_over_tokens(logits, k):
    return logits.softmax(dim=-1).topk(k, dim=0)


def smallest(logits, k):
    w, i = logits.softmax(dim=-1).topk(k, dim=-1, largest=False)
    return _renorm(w), i


def sigmoid_scores(logits, k):
    w, i = logits.sigmoid().topk(k, dim=-1)
    return _renorm(w), i


def positions_not_ids(logits, k):
    w, _ = softmax_topk(logits, k)
    w, pos = w.sort(dim=-1, descending=True)
    return w, pos


def shuffled_ids(logits, k):
    w, i = softmax_topk(logits, k)
    return w, (i + 1) % logits.shape[-1]


def second_softmax(logits, k):
    w, i = logits.softmax(dim=-1).topk(k, dim=-1)
    return w.softmax(dim=-1), i


def ascending(logits, k):
    w, i = softmax_topk(logits, k)
    return w.flip(-1), i.flip(-1)


def detached(logits, k):
    w, i = softmax_topk(logits.detach(), k)
    return w, i


def numpy_router(logits, k):
    """Right values computed in NumPy: the router cannot learn through them."""
    z = logits.detach().numpy()
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(p, idx, -1)
    return torch.tensor(w / w.sum(-1, keepdims=True)), torch.tensor(idx)


def numpy_router_leaf(logits, k):
    w, i = numpy_router(logits, k)
    return w.requires_grad_(True), i


def straight_through(logits, k):
    """Right weights, but the gradient is the logits' own (non-zero, and wrong)."""
    w, i = softmax_topk(logits.detach(), k)
    top = logits.gather(-1, i)
    return w + (top - top.detach()), i


def renorm_first_two(logits, k):
    """Renormalises by the first two weights only: right for k = 1, 2, wrong for k = 3."""
    w, i = logits.softmax(dim=-1).topk(k, dim=-1)
    return w / w[:, :2].sum(dim=-1, keepdim=True), i


def swapped_outputs(logits, k):
    w, i = softmax_topk(logits, k)
    return i, w


def crashes(logits, k):
    raise RuntimeError("boom")


def test_reference_passes(capsys):
    check.topk_router(reference)
    check.topk_router(softmax_of_top_logits)  # the same function, computed the other way
    assert capsys.readouterr().out.count("OK  topk_router") == 2


def test_column_order_of_equal_weights_is_free():
    from moe_course.check._core import same_choices

    w = torch.tensor([[0.5, 0.5]])
    assert same_choices(w, torch.tensor([[3, 1]]), w, torch.tensor([[1, 3]]))
    assert not same_choices(w, torch.tensor([[3, 2]]), w, torch.tensor([[1, 3]]))


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (no_renormalisation, "weights must sum to 1 over the k chosen experts"),
        (softmax_over_tokens, "softmax over the tokens"),
        (topk_over_tokens, "top-k over the tokens"),
        (smallest, "k smallest"),
        (sigmoid_scores, "sigmoid"),
        (positions_not_ids, "look like positions"),
        (shuffled_ids, "indices are not the ids"),
        (second_softmax, "second softmax"),
        (ascending, "descending weight"),
        (detached, "autograd cannot differentiate"),
        (numpy_router, "autograd cannot differentiate"),
        (numpy_router_leaf, "no gradient reaches the logits"),
        (straight_through, "gradient with respect to the logits is not"),
        (renorm_first_two, "k=3: weights must sum to 1"),
        (swapped_outputs, "order (weights, indices)"),
        (crashes, "raised RuntimeError: boom"),
    ],
)
def test_mistakes_are_named(fn, message):
    with pytest.raises(CheckError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check.topk_router(fn)


def test_unrenormalised_sum_message_without_a_known_pattern():
    def scaled(logits, k):
        w, i = softmax_topk(logits, k)
        return 0.5 * w, i

    with pytest.raises(CheckError, match="weights must sum to 1 over the k chosen experts"):
        check.topk_router(scaled)


def test_unfinished_stub_raises_not_implemented():
    def stub(logits, k):
        raise NotImplementedError()

    with pytest.raises(NotImplementedError):
        check.topk_router(stub)
