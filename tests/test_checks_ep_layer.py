"""check.expert_parallel_forward: the reference passes; every wrong answer fails with its mistake named."""

import importlib.util
import sys

import ep_layer_variants as variants
import pytest
import torch

from moe_course import check
from moe_course.check._core import CheckError


@pytest.mark.parametrize("answer", [variants.reference, variants.alternative], ids=["reference", "alternative"])
def test_correct_answers_pass(answer, capsys):
    check.expert_parallel_forward(answer)
    assert "OK" in capsys.readouterr().out


def test_the_tie_case_tells_one_sort_from_another():
    """In the float32 case the destination ranks repeat hundreds of times: an unstable sort orders them otherwise."""
    from moe_course.check import ep_layer

    (what, tokens, n_experts, k, starved, dtype), = [c for c in ep_layer.CASES if c[5] == "float32"]
    dest = ep_layer._case_data(tokens, n_experts, k, starved, 0)["indices"][:tokens[0]].reshape(-1) // 2
    assert not torch.equal(dest.argsort(), dest.argsort(stable=True))


@pytest.fixture(scope="module")
def wrong(tmp_path_factory):
    path = variants.write_variants(tmp_path_factory.mktemp("ep_wrong"))
    spec = importlib.util.spec_from_file_location("ep_layer_wrong", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ep_layer_wrong"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["ep_layer_wrong"]


@pytest.mark.parametrize("name", list(variants.MUTATIONS))
def test_wrong_answers_are_named(wrong, name):
    message = variants.MUTATIONS[name][1]
    with pytest.raises(CheckError, match=message):
        check.expert_parallel_forward(getattr(wrong, name))


def test_an_unwritten_exercise_says_so():
    def my_expert_parallel(x, indices, weights, experts, world):
        raise NotImplementedError()

    with pytest.raises(NotImplementedError, match="not written yet"):
        check.expert_parallel_forward(my_expert_parallel)
