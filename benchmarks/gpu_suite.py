"""The GPU suite: one prepared command that measures what the course promises on a GPU, most valuable first.

    PYTHONPATH=. python benchmarks/gpu_suite.py --out gpu-out --budget-s 480          # on the GPU machine
    .venv/bin/python benchmarks/gpu_suite.py --out /tmp/suite --size smoke --device cpu  # CPU check: ~5 s

Each stage writes its file into ``--out`` before the next one starts, so whatever finishes is useful:

1. ``environment.json``: device, torch / CUDA / Python versions, bf16 support, whether
   ``torch.nn.functional.grouped_mm`` exists and runs on the device (a tiny call against a loop), CPU count,
   the git commit (if any) and a hash of the package's source.
2. ``correctness.json`` (< 1 minute): grouped experts (bf16 under autocast on CUDA) against the per-expert
   loop, the MoE layer against the ModuleList teaching layout (forward and backward), a TinyLM training step
   of each model (finite loss and gradients), ``ExpertParallelMoE`` on one rank (NCCL on CUDA, gloo on the CPU)
   against the single-process layer, and on CUDA a training step under ``torch.cuda.set_sync_debug_mode``
   (the host-device synchronisations it makes, with where they come from; none is the goal).
3. ``bench.json`` and ``profile.json``: tokens/s of the dense twin, the top-2 MoE and the recipe
   (gpu-dense, gpu-moe, gpu-best; :mod:`bench_model_step`), their ratios to dense, MFU against the device's
   bf16 peak; one MoE layer against a dense FFN (:mod:`bench_moe_layer`); and a ``torch.profiler`` breakdown of
   one training step of each model (GEMM, grouped GEMM, attention, routing, sort, gather/scatter, optimizer).
4. ``capstone-gpu.json``: notebook 08's capstone at GPU size (gpu-dense, gpu-moe, gpu-best, 1,500 steps of
   32 x 256 tokens each), seed by seed (every seed trains all three models before the next seed starts, so the
   file always holds complete seeds), as many seeds as the budget allows (at least one). The file is an
   :class:`~moe_course.experiments.ExperimentResult`: copy it to ``data/results/`` and
   ``load_result("capstone", "gpu")`` (or :func:`moe_course.course.gpu_results.load_gpu_capstone`) reads it. Each
   record's ``extra`` adds the device name, training FLOPs per token, MFU and the bench's tokens/s.

``suite.log`` has a timestamped line per stage. ``--budget-s`` (wall seconds, from the start) stops the suite
before a stage or a capstone seed that would not fit; stages 1 and 2 always run.

Time on one H100 at ``--size gpu`` (estimated; no GPU has run it yet): start-up and stages 1-2 about 40 s,
stage 3 about 30 s, and each capstone seed 3 x 12.3 M tokens x 57 MFLOP/token = 2.1 PFLOP: 2 s at the
989 TFLOPS bf16 peak, but a model this small is bound by kernel launches, about 10-15 ms a step, so 1,500 steps
plus evaluation take 20-30 s a model and 60-90 s a seed; three seeds fit in the default 480 s.

The suite imports only the standard library, torch and the package (and numpy, which the package needs); it
puts the checkout first on ``sys.path``, so no ``pip install`` is needed, and it stands in for tqdm if that is
missing.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import types
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(HERE), str(ROOT)):  # the checkout's package and the benchmark modules, before anything installed
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

LOG_NAME = "suite.log"
STAGES = ("environment", "correctness", "bench", "capstone")
PRESET_OF = {"dense": "dense", "MoE top-2": "moe", "MoE recipe": "best"}  # capstone run label -> preset kind
SETTINGS: dict[str, dict[str, Any]] = {
    # models are the capstone's runs at that size (gpu: the gpu-dense / gpu-moe / gpu-best presets)
    "gpu": dict(bench_repeats=20, layer=dict(tokens=8192, d=384, h=384, n=16, k=2), layer_repeats=10,
                check_batch=8, profile_steps=3, max_seeds=3),
    "smoke": dict(bench_repeats=2, layer=dict(tokens=256, d=32, h=32, n=4, k=2), layer_repeats=2,
                  check_batch=2, profile_steps=1, max_seeds=2),
}
SEED_OVERHEAD = 1.3
"""Capstone time of a model over its benchmarked training-step time: evaluation, the recorder, the probe."""
SEED_FALLBACK_S = {"gpu": 180.0, "smoke": 20.0}
"""Seconds assumed for the first capstone seed when the benchmark stage left no step times."""
PEAK_NOTES = {"T4": "a T4 has no bf16 tensor cores: its 65 TFLOPS peak is fp16, and autocast uses fp16 there"}


# ------------------------------------------------------------------------------------------------ plumbing


def ensure_tqdm() -> bool:
    """Stand in for tqdm (progress bars only) when it is not installed; True if the stand-in was installed."""
    try:
        import tqdm.auto  # noqa: F401
        return False
    except ImportError:
        pass

    class _Bar:
        def __init__(self, iterable: Any = None, *args: Any, **kwargs: Any) -> None:
            self.iterable = iterable

        def __iter__(self) -> Any:
            return iter(self.iterable)

        def __enter__(self) -> _Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def _ignore(self, *args: Any, **kwargs: Any) -> None:
            return None

        update = set_postfix = set_postfix_str = set_description = close = refresh = _ignore

    package, auto = types.ModuleType("tqdm"), types.ModuleType("tqdm.auto")
    package.__spec__ = importlib.machinery.ModuleSpec("tqdm", None, is_package=True)  # torch._dynamo looks
    auto.__spec__ = importlib.machinery.ModuleSpec("tqdm.auto", None)
    package.tqdm = auto.tqdm = _Bar
    package.auto = auto
    sys.modules["tqdm"], sys.modules["tqdm.auto"] = package, auto
    return True


TQDM_SHIM = ensure_tqdm()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


class Suite:
    """The output folder, the log and the clock of one suite run."""

    def __init__(self, out: Path, budget_s: float, size: str, device: torch.device) -> None:
        self.out, self.budget_s, self.size, self.device = out, budget_s, size, device
        self.settings = SETTINGS[size]
        self.start = time.monotonic()
        self.failures: list[str] = []
        self.bench: dict[str, Any] | None = None
        out.mkdir(parents=True, exist_ok=True)
        (out / LOG_NAME).write_text("", encoding="utf-8")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, message: str) -> None:
        line = f"{_now()} +{self.elapsed():7.1f}s {message}"
        print(line, flush=True)
        with open(self.out / LOG_NAME, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def write(self, name: str, data: Any) -> Path:
        """Write JSON atomically (a half-written file never replaces a whole one)."""
        path = self.out / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


def _autocast(device: torch.device, amp: bool) -> Any:
    from moe_course.train import _autocast as course_autocast

    return course_autocast(device, amp)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 for empty tensors): one number per compared tensor, fit for bf16 and fp32."""
    a, b = a.detach().float(), b.detach().float()
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@contextmanager
def grouped_mm_mode(mode: str) -> Any:
    """Set ``moe_course.experts.GROUPED_MM`` ("auto", "on" or "off") for the block."""
    from moe_course import experts

    before = experts.GROUPED_MM
    experts.GROUPED_MM = mode
    try:
        yield
    finally:
        experts.GROUPED_MM = before


