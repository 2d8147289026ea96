"""Wrong answers to notebook 07's token-exchange exercise (module-level, so their source can travel to the ranks)."""

import torch
import torch.distributed as dist


def own_rows_only(x, dest, world):
    return x[torch.argsort(dest, stable=True)]


def unsorted_rows(x, dest, world):
    send = torch.bincount(dest, minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    out = x.new_empty(int(recv.sum()), x.shape[1])
    dist.all_to_all_single(out, x, recv.tolist(), send.tolist())
    return out


def reversed_ties(x, dest, world):
    order = torch.argsort(dest * 1000 - torch.arange(len(dest)))  # groups by destination, each group reversed
    send = torch.bincount(dest, minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    out = x.new_empty(int(recv.sum()), x.shape[1])
    dist.all_to_all_single(out, x[order], recv.tolist(), send.tolist())
    return out


def output_like_input(x, dest, world):
    order = torch.argsort(dest, stable=True)
    send = torch.bincount(dest, minlength=world)
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x[order], send.tolist(), send.tolist())
    return out


def swapped_splits(x, dest, world):
    order = torch.argsort(dest, stable=True)
    send = torch.bincount(dest, minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    out = x.new_empty(int(recv.sum()), x.shape[1])
    dist.all_to_all_single(out, x[order], send.tolist(), recv.tolist())
    return out


def no_minlength(x, dest, world):
    order = torch.argsort(dest, stable=True)
    send = torch.bincount(dest)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    out = x.new_empty(int(recv.sum()), x.shape[1])
    dist.all_to_all_single(out, x[order], recv.tolist(), send.tolist())
    return out


def sorts_dest_in_place(x, dest, world):
    sorted_dest, order = torch.sort(dest, stable=True)
    dest.copy_(sorted_dest)
    send = torch.bincount(dest, minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    out = x.new_empty(int(recv.sum()), x.shape[1])
    dist.all_to_all_single(out, x[order], recv.tolist(), send.tolist())
    return out


def rank0_skips(x, dest, world):
    if dist.get_rank() == 0:
        return x
    send = torch.bincount(dest, minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    return x


def all_reduce_counts(x, dest, world):
    order = torch.argsort(dest, stable=True)
    send = torch.bincount(dest, minlength=world)
    recv = send.clone()
    dist.all_reduce(recv)
    out = x.new_empty(int(recv[dist.get_rank()]), x.shape[1])
    dist.all_to_all_single(out, x[order], None, send.tolist())
    return out


def not_written(x, dest, world):
    # YOUR CODE HERE
    raise NotImplementedError()


def unstable_sort(x, dest, world):
    order = torch.argsort(dest)  # not stable: ties may leave their order
    send = torch.bincount(dest, minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    out = x.new_empty(int(recv.sum()), x.shape[1])
    dist.all_to_all_single(out, x[order], recv.tolist(), send.tolist())
    return out


def float32_output(x, dest, world):
    order = torch.argsort(dest, stable=True)
    send = torch.bincount(dest, minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    out = torch.empty(int(recv.sum()), x.shape[1])  # float32 whatever x is
    dist.all_to_all_single(out, x[order].float(), recv.tolist(), send.tolist())
    return out


def counts_from_max(x, dest, world):
    order = torch.argsort(dest, stable=True)
    send = torch.bincount(dest, minlength=int(dest.max()) + 1)  # fails on a rank with no rows
    send = torch.cat([send, send.new_zeros(world - len(send))])
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    out = x.new_empty(int(recv.sum()), x.shape[1])
    dist.all_to_all_single(out, x[order], recv.tolist(), send.tolist())
    return out
