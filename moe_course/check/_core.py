"""Shared helpers of the exercise checks: one error type, tensor comparisons with named mistakes."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


class CheckError(AssertionError):
    """Raised by a check when the learner's answer is wrong; the message says what to fix."""


def fail(message: str) -> None:
    """Raise a :class:`CheckError` with a message aimed at the learner."""
    raise CheckError(message)


def ok(name: str, detail: str = "") -> None:
    """Print the one-line success message of a check."""
    print(f"OK  {name}" + (f": {detail}" if detail else ""))


def call(fn: Callable[..., Any], *args: Any, what: str, **kwargs: Any) -> Any:
    """Call the learner's function, turning a crash (other than an unfinished stub) into a clear message."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise
    except CheckError:
        raise
    except Exception as exc:  # noqa: BLE001 - we re-raise with context for the learner
        hint = ""
        if "requires grad" in str(exc) or "requires_grad" in str(exc):
            hint = (". The inputs require grad, as in training: keep the computation in torch (no NumPy, "
                    ".item() or .tolist()) so that autograd can follow it")
        raise CheckError(f"{what} raised {type(exc).__name__}: {exc}{hint}") from exc


def as_tensor(value: Any, what: str) -> torch.Tensor:
    """Insist on a tensor (floats and numbers are accepted and converted)."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except Exception as exc:  # noqa: BLE001
        raise CheckError(f"{what} should return a tensor, got {type(value).__name__}") from exc