# ------------------------------------------------------------------------------------------------ stage 1


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    head = ROOT / ".git" / "HEAD"  # no git program: read the ref by hand
    try:
        ref = head.read_text().strip()
        if not ref.startswith("ref: "):
            return ref
        name = ref[5:]
        loose = ROOT / ".git" / name
        if loose.exists():
            return loose.read_text().strip()
        for line in (ROOT / ".git" / "packed-refs").read_text().splitlines():
            if line.endswith(" " + name):
                return line.split()[0]
    except OSError:
        pass
    return None


def source_hash() -> str:
    """SHA-256 (16 hex digits) of the package's Python sources: names the code when there is no git."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "moe_course").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def probe_grouped_mm(device: torch.device) -> dict[str, Any]:
    """Does ``F.grouped_mm`` exist and give the loop's answer (forward and backward) on ``device``?"""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    info: dict[str, Any] = {"exists": hasattr(F, "grouped_mm"), "dtype": str(dtype).replace("torch.", ""),
                            "runs": False, "error": None}
    if not info["exists"]:
        return info
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(48, 32, generator=gen).to(device, dtype).requires_grad_(True)
        b = torch.randn(3, 32, 16, generator=gen).to(device, dtype).requires_grad_(True)
        offs = torch.tensor([16, 16, 48], dtype=torch.int32, device=device)  # the second group is empty
        y = F.grouped_mm(a, b, offs=offs)
        y.float().square().sum().backward()
        ref = torch.cat([a[:16].float() @ b[0].float(), a[16:].float() @ b[2].float()])
        info.update(runs=True, max_rel_err=_max_rel_err(y, ref), grad_finite=bool(
            torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()))
    except Exception as exc:  # noqa: BLE001 - recorded: this is what the stage is for
        info["error"] = f"{type(exc).__name__}: {exc}"[:500]
    return info


