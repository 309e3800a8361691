"""``Kron``'s checkpoints: everything the next step depends on, checked before anything loads.

Per parameter: ``step``, ``momentum_buffer``, ``Q`` (and ``L`` with ``lipschitz="ema"``,
``initialised`` with a data-driven initial scale). Under ``"psgd_lab"``: the schedule's step
count, the update counters, the balancing RNG's state, each parameter's count of random draws
(its stream position), the skipped-step count and a layout record. Format 2 (this one) replaced
format 1's per-device generator states by the per-parameter stream counts.
"""

from __future__ import annotations

import warnings
from itertools import chain

import torch
from torch import Tensor

from .. import distributed as dist_
from .config import mu_dtype, precond_dtype

STATE_FORMAT = 2
EXTRA = "psgd_lab"  # the key of the optimiser-wide state in state_dict()


def state_dict(opt, base: dict) -> dict:
    """``base`` (torch's ``Optimizer.state_dict()``) completed with Kron's own state; under
    ``distributed="shard"`` a collective that gathers the owners' states to every rank's CPU."""
    if opt.distributed == "shard":
        mine = {k: copy_to(v, "cpu") for k, v in base["state"].items() if v}
        merged = {}
        for part in dist_.gather_objects(mine, opt.process_group):
            merged.update(part)
        base["state"] = dict(sorted(merged.items()))
    base[EXTRA] = {
        "format": STATE_FORMAT,
        "prob_step": opt._prob_step,
        "update_counters": list(opt._counters),
        "rng": opt._rng.getstate(),
        "draw_counts": list(opt._draw_counts),
        "nonfinite_count": opt.nonfinite_count,
        "layout": layout(opt),
        "seed": opt.seed,
        "shard_of": shard_of(opt),
    }
    return base


def load_state_dict(opt, sd: dict, base_load) -> None:
    """Check ``sd`` against ``opt`` completely, then load it (``base_load``: torch's loader);
    a failed check leaves ``opt`` untouched."""
    extra = sd.get(EXTRA)
    if extra is None:
        raise ValueError(
            "this state dict was not saved by psgd_lab.Kron (no 'psgd_lab' entry); "
            "a kron-torch state dict cannot be resumed exactly"
        )
    fmt = extra.get("format")
    if fmt not in (1, STATE_FORMAT):
        raise ValueError(f"unknown psgd_lab.Kron state format {fmt!r}")
    saved_of, here_of = extra.get("shard_of"), shard_of(opt)
    if saved_of != here_of:
        raise ValueError(
            f"this checkpoint holds {_shard_text(saved_of)}, and this optimiser needs "
            f"{_shard_text(here_of)}: with dtensor='local' each rank saves and loads its own "
            "file, under the same world size"
        )
    here = layout(opt)
    saved = [[tuple(s) for s in g] for g in extra["layout"]]
    if saved != here:
        raise ValueError(
            f"the state dict was saved for a different parameter layout: {_diff(saved, here)}"
        )
    groups = sd["param_groups"]
    ids = list(chain.from_iterable(g["params"] for g in groups))
    by_id = dict(
        zip(ids, [(p, sg) for sg, g in zip(groups, opt.param_groups) for p in g["params"]])
    )
    for k, st in sd["state"].items():  # every check before anything changes
        p, saved_group = by_id[k]
        _check_entry(opt, p, saved_group, st)
    base_load({k: v for k, v in sd.items() if k != EXTRA})
    # torch casts floating state to the parameter's dtype, which rounds a float32 Q of a bf16
    # parameter: take the saved tensors themselves (copied, moved to the device)
    own = opt._owners()
    rank = dist_.rank_and_size(opt.process_group)[0] if own else 0
    for k, st in sd["state"].items():
        p = by_id[k][0]
        if own.get(p, rank) == rank:  # distributed="shard": keep the owned share
            opt.state[p] = _upgrade({key: copy_to(v, p.device) for key, v in st.items()}, p)
        else:
            opt.state.pop(p, None)
    opt._prob_step = int(extra["prob_step"])
    opt._counters = [int(c) for c in extra["update_counters"]]
    opt._rng.setstate(_as_rng_state(extra["rng"]))
    n = sum(len(g["params"]) for g in opt.param_groups)
    if fmt == 1:
        warnings.warn(
            "loading a psgd_lab 0.1 checkpoint (format 1): momentum, Q and the schedule load "
            "exactly, but its random draws came from per-device generators, which psgd_lab now "
            "replaces by one stream per parameter: the run continues on new draws",
            UserWarning,
            stacklevel=3,
        )
        opt._draw_counts = [0] * n
    else:
        opt._draw_counts = [int(c) for c in extra["draw_counts"]]
    opt._cache.clear()
    opt._group_plans.clear()  # their states were replaced
    opt._layout_checked = False  # the loaded schedule state is compared at the next step
    opt.nonfinite_count = int(extra["nonfinite_count"])
    opt.seed = int(extra["seed"])
    opt._streams.seed = opt.seed


