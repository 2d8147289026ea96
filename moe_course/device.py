"""Device choice and reproducibility for every notebook: one place that decides where tensors live and seeds RNGs."""

from __future__ import annotations

import importlib
import os
import platform
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def pick_device(prefer: str | None = None) -> torch.device:
    """Return CUDA if present, else Apple MPS, else CPU.

    ``prefer`` (or the environment variable ``MOE_DEVICE``) forces a device, e.g. ``"cpu"`` to
    reproduce the CPU numbers on a GPU machine.
    """
    choice = prefer or os.environ.get("MOE_DEVICE")
    if choice:
        source = "prefer" if prefer else "MOE_DEVICE"
        try:
            device = torch.device(choice)
        except RuntimeError:
            raise ValueError(f"{source}={choice!r} is not a device: use 'cpu', 'cuda' (or 'cuda:N') or 'mps'") from None
        if device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"{source}={choice!r}: the course runs on 'cpu', 'cuda' (or 'cuda:N') or 'mps'")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {choice!r} was requested but CUDA is not available; use 'cpu'")
        if device.type == "mps" and not _mps_available():
            raise ValueError(f"device {choice!r} was requested but Apple MPS is not available; use 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def has_gpu(device: torch.device | None = None) -> bool:
    """True when experiments should scale up (CUDA or MPS)."""
    device = device or pick_device()
    return device.type in ("cuda", "mps")


def pin_threads(device: torch.device, threads: int = 1) -> int:
    """On the CPU, run PyTorch on ``threads`` threads; return the count before. Other devices: unchanged.

    A sum split over more threads is added up in another order, so trained numbers would depend on the
    machine's core count (a laptop, Binder, CI); every notebook pins one thread so its recorded outputs
    reproduce anywhere. Tiny models also train fastest on one core: their many small ops wait on each other.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    return before


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (all devices) so that a notebook prints the same numbers each run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - any import problem means "not usable"
        return None


REQUIRED = ("torch", "numpy", "matplotlib", "ipywidgets", "tqdm")


def environment_report(verbose: bool = True) -> dict[str, object]:
    """Collect (and print) device, versions and OK/FAIL lines for what the course needs."""
    device = pick_device()
    report: dict[str, object] = {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "device": device.type,
        "cpu_threads": torch.get_num_threads(),
    }
    checks: list[tuple[str, bool, str]] = []
    checks.append(("Python >= 3.10", sys.version_info >= (3, 10), platform.python_version()))
    for name in REQUIRED:
        version = _version(name)
        report[name] = version
        checks.append((name, version is not None, version or "missing: run `make setup`"))
    x = torch.randn(4, 4, device=device)
    ok = bool(torch.allclose((x @ torch.eye(4, device=device)).cpu(), x.cpu()))
    checks.append((f"tensor maths on {device.type}", ok, "matmul ok" if ok else "matmul gave wrong numbers"))
    report["checks"] = checks
    report["all_ok"] = all(passed for _, passed, _ in checks)
    if verbose:
        for name, passed, detail in checks:
            print(f"{'OK  ' if passed else 'FAIL'} {name:<24} {detail}")
        if device.type == "cpu":
            print("Running on the CPU: experiments use their small, fast settings.")
        else:
            print(f"Accelerator found ({device.type}): experiments scale up automatically.")
    return report


@contextmanager
def cpu_threads(n: int = 1) -> Iterator[None]:
    """Run the block with ``n`` PyTorch CPU threads, then restore the previous count.

    For loops over tiny tensors (notebook 01's 2-D mixtures): one thread does them as fast as two, and keeps
    them fast when other programs are busy on the cores (many threads then wait on each other, 8x slower here).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