def _nvidia_smi() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def stage_environment(suite: Suite) -> dict[str, Any]:
    from bench_model_step import peak_bf16_flops

    device = suite.device
    env: dict[str, Any] = {
        "created": _now(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda, "cudnn": None, "device": str(device), "device_name": _device_name(device),
        "size": suite.size, "budget_s": suite.budget_s, "git_commit": _git_commit(), "source_sha256": source_hash(),
        "tqdm_stand_in": TQDM_SHIM, "moe_grouped_mm_env": os.environ.get("MOE_GROUPED_MM"),
        "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
    }
    try:
        import numpy

        env["numpy"] = numpy.__version__
    except ImportError:
        env["numpy"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(cudnn=torch.backends.cudnn.version(), capability=list(torch.cuda.get_device_capability(device)),
                   memory_gb=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                   bf16_supported=torch.cuda.is_bf16_supported(), nvidia_smi=_nvidia_smi(),
                   device_count=torch.cuda.device_count())
    else:
        try:
            torch.ones(2, 2, dtype=torch.bfloat16) @ torch.ones(2, 2, dtype=torch.bfloat16)
            env["bf16_supported"] = True
        except RuntimeError:
            env["bf16_supported"] = False
    peak = peak_bf16_flops(env["device_name"]) if device.type == "cuda" else None
    env["peak_bf16_tflops"] = peak / 1e12 if peak else None
    env["peak_note"] = next((note for key, note in PEAK_NOTES.items() if key in env["device_name"]), None)
    if device.type == "cuda" and peak is None:
        env["peak_note"] = f"no known bf16 peak for {env['device_name']!r}: MFU is left null"
    env["grouped_mm"] = probe_grouped_mm(device)
    try:
        import moe_course
        from moe_course.experts import use_grouped_mm

        env["package"] = {"version": moe_course.__version__, "path": str(Path(moe_course.__file__).parent)}
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        env["grouped_mm"]["package_uses_it"] = use_grouped_mm(dtype, device, torch.empty(1, 64, 64, device=device))
    except Exception as exc:  # noqa: BLE001
        env["package"] = {"error": f"{type(exc).__name__}: {exc}"}
        suite.failures.append("environment: the package does not import")
    return env


# ------------------------------------------------------------------------------------------------ stage 2


def check_grouped_experts(device: torch.device, amp: bool, n: int = 8, d: int = 64, h: int = 64,
                          tokens: int = 300) -> dict[str, Any]:
    """GroupedExperts (grouped_mm where it applies) against its per-expert loop, forward and backward."""
    from moe_course.experts import GroupedExperts, use_grouped_mm

    torch.manual_seed(0)
    experts = GroupedExperts(n, d, h).to(device)
    gen = torch.Generator().manual_seed(1)
    counts = torch.bincount(torch.randint(0, n - 1, (tokens,), generator=gen), minlength=n).to(device)  # last: 0
    x = torch.randn(tokens, d, generator=gen).to(device)
    probe = torch.randn(tokens, d, generator=gen).to(device)

    def run(mode: str) -> list[torch.Tensor]:
        with grouped_mm_mode(mode):
            experts.zero_grad(set_to_none=True)
            xx = x.clone().requires_grad_(True)
            with _autocast(device, amp):
                y = experts(xx, counts)
            (y.float() * probe).sum().backward()
        return [y.float(), xx.grad, experts.w_gate.grad, experts.w_up.grad, experts.w_down.grad]

    fast, loop = run("auto"), run("off")
    names = ("output", "grad_input", "grad_w_gate", "grad_w_up", "grad_w_down")
    errors = {name: _max_rel_err(a, b) for name, a, b in zip(names, fast, loop, strict=True)}
    from moe_course.train import amp_dtype

    dtype = amp_dtype(device, amp)  # what the autocast block above ran in (read there, not after it closed)
    tol = 3e-2 if dtype != torch.float32 else 1e-5
    return {"ok": max(errors.values()) <= tol, "tolerance": tol, "errors": errors, "dtype": str(dtype),
            "grouped_mm_used": use_grouped_mm(dtype, device, experts.w_gate), "counts": counts.tolist()}


def check_moe_layer(device: torch.device, amp: bool) -> dict[str, Any]:
    """The MoE layer (grouped experts, grouped dispatch) against the same weights as a ModuleList with sorted
    dispatch, forward and backward: a softmax top-2 layer with the Switch loss, and the recipe (sigmoid gate,
    routing bias, shared experts) with a bias update."""
    from moe_course.moe import MoE

    configs = {
        "top-2 softmax, aux loss": dict(d_model=64, d_hidden=64, n_experts=8, top_k=2, aux_loss_coef=0.01),
        "recipe: sigmoid, bias, shared": dict(d_model=64, d_hidden=32, n_experts=16, top_k=2, n_shared=2,
                                              score="sigmoid", bias_update_rate=1e-3),
    }
    out: dict[str, Any] = {"ok": True, "layers": {}}
    tol = 3e-2 if amp else 1e-5
    for name, kw in configs.items():
        torch.manual_seed(0)
        fast = MoE(**kw).to(device).train()
        ref = MoE(**kw, experts="list", dispatch="sorted").to(device).train()
        ref.load_state_dict(fast.state_dict(), strict=False)
        ref.experts = fast.experts.to_experts()
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(4, 50, kw["d_model"], generator=gen).to(device)
        probe = torch.randn(4, 50, kw["d_model"], generator=gen).to(device)
        grads = {}
        for tag, layer in (("fast", fast), ("ref", ref)):
            xx = x.clone().requires_grad_(True)
            with _autocast(device, amp):
                y = layer(xx)
            ((y.float() * probe).sum() + layer.aux_loss.float()).backward()
            layer.after_step()
            w = layer.experts
            if tag == "fast":
                expert_grads = [w.w_gate.grad, w.w_up.grad, w.w_down.grad]
            else:
                expert_grads = [torch.stack([e.gate.weight.grad.t() for e in w]),
                                torch.stack([e.up.weight.grad.t() for e in w]),
                                torch.stack([e.down.weight.grad.t() for e in w])]
            grads[tag] = [y.float(), xx.grad, layer.router.gate.weight.grad, *expert_grads,
                          layer.router.expert_bias.clone(), layer.aux_loss.detach().float().reshape(1)]
        names = ("output", "grad_input", "grad_router", "grad_w_gate", "grad_w_up", "grad_w_down", "expert_bias",
                 "aux_loss")
        errors = {n: _max_rel_err(a, b) for n, a, b in zip(names, grads["fast"], grads["ref"], strict=True)}
        finite = all(bool(torch.isfinite(t).all()) for t in grads["fast"])
        ok = finite and max(errors.values()) <= tol
        out["layers"][name] = {"ok": ok, "errors": errors, "finite": finite}
        out["ok"] = out["ok"] and ok
    out["tolerance"] = tol
    return out


def suite_models(size: str) -> dict[str, tuple[Any, int, str]]:
    """``{kind: (ModelConfig, batch size, label)}`` of the capstone's dense twin, top-2 MoE and recipe at ``size``."""
    from moe_course.experiments import get_experiment

    runs = [r for r in get_experiment("capstone").runs(size) if r.label in PRESET_OF]
    return {PRESET_OF[r.label]: (r.model, r.train.batch_size, r.label) for r in runs}


def check_training_steps(device: torch.device, amp: bool, size: str, batch: int) -> dict[str, Any]:
    """Two optimizer steps of each model: the loss is finite, every gradient finite, the weights move."""
    from bench_model_step import make_batch, train_step

    from moe_course.model import TinyLM

    out: dict[str, Any] = {"ok": True, "models": {}}
    for kind, (cfg, _, label) in suite_models(size).items():
        torch.manual_seed(0)
        model = TinyLM(cfg).to(device).train()
        before = [p.detach().clone() for p in model.parameters()]
        bias_before = [m.router.expert_bias.clone() for m in model.moe_layers() if hasattr(m.router, "expert_bias")]
        x, y = make_batch(cfg, batch, device)
        step = train_step(model, x, y, amp)
        losses = [float(step()) for _ in range(2)]
        grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        moved = sum(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters(), strict=True))
        bias_moved = [not torch.equal(a, m.router.expert_bias) for a, m in
                      zip(bias_before, [m for m in model.moe_layers() if hasattr(m.router, "expert_bias")],
                          strict=True)]
        ok = all(math.isfinite(v) for v in losses) and grads_finite and moved == len(before)
        if cfg.bias_update_rate:
            ok = ok and all(bias_moved)
        out["models"][kind] = {"label": label, "ok": ok, "losses": losses, "grads_finite": grads_finite,
                               "params_moved": f"{moved}/{len(before)}",
                               "bias_moved": bias_moved if cfg.bias_update_rate else None}
        out["ok"] = out["ok"] and ok
    return out


def _sync_sites_profiler(step: Callable[[], Any]) -> dict[str, int]:
    """``{"aten op -> CUDA runtime call": count}`` of the calls in one step that make the host wait for the GPU."""
    from torch.profiler import ProfilerActivity, profile

    waits = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
    sites: Counter[str] = Counter()
    for event in prof.events():
        name = event.name
        if name.startswith(waits) or name == "cudaMemcpy":
            parent, chain = event.cpu_parent, []
            while parent is not None and len(chain) < 3:
                chain.append(parent.name)
                parent = parent.cpu_parent
            sites[f"{' < '.join(chain) or '(top level)'} -> {name}"] += 1
    return dict(sites)


def check_sync_free(device: torch.device, size: str, batch: int,
                    set_mode: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """A training step of each model under ``torch.cuda.set_sync_debug_mode("warn")``: where it synchronises.

    Every synchronising call warns; each warning is recorded with the Python frames (package and torch) that led
    to it, and on CUDA a profile of the same step names the aten op behind each blocking CUDA runtime call.
    ``set_mode`` stands in for ``torch.cuda.set_sync_debug_mode`` (the CPU test of this function).
    """
    if device.type != "cuda" and set_mode is None:
        return {"ok": True, "skipped": "CUDA only: a CPU never waits for itself"}
    from bench_model_step import make_batch, train_step

    from moe_course.model import TinyLM

    set_mode = set_mode or torch.cuda.set_sync_debug_mode
    out: dict[str, Any] = {"ok": True, "models": {}}
    for kind, (cfg, _, label) in suite_models(size).items():
        torch.manual_seed(0)
        model = TinyLM(cfg).to(device).train()
        x, y = make_batch(cfg, batch, device)
        step = train_step(model, x, y, amp=True, sync=False)
        for _ in range(2):  # first steps create the optimizer state and pick kernels
            step()
        _sync(device)
        warned: list[dict[str, Any]] = []

        def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None,
                   warned: list = warned) -> None:
            frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-1]
                      if ("moe_course" in f.filename or "torch" in f.filename) and "warnings" not in f.filename]
            warned.append({"message": str(message)[:160], "where": f"{Path(filename).name}:{lineno}",
                           "stack": frames[-5:]})

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            set_mode("warn")
            try:
                step()
            finally:
                set_mode(0)
        _sync(device)
        profiled: dict[str, Any] = {}
        if device.type == "cuda":
            try:
                profiled = _sync_sites_profiler(step)
            except Exception as exc:  # noqa: BLE001
                profiled = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        sites = Counter(w["where"] for w in warned)
        out["models"][kind] = {"label": label, "sync_free": not warned, "syncs": len(warned),
                               "sites": dict(sites), "first": warned[:8], "profiler": profiled}
        out["ok"] = out["ok"] and not warned
    return out


