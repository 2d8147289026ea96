"""What trained experts do (notebooks 05 and 08): redundancy (mask each token's best experts), similarity, and
specialisation by token type.

* **Redundancy** (DeepSeekMoE §4.5, arXiv:2401.06066): at evaluation, skip each token's ``m`` best routed experts
  (``TopKRouter.mask_top``; the next-best take their place) and measure how much the loss rises. If other
  experts hold the same knowledge, the loss barely moves; the paper finds that its fine-grained experts are
  less redundant: masking hurts DeepSeekMoE more than GShard.
* **Similarity**: the mean cosine similarity between the outputs of every pair of routed experts on the same
  inputs (the layer's real inputs, captured with a hook). Outputs, not weights: a SwiGLU's hidden units can
  be permuted without changing it, so two equal experts can have dissimilar weight matrices.
* **Specialisation**: route validation text and count, per MoE layer, each token's first-choice expert by the
  Python token type of the byte (:class:`~moe_course.corpus.TokenType`). The mutual information I(type;
  expert) measures how much the expert tells about the type; a *random-router baseline* (the same expert
  choices shuffled across tokens, so the same loads) gives what chance alone produces with this many tokens.
* **Against the byte**: in a byte-level model the type is largely a function of the byte itself (a space is
  whitespace, ``d`` is mostly a name), so a router that only looked at the byte would already score a high
  I(type; expert). :func:`byte_routing_tables` keeps the input byte too; :func:`specialisation_by_byte` gives
  I(type; byte), I(type; expert | byte) (what the expert tells about the type *beyond* the byte: context) and
  the *byte-lookup router* (every byte value sent to its most common expert), the baseline a router must beat
  to show more than a byte lookup.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from moe_course.routing import TopKRouter
from moe_course.train import evaluate_text
from moe_course.validate import check_int

__all__ = [
    "byte_lookup_table",
    "byte_routing_tables",
    "conditional_mutual_information",
    "expert_output_similarity",
    "mask_top_experts",
    "mutual_information",
    "probe",
    "random_router_table",
    "redundancy",
    "shared_as_routed",
    "shuffled_within_bytes",
    "routing_tables",
    "shared_output_share",
    "specialisation",
    "specialisation_by_byte",
    "type_expert_table",
]


def _check_data(data: torch.Tensor, block_size: int, types: torch.Tensor | None = None) -> None:
    """``data`` is a 1-D token sequence longer than one window; ``types`` (if given) labels each of its tokens."""
    if not isinstance(data, torch.Tensor) or data.dim() != 1:
        got = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"data must be a 1-D tensor of token ids (e.g. corpus.val), got {got}")
    if len(data) <= block_size:
        raise ValueError(f"data has {len(data)} tokens, need more than block_size={block_size} for one window")
    if types is not None and (not isinstance(types, torch.Tensor) or types.shape != data.shape):
        got = tuple(types.shape) if isinstance(types, torch.Tensor) else type(types).__name__
        raise ValueError(f"types must label every token of data (shape {tuple(data.shape)}), got {got}; pass "
                         "the labels that belong to data, e.g. corpus.val with corpus.val_types")


def _routers(model: torch.nn.Module) -> list[TopKRouter]:
    return [m for m in model.modules() if isinstance(m, TopKRouter)]


@contextlib.contextmanager
def mask_top_experts(model: torch.nn.Module, m: int) -> Iterator[torch.nn.Module]:
    """Within the block, every top-k router of ``model`` skips each token's ``m`` best experts."""
    check_int("m", m, 0)
    routers = _routers(model)
    if m and not routers:
        raise ValueError("mask_top_experts needs a model with top-k routers (a dense model has none)")
    spare = min((r.n_experts - r.k for r in routers), default=0)
    if m > spare:
        raise ValueError(f"m={m} masks too many experts: with N experts and top-k, at most N - k = {spare} can be "
                         "skipped (k must remain to choose from); lower m")
    old = [r.mask_top for r in routers]
    try:
        for r in routers:
            r.mask_top = m
        yield model
    finally:
        for r, value in zip(routers, old, strict=True):
            r.mask_top = value