def _upgrade(st: dict, p: Tensor) -> dict:
    """Format-1 state: ``step`` and ``initialised`` were Python values; now 0-d tensors on the
    parameter's device (the step can then skip a non-finite gradient without a host sync)."""
    if not isinstance(st.get("step"), Tensor):
        st["step"] = torch.tensor(int(st["step"]), dtype=torch.int64, device=p.device)
    if "initialised" in st and not isinstance(st["initialised"], Tensor):
        st["initialised"] = torch.tensor(bool(st["initialised"]), device=p.device)
    return st


def layout(opt) -> list[list[tuple[int, ...]]]:
    """Each group's parameter shapes (whole shapes for FSDP2 parameters)."""
    return [[tuple(p.shape) for p in g["params"]] for g in opt.param_groups]


def shard_of(opt) -> list[int] | None:
    """``[rank, world]`` when the state is this rank's own (``dtensor="local"`` with FSDP2
    parameters), else ``None`` (the state is whole)."""
    from .placement import collective

    collective(opt)  # looks for DTensors once
    if opt.dtensor == "local" and opt._has_dtensor:
        return list(dist_.rank_and_size(opt.process_group))
    return None


def _check_entry(opt, p: Tensor, group: dict, st: dict) -> None:
    """A checkpoint's state for ``p`` under the saved ``group`` settings, or ``ValueError``."""
    mu = mu_dtype(group, p)
    mom, shape = st["momentum_buffer"], opt._shape(p)
    if tuple(mom.shape) != shape:
        raise ValueError(
            f"checkpoint momentum has shape {tuple(mom.shape)} but this parameter needs "
            f"{shape}" + (" (its local shard)" if shape != tuple(p.shape) else "")
        )
    if mom.dtype != mu:
        raise ValueError(
            f"checkpoint momentum is {mom.dtype} but this parameter ({p.dtype}, "
            f"mu_dtype={group['mu_dtype']}) needs {mu}: load it into parameters "
            "of the dtype it was saved with"
        )
    pd = precond_dtype(group, p)
    plan = opt._structure(p, group)
    shapes = [tuple(q.shape) for q in st["Q"]]
    if shapes != [tuple(s) for s in plan.factor_shapes()] or any(q.dtype != pd for q in st["Q"]):
        raise ValueError(
            f"checkpoint factors {shapes} ({st['Q'][0].dtype}) do not match this parameter's "
            f"structure {plan.factor_shapes()} ({pd})"
        )


def copy_to(value, device):
    """A copy of a state value with its tensors on ``device`` and their dtypes kept."""
    if isinstance(value, Tensor):
        return value.to(device=device, copy=True)
    if isinstance(value, (list, tuple)):
        return type(value)(copy_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: copy_to(v, device) for k, v in value.items()}
    return value


def _as_rng_state(state):
    """``random.Random.setstate`` wants tuples; a checkpoint round trip may give lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _shard_text(shard: list[int] | None) -> str:
    return "the whole state" if shard is None else f"rank {shard[0]} of {shard[1]}'s shards"


def _diff(saved: list, here: list) -> str:
    if len(saved) != len(here):
        return f"{len(saved)} parameter groups saved, {len(here)} here"
    for gi, (a, b) in enumerate(zip(saved, here)):
        if len(a) != len(b):
            return f"group {gi} has {len(a)} parameters saved, {len(b)} here"
        for pi, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f"group {gi} parameter {pi} has shape {x} saved, {y} here"
    return "unknown difference"