def check_expert_parallel(device: torch.device) -> dict[str, Any]:
    """ExpertParallelMoE on one rank (NCCL on CUDA, gloo on the CPU) against the single-process layer."""
    import torch.distributed as dist

    from moe_course.parallel import compare_with_single_process

    if not dist.is_available():
        return {"ok": False, "error": "torch.distributed is not available in this build"}
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        return {"ok": False, "error": "a process group is already initialised"}
    base = dict(d_model=32, d_hidden=64, n_experts=8, top_k=2)
    scenarios = [
        {"name": "top-2 + shared, aux loss", "moe": {**base, "n_shared": 1, "aux_loss_coef": 0.01},
         "tokens": [96], "seed": 0, "train": True},
        {"name": "sigmoid + bias update", "moe": {**base, "score": "sigmoid", "bias_update_rate": 1e-3},
         "tokens": [64], "seed": 1, "train": True, "seq_len": 16},
        {"name": "capacity 1.0", "moe": {**base, "capacity_factor": 1.0}, "tokens": [64], "seed": 2},
    ]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=60))
    try:
        results = compare_with_single_process(scenarios)
    finally:
        dist.destroy_process_group()
    tol = 1e-4
    worst = {r["name"]: max(r["errors"].values()) for r in results}
    return {"ok": all(v <= tol for v in worst.values()), "backend": backend, "world": 1, "tolerance": tol,
            "largest_error": worst, "results": results}


