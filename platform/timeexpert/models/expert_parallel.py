"""Expert parallelism for `MoELayer`: expert slots sharded over a process group, tokens by all-to-all.

Shape letters: P (token, expert) pairs on this rank, Q pairs received for this rank's experts,
D model dim, E expert slots, L slots per rank (E / R), R ranks of the EP group.

Rank r holds the contiguous slots [r L, (r+1) L). Pairs arrive sorted by global expert id, which
also sorts them by destination rank, so one `all_to_all_single` with uneven splits dispatches
them; the expert outputs come back by the reverse all-to-all. Both directions carry autograd
(the backward of an all-to-all is the all-to-all with the splits swapped). Works on gloo and NCCL.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor

# parameters sharded over EP ranks along dim 0; everything else in a MoELayer is replicated
EXPERT_PARAM_NAMES = ("w1_LFD", "w3_LFD", "w2_LDF")
# a checkpoint directory: the whole model in WEIGHTS (or the files WEIGHTS_INDEX names), or, when
# written by EP ranks, everything but the expert weights there and each EP rank's expert slice in
# EXPERTS_DIR/ep_{rank}-of-{ranks}.safetensors
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # save_pretrained's index of a sharded save
EXPERTS_DIR = "experts"
_SHARD_RE = re.compile(r"ep_(\d{5})-of-(\d{5})\.safetensors")


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` with uneven splits along dim 0, differentiable."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(
            grad_in, grad_out.contiguous(), in_splits, out_splits, group=ctx.group
        )
        return grad_in, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    """Differentiable uneven all-to-all: send `in_splits[r]` rows to rank r, receive `out_splits`."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def dispatch_compute_combine(
    x_PD: Tensor,
    counts_E: Tensor,
    local_experts: Callable[[Tensor, list[int]], Tensor],
    group: dist.ProcessGroup,
) -> Tensor:
    """Send pairs (sorted by global expert) to the expert owners, run them, bring results back.

    `counts_E[e]`: this rank's pairs for global expert e. `local_experts(x_QD, counts_L)` runs
    this rank's L experts on rows sorted by local expert. Returns (P, D) in `x_PD`'s order.
    """
    R = dist.get_world_size(group)
    L = counts_E.numel() // R
    # how many pairs each source rank sends to each of my L experts
    recv_RL = torch.empty_like(counts_E)
    dist.all_to_all_single(recv_RL, counts_E.contiguous(), group=group)
    recv_RL = recv_RL.view(R, L)
    send_splits = counts_E.view(R, L).sum(1).tolist()
    recv_splits = recv_RL.sum(1).tolist()
    x_QD = all_to_all(x_PD, recv_splits, send_splits, group)  # ordered (source rank, expert)
    # regroup received rows by local expert (stable: source rank order within an expert)
    expert_Q = torch.arange(L, device=x_PD.device).repeat(R).repeat_interleave(recv_RL.flatten())
    order_Q = expert_Q.argsort(stable=True)
    y_QD = local_experts(x_QD[order_Q], recv_RL.sum(0).tolist())
    y_QD = torch.empty_like(y_QD).index_copy(0, order_Q, y_QD)  # back to (source rank, expert)
    return all_to_all(y_QD, send_splits, recv_splits, group)


def expert_rows(name: str, num_slots: int, rank: int, ep_size: int) -> slice | None:
    """The rows of EP rank `rank` in the EP=1 tensor `name` of `num_slots` rows (its slice of
    expert slots), or None for a tensor every rank holds whole."""
    if not is_expert_param(name):
        return None
    if num_slots % ep_size:
        raise ValueError(f"{name}: {num_slots} slots not divisible by {ep_size}")
    L = num_slots // ep_size
    return slice(rank * L, (rank + 1) * L)


def is_expert_param(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in EXPERT_PARAM_NAMES


def expert_shard_file(ep_rank: int, ep_size: int) -> str:
    """Where EP rank `ep_rank` of `ep_size` writes its expert slice in a checkpoint directory."""
    return os.path.join(EXPERTS_DIR, f"ep_{ep_rank:05d}-of-{ep_size:05d}.safetensors")


def expert_shards(directory: str) -> list[str]:
    """The expert shard files of a checkpoint directory in rank order ([] for a whole model);
    ValueError when some rank's file is missing."""
    folder = os.path.join(directory, EXPERTS_DIR)
    if not os.path.isdir(folder):
        return []
    found = sorted(m.groups() for m in map(_SHARD_RE.fullmatch, os.listdir(folder)) if m)
    sizes = {int(n) for _, n in found}
    if len(sizes) != 1 or [int(r) for r, _ in found] != list(range(sizes.pop() if sizes else 0)):
        raise ValueError(f"{folder!r} holds an incomplete set of expert shards: "
                         f"{[f'ep_{r}-of-{n}' for r, n in found]}")
    return [os.path.join(folder, f"ep_{r}-of-{n}.safetensors") for r, n in found]


def load_weights(directory: str, ep_rank: int = 0, ep_size: int = 1) -> dict[str, Tensor]:
    """The state dict of a checkpoint directory for EP rank `ep_rank` of `ep_size`: expert
    weights read as this rank's slice only (safetensors reads the rows asked for, from the
    whole model or from the expert shards that hold them, whatever EP degree wrote them),
    everything else whole. `ep_size` 1: the full (EP=1) state dict."""
    index = os.path.join(directory, WEIGHTS_INDEX)
    if os.path.isfile(index):  # save_pretrained split a large model over several files
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(directory, WEIGHTS)):
        files = [WEIGHTS]
    else:
        raise ValueError(f"{directory!r} holds no {WEIGHTS}: not a TimeExpert checkpoint")
    out = {}
    for file in files:
        with safe_open(os.path.join(directory, file), framework="pt") as f:
            for name in f.keys():
                part = f.get_slice(name)
                shape = part.get_shape()
                rows = expert_rows(name, shape[0] if shape else 0, ep_rank, ep_size)
                out[name] = f.get_tensor(name) if rows is None else part[rows]
    shards = expert_shards(directory)
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(safe_open(path, framework="pt")) for path in shards]
        for name in opened[0].keys() if opened else []:
            per_shard = opened[0].get_slice(name).get_shape()[0]
            rows = expert_rows(name, per_shard * len(opened), ep_rank, ep_size)
            parts = [f.get_slice(name)[max(rows.start - k * per_shard, 0):
                                      min(rows.stop - k * per_shard, per_shard)]
                     for k, f in enumerate(opened)
                     if rows.start < (k + 1) * per_shard and k * per_shard < rows.stop]
            out[name] = torch.cat(parts)
    return out


def shard_state_dict(state_dict: dict[str, Tensor], rank: int, ep_size: int) -> dict[str, Tensor]:
    """An EP=1 state dict (a MoELayer's or a model's) -> the one of EP rank `rank`."""
    out = {}
    for name, value in state_dict.items():
        rows = expert_rows(name, value.shape[0] if value.dim() else 0, rank, ep_size)
        out[name] = value if rows is None else value[rows]
    return out


def gather_experts(local_LX: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Every rank's expert-sharded tensor (a weight or its gradient) concatenated along dim 0, on
    every rank (the EP-equals-EP=1 checks compare it with an unsharded layer)."""
    parts = [torch.empty_like(local_LX) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local_LX.contiguous(), group=group)
    return torch.cat(parts)
