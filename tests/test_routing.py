import math

import pytest
import torch

from moe_course.routing import TopKRouter, keep_topk_softmax, noisy_topk_logits, sigmoid_topk, softmax_topk


def test_softmax_topk_hand_computed():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    w, i = softmax_topk(logits, 2)
    assert i.tolist() == [[0, 1]]
    e = math.e
    assert w[0, 0].item() == pytest.approx(e / (e + 1))  # softmax over {2, 1}
    assert w.sum().item() == pytest.approx(1.0)
    w_raw, _ = softmax_topk(logits, 2, renormalize=False)
    z = sum(math.exp(v) for v in (2, 1, 0, -1))
    assert w_raw[0].tolist() == pytest.approx([math.exp(2) / z, math.exp(1) / z])


def test_renormalised_topk_equals_softmax_over_topk_logits():
    torch.manual_seed(0)
    logits = torch.randn(50, 8)
    w, i = softmax_topk(logits, 3)
    w2, i2 = keep_topk_softmax(logits, 3)
    assert torch.equal(i, i2)
    assert torch.allclose(w, w2, atol=1e-6)


def test_sigmoid_topk_bias_changes_choice_not_weights():
    logits = torch.tensor([[1.0, 0.5, 0.0]])
    bias = torch.tensor([0.0, 0.0, 1.0])
    w, i = sigmoid_topk(logits, 1, bias=bias, renormalize=False)
    assert i.tolist() == [[2]]  # chosen because of the bias
    assert w.item() == pytest.approx(torch.sigmoid(torch.tensor(0.0)).item())  # weighted by plain score
    w2, _ = sigmoid_topk(logits, 2)
    assert w2.sum().item() == pytest.approx(1.0)


def test_noisy_logits_noise_scale_is_softplus():
    gen = torch.Generator().manual_seed(0)
    clean = torch.zeros(20000, 2)
    h = noisy_topk_logits(clean, torch.full((20000, 2), 1.0), generator=gen)
    assert h.std().item() == pytest.approx(math.log1p(math.e), rel=0.03)


@pytest.mark.parametrize("k", [0, 5])
def test_k_out_of_range_is_a_clear_error(k):
    with pytest.raises(ValueError, match="between 1 and the number of experts"):
        softmax_topk(torch.randn(3, 4), k)
    with pytest.raises(ValueError, match="top-k"):
        TopKRouter(8, 4, k)


def test_router_shapes_and_errors():
    torch.manual_seed(0)
    r = TopKRouter(16, 8, 2)
    out = r(torch.randn(10, 16))
    assert out.weights.shape == (10, 2) and out.indices.shape == (10, 2) and out.scores.shape == (10, 8)
    assert torch.allclose(out.weights.sum(-1), torch.ones(10))
    with pytest.raises(ValueError, match="shape"):
        r(torch.randn(10, 15))
    with pytest.raises(ValueError, match="unknown router score"):
        TopKRouter(16, 8, 2, score="relu")


def test_router_expert_bias_steers_softmax_choice():
    torch.manual_seed(0)
    r = TopKRouter(4, 3, 1)
    r.expert_bias[2] = 10.0
    out = r(torch.randn(6, 4))
    assert (out.indices == 2).all()


def test_noisy_router_is_noisy_only_in_training():
    torch.manual_seed(0)
    r = TopKRouter(4, 4, 2, noisy=True)
    torch.nn.init.constant_(r.noise.weight, 1.0)
    x = torch.randn(5, 4)
    r.eval()
    assert torch.equal(r(x).logits, r(x).logits)
    r.train()
    assert not torch.equal(r(x).logits, r(x).logits)
