"""launch's results survive their rank exiting before the parent reads them (the race of issue 26, made certain).

torch.multiprocessing passes a tensor's storage by file descriptor, served by the sending process; a rank
that put a tensor on the queue and exited could no longer serve it, and the parent failed with
FileNotFoundError, ConnectionRefusedError, ConnectionResetError or EOFError, more often under load. Here the
parent reads the queue only after every rank has exited, so the old way fails every time.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moe_course import check, collectives, parallel
from moe_course.check import CheckError
from moe_course.check import collectives as check_collectives
from moe_course.parallel import LaunchFailed, launch

TENSORS = '''
def tensors():
    rank = dist.get_rank()
    return {"rows": torch.arange(4.0) + rank, "ids": [torch.tensor([rank]), (torch.ones(2, dtype=torch.float64),)]}
'''


class ReadsLate:
    """A multiprocessing context whose queue the parent reads only after every rank process has exited."""

    def __init__(self, ctx: Any) -> None:  # noqa: ANN401
        self.ctx, self.procs = ctx, []

    def Process(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401, N802 - multiprocessing's name
        p = self.ctx.Process(*args, **kwargs)
        self.procs.append(p)
        return p

    def Queue(self) -> Any:  # noqa: ANN401, N802
        q, real_get = self.ctx.Queue(), None
        real_get = q.get

        def get(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
            for p in self.procs:
                p.join(timeout=120)
            return real_get(*args, **kwargs)

        q.get = get
        return q


@pytest.fixture
def reads_late(monkeypatch: pytest.MonkeyPatch) -> None:
    real = parallel._context
    monkeypatch.setattr(parallel, "_context", lambda method: ReadsLate(real(method)))


def test_tensor_results_arrive_after_their_rank_exited(reads_late):
    got = launch(collectives._call_source, 2, TENSORS, "tensors", None, ())
    for rank, out in enumerate(got):
        assert torch.equal(out["rows"], torch.arange(4.0) + rank)
        assert torch.equal(out["ids"][0], torch.tensor([rank]))
        assert out["ids"][1][0].dtype == torch.float64


def test_the_exchange_check_passes_a_correct_answer_after_the_ranks_exited(reads_late, capsys):
    check.send_tokens(collectives.send_tokens)
    assert capsys.readouterr().out.startswith("OK  send_tokens")


def test_a_broken_queue_is_named_as_the_machinery(monkeypatch):
    real = parallel._context

    class Broken(ReadsLate):
        def Queue(self) -> Any:  # noqa: ANN401, N802
            q = self.ctx.Queue()

            def get(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
                raise ConnectionResetError(104, "Connection reset by peer")

            q.get = get
            return q

    monkeypatch.setattr(parallel, "_context", lambda method: Broken(real(method)))
    with pytest.raises(LaunchFailed, match="process machinery failed.*ConnectionResetError"):
        launch(collectives._call_source, 2, TENSORS, "tensors", None, ())


def test_a_check_meeting_the_machinery_failing_says_it_is_not_the_answer(monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        raise LaunchFailed("FileNotFoundError: [Errno 2] No such file or directory: '/tmp/pymp-x/listener-y'")

    monkeypatch.setattr(check_collectives, "launch", broken)
    with pytest.raises(CheckError, match="not your answer: the processes failed.*rerun") as info:
        check.send_tokens(collectives.send_tokens)
    assert info.value.__cause__ is None and info.value.__suppress_context__
