"""What ``Kron`` needs from ``torch.distributed``: who owns which parameter, and moving the results.

Data parallelism (DDP) needs nothing from here: the gradients arrive averaged and every rank runs
the same deterministic step. ``Kron(distributed="shard")`` splits the step instead: each
parameter has one owner rank (``assign_owners``, balanced by ``step_cost``) that keeps its
momentum and ``Q`` and computes its update; the updated parameters then reach every rank by
``broadcast_from_owners``. FSDP2 parameters are DTensors: ``local_part`` cuts a full
update down to this rank's shard. All of it is ``torch.distributed``'s
own collectives; nothing here is a communication layer of its own.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .structure import KronPlan

DISTRIBUTED = (None, "shard")
DTENSOR = ("full", "local")


def is_dtensor(t: Tensor | None) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter or gradient).

    The module is not imported here (it costs ~1.6 s at ``import psgd_lab``): until something
    imports it, no tensor can be a DTensor."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def rank_and_size(group=None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; ``(0, 1)`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def require_process_group(option: str) -> None:
    """``RuntimeError`` unless a default process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"Kron(distributed={option!r}) splits the preconditioner work across the ranks of a "
            "torch.distributed process group, and none is initialised: call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment), or "
            "pass distributed=None for a single process"
        )


def check_same_layout(layout, group=None) -> None:
    """``ValueError`` on every rank, naming the first entry where a rank's ``layout`` (its
    parameters and settings: nested lists, dicts and plain values) differs from rank 0's. A
    collective: every rank of ``group`` must call it."""
    _, size = rank_and_size(group)
    if size == 1:
        return
    gathered: list = [None] * size
    dist.all_gather_object(gathered, layout, group=group)
    for r, other in enumerate(gathered):
        diff = _first_difference(gathered[0], other)
        if diff is not None:
            where, mine, theirs = diff
            raise ValueError(
                "the ranks disagree on the parameter list or settings given to Kron: at "
                f"{where or 'the top'}, rank 0 has {mine!r} and rank {r} has {theirs!r}. Every "
                "rank must build the same model, pass its parameters in the same order and use "
                "the same settings"
            )


def _first_difference(a, b, where: str = ""):
    """``(path, a_part, b_part)`` of the first difference between two nested values, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _first_difference(a.get(k), b.get(k), f"{where}[{k!r}]")
            if d is not None:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        if all(not isinstance(x, (list, tuple, dict)) for x in a) and a != b and len(a) <= 4:
            return where, a, b  # a short tuple (a shape) reads better whole
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{where}[{i}]")
            if d is not None:
                return d
        return None
    return None if a == b else (where, a, b)


def step_cost(plan: KronPlan) -> float:
    """FLOPs of one preconditioner update and application for a tensor with ``plan``: each dense
    factor of size ``d`` costs about ``d·numel`` per product (four of them) and ``d³`` (two)."""
    n = max(plan.numel, 1)
    cost = float(n)
    for d, diag in zip(plan.shape, plan.diag):
        cost += 4.0 * n if diag else 4.0 * d * n + 2.0 * d**3
    return cost


def assign_owners(
    costs: Sequence[float], size: int, load: Sequence[float] | None = None
) -> list[int]:
    """The owner rank of each item: greedy longest-processing-time first onto the least loaded
    rank (starting from ``load``), ties to the lower index and the lower rank, so every rank
    computes the same assignment."""
    load = list(load) if load is not None else [0.0] * size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def local_part(whole: Tensor, like: Tensor) -> Tensor:
    """This rank's piece of ``whole`` (held by every rank) laid out as the DTensor ``like``: cut
    locally, no communication, on any device mesh."""
    out = torch.distributed.tensor.distribute_tensor(
        whole, like.device_mesh, like.placements, src_data_rank=None
    )
    return out.to_local()


BUCKET_BYTES = 32 * 2**20  # one broadcast carries at most this much (or one larger tensor)


def broadcast_from_owners(tensors: Sequence[Tensor], owners: Sequence[int], group=None) -> None:
    """Give every rank the owner's values of each tensor, in place: flat broadcasts per owner
    and dtype of at most ``BUCKET_BYTES`` each, so the extra memory stays one bucket
    (``tensors`` and ``owners`` must agree on every rank)."""
    rank, size = rank_and_size(group)
    if size == 1:
        return
    buckets: dict[tuple[int, torch.dtype, torch.device], list[list[Tensor]]] = {}
    for t, r in zip(tensors, owners):
        chunks = buckets.setdefault((r, t.dtype, t.device), [[]])
        if chunks[-1] and sum(x.nbytes for x in chunks[-1]) + t.nbytes > BUCKET_BYTES:
            chunks.append([])
        chunks[-1].append(t)
    for (r, _, _), chunks in buckets.items():
        src = r if group is None else dist.get_global_rank(group, r)
        for ts in chunks:
            flat = torch.cat([t.reshape(-1) for t in ts]) if rank == r else _empty_like_all(ts)
            dist.broadcast(flat, src, group=group)
            if rank != r:
                _unflatten_into(flat, ts)


def _unflatten_into(flat: Tensor, ts: Sequence[Tensor]) -> None:
    """Copy consecutive pieces of ``flat`` into ``ts`` (the inverse of ``cat`` of reshapes)."""
    offset = 0
    for t in ts:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _empty_like_all(ts: Sequence[Tensor]) -> Tensor:
    return torch.empty(sum(t.numel() for t in ts), dtype=ts[0].dtype, device=ts[0].device)


def average(tensors: Sequence[Tensor], group=None) -> None:
    """Each tensor replaced by its mean over the ranks, in place: one flat all-reduce per dtype
    and device (a collective; nothing happens without a process group)."""
    _, size = rank_and_size(group)
    if size == 1 or not tensors:
        return
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for ts in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat /= size
        _unflatten_into(flat, ts)


def gather_objects(obj, group=None) -> list:
    """Every rank's ``obj`` (picklable; tensors should be on the CPU), in rank order."""
    _, size = rank_and_size(group)
    if size == 1:
        return [obj]
    out: list = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out


def all_max(t: Tensor, group=None) -> Tensor:
    """``t``'s elementwise maximum over the ranks, in place."""
    if rank_and_size(group)[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def all_min(t: Tensor, group=None) -> Tensor:
    """``t``'s elementwise minimum over the ranks, in place."""
    if rank_and_size(group)[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return t
