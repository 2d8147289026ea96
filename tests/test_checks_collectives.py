"""check.send_tokens runs the learner's exchange on real gloo processes and names the mistake."""

import exchange_variants as wrong
import pytest

from moe_course import check, collectives
from moe_course.check import CheckError
from moe_course.check import collectives as check_collectives


def test_reference_passes(capsys):
    check.send_tokens(collectives.send_tokens)
    assert capsys.readouterr().out.startswith("OK  send_tokens")


@pytest.mark.parametrize("fn, match", [
    (wrong.own_rows_only, "only its own rows"),
    (wrong.unsorted_rows, "Sort the rows by destination"),
    (wrong.reversed_ties, "another order.*stable sort"),
    (wrong.output_like_input, "received .* rows, expected|output holds their sum"),
    (wrong.swapped_splits, "received .* rows, expected|output holds their sum"),
    (wrong.no_minlength, "rank 2 receives nothing.*output holds their sum"),
    (wrong.sorts_dest_in_place, "changed its input dest in place"),
    (wrong.all_reduce_counts, "received .* rows, expected|output holds their sum"),
    (wrong.unstable_sort, "40 to 44 rows each.*another order.*stable sort"),
    (wrong.float32_output, "float64 rows.*dtype torch.float32, expected torch.float64.*x.new_empty"),
    (wrong.counts_from_max, "rank 1 sends nothing.*rank 1 raised"),
])
def test_wrong_exchanges_are_named(fn, match):
    with pytest.raises(CheckError, match=match):
        check.send_tokens(fn)


def test_a_rank_that_skips_the_collective_is_named(monkeypatch):
    monkeypatch.setattr(check_collectives, "TIMEOUT_S", 3.0)
    with pytest.raises(CheckError, match="Every rank must call every collective"):
        check.send_tokens(wrong.rank0_skips)


def test_a_lambda_is_refused_with_the_reason():
    with pytest.raises(TypeError, match="defined with def"):
        check.send_tokens(lambda x, dest, world: x)


def test_an_unwritten_exercise_says_so():
    with pytest.raises(NotImplementedError, match="not written yet"):
        check.send_tokens(wrong.not_written)
