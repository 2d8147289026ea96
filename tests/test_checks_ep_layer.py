"""check.expert_parallel_forward: the reference passes; every wrong answer fails with its mistake named."""

import importlib.util
import sys

import ep_layer_variants as variants
import pytest

from moe_course import check
from moe_course.check._core import CheckError


def test_reference_passes(capsys):
    check.expert_parallel_forward(variants.reference)
    assert "OK" in capsys.readouterr().out


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
