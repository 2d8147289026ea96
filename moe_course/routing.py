"""Routers (notebook 03 onwards): which k experts does each token go to, and with what weight?

Three scoring rules from the papers:

* softmax over all experts, keep the top k, renormalise over them (Mixtral; equal to a softmax over the k
  largest logits). Without renormalisation: Switch Transformer (k = 1); Qwen's MoE configs expose this
  choice as ``norm_topk_prob`` (the Hugging Face class defaults to False, the released Qwen3 MoE models set True).
* sigmoid scores per expert, top-k chosen on ``score + bias`` but weighted by the plain score, renormalised
  (DeepSeek-V3; the bias is the auxiliary-loss-free balancing term of notebook 06).
* noisy top-k gating (Shazeer et al. 2017): H = x·W_g + ε·softplus(x·W_noise), keep the top k, softmax.

Routers are small modules with one contract, ``router(x (T, d), token_ids (T,) | None) -> routing``:
:class:`TopKRouter` (token choice, with DeepSeek-V3's group-limited selection), :class:`ExpertChoiceRouter`
(each expert picks its tokens; Zhou et al. 2022) and :class:`HashRouter` (a fixed hash of the token id;
Roller et al. 2021). Every routing record counts its assignments per expert (``counts``); the expert-choice
record also lists them sorted by expert (``sorted_assignments``), since its dispatch differs from token choice's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from moe_course.validate import check_int


def count_per_expert(expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(N,) long: how many entries of ``expert_ids`` name each expert (``torch.bincount`` with minlength N).

    Added up with ``scatter_add_`` into N zeros rather than with ``bincount``, which on a GPU first copies the
    largest id to the host to size its output: a sync in every layer. The counts are the same integers.
    """
    ids = expert_ids.reshape(-1).long()  # scatter_add_ indexes with int64
    return torch.zeros(n_experts, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


@dataclass
class Assignments:
    """(token, expert, weight) triples sorted by expert: the layout grouped GEMM and all-to-all use."""

    token: torch.Tensor  # (A,) token id of each assignment, grouped by expert
    weight: torch.Tensor  # (A,) combine weight of each assignment
    counts: torch.Tensor  # (N,) assignments per expert; expert e owns rows counts[:e].sum() ...


@dataclass
class Routing:
    """What a token-choice router decided for a batch of T tokens over N experts."""

    weights: torch.Tensor  # (T, k) combine weights of the chosen experts
    indices: torch.Tensor  # (T, k) chosen expert ids; column 0 is each token's first choice
    logits: torch.Tensor  # (T, N) raw router logits (for the z-loss)
    scores: torch.Tensor  # (T, N) per-expert probabilities/affinities (for balancing losses, metrics)

    def counts(self, n_experts: int) -> torch.Tensor:
        """Assignments per expert (N,), counting each of a token's k choices (no host sync on a GPU)."""
        return count_per_expert(self.indices, n_experts)

    def detach(self) -> Routing:
        """A copy without autograd history, for logging."""
        return Routing(self.weights.detach(), self.indices.detach(), self.logits.detach(), self.scores.detach())


@dataclass
class ExpertChoiceRouting:
    """What an expert-choice router decided: each of N experts took c tokens (Zhou et al. 2022)."""

    weights: torch.Tensor  # (N, c) gate value of each chosen token
    token_ids: torch.Tensor  # (N, c) which tokens expert e took
    logits: torch.Tensor  # (T, N)
    scores: torch.Tensor  # (T, N) softmax over experts, per token

    def counts(self, n_experts: int) -> torch.Tensor:
        """Assignments per expert: c for every expert, by construction."""
        return torch.full((n_experts,), self.token_ids.shape[1], dtype=torch.long, device=self.token_ids.device)

    def experts_per_token(self) -> torch.Tensor:
        """(T,) how many experts processed each token (0 is possible: that token skips the layer)."""
        return torch.bincount(self.token_ids.reshape(-1), minlength=self.scores.shape[0])

    def sorted_assignments(self, n_experts: int) -> Assignments:
        """Already grouped by expert: row e of ``token_ids`` is expert e's slice."""
        return Assignments(token=self.token_ids.reshape(-1), weight=self.weights.reshape(-1),
                           counts=self.counts(n_experts))

    def detach(self) -> ExpertChoiceRouting:
        """A copy without autograd history, for logging."""
        return ExpertChoiceRouting(self.weights.detach(), self.token_ids.detach(), self.logits.detach(),
                                   self.scores.detach())


def _check_k(k: int, n_experts: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"top-k must be an int, got {type(k).__name__} {k!r}; pass e.g. k=2")
    if not 1 <= k <= n_experts:
        raise ValueError(
            f"top-k must be between 1 and the number of experts ({n_experts}), got k={k}; "
            "lower k or add experts"
        )


def _check_2d(name: str, t: object) -> None:
    """Scores, logits and the like are (T, N): one row per token, one column per expert."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (T, N), got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (T tokens, N experts), got shape {tuple(t.shape)}; flatten a batch "
                         f"with {name}.reshape(-1, {name}.shape[-1]) or give one token as {name}[None]")


def _check_bias(bias: object, scores: torch.Tensor) -> None:
    t, n = scores.shape
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor of shape ({n},) or ({t}, {n}), got {type(bias).__name__}")
    if bias.dim() not in (1, 2) or bias.shape[-1] != n or (bias.dim() == 2 and bias.shape[0] not in (1, t)):
        raise ValueError(f"bias must have shape ({n},) (one value per expert) or ({t}, {n}) (one row per token), "
                         f"got {tuple(bias.shape)}; give one bias per expert of the scores")


def _check_groups(n_experts: int, k: int, n_groups: object, topk_groups: object) -> None:
    """Group-limited routing: n_groups divides N, 1 <= topk_groups <= n_groups, and k fits in the kept groups."""
    check_int("n_groups", n_groups, 1)
    check_int("topk_groups", topk_groups, 1)
    if n_experts % n_groups:
        raise ValueError(f"n_groups={n_groups} must divide the number of experts {n_experts}; pick a divisor")
    if topk_groups > n_groups:
        raise ValueError(f"topk_groups must be between 1 and n_groups={n_groups}, got {topk_groups}")
    if k > topk_groups * (n_experts // n_groups):
        raise ValueError(f"k={k} experts cannot fit in topk_groups={topk_groups} groups of {n_experts // n_groups} "
                         "experts; raise topk_groups or lower k")


def select_topk(
    scores: torch.Tensor, k: int, bias: torch.Tensor | None = None, renormalize: bool = True,
    n_groups: int = 1, topk_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the k experts with the largest ``scores + bias``; weight them by the plain scores.

    scores: (T, N) probabilities or affinities -> weights (T, k), indices (T, k). The bias (N,) or (T, N) only
    changes *which* experts are chosen; ``n_groups > 1`` first keeps each token's ``topk_groups`` best groups.
    The one selection rule behind :func:`softmax_topk`, :func:`sigmoid_topk` and :class:`TopKRouter`.
    """
    _check_2d("scores", scores)
    _check_k(k, scores.shape[-1])
    if bias is not None:
        _check_bias(bias, scores)
    _check_groups(scores.shape[-1], k, n_groups, topk_groups)
    choice = scores if bias is None else scores + bias
    if n_groups > 1:
        choice = choice.masked_fill(group_limited_mask(choice, n_groups, topk_groups, bias is not None), -torch.inf)
    indices = choice.topk(k, dim=-1).indices
    weights = scores.gather(-1, indices)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def softmax_topk(
    logits: torch.Tensor, k: int, renormalize: bool = True, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, keep the k largest, optionally renormalise them to sum to 1.

    logits: (T, N) -> weights (T, k), indices (T, k). A ``bias`` (N,) shifts only which experts are
    chosen (top-k of ``probs + bias``); the weights stay the plain probabilities.
    """
    _check_2d("logits", logits)
    _check_k(k, logits.shape[-1])
    return select_topk(logits.softmax(dim=-1), k, bias, renormalize)


def group_limited_mask(choice: torch.Tensor, n_groups: int, topk_groups: int, biased: bool) -> torch.Tensor:
    """(T, N) bool: experts outside each token's ``topk_groups`` best groups (DeepSeek-V3 node-limited routing).

    Experts are split into ``n_groups`` contiguous groups; a group's score is the sum of its two highest
    (biased) scores, or its single highest score when there is no bias, as in DeepSeek-V3's reference ``Gate``.
    """
    _check_2d("choice", choice)
    check_int("n_groups", n_groups, 1)
    check_int("topk_groups", topk_groups, 1)
    t, n = choice.shape
    if n % n_groups:
        raise ValueError(f"n_groups={n_groups} must divide the number of experts {n}")
    if not 1 <= topk_groups <= n_groups:
        raise ValueError(f"topk_groups must be between 1 and n_groups={n_groups}, got {topk_groups}")
    grouped = choice.view(t, n_groups, n // n_groups)  # (T, G, N/G)
    if biased and n // n_groups >= 2:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (T, G)
    else:
        group_scores = grouped.amax(dim=-1)
    best = group_scores.topk(topk_groups, dim=-1).indices  # (T, topk_groups)
    outside = torch.ones(t, n_groups, dtype=torch.bool, device=choice.device).scatter(1, best, False)
    return outside.repeat_interleave(n // n_groups, dim=1)  # (T, N)


def sigmoid_topk(
    logits: torch.Tensor,
    k: int,
    bias: torch.Tensor | None = None,
    renormalize: bool = True,
    scale: float = 1.0,
    n_groups: int = 1,
    topk_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing: sigmoid affinities; choose top-k of ``score + bias``; weight by the score.

    The bias only changes *which* experts are chosen, never the weights (arXiv:2412.19437, eqs. 13-16).
    With ``n_groups > 1`` each token first keeps its ``topk_groups`` best expert groups (node-limited routing).
    """
    _check_2d("logits", logits)
    _check_k(k, logits.shape[-1])
    weights, indices = select_topk(logits.sigmoid(), k, bias, renormalize, n_groups, topk_groups)
    return weights * scale, indices


def noisy_topk_logits(
    clean: torch.Tensor, noise_logits: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """H = clean + ε·softplus(noise_logits) with ε ~ N(0, 1) (Shazeer et al. 2017, eq. 4)."""
    if noise_logits.shape != clean.shape:
        raise ValueError(f"noise_logits must have the shape of clean {tuple(clean.shape)} (one noise scale per "
                         f"token and expert), got {tuple(noise_logits.shape)}")
    eps = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    return clean + eps * F.softplus(noise_logits)


def keep_topk_softmax(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(KeepTopK(H, k)): logits outside the top k set to -inf before the softmax."""
    _check_2d("h", h)
    _check_k(k, h.shape[-1])
    top, indices = h.topk(k, dim=-1)
    return top.softmax(dim=-1), indices


class TopKRouter(nn.Module):
    """A linear router over N experts that keeps k per token (token choice).

    ``score``: "softmax" (Mixtral/Switch/Qwen) or "sigmoid" (DeepSeek-V3). ``noisy`` adds the trainable
    noise of Shazeer et al. (2017) while training. ``expert_bias`` (a buffer, zeros) shifts only the
    choice of experts; notebook 06 updates it to balance load without an auxiliary loss. ``n_groups`` /
    ``topk_groups`` limit each token to its best expert groups (DeepSeek-V3; sigmoid scores only).
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        k: int,
        score: str = "softmax",
        renormalize: bool = True,
        noisy: bool = False,
        n_groups: int = 1,
        topk_groups: int = 1,
    ) -> None:
        super().__init__()
        check_int("d_model", d_model, 1)
        check_int("n_experts", n_experts, 1)
        _check_k(k, n_experts)
        check_int("n_groups", n_groups, 1)
        check_int("topk_groups", topk_groups, 1)
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown router score {score!r}; use 'softmax' or 'sigmoid'")
        if n_groups < 1 or n_experts % n_groups:
            raise ValueError(f"n_groups={n_groups} must be a positive divisor of n_experts={n_experts}")
        if not 1 <= topk_groups <= n_groups:
            raise ValueError(f"topk_groups must be between 1 and n_groups={n_groups}, got {topk_groups}")
        if n_groups > 1 and score != "sigmoid":
            raise ValueError("group-limited routing (n_groups > 1) follows DeepSeek-V3: use score='sigmoid'")
        if k > topk_groups * (n_experts // n_groups):
            raise ValueError(f"k={k} experts cannot fit in topk_groups={topk_groups} groups of "
                             f"{n_experts // n_groups}; raise topk_groups")
        self.n_experts, self.k, self.score, self.renormalize = n_experts, k, score, renormalize
        self.n_groups, self.topk_groups = n_groups, topk_groups
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.noise = nn.Linear(d_model, n_experts, bias=False) if noisy else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)
        self.register_buffer("expert_bias", torch.zeros(n_experts))
        self.mask_top = 0  # evaluation knob: skip each token's mask_top best experts (DeepSeekMoE's redundancy test)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:  # x: (T, d)
        _check_tokens(x, self.gate.in_features)
        logits = self.gate(x)  # (T, N)
        if self.noise is not None and self.training:
            logits = noisy_topk_logits(logits, self.noise(x))
        bias = self.expert_bias
        if self.mask_top:
            if not 0 <= self.mask_top <= self.n_experts - self.k:
                raise ValueError(f"mask_top must be between 0 and n_experts - k = {self.n_experts - self.k}")
            masked = torch.zeros_like(logits).scatter(1, logits.topk(self.mask_top, dim=-1).indices, -torch.inf)
            bias = bias + masked  # (T, N): the masked experts can never be chosen; the weights are unchanged
        score = torch.sigmoid if self.score == "sigmoid" else partial(torch.softmax, dim=-1)
        weights, indices = select_topk(score(logits), self.k, bias, self.renormalize, self.n_groups, self.topk_groups)
        # The scores are a second node on purpose: sharing one would change the backward pass's summation order,
        # and the stored results in data/results would no longer reproduce bit for bit (re-run them to merge).
        scores = score(logits)  # (T, N)
        return Routing(weights=weights, indices=indices, logits=logits, scores=scores)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, k={self.k}, score={self.score!r}"


def _check_tokens(x: torch.Tensor, d_model: int) -> None:
    if x.dim() != 2 or x.shape[-1] != d_model:
        raise ValueError(f"router expects tokens of shape (T, {d_model}), got {tuple(x.shape)}")


def expert_choice(scores: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert takes its ``capacity`` highest-scoring tokens (Zhou et al. 2022, arXiv:2202.09368, eq. 1).

    scores: (T, N), a softmax over experts per token -> weights (N, c), token_ids (N, c): ``G, I = TopK(Sᵀ, c)``.
    """
    _check_2d("scores", scores)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= scores.shape[0]:
        raise ValueError(f"capacity must be an int between 1 and the number of tokens {scores.shape[0]}, "
                         f"got {capacity!r}")
    weights, token_ids = scores.t().topk(capacity, dim=-1)  # top tokens along the token axis, per expert
    return weights, token_ids


def _check_capacity_factor(capacity_factor: object) -> None:
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
        raise TypeError(f"capacity_factor must be a number, got {type(capacity_factor).__name__} "
                        f"{capacity_factor!r}; e.g. capacity_factor=2.0")
    if not math.isfinite(capacity_factor) or capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be a positive finite number, got {capacity_factor}")


def expert_choice_capacity(n_tokens: int, n_experts: int, capacity_factor: float) -> int:
    """Tokens per expert in expert choice: c = ceil(T · cf / N), at least 1 and at most T."""
    check_int("n_tokens", n_tokens, 1)
    check_int("n_experts", n_experts, 1)
    _check_capacity_factor(capacity_factor)
    return max(1, min(n_tokens, math.ceil(n_tokens * capacity_factor / n_experts)))


class ExpertChoiceRouter(nn.Module):
    """Expert choice routing: S = softmax(x·W_g) over experts; each expert takes its top-c tokens.

    Perfectly balanced by construction (every expert gets c = T·cf/N tokens), but a token may get zero or
    many experts, and the choice looks at the whole batch: in a causal LM a later token can change which
    experts an earlier token gets (the future leaks), so it is unfit for autoregressive decoding.
    """

    def __init__(self, d_model: int, n_experts: int, capacity_factor: float = 2.0) -> None:
        super().__init__()
        check_int("d_model", d_model, 1)
        check_int("n_experts", n_experts, 1)
        _check_capacity_factor(capacity_factor)
        self.n_experts, self.capacity_factor = n_experts, capacity_factor
        self.gate = nn.Linear(d_model, n_experts, bias=False)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> ExpertChoiceRouting:
        _check_tokens(x, self.gate.in_features)
        logits = self.gate(x)  # (T, N)
        scores = logits.softmax(dim=-1)
        capacity = expert_choice_capacity(x.shape[0], self.n_experts, self.capacity_factor)
        weights, chosen = expert_choice(scores, capacity)
        return ExpertChoiceRouting(weights=weights, token_ids=chosen, logits=logits, scores=scores)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, capacity_factor={self.capacity_factor}"


class HashRouter(nn.Module):
    """Hash layers (Roller et al. 2021, arXiv:2106.04426): a fixed random map token id -> k distinct experts.

    Nothing is learned, so it cannot collapse; balance follows the token frequencies. Weights are 1/k.
    It needs the token ids, which :class:`~moe_course.model.TinyLM` passes to layers that ask for them.
    """

    def __init__(self, n_experts: int, vocab_size: int, k: int = 1, seed: int = 0) -> None:
        super().__init__()
        check_int("n_experts", n_experts, 1)
        _check_k(k, n_experts)
        check_int("vocab_size", vocab_size, 1)
        self.n_experts, self.k = n_experts, k
        gen = torch.Generator().manual_seed(seed)
        table = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(vocab_size)])
        self.register_buffer("table", table)  # (vocab, k) expert ids of each token id

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        if token_ids is None:
            raise ValueError("HashRouter routes by token id: call the layer with token_ids=... "
                             "(TinyLM passes them automatically)")
        ids = token_ids.reshape(-1)
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"token_ids has {ids.shape[0]} entries for {x.shape[0]} tokens")
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"token_ids must be integer token ids (torch.long), got dtype {ids.dtype}")
        vocab = self.table.shape[0]
        if ids.device.type == "cpu" and ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab):
            # checked on the CPU only: on a GPU the check would wait for the device (a sync per layer and step)
            raise ValueError(f"token_ids must lie in [0, vocab_size={vocab}), got {int(ids.min())}..{int(ids.max())}; "
                             "build the router (or ModelConfig) with a vocab_size that covers every token id")
        indices = self.table[ids]  # (T, k)
        weights = torch.full(indices.shape, 1.0 / self.k, dtype=x.dtype, device=x.device)
        scores = torch.zeros(x.shape[0], self.n_experts, dtype=x.dtype, device=x.device)
        scores = scores.scatter(1, indices, 1.0 / self.k)  # (T, N): the fixed routing as a distribution
        return Routing(weights=weights, indices=indices, logits=scores, scores=scores)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, k={self.k}, vocab_size={self.table.shape[0]}"