def redundancy(model: torch.nn.Module, data: torch.Tensor, masks: tuple[int, ...] = (1,),
               batch_size: int = 16) -> dict[str, float]:
    """Loss on the whole of ``data`` with nothing masked (``"base"``) and with each token's top-``m`` experts
    skipped (``"mask_m"``; the next-ranked experts take their place, as in DeepSeekMoE §4.5).

    Masks that a layer cannot take (m > N − k: too few experts left to choose k) are left out.
    """
    for m in masks:
        check_int("masks", m, 0)
    check_int("batch_size", batch_size, 1)
    _check_data(data, model.cfg.block_size)
    out = {"base": evaluate_text(model, data, batch_size)}
    spare = min((r.n_experts - r.k for r in _routers(model)), default=0)
    for m in (m for m in masks if m <= spare):
        with mask_top_experts(model, m):
            out[f"mask_{m}"] = evaluate_text(model, data, batch_size)
    return out


@contextlib.contextmanager
def shared_as_routed(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, each MoE layer drops its shared experts and routes each token to that many more experts.

    DeepSeekMoE's direct test of shared-expert isolation (arXiv:2401.06066 §4.5): if the shared expert only
    duplicated what routed experts know, one more routed expert per token would replace it at no cost.
    """
    layers = [layer for layer in model.moe_layers() if getattr(layer, "shared", None) is not None]
    if not layers:
        raise ValueError("shared_as_routed needs a model with shared experts (ModelConfig.n_shared >= 1)")
    saved = [(layer.shared, layer.top_k, layer.router.k) for layer in layers]
    for layer in layers:
        extra = model.cfg.n_shared
        if layer.router.k + extra > layer.n_experts:
            raise ValueError(f"the layer has {layer.n_experts} routed experts, too few to route "
                             f"{layer.router.k} + {extra} per token")
    try:
        for layer in layers:
            layer.shared, layer.top_k, layer.router.k = None, layer.top_k + model.cfg.n_shared, \
                layer.router.k + model.cfg.n_shared
        yield model
    finally:
        for layer, (shared, top_k, k) in zip(layers, saved, strict=True):
            layer.shared, layer.top_k, layer.router.k = shared, top_k, k


def _windows(data: torch.Tensor, types: torch.Tensor, batch_size: int, block_size: int,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows x (B, T) of ``data`` and the token type of each *input* byte (B, T)."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=gen)
    index = starts[:, None] + torch.arange(block_size)
    return data[index].long(), types[index].long()


def type_expert_table(types: torch.Tensor, indices: torch.Tensor, n_types: int, n_experts: int,
                      first_choice_only: bool = True) -> torch.Tensor:
    """(n_types, n_experts) counts: row = token type, column = expert, one count per token's first choice.

    ``types``: (T,) type label of each token; ``indices``: (T, k) its chosen experts, column 0 the first
    choice. With ``first_choice_only=False`` each of the k choices counts once. Types or experts that never
    occur keep their (zero) row or column, so tables of different batches add up.
    """
    check_int("n_types", n_types, 1)
    check_int("n_experts", n_experts, 1)
    for name, t in (("types", types), ("indices", indices)):
        if not isinstance(t, torch.Tensor) or t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be an integer tensor (torch.long), got {got}")
    if types.dim() != 1 or indices.dim() != 2 or indices.shape[0] != types.shape[0]:
        raise ValueError(f"types must be (T,) and indices (T, k) with the same T, got types {tuple(types.shape)} "
                         f"and indices {tuple(indices.shape)}")
    if types.numel() and not (0 <= int(types.min()) and int(types.max()) < n_types):
        raise ValueError(f"types must lie in [0, n_types={n_types}), got {int(types.min())}..{int(types.max())}")
    if indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < n_experts):
        raise ValueError(f"indices must lie in [0, n_experts={n_experts}), got "
                         f"{int(indices.min())}..{int(indices.max())}")
    chosen = (indices[:, :1] if first_choice_only else indices).long()  # (T, 1) or (T, k)
    rows = types.to(chosen.device).long()[:, None].expand_as(chosen)  # (T, 1) or (T, k)
    cells = (rows * n_experts + chosen).reshape(-1)
    return torch.bincount(cells, minlength=n_types * n_experts).reshape(n_types, n_experts)


def _check_routing_args(model: torch.nn.Module, data: torch.Tensor, types: torch.Tensor, n_types: int,
                        batch_size: int, n_batches: int) -> None:
    check_int("n_types", n_types, 1)
    check_int("batch_size", batch_size, 1)
    check_int("n_batches", n_batches, 1)
    _check_data(data, model.cfg.block_size, types)


def _routed_windows(model: torch.nn.Module, data: torch.Tensor, types: torch.Tensor, batch_size: int,
                    n_batches: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[torch.nn.Module]]]:
    """Route ``n_batches`` fixed random windows of ``data`` in eval mode: (x, types of x, MoE layers) after each."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    layers = model.moe_layers()
    with _eval_mode(model):
        for _ in range(n_batches):
            x, t = _windows(data, types, batch_size, model.cfg.block_size, gen)
            model(x.to(device))
            yield x, t, layers


@torch.no_grad()
def byte_routing_tables(model: torch.nn.Module, data: torch.Tensor, types: torch.Tensor, n_types: int,
                        batch_size: int = 16, n_batches: int = 4, seed: int = 1234) -> list[torch.Tensor]:
    """Per MoE layer, a (256, n_types, N) count table: tokens by input byte, token type and first-choice expert.

    The same windows as :func:`routing_tables` (same ``seed``), so ``table.sum(0)`` is its (n_types, N) table.
    """
    _check_routing_args(model, data, types, n_types, batch_size, n_batches)
    tables = [torch.zeros(256 * n_types, layer.n_experts, dtype=torch.long) for layer in model.moe_layers()]
    for x, t, layers in _routed_windows(model, data, types, batch_size, n_batches, seed):
        rows = x.reshape(-1) * n_types + t.reshape(-1)  # (B*T,) one row per (byte, type)
        for table, layer in zip(tables, layers, strict=True):
            table += type_expert_table(rows, layer.last_routing.indices.cpu(), 256 * n_types, layer.n_experts)
    return [t.reshape(256, n_types, -1) for t in tables]


def _check_table3(table: Any, name: str = "table") -> None:
    if not isinstance(table, torch.Tensor) or table.dim() != 3:
        got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"{name} must be a 3-D tensor of counts (byte x type x expert), e.g. from "
                         f"byte_routing_tables, got {got}")
    _check_table(table.reshape(table.shape[0], -1), name)
    if not table.sum() > 0:
        raise ValueError(f"{name} is empty (its counts sum to 0): route some text first")


