"""Shared helpers of every notebook's exercise checks: one error type, tensor comparisons with named mistakes."""

from __future__ import annotations

import copy
import dataclasses
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from itertools import chain
from typing import Any, NamedTuple

import torch
from torch import nn


class CheckError(AssertionError):
    """Raised by a check when the learner's answer is wrong; the message says what to fix."""


def fail(message: str) -> None:
    """Raise a :class:`CheckError` with a message aimed at the learner."""
    raise CheckError(message)


def ok(name: str, detail: str = "") -> None:
    """Print the one-line success message of a check."""
    print(f"OK  {name}" + (f": {detail}" if detail else ""))


def fn_name(fn: Callable[..., Any]) -> str:
    """The learner's function's own name for messages (``my_router(...)``), or "your function" for a lambda."""
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) and name.isidentifier() else "your function"


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
        if _IN_PLACE_ERROR.search(str(exc)):
            hint = f". An input was changed in place: {IN_PLACE_FIX}"
        elif "requires grad" in str(exc) or "requires_grad" in str(exc):
            hint = (". The inputs require grad, as in training: keep the computation in torch (no NumPy, "
                    ".item() or .tolist()) so that autograd can follow it")
        raise CheckError(f"{what} raised {type(exc).__name__}: {exc}{hint}") from exc


# ---------------------------------------------------------------------------------------------------------
# Inputs that a learner's function must leave as they were
# ---------------------------------------------------------------------------------------------------------

IN_PLACE_FIX = ("an in-place operation (x += ..., x.add_(...), x.div_(...), x[...] = ..., x.data) changes the "
                "caller's tensor; compute new tensors instead (x = x + ...)")
REASSIGNED_FIX = "assign to local variables, not to the fields or items of an input"
_IN_PLACE_ERROR = re.compile(r"in-?place operation", re.IGNORECASE)


class _Frozen(NamedTuple):
    """A tensor input as it was before the call (``tensor`` is the object itself, to see it replaced)."""

    tensor: torch.Tensor
    values: torch.Tensor
    requires_grad: bool


def _parts(value: Any) -> dict[str, Any]:
    """The named parts of a module (parameters, buffers) or of a dataclass (fields)."""
    if isinstance(value, nn.Module):
        return dict(chain(value.named_parameters(), value.named_buffers()))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return {}


def snapshot(value: Any) -> Any:
    """A frozen copy of an input (tensor, module, list, dataclass or plain value) to compare after the call."""
    if isinstance(value, torch.Tensor):
        return _Frozen(value, value.detach().clone(), value.requires_grad)
    if isinstance(value, (list, tuple, nn.ModuleList)):
        return [snapshot(v) for v in value]
    if isinstance(value, nn.Module) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        return {n: snapshot(v) for n, v in _parts(value).items()}
    return copy.deepcopy(value)


def _tensor_change(value: Any, before: _Frozen, path: str) -> tuple[str, str] | None:
    """(what changed, how to fix it) for a tensor input, or None."""
    old = before.values
    if not isinstance(value, torch.Tensor):
        return f"{path} (it was replaced by a {type(value).__name__})", REASSIGNED_FIX
    fix = IN_PLACE_FIX if value is before.tensor else REASSIGNED_FIX
    if tuple(value.shape) != tuple(old.shape):
        return f"{path} (its shape, from {tuple(old.shape)} to {tuple(value.shape)})", fix
    if value.dtype != old.dtype:
        return f"{path} (its dtype, from {old.dtype} to {value.dtype})", fix
    new = value.detach().cpu()
    if not torch.equal(new, old.cpu()):
        at = tuple((new != old.cpu()).nonzero()[0].tolist())
        where = "".join(f"[{i}]" for i in at)
        return f"{path} (its values: {path}{where} went from {_two(old[at].item(), new[at].item())})", fix
    if value.requires_grad != before.requires_grad:
        return (f"{path} (its requires_grad, from {before.requires_grad} to {value.requires_grad})",
                "requires_grad_() and detach_() change the caller's tensor; use .detach(), which returns a new one")
    return None