def stage_correctness(suite: Suite) -> dict[str, Any]:
    device, amp = suite.device, suite.device.type == "cuda"
    batch = suite.settings["check_batch"]
    checks: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("grouped_experts_vs_loop", lambda: check_grouped_experts(device, amp)),
        ("moe_layer_vs_list", lambda: check_moe_layer(device, amp)),
        ("training_steps", lambda: check_training_steps(device, amp, suite.size, batch)),
        ("sync_free_step", lambda: check_sync_free(device, suite.size, batch)),
        ("expert_parallel_one_rank", lambda: check_expert_parallel(device)),  # last: a hung collective stops here
    ]
    out: dict[str, Any] = {"device": _device_name(device), "amp": amp, "checks": {}}
    for name, check in checks:
        start = time.monotonic()
        try:
            result = check()
        except Exception as exc:  # noqa: BLE001 - recorded, and the next check runs
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:1000],
                      "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.monotonic() - start, 2)
        out["checks"][name] = result
        status = "skipped" if result.get("skipped") else ("ok" if result["ok"] else "FAILED")
        suite.log(f"  correctness {name}: {status} ({result['seconds']:.1f} s)"
                  + (f": {result['error'].splitlines()[0]}" if result.get("error") else ""))
        if not result["ok"]:
            suite.failures.append(f"correctness: {name}")
        out["ok"] = all(c["ok"] for c in out["checks"].values())
        suite.write("correctness.json", out)  # after every check: a hang later keeps what is done
    return out


