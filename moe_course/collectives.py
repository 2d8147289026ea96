"""A first look at ``torch.distributed`` (notebook 07): run a notebook's function on W processes; the token exchange.

:func:`moe_course.parallel.launch` runs functions of the package on W processes; a function a learner types in
a notebook cannot travel that way (a new process cannot import a notebook). :func:`run` sends the function's
source instead: every rank compiles it, joins the process group and calls it, so a notebook cell can hold
distributed code and run it at once. The names ``torch``, ``dist`` (``torch.distributed``) and ``math`` are
available to it; anything else it must import itself.

:func:`send_tokens` is the first half of an expert-parallel layer (rows sorted by destination, counts
exchanged, rows exchanged with uneven splits): the reference of notebook 07's distributed exercise.
"""

from __future__ import annotations

import inspect
import math
import pickle
import textwrap
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from moe_course.parallel import launch
from moe_course.validate import check_ids, check_int, check_tensor

__all__ = ["expected_received", "exchange_inputs", "row_origins", "run", "send_tokens"]


def send_tokens(x: torch.Tensor, dest: torch.Tensor, world: int) -> torch.Tensor:
    """Send row t of x (T, d) to rank dest[t]; return the rows this rank receives, grouped by source rank."""
    from moe_course.collectives import _check_exchange  # imported here: run() sends this function's source alone

    _check_exchange(x, dest, world)
    order = torch.argsort(dest, stable=True)  # (T,) rows grouped by destination, each group in its original order
    send_counts = torch.bincount(dest, minlength=world)  # (W,) rows for each rank
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)  # (W,) rows from each rank: the receive side's sizes
    out = x.new_empty(int(recv_counts.sum()), x.shape[1])  # (R, d)
    dist.all_to_all_single(out, x[order], recv_counts.tolist(), send_counts.tolist())
    return out


def _check_exchange(x: object, dest: object, world: object) -> None:
    """send_tokens' arguments: rows (T, d), one destination rank per row, inside a process group of ``world``."""
    check_tensor("x", x, 2, "(T, d): one row per token", "; give one row as x[None]")
    check_tensor("dest", dest, 1, "(T,) destination ranks")
    check_int("world", world, 1)
    if dest.shape[0] != x.shape[0]:
        raise ValueError(f"dest must hold one rank per row of x ({x.shape[0]}), got {dest.shape[0]}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("send_tokens must run inside a process group (torch.distributed is not initialised): "
                           "call it on every rank, e.g. with collectives.run(fn, world)")
    if world != dist.get_world_size():
        raise ValueError(f"world must be the process group's size {dist.get_world_size()}, got {world}")
    check_ids("dest", dest, world, "ranks")


def _source(fn: Callable[..., Any]) -> tuple[str, str]:
    """The source of ``fn`` (a plain ``def`` in a notebook cell or a file) and its name."""
    if not callable(fn) or not hasattr(fn, "__code__"):
        raise TypeError(f"fn must be a function defined with def, got {type(fn).__name__}")
    if fn.__name__ == "<lambda>":
        raise TypeError("fn must be a function defined with def (a lambda's source cannot be sent to other processes)")
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as err:
        raise TypeError(f"the source of {fn.__name__} cannot be found ({err}); define it with def in a notebook "
                        "cell or a file") from None
    return source, fn.__name__


def _call_source(source: str, name: str, args_by_rank: list[tuple] | None, args: tuple) -> Any:  # noqa: ANN401
    """On one rank: compile ``source``, then call ``name`` with this rank's arguments."""
    namespace: dict[str, Any] = {"torch": torch, "dist": dist, "math": math, "__name__": "__rank__"}
    exec(compile(source, f"<{name} on rank {dist.get_rank()}>", "exec"), namespace)  # noqa: S102
    own = args_by_rank[dist.get_rank()] if args_by_rank is not None else ()
    try:
        return namespace[name](*own, *args)
    except NameError as err:  # a helper from another cell: the ranks received this function's source alone
        raise NameError(f"{err} on the ranks: run() sends only the source of {name}(), so a function or variable "
                        f"defined in another cell is missing there; define or import it inside {name}() (torch, "
                        "dist and math are available)") from err


