"""Where a ``Kron`` step's work happens and where its results go (``torch.distributed`` only).

- replicated (``distributed=None``): every rank computes every update (DDP averages gradients;
  the shared seed and the deterministic schedule keep ranks identical);
- ``"shard"``: each parameter has one owner rank that keeps its state and computes its update;
  the results reach the other ranks by broadcasts from the owners (``exchange``);
- FSDP2 ``dtensor="full"``: a DTensor is preconditioned whole and each rank applies its shard
  of the update (``apply``); ``dtensor="local"``: each rank's shard is a tensor of its own.

Every function takes the optimiser, the only object holding ``param_groups`` and ``state``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import distributed as dist_
from ..schedules import UpdateProbSchedule
from .apply import apply_updates


def owners(opt) -> dict[Tensor, int]:
    """``p -> owner rank`` under ``distributed="shard"`` (every rank computes the same
    assignment from the same costs); empty otherwise. Parameters keep their owner: a group added
    later is placed on the ranks' current loads."""
    if opt.distributed != "shard":
        return opt._owner
    params = [(p, g) for g in opt.param_groups for p in g["params"]]
    new = [(p, g) for p, g in params if p not in opt._owner]
    if new:
        size = dist_.rank_and_size(opt.process_group)[1]
        load = [0.0] * size
        for p, g in params:
            if p in opt._owner:
                load[opt._owner[p]] += dist_.step_cost(opt._structure(p, g))
        costs = [dist_.step_cost(opt._structure(p, g)) for p, g in new]
        opt._owner.update(zip((p for p, _ in new), dist_.assign_owners(costs, size, load)))
    return opt._owner


def collective(opt) -> bool:
    """Whether ``step()`` communicates: ``"shard"``, FSDP2 parameters, or Newton mode's
    averaging under a process group."""
    if opt._has_dtensor is None:
        opt._has_dtensor = any(dist_.is_dtensor(p) for g in opt.param_groups for p in g["params"])
    if opt.distributed is not None or opt._has_dtensor:
        return True
    return opt.mode == "newton" and dist_.rank_and_size(opt.process_group)[1] > 1


def device(opt) -> torch.device:
    """Where small bookkeeping tensors live: the first parameter's (local) device, so that a
    collective over them works with any backend (NCCL refuses CPU tensors)."""
    for g in opt.param_groups:
        for p in g["params"]:
            return p.device
    return torch.device("cpu")


def fingerprint(value):
    """A hyperparameter as every rank can compare it (no memory addresses; NaN equals NaN)."""
    if isinstance(value, UpdateProbSchedule):
        return repr(value)
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if callable(value):
        return f"callable {getattr(value, '__qualname__', type(value).__name__)}"
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def check_layout(opt) -> None:
    """Once (again after ``add_param_group`` and ``load_state_dict``) when ``step()``
    communicates: every rank has the same parameters, settings, seed and schedule state, or
    every rank raises the same ``ValueError`` (instead of a hang in a collective)."""
    if opt._layout_checked or not collective(opt):
        return
    groups = [
        {
            "params": [(tuple(p.shape), str(p.dtype), p.requires_grad) for p in g["params"]],
            **{k: fingerprint(g.get(k)) for k in opt._group_keys},  # not torch's or yours
        }
        for g in opt.param_groups
    ]
    settings = {
        "seed": opt.seed,
        "mode": opt.mode,
        "hvp": opt.hvp,
        "nonfinite": opt.nonfinite,
        "distributed": opt.distributed,
        "dtensor": opt.dtensor,
        "step() calls": opt._prob_step,
        "update counters": opt._counters,
    }
    dist_.check_same_layout({"param_groups": groups, **settings}, opt.process_group)
    opt._layout_checked = True