# ------------------------------------------------------------------------------------------------ stage 3

def stage_bench(suite: Suite) -> dict[str, Any]:
    from bench_model_step import GPU_TARGET, measure_steps, peak_bf16_flops, profile_presets
    from bench_moe_layer import measure_layers

    device, settings = suite.device, suite.settings
    amp = device.type == "cuda"
    models = suite_models(suite.size)
    configs = {kind: (cfg, batch) for kind, (cfg, batch, _) in models.items()}
    deadline = suite.start + suite.budget_s  # repeats stop at the budget; every model keeps its samples
    steps = measure_steps(configs, device, settings["bench_repeats"], clock="wall", amp=amp,
                          label="grouped", deadline=deadline)
    name = _device_name(device)
    peak = peak_bf16_flops(name) if device.type == "cuda" else None
    dense = steps["rows"]["dense"]["tokens_per_s"]
    for kind, row in steps["rows"].items():
        row["preset"] = f"{suite.size}-{kind}" if suite.size == "gpu" else f"smoke {models[kind][2]}"
        row["tokens_per_s_vs_dense"] = row["tokens_per_s"] / dense
    result: dict[str, Any] = {
        "device": name, "size": suite.size, "peak_bf16_tflops": peak / 1e12 if peak else None,
        "peak_note": next((n for k, n in PEAK_NOTES.items() if k in name), None), "model_step": steps,
        "target_tokens_per_s_vs_dense": GPU_TARGET if device.type == "cuda" else None,
        "targets_met": {kind: row["tokens_per_s_vs_dense"] >= GPU_TARGET for kind, row in steps["rows"].items()
                        if kind != "dense"} if device.type == "cuda" else None,
    }
    suite.bench = result
    suite.write("bench.json", result)
    suite.log("  model step: " + ", ".join(
        f"{row['preset']} {row['tokens_per_s']:,.0f} tok/s ({row['tokens_per_s_vs_dense']:.2f}x dense"
        + (f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else "") + ")" for row in steps["rows"].values()))
    if suite.left() <= 0:
        suite.log("  budget spent: the layer benchmark and the profile are skipped")
        return result
    layer = settings["layer"]
    result["layer"] = measure_layers(layer["tokens"], layer["d"], layer["h"], layer["n"], layer["k"], device,
                                     settings["layer_repeats"], amp=amp,
                                     names=("dense FFN", "MoE grouped", "MoE sorted (list)", "soft mixture"),
                                     deadline=deadline)
    from moe_course.experts import use_grouped_mm  # "MoE grouped" runs a per-expert loop where grouped_mm is absent

    result["layer"]["grouped_mm_used"] = use_grouped_mm(torch.bfloat16 if amp else torch.float32, device,
                                                        torch.empty(1, 64, 64, device=device))
    suite.write("bench.json", result)
    how = "" if result["layer"]["grouped_mm_used"] else " (no grouped_mm here: GroupedExperts' per-expert loop)"
    suite.log(f"  layer: MoE grouped / dense FFN = {result['layer']['sparse_vs_dense']:.2f} (median){how}")
    if suite.left() <= 0:
        suite.log("  budget spent: the profile is skipped")
        return result
    profiles: dict[str, Any] = {"device": name, "size": suite.size, "steps": settings["profile_steps"], "models": {}}
    for kind, (cfg, batch, label) in models.items():
        if suite.left() <= 0:
            suite.log(f"  budget spent: the profile stops before {kind}")
            break
        try:
            profile = profile_presets({kind: (cfg, batch)}, device, settings["profile_steps"], amp)[kind]
            profiles["models"][kind] = {"label": label, **profile}
        except Exception as exc:  # noqa: BLE001
            profiles["models"][kind] = {"label": label, "error": f"{type(exc).__name__}: {exc}"[:500]}
    suite.write("profile.json", profiles)
    return result