def conditional_mutual_information(table: torch.Tensor) -> float:
    """I(type; expert | byte) in bits of a (byte, type, expert) count table: Σ_b p(b) I(type; expert | B = b).

    What the expert choice tells about the token type once the byte is known: zero for any router that looks
    only at the byte, whatever its I(type; expert).
    """
    _check_table3(table)
    total = table.sum()
    out = 0.0
    for row in table:  # row: (n_types, N) table of one byte value
        n = row.sum()
        if n > 0:
            out += float(n / total) * mutual_information(row)
    return out


def byte_lookup_table(table: torch.Tensor) -> torch.Tensor:
    """The (n_types, N) table of a *byte-lookup router*: every token of a byte value goes to that byte's most
    common first-choice expert in ``table`` (byte, type, expert), the best a router blind to context can copy."""
    _check_table3(table)
    per_byte = table.sum(dim=1)  # (256, N) tokens of each byte at each expert
    best = per_byte.argmax(dim=1)  # (256,) the byte's most common expert (lowest index on ties)
    by_type = table.sum(dim=2)  # (256, n_types) tokens of each byte and type
    out = torch.zeros(table.shape[1], table.shape[2], dtype=torch.long)
    out.index_add_(1, best, by_type.T.contiguous())  # column best[b] gets byte b's tokens of every type
    return out