def agree(opt, entries: list, finite: Tensor | None = None) -> None:
    """When ``step()`` communicates: the ranks step the same parameters with the same update
    decisions (and, given ``finite``, the same finiteness), or all raise the same
    ``RuntimeError`` (one small all-reduce; a mismatch would otherwise hang in the next
    collective or silently desynchronise the ranks). ``entries``: ``(p, do_update)``."""
    pos = {p: i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    n, dev = len(pos), device(opt)
    codes = torch.zeros(n, dtype=torch.int32, device=dev)
    if entries:
        idx = torch.tensor([pos[p] for p, _ in entries], device=dev)
        do = torch.tensor([int(d) for _, d in entries], dtype=torch.int32, device=dev)
        ok = 1 if finite is None else finite.to(device=dev, dtype=torch.int32)
        codes[idx] = 1 + ok + 2 * do
    both = torch.cat([codes, -codes])
    dist_.all_max(both, opt.process_group)
    bad = (both[:n] != -both[n:]).nonzero().flatten().tolist()
    if bad:
        where = [
            (gi, pi) for gi, g in enumerate(opt.param_groups) for pi in range(len(g["params"]))
        ]
        raise RuntimeError(
            f"the ranks disagree at step {opt._prob_step} on parameter(s) (group, index) "
            f"{[where[i] for i in bad]}: on some rank it has no gradient, a non-finite one, "
            "or another preconditioner-update decision. With distributed='shard' (and Newton "
            "mode under a process group) every rank must step the same parameters, as DDP "
            "and FSDP2 ensure"
        )


def whole(opt, p: Tensor) -> bool:
    """True when ``p``'s update is computed for the whole tensor and each rank applies its
    shard (an FSDP2 DTensor with ``dtensor="full"``)."""
    return dist_.is_dtensor(p) and opt.dtensor == "full"


def local(p: Tensor) -> Tensor:
    """This rank's part of ``p`` to update in place: its shard for a DTensor, else ``p``."""
    return p.to_local() if dist_.is_dtensor(p) else p


def apply(opt, group: dict, results: list[tuple[Tensor, Tensor, Tensor]]) -> None:
    """Apply ``(p, u, ok)`` of one group on this rank: plain and local-shard parameters in one
    ``torch._foreach`` pass; a whole DTensor's update cut to this rank's shard first."""
    if not opt._has_dtensor:  # the common case, without a check per parameter
        targets, us = [p for p, *_ in results], [u for _, u, _ in results]
    else:
        targets, us = [], []
        for p, u, _ in results:
            if whole(opt, p):
                targets.append(p.to_local())
                us.append(dist_.local_part(u.reshape(p.shape), p))
            else:
                targets.append(local(p))
                us.append(u)
    apply_updates(targets, us, [ok for *_, ok in results], [p.dim() for p, *_ in results],
                  group["lr"], group["weight_decay"],
                  group.get("clip_max_entry", math.inf))  # fmt: skip


def exchange(opt, owned: dict, stepped: list, rank: int) -> None:
    """``distributed="shard"``: every rank gets the owners' results over ``process_group``.
    Plain parameters (already updated by their owner) travel whole, in buckets; for a whole
    DTensor the owner sends ``u`` and ``ok``, one parameter at a time, and each rank applies its
    own shard. ``owned``: ``p -> (u, ok)`` computed here; ``stepped``: ``(p, group)`` of every
    parameter that stepped on any rank."""
    own = owners(opt)
    plain = [p for p, _ in stepped if not whole(opt, p)]
    dist_.broadcast_from_owners(plain, [own[p] for p in plain], opt.process_group)
    for p, group in stepped:
        if not whole(opt, p):
            continue
        r = own[p]
        if r == rank:
            u, ok = owned[p]
            u, okf = u.reshape(p.shape), ok.to(u.real.dtype).reshape(1)
        else:
            dev = p.to_local().device
            u = torch.empty(p.shape, dtype=opt._precond_dtype(group, p), device=dev)
            okf = torch.empty(1, dtype=u.real.dtype, device=dev)
        dist_.broadcast_from_owners([u, okf], [r, r], opt.process_group)
        apply(opt, group, [(p, u, okf.reshape(()) > 0)])


def screen(opt, todo: list, hvs: dict) -> dict | None:
    """Host-side finiteness where it is needed anyway: when ``step()`` communicates (the ranks
    must agree, before any collective that depends on which parameters step) or with
    ``nonfinite="raise"``. ``{p: finite}``, or None: the kernels mask non-finite tensors on the
    device. ``todo``: ``(p, group index, do_update, prob)``; a DTensor's gradient is finite
    when every rank's shard is."""
    comm = collective(opt)
    entries = [(p, do) for p, _, do, _ in todo]
    if comm:
        agree(opt, entries)
    if not comm and opt.nonfinite == "skip":
        return None
    flags = []
    for p, *_ in todo:
        f = torch.isfinite(local(p.grad) if dist_.is_dtensor(p.grad) else p.grad).all()
        flags.append(f & torch.isfinite(hvs[p][1]).all() if p in hvs else f)
    finite = torch.stack(flags).to(device(opt)) if flags else torch.ones(0, dtype=torch.bool)
    if any(dist_.is_dtensor(p) for p, *_ in todo):
        finite = dist_.all_min(finite.to(torch.uint8), opt.process_group).bool()
    if comm:
        agree(opt, entries, finite)
    finite = finite.tolist()
    if opt.nonfinite == "raise" and not all(finite):
        bad = [i for i, ok in enumerate(finite) if not ok]
        raise FloatingPointError(
            f"non-finite gradient (NaN/Inf) for parameter(s) at positions {bad} of this step; "
            "pass nonfinite='skip' to skip such steps instead"
        )
    return {p: ok for (p, *_), ok in zip(todo, finite)}