# ------------------------------------------------------------------------------------------------ stage 4


def estimate_seed_seconds(suite: Suite, runs: list[Any]) -> float:
    """Seconds one capstone seed should take: each run's steps at the benchmarked step time, times an overhead."""
    rows = (suite.bench or {}).get("model_step", {}).get("rows", {})
    total = 0.0
    for run in runs:
        kind = PRESET_OF.get(run.label, "dense")
        ms = rows.get(kind, {}).get("best_ms")
        if ms is None:  # the benchmark did not run or failed
            return SEED_FALLBACK_S[suite.size]
        total += run.train.steps * ms / 1e3 * SEED_OVERHEAD + 5.0  # + model build, corpus and probe
    return total


def stage_capstone(suite: Suite) -> dict[str, Any]:
    from moe_course.experiments import ExperimentResult, get_experiment, load_result, result_path, run_experiment
    from moe_course.metrics import mfu
    from moe_course.model import TinyLM
    from moe_course.params import train_flops_per_token

    device, size = suite.device, suite.size
    exp = get_experiment("capstone")
    runs = exp.runs(size)
    seeds = list(exp.seeds)[: suite.settings["max_seeds"]]
    name = _device_name(device)
    flops = {run.label: train_flops_per_token(TinyLM(run.model)) for run in runs}
    bench_rows = (suite.bench or {}).get("model_step", {}).get("rows", {})
    merged: ExperimentResult | None = None
    path = suite.out / result_path("capstone", size).name
    summary: dict[str, Any] = {"file": path.name, "seeds_done": [], "seed_seconds": []}
    estimate = estimate_seed_seconds(suite, runs)
    for i, seed in enumerate(seeds):
        if i == 0 and suite.left() < estimate:
            suite.log(f"  budget: {suite.left():.0f} s left, a capstone seed needs about {estimate:.0f} s: "
                      "stopping before the capstone")
            summary["stopped"] = "budget spent before the first seed"
            break
        if i > 0 and suite.left() < summary["seed_seconds"][-1]:
            suite.log(f"  budget: {suite.left():.0f} s left, the last seed took {summary['seed_seconds'][-1]:.0f} s: "
                      f"stopping after {i} seed(s)")
            summary["stopped"] = f"budget spent after {i} seed(s)"
            break
        start = time.monotonic()
        suite.log(f"  capstone seed {seed}: " + ", ".join(r.label for r in runs)
                  + (f" (estimate {estimate:.0f} s)" if i == 0 else ""))
        part = run_experiment("capstone", size, [seed], device, progress=False, save=False)
        for record in part.records:
            util = mfu(record.tokens_per_s, flops[record.label], name) if device.type == "cuda" else None
            bench = bench_rows.get(PRESET_OF.get(record.label, ""), {})
            record.extra.update(device_name=name, train_flops_per_token=flops[record.label], mfu=util,
                                bench_tokens_per_s=bench.get("tokens_per_s"), bench_mfu=bench.get("mfu"))
        if merged is None:
            merged = part
        else:
            merged.seeds.append(seed)
            merged.records.extend(part.records)
            merged.seconds = round(merged.seconds + part.seconds, 1)
        merged.command = (f"python benchmarks/gpu_suite.py --size {size} (capstone seeds "
                          f"{' '.join(map(str, merged.seeds))}, as `python -m moe_course.experiments run capstone "
                          f"--size {size}` trains them)")
        merged.save(path)
        took = time.monotonic() - start
        summary["seeds_done"].append(seed)
        summary["seed_seconds"].append(round(took, 1))
        suite.log(f"  capstone seed {seed} done in {took:.0f} s: " + ", ".join(
            f"{r.label} val {r.val_loss[-1]:.3f} ({r.tokens_per_s:,.0f} tok/s)" for r in part.records))
    if merged is not None:
        load_result("capstone", size, results_dir=suite.out)  # the notebook's loader reads it (fingerprint, corpus)
        suite.log(f"  wrote {path.name} with seeds {merged.seeds}; load_result('capstone', {size!r}) reads it")
    return summary


