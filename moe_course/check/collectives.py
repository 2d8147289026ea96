"""Check of notebook 07's distributed exercise: the learner's token exchange runs on 2 and 3 gloo processes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from moe_course.check._core import CheckError, fail, ok
from moe_course.collectives import _call_source, _source, exchange_inputs, expected_received, row_origins
from moe_course.parallel import LaunchFailed, RankFailed, launch

__all__ = ["send_tokens"]

CASES = (  # (what, world, seed, exchange_inputs options)
    ("2 ranks", 2, 0, {}),
    ("3 ranks", 3, 2, {}),
    ("3 ranks, rank 2 receives nothing", 3, 1, {"skip_rank": 2}),
    ("3 ranks, 40 to 44 rows each (many ties)", 3, 3, {"rows": 40}),  # an unstable sort reorders ties above 16
    ("3 ranks, rank 1 sends nothing", 3, 4, {"empty_rank": 1}),
    ("2 ranks, float64 rows", 2, 5, {"dtype": torch.float64}),
    ("2 ranks, int64 rows", 2, 6, {"dtype": torch.int64}),
)
SIZES = ("In all_to_all_single(output, input, output_split_sizes, input_split_sizes) the input splits are your "
         "counts per destination, the output splits the counts you receive from each rank (exchange them first), "
         "and the output holds their sum of rows")
TIMEOUT_S = 20.0
"""Seconds a rank may wait in a collective before the check says which rank hangs."""


def _run_rank(source: str, name: str, inputs: list[tuple[torch.Tensor, torch.Tensor]], world: int
              ) -> dict[str, Any]:
    """On one rank: call the learner's function on copies of this rank's inputs; report its output and edits."""
    x, dest = inputs[dist.get_rank()]
    x_in, dest_in = x.clone(), dest.clone()
    out = _call_source(source, name, [(x_in, dest_in, world)] * world, ())
    changed = [arg for arg, given, kept in (("x", x_in, x), ("dest", dest_in, dest)) if not torch.equal(given, kept)]
    return {"out": out, "changed": changed}


def _explain_failure(err: RankFailed, what: str) -> str:
    """A learner-facing message for a rank that raised or hung."""
    last = str(err).strip().splitlines()[-1]
    if last.startswith("NotImplementedError"):
        raise NotImplementedError(f"case '{what}': the function is not written yet (rank {err.rank}: {last})")
    order = ("Every rank must call every collective, in the same order (a rank that skips an all_to_all_single or "
             "returns early leaves the others waiting)")
    if "timed out" in str(err):
        return f"case '{what}': {err.args[0].splitlines()[0]}. {order}"
    if "Connection closed" in last or "Connection reset" in last:
        return (f"case '{what}': rank {err.rank} lost its peer in a collective: another rank returned early, "
                f"skipped a collective, or died because the sizes did not match. {order}. {SIZES}")
    if "died" in last:
        return f"case '{what}': {last} A rank dies inside all_to_all_single when the sizes do not match. {SIZES}"
    hint = ""
    if "split" in last.lower() or "size" in last.lower() or "shape" in last.lower():
        hint = f". {SIZES}"
    return f"case '{what}': rank {err.rank} raised {last}{hint}"


def _diagnose(what: str, rank: int, got: torch.Tensor, want: torch.Tensor, inputs: list, world: int) -> None:
    """Fail with the first difference between what rank ``rank`` received and what it should have."""
    own_x, own_dest = inputs[rank]
    if got.shape == own_x.shape and torch.equal(got, own_x[torch.argsort(own_dest, stable=True)]):
        fail(f"case '{what}': rank {rank} returned only its own rows; send them with dist.all_to_all_single")
    if got.shape[0] != want.shape[0]:
        sent_own = own_x.shape[0]
        extra = (" (as many rows as it sent: size the output by the counts received, exchanged first with "
                 "all_to_all_single)") if got.shape[0] == sent_own else ""
        fail(f"case '{what}': rank {rank} received {got.shape[0]} rows, expected {want.shape[0]}{extra}")
    if got.dtype != want.dtype:
        fail(f"case '{what}': rank {rank} returned rows of dtype {got.dtype}, expected {want.dtype} (the dtype of "
             "x): make the output with x.new_empty(rows, d), which keeps x's dtype and device")
    if got.shape[1:] != want.shape[1:]:
        fail(f"case '{what}': rank {rank} returned rows of shape {tuple(got.shape[1:])}, "
             f"expected {tuple(want.shape[1:])}")
    if torch.equal(got, want):
        return
    pairs, wanted = row_origins(got), row_origins(want)
    for i, ((src, row), (wsrc, wrow)) in enumerate(zip(pairs, wanted, strict=True)):
        if (src, row) == (wsrc, wrow):
            continue
        if sorted(pairs) == sorted(wanted):
            fail(f"case '{what}': rank {rank} received the right rows in another order: row {i} is row {row} of "
                 f"rank {src}, expected row {wrow} of rank {wsrc}. Rows must arrive grouped by source rank, each "
                 "group in its original order: sort by destination with a stable sort (ties keep their order)")
        dest_of = int(inputs[src][1][row]) if 0 <= src < world and row < inputs[src][1].shape[0] else None
        fail(f"case '{what}': rank {rank} received row {row} of rank {src} at position {i}, whose destination is "
             f"rank {dest_of}; expected row {wrow} of rank {wsrc}. Sort the rows by destination (x[order]) before "
             "sending, so that each rank's slice holds its rows")
    fail(f"case '{what}': rank {rank} received the right rows with other values")


def send_tokens(fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]) -> None:
    """Run ``fn(x, dest, world)`` on 2 and 3 gloo processes and compare what every rank receives."""
    source, name = _source(fn)
    for what, world, seed, options in CASES:
        inputs = exchange_inputs(world, seed, **options)
        try:
            results = launch(_run_rank, world, source, name, inputs, world, timeout_s=TIMEOUT_S)
        except RankFailed as err:
            raise CheckError(_explain_failure(err, what)) from None
        except LaunchFailed as err:
            raise CheckError(f"case '{what}': not your answer: the processes failed ({err.cause}) — rerun the check; "
                             "if it fails again, restart the kernel") from None
        for rank, (res, want) in enumerate(zip(results, expected_received(inputs), strict=True)):
            if res["changed"]:
                fail(f"case '{what}': {name} changed its input {res['changed'][0]} in place on rank {rank}; leave "
                     "the inputs unchanged (x[order] and torch.argsort make new tensors)")
            got = res["out"]
            if not isinstance(got, torch.Tensor):
                fail(f"case '{what}': rank {rank} returned {type(got).__name__}, expected a tensor of rows")
            if got.dim() != 2:
                fail(f"case '{what}': rank {rank} returned shape {tuple(got.shape)}, expected (rows received, d)")
            _diagnose(what, rank, got, want, inputs, world)
    ok("send_tokens", "every rank received its rows, grouped by source rank in order, on 2 and 3 processes")