def _two(a: float, b: float) -> str:
    """'a to b' with as many digits as it takes to tell them apart."""
    for digits in (4, 6, 9, 17):
        if f"{a:.{digits}g}" != f"{b:.{digits}g}":
            break
    return f"{a:.{digits}g} to {b:.{digits}g}"


def _list_change(value: Any, before: list[Any], path: str) -> tuple[str, str] | None:
    """(what changed, how to fix it) for a list, tuple or ModuleList input, or None."""
    if not isinstance(value, (list, tuple, nn.ModuleList)):
        return f"{path} (it was replaced by a {type(value).__name__})", REASSIGNED_FIX
    items = list(value)
    if len(items) != len(before):
        return (f"{path} (its length, from {len(before)} to {len(items)})",
                "append, extend, += and pop change the caller's list; build a new one, e.g. list(a) + list(b)")
    found = (changed_input(v, b, f"{path}[{i}]") for i, (v, b) in enumerate(zip(items, before, strict=True)))
    return next((f for f in found if f), None)


def _parts_change(value: Any, before: dict[str, Any], path: str) -> tuple[str, str] | None:
    """(what changed, how to fix it) for a module or dataclass input, or None."""
    parts = _parts(value)
    if set(parts) != set(before):
        return f"{path} (its parts: {sorted(before)} became {sorted(parts)})", REASSIGNED_FIX
    found = (changed_input(parts[n], b, f"{path}.{n}") for n, b in before.items())
    return next((f for f in found if f), None)


def changed_input(value: Any, before: Any, path: str) -> tuple[str, str] | None:
    """(what changed, how to fix it) when ``value`` differs from its :func:`snapshot` ``before``, else None."""
    if isinstance(before, _Frozen):
        return _tensor_change(value, before, path)
    if isinstance(before, list):
        return _list_change(value, before, path)
    if isinstance(before, dict):
        return _parts_change(value, before, path)
    if value is not before and value != before:
        return f"{path} (from {before!r} to {value!r})", REASSIGNED_FIX
    return None


def expect_unchanged(what: str, inputs: Mapping[str, Any], before: Mapping[str, Any]) -> None:
    """Fail, naming the input and what changed, when the learner's function changed one of its inputs."""
    for name, value in inputs.items():
        found = changed_input(value, before[name], name)
        if found:
            fail(f"{what} changed its input {found[0]} in place: {found[1]}. The caller still uses its inputs "
                 "after the call, so a function must leave them as they were")


def _copy(value: Any) -> Any:
    """An independent copy of an input, tensors keeping their requires_grad (non-leaf ones become leaves)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _copy(getattr(value, f.name))
                                              for f in dataclasses.fields(value) if f.init})
    return copy.deepcopy(value)


def _name_in_place(fn: Callable[..., Any], inputs: Mapping[str, Any], what: str, error: BaseException) -> None:
    """Autograd refused to change an input in place: rerun on copies, without autograd, to name that input."""
    copies = {name: _copy(v) for name, v in inputs.items()}
    before = {name: snapshot(v) for name, v in copies.items()}
    with torch.no_grad():
        try:
            fn(*copies.values())
        except Exception:  # noqa: BLE001, S110 - only which input it changes matters here
            pass
    expect_unchanged(what, copies, before)
    fail(f"{what} raised RuntimeError: {error}. An input was changed in place: {IN_PLACE_FIX}")


def call_unchanged(fn: Callable[..., Any], inputs: Mapping[str, Any], *, what: str) -> Any:
    """:func:`call` with the named inputs as positional arguments; fail naming any input changed in place."""
    before = {name: snapshot(v) for name, v in inputs.items()}
    try:
        result = call(fn, *inputs.values(), what=what)
    except CheckError as exc:
        if isinstance(exc.__cause__, RuntimeError) and _IN_PLACE_ERROR.search(str(exc.__cause__)):
            _name_in_place(fn, inputs, what, exc.__cause__)
        raise
    expect_unchanged(what, inputs, before)
    return result


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