def expect_shape(value: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    """Fail with both shapes named when they differ."""
    if tuple(value.shape) != tuple(shape):
        fail(f"{what} has shape {tuple(value.shape)}, expected {tuple(shape)}")


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """allclose after moving both to float64 on the CPU (shapes must already match)."""
    return bool(torch.allclose(a.detach().double().cpu(), b.detach().double().cpu(), atol=atol, rtol=rtol))


def as_count(value: Any, what: str, expected: int | None = None) -> int:
    """A parameter count as an int: accept ints, NumPy ints, 0-d tensors and integral floats; explain the rest.

    With ``expected``, a float that is the answer in billions or millions gets its own message.
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(f"{what} should be an int (a parameter count), got {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    if expected and value > 0 and abs(value * 1e9 - expected) <= 0.01 * expected:
        fail(f"{what} returned {value:g}, which looks like billions; return the exact count "
             f"({expected / 1e9:.2f}B is {expected:,} parameters)")
    if expected and value > 0 and abs(value * 1e6 - expected) <= 0.01 * expected:
        fail(f"{what} returned {value:g}, which looks like millions; return the exact count")
    if not value.is_integer():
        fail(f"{what} is {value!r}; a parameter count is a whole number, return an int")
    return int(value)


OUTSIDE_AUTOGRAD = ("keep the computation in torch: no .detach(), .item(), .tolist(), .numpy()/NumPy, "
                    "torch.tensor(...) of an intermediate result, or torch.no_grad()")


def probe_like(out: torch.Tensor) -> torch.Tensor:
    """Fixed, uneven weights for the output, so that sum(out * probe) sees every element differently."""
    n = out.numel()
    return torch.cos(torch.arange(n, dtype=torch.float64) * 1.7 + 0.3).reshape(out.shape).to(out.dtype)


Grads = Mapping[str, Any]  # name -> a tensor, or a sequence of tensors (e.g. a module's parameters)


def _flat(group: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [group] if isinstance(group, torch.Tensor) else list(group)


def _grads(out: torch.Tensor, probe: torch.Tensor, groups: Grads) -> dict[str, list[torch.Tensor | None]]:
    """Gradient of sum(out * probe) w.r.t. each tensor of each group (None where autograd does not reach)."""
    names = [n for n in groups for _ in _flat(groups[n])]
    tensors = [t for n in groups for t in _flat(groups[n])]
    wanted = [i for i, t in enumerate(tensors) if t.requires_grad]
    found = torch.autograd.grad((out * probe.to(out.device, out.dtype)).sum(), [tensors[i] for i in wanted],
                                allow_unused=True) if wanted and out.requires_grad else []
    grads: list[torch.Tensor | None] = [None] * len(tensors)
    for i, g in zip(wanted, found, strict=False):
        grads[i] = g
    result: dict[str, list[torch.Tensor | None]] = {n: [] for n in groups}
    for n, g in zip(names, grads, strict=True):
        result[n].append(g)
    return result


def compare_grads(what: str, got: torch.Tensor, ref: torch.Tensor, mine: Grads, theirs: Grads) -> None:
    """Gradients of the learner's output w.r.t. every named input/parameter must equal the reference's.

    ``mine`` and ``theirs`` map the same names to the tensors (or lists of tensors, e.g. a module's
    parameters) that produced ``got`` and ``ref``; both outputs are weighted by the same fixed probe. Names
    the reference's gradient does not reach are skipped; a missing or different gradient fails, naming it.
    """
    probe = probe_like(ref.detach()).cpu()
    ref_grads = _grads(ref, probe, theirs)
    reached = [n for n in theirs if any(g is not None for g in ref_grads[n])]
    if not reached:
        return
    if not got.requires_grad:
        fail(f"{what} returned a value that autograd cannot differentiate (no grad_fn), so no gradient reaches "
             f"{_join(reached)}; {OUTSIDE_AUTOGRAD}")
    if got.grad_fn is None:
        fail(f"{what} returned a new leaf tensor (made with torch.tensor(..., requires_grad=True) or "
             f".detach().requires_grad_()): it is not connected to its inputs, so no gradient reaches "
             f"{_join(reached)}; {OUTSIDE_AUTOGRAD}")
    got_grads = _grads(got, probe, {n: mine[n] for n in reached})
    missing = [n for n in reached
               if any(g is None and r is not None and bool(r.any())
                      for g, r in zip(got_grads[n], ref_grads[n], strict=True))]
    if missing:
        fail(f"{what}: the output is right but no gradient reaches {_join(missing)} (it was cut off from "
             f"autograd); {OUTSIDE_AUTOGRAD}")
    for name in reached:
        for g, r in zip(got_grads[name], ref_grads[name], strict=True):
            if r is None:
                continue
            g = torch.zeros_like(r) if g is None else g
            if tuple(g.shape) != tuple(r.shape) or not close(g, r):
                fail(f"{what}: the output is right but its gradient with respect to {name} is not (compared "
                     "with the reference's). Compute the output from the inputs with differentiable torch "
                     "operations only: no straight-through tricks (a + b - b.detach()), no detached pieces, "
                     "no values recomputed outside autograd")


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def weights_and_ids(result: Any, what: str, ids: str = "indices", meaning: str = "integer expert ids"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack a learner's ``(weights, ids)`` pair, naming a swapped order or wrong dtypes (routers, expert choice)."""
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        fail(f"{what} should return a pair (weights, {ids}), got {type(result).__name__}")
    weights, index = as_tensor(result[0], what + "'s weights"), as_tensor(result[1], f"{what}'s {ids}")
    if not weights.is_floating_point() and index.is_floating_point():
        fail(f"{what} returned ({ids}, weights); return them in the order (weights, {ids})")
    if not weights.is_floating_point():
        fail(f"{what}: weights should be floating point, got {weights.dtype}")
    if index.is_floating_point() or index.dtype == torch.bool:
        fail(f"{what}: {ids} should be {meaning} (torch.long, as topk returns), got {index.dtype}")
    return weights, index


def same_choices(w: torch.Tensor, i: torch.Tensor, w_ref: torch.Tensor, i_ref: torch.Tensor) -> bool:
    """Same (id, weight) pairs in every row, whatever the column order: a router's k experts per token, or an
    expert's c tokens in expert choice, may come in any order."""
    if w.shape != w_ref.shape or i.shape != i_ref.shape:
        return False
    i_sorted, perm = i.long().sort(dim=-1)
    r_sorted, r_perm = i_ref.long().sort(dim=-1)
    if not torch.equal(i_sorted.cpu(), r_sorted.cpu()):
        return False
    return close(w.gather(-1, perm), w_ref.gather(-1, r_perm))
