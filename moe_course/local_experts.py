"""The 1991 mixture of local experts (notebook 01): a gating network chooses among several small expert networks.

Reference: R. A. Jacobs, M. I. Jordan, S. J. Nowlan and G. E. Hinton, "Adaptive mixtures of local experts",
*Neural Computation* 3(1):79-87, 1991.

For an input case c, expert i produces an output vector o_i^c and the gating network produces the
probabilities p_i^c (a softmax over the experts, so they are positive and sum to 1). The paper compares two
error functions for the case c with desired output d^c:

* the **cooperative** error (eq. 1.1), where the experts' outputs are blended before they are compared with
  the target, so every expert is pushed to correct the residual error left by all the others::

      E^c = || d^c - sum_i p_i^c o_i^c ||^2

* the **competitive** error (eq. 1.3), the negative log-likelihood of a mixture of unit-variance Gaussians,
  where each expert is compared with the target on its own::

      E^c = -log sum_i p_i^c exp(-1/2 || d^c - o_i^c ||^2)

  Its gradient for expert i is weighted by the posterior probability (the *responsibility*)
  h_i^c = p_i^c exp(-1/2 ||d^c - o_i^c||^2) / sum_j p_j^c exp(-1/2 ||d^c - o_j^c||^2), so an expert learns
  mostly from the cases it already explains best, and the experts stop interfering with one another.

This module holds the model (:class:`GatingNetwork`, :class:`Expert`, :class:`MixtureOfLocalExperts`), both
error functions, a training helper, a single-network baseline with a matched parameter count, the
specialisation metrics of notebook 01. Its figures are in :mod:`moe_course.plots.local_experts`. All losses
are averaged over the cases of a batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from moe_course.device import cpu_threads

__all__ = [
    "Expert",
    "GatingNetwork",
    "MixtureOfLocalExperts",
    "MixtureOutput",
    "SpecialisationReport",
    "TrainHistory",
    "competitive_loss",
    "confident_fraction",
    "cooperative_loss",
    "count_params",
    "expert_region_mse",
    "expert_regions",
    "matched_mlp",
    "mlp",
    "partition_purity",
    "responsibilities",
    "specialisation_report",
    "train_mixture",
    "weighted_squared_error",
]


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


def mlp(d_in: int, d_out: int, hidden: int = 0) -> nn.Module:
    """A linear map (``hidden=0``) or a one-hidden-layer tanh network d_in -> hidden -> d_out."""
    if d_in < 1 or d_out < 1 or hidden < 0:
        raise ValueError(f"need d_in >= 1, d_out >= 1 and hidden >= 0, got {d_in}, {d_out}, {hidden}")
    if hidden == 0:
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


def count_params(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class GatingNetwork(nn.Module):
    """The gate of the 1991 paper: p = softmax(x W + b) over the experts, one row per input.

    With ``hidden > 0`` the logits come from a small tanh network instead of a single linear layer. A
    linear gate splits the input space into convex cells (intervals in 1-D), which is all that notebook 01
    needs. ``forward`` returns the probabilities (N, n_experts); :meth:`log_probs` the log-probabilities,
    computed with ``log_softmax`` so that they stay finite when a probability underflows.
    """

    def __init__(self, d_in: int, n_experts: int, hidden: int = 0) -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be at least 1, got {n_experts}")
        self.n_experts = n_experts
        self.net = mlp(d_in, n_experts, hidden)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).log_softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).softmax(dim=-1)


class Expert(nn.Module):
    """One expert: a linear map (``hidden=0``) or a tiny tanh MLP from the input to an output vector."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 0) -> None:
        super().__init__()
        self.net = mlp(d_in, d_out, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MixtureOutput(NamedTuple):
    """What :class:`MixtureOfLocalExperts` returns: ``p`` (N, n), ``o`` (N, n, d_out), ``y`` (N, d_out).

    ``y = sum_i p_i o_i`` is the mixture's prediction (the mean of the mixture distribution);
    ``log_p`` holds log p computed stably (use it for the competitive loss).
    """

    p: torch.Tensor
    o: torch.Tensor
    y: torch.Tensor
    log_p: torch.Tensor


class MixtureOfLocalExperts(nn.Module):
    """A gating network plus ``n_experts`` expert networks, all looking at the same input (Jacobs et al., 1991).

    ``model(x)`` returns a :class:`MixtureOutput` ``(p, o, y, log_p)``: gate probabilities p (N, n), every
    expert's output o (N, n, d_out), the blended prediction y = sum_i p_i o_i (N, d_out) and log p. Every
    expert runs on every input here (the 1991 model is dense); the sparse version of notebook 02 onwards
    only runs the chosen ones.

    ``seed`` makes the initial weights reproducible without touching the global random state.
    """

    def __init__(self, n_experts: int, d_in: int, d_out: int, expert_hidden: int = 0, gate_hidden: int = 0,
                 seed: int | None = None) -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be at least 1, got {n_experts}")
        self.n_experts, self.d_in, self.d_out = n_experts, d_in, d_out
        with _seeded(seed):
            self.gate = GatingNetwork(d_in, n_experts, gate_hidden)
            self.experts = nn.ModuleList(Expert(d_in, d_out, expert_hidden) for _ in range(n_experts))

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """All experts' outputs stacked: (N, n_experts, d_out)."""
        return torch.stack([expert(x) for expert in self.experts], dim=1)

    def forward(self, x: torch.Tensor) -> MixtureOutput:
        log_p = self.gate.log_probs(x)
        p = log_p.exp()
        o = self.expert_outputs(x)
        y = (p.unsqueeze(-1) * o).sum(dim=1)
        return MixtureOutput(p, o, y, log_p)


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Run the block under ``torch.manual_seed(seed)`` and restore the global CPU RNG afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------------------------------------
# The two error functions of the paper (and the one in between)
# ----------------------------------------------------------------------------------------------------------


def _check_shapes(p: torch.Tensor, o: torch.Tensor, d: torch.Tensor) -> None:
    if p.dim() != 2 or o.dim() != 3 or d.dim() != 2:
        raise ValueError(f"expected p (N, n), o (N, n, d_out), d (N, d_out); got shapes {tuple(p.shape)}, "
                         f"{tuple(o.shape)}, {tuple(d.shape)}")
    if o.shape[:2] != p.shape or o.shape[0] != d.shape[0] or o.shape[2] != d.shape[1]:
        raise ValueError(f"shapes do not fit together: p {tuple(p.shape)}, o {tuple(o.shape)}, d {tuple(d.shape)}")
    if p.shape[0] == 0:
        raise ValueError("p, o and d hold no cases (N = 0): the mean error over no cases is undefined; give at "
                         "least one case")


def _squared_errors(o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """||d - o_i||^2 for every case and expert: (N, n)."""
    return (d.unsqueeze(1) - o).pow(2).sum(dim=-1)


def cooperative_loss(p: torch.Tensor, o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The cooperative error of Jacobs et al. (1991), eq. 1.1: E = ||d - sum_i p_i o_i||^2.

    ``p`` (N, n) gate probabilities, ``o`` (N, n, d_out) expert outputs, ``d`` (N, d_out) desired outputs.
    Returns the mean of E over the N cases (a scalar). Because the experts' outputs are added up before
    the comparison, each expert's gradient depends on what all the others output: they cooperate.
    """
    _check_shapes(p, o, d)
    blended = (p.unsqueeze(-1) * o).sum(dim=1)
    return (d - blended).pow(2).sum(dim=-1).mean()


def weighted_squared_error(p: torch.Tensor, o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The paper's intermediate error (eq. 1.2): E = sum_i p_i ||d - o_i||^2, averaged over the cases.

    Each expert is compared with the target on its own (so they compete), but the paper shows that the
    gradient of the negative log-likelihood (eq. 1.3, :func:`competitive_loss`) works better in practice.
    """
    _check_shapes(p, o, d)
    return (p * _squared_errors(o, d)).sum(dim=-1).mean()


def competitive_loss(p: torch.Tensor, o: torch.Tensor, d: torch.Tensor, log_p: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """The competitive error of Jacobs et al. (1991), eq. 1.3: E = -log sum_i p_i exp(-1/2 ||d - o_i||^2).

    ``p`` (N, n) gate probabilities, ``o`` (N, n, d_out) expert outputs, ``d`` (N, d_out) desired outputs.
    Returns the **mean** of E over the N cases (a scalar). It is computed stably as
    ``-logsumexp_i(log p_i - 1/2 ||d - o_i||^2)``, so large errors do not underflow ``exp`` to 0 (which would
    make the loss ``inf``). Pass ``log_p`` (e.g. ``MixtureOutput.log_p``) when you have it; otherwise
    ``log p`` is taken from ``p`` (a probability of exactly 0 then contributes nothing, as it should).
    """
    _check_shapes(p, o, d)
    if log_p is None:
        log_p = p.clamp_min(torch.finfo(p.dtype).tiny).log()
    return -torch.logsumexp(log_p - 0.5 * _squared_errors(o, d), dim=-1).mean()


def responsibilities(p: torch.Tensor, o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The posterior probability h_i that expert i generated case c (N, n); rows sum to 1.

    h_i = p_i exp(-1/2 ||d - o_i||^2) / sum_j p_j exp(-1/2 ||d - o_j||^2). The gradient of the competitive
    loss with respect to o_i is -h_i (d - o_i): each expert is pulled towards the target in proportion to
    how much it is held responsible for the case.
    """
    _check_shapes(p, o, d)
    log_p = p.clamp_min(torch.finfo(p.dtype).tiny).log()
    return (log_p - 0.5 * _squared_errors(o, d)).softmax(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Baseline and training
# ----------------------------------------------------------------------------------------------------------


def matched_mlp(n_params: int | nn.Module, d_in: int, d_out: int, seed: int | None = None
                ) -> tuple[nn.Module, int]:
    """A single one-hidden-layer tanh network with (about) ``n_params`` parameters, and its exact count.

    ``n_params`` may be a module (e.g. a :class:`MixtureOfLocalExperts`) whose parameter count is matched.
    The hidden width h is the one that brings h (d_in + d_out + 1) + d_out closest to the target.
    """
    target = count_params(n_params) if isinstance(n_params, nn.Module) else int(n_params)
    per_unit = d_in + d_out + 1
    if target < per_unit + d_out:
        raise ValueError(f"{target} parameters are too few for even one hidden unit ({per_unit + d_out} needed)")
    hidden = max(1, round((target - d_out) / per_unit))
    with _seeded(seed):
        net = mlp(d_in, d_out, hidden)
    return net, count_params(net)


@dataclass
class TrainHistory:
    """Per logged step: the training objective, and the MSE of the prediction on the training/test data."""

    loss_name: str
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    train_mse: list[float] = field(default_factory=list)
    test_mse: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


LOSSES = ("competitive", "cooperative", "weighted", "mse")


def _objective(model: nn.Module, x: torch.Tensor, d: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, prediction) for ``loss`` in :data:`LOSSES`."""
    if isinstance(model, MixtureOfLocalExperts):
        out = model(x)
        if loss == "competitive":
            return competitive_loss(out.p, out.o, d, log_p=out.log_p), out.y
        if loss == "cooperative":
            return cooperative_loss(out.p, out.o, d), out.y
        if loss == "weighted":
            return weighted_squared_error(out.p, out.o, d), out.y
        return (out.y - d).pow(2).sum(-1).mean(), out.y
    if loss != "mse":
        raise ValueError(f"loss={loss!r} needs a MixtureOfLocalExperts; a single network is trained with 'mse'")
    y = model(x)
    return (y - d).pow(2).sum(-1).mean(), y


@torch.no_grad()
def _mse(model: nn.Module, x: torch.Tensor, d: torch.Tensor) -> float:
    y = model(x).y if isinstance(model, MixtureOfLocalExperts) else model(x)
    return float((y - d).pow(2).sum(-1).mean())


def train_mixture(
    model: nn.Module,
    x: torch.Tensor,
    d: torch.Tensor,
    loss: str = "competitive",
    steps: int = 1500,
    lr: float = 0.02,
    gate_lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    x_test: torch.Tensor | None = None,
    d_test: torch.Tensor | None = None,
    log_every: int = 10,
    progress: bool = True,
) -> TrainHistory:
    """Train ``model`` with Adam on (x, d) and return its :class:`TrainHistory`.

    ``loss`` is ``"competitive"`` (eq. 1.3), ``"cooperative"`` (eq. 1.1), ``"weighted"`` (eq. 1.2) or
    ``"mse"`` (the mean squared error of the prediction; the only choice for a plain network).
    ``gate_lr`` gives the gating network its own learning rate (default: ``lr``).
    ``batch_size=None`` uses the whole training set at every step (deterministic); otherwise minibatches
    are drawn with a local generator seeded with ``seed``. Every ``log_every`` steps the history records
    the training loss and the MSE of the prediction on the training and (if given) test data, so that
    models trained with different objectives can be compared on one scale.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if steps < 1 or log_every < 1:
        raise ValueError(f"steps and log_every must be positive, got {steps} and {log_every}")
    device = next(model.parameters()).device
    x, d = x.to(device), d.to(device)
    if x_test is not None and d_test is not None:
        x_test, d_test = x_test.to(device), d_test.to(device)
    gen = torch.Generator().manual_seed(seed)
    if gate_lr is not None and isinstance(model, MixtureOfLocalExperts):
        groups = [{"params": model.experts.parameters(), "lr": lr},
                  {"params": model.gate.parameters(), "lr": gate_lr}]
    else:
        groups = [{"params": model.parameters(), "lr": lr}]
    opt = torch.optim.Adam(groups)
    history = TrainHistory(loss_name=loss)
    with cpu_threads(1) if device.type == "cpu" else nullcontext():  # tiny tensors: one thread is fastest
        start = time.perf_counter()
        model.train()
        for step in tqdm(range(1, steps + 1), desc=f"train ({loss})", disable=not progress, leave=False):
            if batch_size is None or batch_size >= len(x):
                xb, db = x, d
            else:
                idx = torch.randint(len(x), (batch_size,), generator=gen).to(device)
                xb, db = x[idx], d[idx]
            value, _ = _objective(model, xb, db, loss)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            if step % log_every == 0 or step == steps or step == 1:
                history.step.append(step)
                history.loss.append(float(value.detach()))
                history.train_mse.append(_mse(model, x, d))
                if x_test is not None and d_test is not None:
                    history.test_mse.append(_mse(model, x_test, d_test))
        model.eval()
        history.seconds = time.perf_counter() - start
    return history


# ----------------------------------------------------------------------------------------------------------
# Specialisation metrics
# ----------------------------------------------------------------------------------------------------------


def confident_fraction(p: torch.Tensor, threshold: float = 0.9) -> float:
    """Fraction of inputs whose largest gate probability exceeds ``threshold`` (the gate picks one expert)."""
    return float((p.max(dim=-1).values > threshold).double().mean())


def expert_regions(p: torch.Tensor) -> torch.Tensor:
    """Each input's region: the expert with the largest gate probability (N,), int64."""
    return p.argmax(dim=-1)


def expert_region_mse(p: torch.Tensor, o: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each expert i: (MSE of o_i on its own region, MSE of o_i on every other input), both (n,).

    An expert that has specialised is accurate on its own region and bad elsewhere; a blending expert is
    mediocre everywhere. An empty region (or an expert that owns everything) gives ``nan``.
    """
    _check_shapes(p, o, d)
    err = _squared_errors(o, d).detach()  # (N, n)
    owner = expert_regions(p)
    n = p.shape[1]
    own = torch.full((n,), float("nan"), dtype=torch.float64)
    other = torch.full((n,), float("nan"), dtype=torch.float64)
    for i in range(n):
        mine = owner == i
        if mine.any():
            own[i] = err[mine, i].double().mean()
        if (~mine).any():
            other[i] = err[~mine, i].double().mean()
    return own, other


def partition_purity(p: torch.Tensor, regimes: torch.Tensor) -> float:
    """How well the gate's partition matches the true regimes, in [0, 1].

    Each expert's region votes for its most common true regime; purity is the fraction of inputs that
    belong to the majority regime of their region: sum_k max_r |region k and regime r| / N. It is 1 when
    every region lies inside one regime, and the share of the largest regime when one expert takes all.
    """
    owner = expert_regions(p).cpu()
    regimes = regimes.cpu().long()
    if owner.shape != regimes.shape:
        raise ValueError(f"p has {owner.shape[0]} rows but regimes has shape {tuple(regimes.shape)}")
    n_regimes = int(regimes.max()) + 1
    table = torch.zeros(p.shape[1], n_regimes, dtype=torch.long)
    table.index_put_((owner, regimes), torch.ones_like(owner), accumulate=True)
    return float(table.max(dim=1).values.sum()) / len(owner)


@dataclass
class SpecialisationReport:
    """The numbers of notebook 01 for one trained mixture (see :func:`specialisation_report`)."""

    confident: float  # fraction of inputs with max gate probability > threshold
    purity: float  # agreement of the gate's partition with the true regimes
    own_mse: list[float]  # per expert, MSE on its own region
    other_mse: list[float]  # per expert, MSE elsewhere
    region_share: list[float]  # per expert, fraction of inputs in its region
    mse: float  # MSE of the mixture prediction sum_i p_i o_i
    top1_mse: float  # MSE when each input uses only the output of its top-gated expert
    mean_max_gate: float  # average of the largest gate probability

    def rows(self) -> list[tuple[str, str]]:
        """(metric, value) pairs, rounded to 3 decimals, ready to print."""
        fmt = ", ".join
        return [
            ("max gate > 0.9", f"{self.confident:.3f}"),
            ("mean max gate", f"{self.mean_max_gate:.3f}"),
            ("regime purity", f"{self.purity:.3f}"),
            ("region share", fmt(f"{v:.2f}" for v in self.region_share)),
            ("MSE own region", fmt(_fmt(v) for v in self.own_mse)),
            ("MSE elsewhere", fmt(_fmt(v) for v in self.other_mse)),
            ("mixture MSE", f"{self.mse:.3f}"),
            ("top-1 expert MSE", f"{self.top1_mse:.3f}"),
        ]


def _fmt(v: float) -> str:
    return "  -  " if v != v else f"{v:.3f}"


@torch.no_grad()
def specialisation_report(model: MixtureOfLocalExperts, x: torch.Tensor, d: torch.Tensor, regimes: torch.Tensor,
                          threshold: float = 0.9) -> SpecialisationReport:
    """Evaluate ``model`` on (x, d) and compute every specialisation metric at once.

    Besides the metrics of :func:`confident_fraction`, :func:`partition_purity` and
    :func:`expert_region_mse`, it reports two errors of prediction: the mixture's blended output
    sum_i p_i o_i, and the output of the single expert with the largest gate (what a sparse top-1 model
    would compute). The second is only good when each expert is right on its own region.
    """
    device = next(model.parameters()).device
    out = model(x.to(device))
    p, o, d = out.p.cpu(), out.o.cpu(), d.cpu()
    own, other = expert_region_mse(p, o, d)
    owner = expert_regions(p)
    share = torch.bincount(owner, minlength=p.shape[1]).double() / len(p)
    top1 = o[torch.arange(len(o)), owner]  # (N, d_out): the output of each input's top expert
    return SpecialisationReport(
        confident=confident_fraction(p, threshold),
        purity=partition_purity(p, regimes),
        own_mse=own.tolist(),
        other_mse=other.tolist(),
        region_share=share.tolist(),
        mse=float((out.y.cpu() - d).pow(2).sum(-1).mean()),
        top1_mse=float((top1 - d).pow(2).sum(-1).mean()),
        mean_max_gate=float(p.max(dim=-1).values.mean()),
    )