def run(fn: Callable[..., Any], world: int, *args: Any, args_by_rank: list[tuple] | None = None,
        timeout_s: float = 30.0) -> list[Any]:
    """Run ``fn(*args_by_rank[rank], *args)`` on ``world`` gloo processes (``fn`` sent as source); results by rank.

    ``fn`` may be defined in a notebook cell; inside it ``dist.get_rank()`` says which rank it is. A rank that
    raises or hangs (say, one that skips a collective the others call) stops the run with
    :class:`moe_course.parallel.RankFailed` naming it.
    """
    check_int("world", world, 1)
    if args_by_rank is not None:
        if len(args_by_rank) != world:
            raise ValueError(f"args_by_rank must hold one tuple per rank ({world}), got {len(args_by_rank)}")
        if not all(isinstance(a, tuple) for a in args_by_rank):
            raise TypeError(f"args_by_rank must hold one tuple of arguments per rank, got {args_by_rank!r}")
    source, name = _source(fn)
    for what, value in (("args", args), ("args_by_rank", args_by_rank)):
        try:
            pickle.dumps(value)
        except Exception as err:  # noqa: BLE001 - pickling raises many types; all mean the same here
            raise TypeError(f"{what} cannot be sent to other processes ({err}); pass tensors, numbers, strings or "
                            "lists of them") from None
    return launch(_call_source, world, source, name, args_by_rank, args, timeout_s=timeout_s)


def exchange_inputs(world: int, seed: int = 0, d: int = 2, skip_rank: int | None = None, rows: int = 5,
                    dtype: torch.dtype = torch.float32, empty_rank: int | None = None
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per rank: rows x (T_r, d) whose first column says where they come from (100·rank + row) and destinations.

    Rank r holds ``rows + 2·r`` rows (none for ``empty_rank``), destinations are uneven and repeat (ties: 40 rows
    or more expose an unstable sort), ``skip_rank``, when given, receives nothing, and ``dtype`` may be any
    float or integer type: the cases a correct exchange must handle.
    """
    check_int("world", world, 1)
    check_int("seed", seed, 0)
    check_int("d", d, 1)
    check_int("rows", rows, 1, 99 - 2 * (world - 1), " (row ids must stay below 100 on every rank)")
    if not isinstance(dtype, torch.dtype) or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"dtype must be a real torch dtype (e.g. torch.float64, torch.int64), got {dtype!r}")
    for name, rank in (("skip_rank", skip_rank), ("empty_rank", empty_rank)):
        if rank is not None:
            check_int(name, rank, 0, world - 1, f" (a rank of the world of {world})")
    if skip_rank is not None and world == 1:
        raise ValueError("skip_rank needs a world of at least 2 ranks: with one rank every row goes to it")
    gen = torch.Generator().manual_seed(seed)
    targets = torch.tensor([r for r in range(world) if r != skip_rank])
    step = 1000 if not dtype.is_floating_point else 0.1  # later columns differ from the first, which stays exact
    inputs = []
    for rank in range(world):
        n = 0 if rank == empty_rank else rows + 2 * rank
        ids = (100 * rank + torch.arange(n, dtype=torch.float64)).unsqueeze(1)  # (T_r, 1)
        x = (ids + step * torch.arange(d, dtype=torch.float64)).to(dtype)  # (T_r, d)
        dest = targets[torch.randint(len(targets), (n,), generator=gen)]  # (T_r,)
        inputs.append((x, dest))
    return inputs


def expected_received(inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """What each rank must receive: from every source rank in rank order, its rows for this rank in their order."""
    if not inputs:
        raise ValueError("inputs must hold one (x, dest) pair per rank, got none")
    world = len(inputs)
    return [torch.cat([x[dest == r] for x, dest in inputs]) for r in range(world)]


def row_origins(out: torch.Tensor) -> list[tuple[int, int]]:
    """Decode received rows back to (source rank, row index) from their values (100·rank + row)."""
    check_tensor("out", out, 2, "(R, d) received rows")
    return [(int(v) // 100, int(v) % 100) for v in out[:, 0].round().tolist()]
