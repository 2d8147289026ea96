"""The reference answer to notebook 07's expert-parallel layer exercise, and wrong answers made from it by one edit
each (``MUTATIONS``: written to a module by :func:`write_variants`, since the check sends a function's source alone
to the ranks)."""

import inspect
import textwrap
from pathlib import Path

import torch
import torch.distributed as dist


def reference(x, indices, weights, experts, world):
    from moe_course.parallel import all_to_all

    k, n_local = indices.shape[1], experts.w_gate.shape[0]
    pairs = indices.reshape(-1)  # (T*k,) pair p = t*k + j
    dest = pairs // n_local  # owner rank of each pair
    order = dest.argsort(stable=True)  # pairs in rank order
    token_of = order // k
    send = torch.bincount(dest, minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    send_l, recv_l = send.tolist(), recv.tolist()
    rows = all_to_all(x[token_of], recv_l, send_l)  # (R, d) rows for my experts, grouped by source rank
    ids = torch.empty(sum(recv_l), dtype=torch.long)
    dist.all_to_all_single(ids, (pairs[order] % n_local).contiguous(), recv_l, send_l)
    by_expert = ids.argsort(stable=True)
    out = experts(rows[by_expert], torch.bincount(ids, minlength=n_local))
    back = torch.empty_like(by_expert)
    back[by_expert] = torch.arange(len(by_expert))
    results = all_to_all(out[back], send_l, recv_l)  # (T*k, d) in send order
    return torch.zeros_like(x).index_add(0, token_of, results * weights.reshape(-1)[order].unsqueeze(-1))


def alternative(x, indices, weights, experts, world):
    """Another correct answer: unstable sorts, rows repeated per pair, outputs scattered back, weights summed per
    token with a view; the check must pass it as well."""
    from moe_course.parallel import all_to_all

    t, k = indices.shape
    n_local = experts.w_gate.shape[0]
    dest = (indices // n_local).reshape(-1)  # (T*k,)
    order = torch.argsort(dest)  # unstable: any order within a destination works if rows and ids follow it
    send = torch.bincount(dest, minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    s, r = send.tolist(), recv.tolist()
    rows = all_to_all(x.repeat_interleave(k, 0)[order], r, s)
    ids = torch.empty(sum(r), dtype=torch.long)
    dist.all_to_all_single(ids, (indices.reshape(-1) % n_local)[order].contiguous(), r, s)
    perm = torch.sort(ids).indices  # unstable too
    out = torch.empty_like(rows)
    out[perm] = experts(rows[perm], torch.bincount(ids, minlength=n_local))
    back = all_to_all(out, s, r)  # (T*k, d) in send order
    per_pair = torch.empty_like(back)
    per_pair[order] = back  # pair p = t*k + j in place p
    return (per_pair.view(t, k, x.shape[1]) * weights.unsqueeze(-1)).sum(1)




MUTATIONS = {  # name: ((text in reference, replacement), ...), and the check's message for it
    "unweighted": (("results * weights.reshape(-1)[order].unsqueeze(-1)", "results"), "without the routing weights"),
    "plain_collectives": (("rows = all_to_all(x[token_of], recv_l, send_l)",
                           "rows = x.new_empty(sum(recv_l), x.shape[1]); "
                           "dist.all_to_all_single(rows, x[token_of].detach(), recv_l, send_l)"),
                          "no gradient reached x.*parallel.all_to_all"),
    "detached_weights": (("weights.reshape(-1)", "weights.detach().reshape(-1)"), "no gradient reached weights"),
    "not_grouped": ((("out = experts(rows[by_expert],", "out = experts(rows,"),
                     ("all_to_all(out[back],", "all_to_all(out,")),
                    "grouped by source rank; group them"),
    "grouping_not_undone": (("all_to_all(out[back],", "all_to_all(out,"), "put them back in the order the rows"),
    "interleaved_layout": ((("dest = pairs // n_local", "dest = pairs % world"),
                            ("(pairs[order] % n_local)", "(pairs[order] // world)")), "not on rank e % W"),
    "global_expert_ids": (("(pairs[order] % n_local)", "pairs[order]"), "rank 1 raised .*(index|Index|out of)"),
    "k_forgotten": (("token_of = order // k", "token_of = order.clamp(max=max(len(x) - 1, 0))"),
                    "belongs to token p // k"),
    "sorts_indices_in_place": (("pairs = indices.reshape(-1)",
                                "indices[:] = indices.flip(1); pairs = indices.reshape(-1)"),
                               "changed its input indices in place"),
    "mixed_sorts": (("token_of = order // k", "token_of = dest.argsort() // k"),
                    "differs from one process"),  # rows in one sort's order, their expert ids in another's
    "float64_output": ((("results * weights.reshape(-1)[order].unsqueeze(-1)",
                         "results.double() * weights.reshape(-1)[order].unsqueeze(-1).double()"),
                        ("torch.zeros_like(x)", "torch.zeros_like(x, dtype=torch.float64)")),
                       "returned float64 for float32 inputs"),
    "returns_early": (("k, n_local = indices.shape[1]", "if x.shape[0] == 0:\n        return torch.zeros_like(x)\n"
                       "    k, n_local = indices.shape[1]"), "timed out|lost its peer|Every rank must call"),
}


def write_variants(folder: Path) -> Path:
    """A module holding every wrong answer as a function of its own (importable, so its source can be read)."""
    base = textwrap.dedent(inspect.getsource(reference))
    parts = ["import torch", "import torch.distributed as dist", ""]
    for name, (edits, _) in MUTATIONS.items():
        source = base.replace("def reference(", f"def {name}(")
        for old, new in (edits if isinstance(edits[0], tuple) else (edits,)):
            assert source.count(old) == 1, (name, old)
            source = source.replace(old, new)
        parts.append(source)
    path = folder / "ep_layer_wrong.py"
    path.write_text("\n\n".join(parts))
    return path