def shuffled_within_bytes(table: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``table`` (byte, type, expert) with the expert choices shuffled among the tokens of each byte value: the
    same byte-by-expert loads, no use of context; its I(type; expert | byte) is what chance gives this many tokens
    (the plug-in estimate is biased upward on small counts)."""
    _check_table3(table)
    out = torch.zeros_like(table)
    for b, row in enumerate(table):
        if row.sum() > 0:
            out[b] = random_router_table(row, seed + b)
    return out


def specialisation_by_byte(tables: list[torch.Tensor], seed: int = 0,
                           whitespace: tuple[int, ...] = (9, 10, 13, 32)) -> dict[str, Any]:
    """Per layer of (byte, type, expert) tables: I(type; expert) against the random router's and the byte-lookup
    router's, I(type; expert | byte) against its within-byte shuffle; and, for the routed text, I(type; byte) and
    I(type; is-whitespace) (a "router" that knows only whether the byte is a space, tab or newline). In bits."""
    for i, t in enumerate(tables):
        _check_table3(t, f"tables[{i}]")
    if not tables:
        raise ValueError("tables is empty: pass one (byte, type, expert) table per MoE layer")
    flat = [t.sum(dim=0) for t in tables]  # (n_types, N) each
    by_byte = tables[0].sum(dim=2)  # (256, n_types), the same text in every layer
    is_ws = torch.zeros(by_byte.shape[0], dtype=torch.bool)
    is_ws[list(whitespace)] = True
    ws = torch.stack([by_byte[~is_ws].sum(0), by_byte[is_ws].sum(0)], dim=1)  # (n_types, 2)
    return {
        "mi": [mutual_information(t) for t in flat],
        "mi_given_byte": [conditional_mutual_information(t) for t in tables],
        "mi_byte_lookup": [mutual_information(byte_lookup_table(t)) for t in tables],
        "mi_random": [mutual_information(random_router_table(t, seed)) for t in flat],
        "mi_given_byte_random": [conditional_mutual_information(shuffled_within_bytes(t, seed)) for t in tables],
        "mi_type_byte": mutual_information(by_byte),
        "mi_type_whitespace": mutual_information(ws),
    }


@torch.no_grad()
def routing_tables(model: torch.nn.Module, data: torch.Tensor, types: torch.Tensor, n_types: int,
                   batch_size: int = 16, n_batches: int = 4, seed: int = 1234) -> list[torch.Tensor]:
    """Per MoE layer, a (n_types, N) count table: tokens of each type whose *first choice* is each expert."""
    _check_routing_args(model, data, types, n_types, batch_size, n_batches)
    tables = [torch.zeros(n_types, layer.n_experts, dtype=torch.long) for layer in model.moe_layers()]
    for _, t, layers in _routed_windows(model, data, types, batch_size, n_batches, seed):
        for table, layer in zip(tables, layers, strict=True):
            table += type_expert_table(t.reshape(-1), layer.last_routing.indices.cpu(), n_types, layer.n_experts)
    return tables


def _check_table(table: torch.Tensor, name: str = "table") -> None:
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"{name} must be a 2-D tensor of counts (rows x columns), got {got}")
    if table.numel() and bool((table < 0).any()):
        raise ValueError(f"{name} must hold counts >= 0, got a minimum of {table.min().item()}")


def mutual_information(table: torch.Tensor) -> float:
    """I(row; column) in bits of a contingency table of counts: Σ p(r,c) log2 p(r,c) / (p(r) p(c))."""
    _check_table(table)
    if not table.sum() > 0:
        raise ValueError("table is empty (its counts sum to 0): I(row; column) needs at least one count")
    p = table.double() / table.sum()
    pr, pc = p.sum(dim=1, keepdim=True), p.sum(dim=0, keepdim=True)
    nz = p > 0
    return float((p[nz] * torch.log2(p[nz] / (pr * pc)[nz])).sum())


def _entropy_bits(counts: torch.Tensor) -> float:
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum())


def random_router_table(table: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The table a router blind to token type would give: the same tokens and expert loads, choices shuffled."""
    if isinstance(table, torch.Tensor) and (table.dtype == torch.bool or table.is_floating_point()
                                            or table.is_complex()):
        raise TypeError(f"table must hold integer counts (torch.long), got dtype {table.dtype}; e.g. "
                        "torch.tensor(counts) of a list of int lists")
    _check_table(table)
    rows = torch.repeat_interleave(torch.arange(table.shape[0]), table.sum(dim=1))
    cols = torch.repeat_interleave(torch.arange(table.shape[1]), table.sum(dim=0))
    perm = torch.randperm(len(cols), generator=torch.Generator().manual_seed(seed))
    out = torch.zeros_like(table)
    out.index_put_((rows, cols[perm]), torch.ones_like(rows), accumulate=True)
    return out


def specialisation(tables: list[torch.Tensor], seed: int = 0) -> dict[str, list[float]]:
    """Per layer: I(type; expert) in bits, the random-router baseline, and I / H(type) (share of the type's entropy)."""
    for i, t in enumerate(tables):
        _check_table(t, f"tables[{i}]")
        if int((t.sum(dim=1) > 0).sum()) < 2:
            raise ValueError(f"tables[{i}] has tokens of fewer than 2 types: H(type) = 0, so I / H(type) is "
                             "undefined; route text with several token types")
    mi = [mutual_information(t) for t in tables]
    base = [mutual_information(random_router_table(t, seed)) for t in tables]
    h_type = [_entropy_bits(t.sum(dim=1)) for t in tables]
    return {"mi": mi, "mi_random": base, "mi_over_h_type": [i / h for i, h in zip(mi, h_type, strict=True)]}


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with ``model`` in eval mode, then restore its training flag."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _layer_inputs(model: torch.nn.Module, data: torch.Tensor, n_tokens: int, seed: int) -> list[torch.Tensor]:
    """The (T, d) input of every MoE layer on fixed random windows of ``data`` (about ``n_tokens`` tokens)."""
    block = model.cfg.block_size
    check_int("n_tokens", n_tokens, 1)
    _check_data(data, block)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(data) - block, (max(1, n_tokens // block),), generator=gen)
    x = data[starts[:, None] + torch.arange(block)].long().to(next(model.parameters()).device)
    return _capture_inputs(model, x)


def _capture_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The (T, d) input of every MoE layer for one forward pass of ``x``."""
    seen: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1])))
             for layer in model.moe_layers()]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def expert_output_similarity(model: torch.nn.Module, data: torch.Tensor, n_tokens: int = 512,
                             seed: int = 1234, group: int = 1) -> list[float]:
    """Per MoE layer: mean cosine similarity of two different routed experts' (or blocks') outputs on the same inputs.

    ``group > 1`` sums the outputs of consecutive blocks of ``group`` experts first (left-over experts unused) and
    compares the blocks: :func:`moe_course.fine_grained.expert_similarity` defines the metric.
    """
    check_int("group", group, 1)
    few = [layer.n_experts for layer in model.moe_layers() if layer.n_experts // group < 2]
    if few and group == 1:
        raise ValueError(f"model has an MoE layer with {few[0]} routed expert: a similarity needs pairs of experts "
                         "(n_experts >= 2)")
    if few:
        raise ValueError(f"a layer has {few[0]} routed experts: too few for two blocks of group={group}; use a "
                         "smaller group")
    with _eval_mode(model):
        inputs = _layer_inputs(model, data, n_tokens, seed)
    sims = []
    for layer, h in zip(model.moe_layers(), inputs, strict=True):
        outs = torch.stack([expert(h) for expert in layer.experts])  # (N, T, d)
        n = outs.shape[0] // group
        outs = outs[: n * group].reshape(n, group, *outs.shape[1:]).sum(dim=1)  # (B, T, d) one output per block
        unit = torch.nn.functional.normalize(outs.double(), dim=-1)
        cos = torch.einsum("atd,btd->abt", unit, unit).mean(dim=-1)  # (B, B) mean over tokens
        sims.append(float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1))))
    return sims


@torch.no_grad()
def shared_output_share(model: torch.nn.Module, data: torch.Tensor, n_tokens: int = 512,
                        seed: int = 1234) -> list[float]:
    """Per MoE layer with shared experts: ‖shared(x)‖ / (‖shared(x)‖ + ‖routed part‖), averaged over tokens."""
    shares = []
    with _eval_mode(model):
        for layer, h in zip(model.moe_layers(), _layer_inputs(model, data, n_tokens, seed), strict=True):
            if getattr(layer, "shared", None) is None:
                continue
            shared_out = layer.shared(h)
            shared = shared_out.norm(dim=-1)
            routed = (layer(h) - shared_out).norm(dim=-1)
            shares.append(float((shared / (shared + routed)).mean()))
    return shares


def probe(model: torch.nn.Module, corpus: Any, masks: tuple[int, ...] = (1,), n_batches: int = 8,
          batch_size: int = 16, group: int = 1) -> dict[str, Any]:
    """Everything notebook 05 measures on a trained model, on the test half of the validation files.

    Masking losses and (with shared experts) the shared-as-routed swap on the whole test half; similarity per
    expert and, with ``group > 1``, per block of ``group`` experts (equal width with a coarser layout);
    specialisation tables on ``n_batches // 2`` batches; the shared experts' share of the output.
    """
    from moe_course.corpus import TOKEN_TYPE_NAMES

    check_int("n_batches", n_batches, 2)  # the type tables use n_batches // 2 >= 1 of them
    check_int("group", group, 1)
    if not model.moe_layers():
        return {}
    data, types = corpus.val_part("test")
    out: dict[str, Any] = {"redundancy": redundancy(model, data, masks, batch_size)}
    if getattr(model.cfg, "n_shared", 0):
        with shared_as_routed(model):
            out["redundancy"]["shared_as_routed"] = evaluate_text(model, data, batch_size)
    out["similarity"] = expert_output_similarity(model, data)
    if group > 1:
        out["similarity_blocks"] = expert_output_similarity(model, data, group=group)
    tables = routing_tables(model, data, types, len(TOKEN_TYPE_NAMES), batch_size, n_batches // 2)
    out["specialisation"] = specialisation(tables)
    out["tables"] = [t.tolist() for t in tables]
    out["shared_share"] = shared_output_share(model, data)
    return out