# ------------------------------------------------------------------------------------------------ main


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the result files (created)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall seconds the suite may take; no stage or capstone seed starts past it (default 480)")
    parser.add_argument("--size", choices=sorted(SETTINGS), default=None,
                        help="gpu (the GPU presets) or smoke (tiny models; default on a machine without CUDA)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    parser.add_argument("--max-seeds", type=int, default=None, help="capstone seeds at most (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.max_seeds is not None and args.max_seeds < 1:
        parser.error("--max-seeds must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = args.size or ("gpu" if device.type == "cuda" else "smoke")
    suite = Suite(Path(args.out), args.budget_s, size, device)
    if args.max_seeds is not None:
        suite.settings = {**suite.settings, "max_seeds": args.max_seeds}
    suite.log(f"gpu suite: size {size} on {_device_name(device)}, budget {args.budget_s:g} s, out {args.out}")
    stages: list[tuple[str, Callable[[Suite], Any], str | None]] = [
        ("environment", stage_environment, "environment.json"),
        ("correctness", stage_correctness, None),  # writes correctness.json itself, check by check
        ("bench", stage_bench, None),  # bench.json (and profile.json)
        ("capstone", stage_capstone, None),  # capstone-SIZE.json, seed by seed
    ]
    for number, (stage, run, file) in enumerate(stages, start=1):
        if stage in ("bench", "capstone") and suite.left() <= 0:
            suite.log(f"budget spent ({suite.elapsed():.0f} of {args.budget_s:g} s): stopping before stage "
                      f"{number} ({stage})" + ("" if stage == "capstone" else " and stage 4 (capstone)"))
            break
        suite.log(f"stage {number} ({stage}) starts")
        start = time.monotonic()
        try:
            result = run(suite)
            if file is not None:
                suite.write(file, result)
            suite.log(f"stage {number} ({stage}) done in {time.monotonic() - start:.1f} s")
        except Exception as exc:  # noqa: BLE001 - log it and go on: later stages may still work
            suite.failures.append(f"{stage}: {type(exc).__name__}: {exc}")
            suite.log(f"stage {number} ({stage}) FAILED after {time.monotonic() - start:.1f} s: "
                      f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    files = sorted(p.name for p in suite.out.iterdir() if p.is_file())
    suite.log(f"suite done in {suite.elapsed():.0f} s; files: {', '.join(files)}"
              + (f"; FAILURES: {'; '.join(suite.failures)}" if suite.failures else "; all checks passed"))
    return 1 if suite.failures else 0


if __name__ == "__main__":
    sys.exit(main())
