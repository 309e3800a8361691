"""What ``Kron`` keeps per parameter and what it costs: the factor structure (with the optional
``precond_budget``), the warning for factors far larger than their parameter, ``describe()``."""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass

from torch import Tensor

from ..structure import KronPlan, diag_dims, fit_budget, make_plan, merged_shape
from .config import itemsize, mu_dtype, precond_dtype

# warn (once) when a parameter's factors exceed WARN_RATIO times its own bytes and WARN_BYTES
WARN_RATIO, WARN_BYTES = 16, 2**20
_KEYS = ("merge_dims", "max_size_triangular", "min_ndim_triangular", "memory_save_mode",
         "max_skew", "precond_budget", "precond_dtype")  # fmt: skip


@dataclass(frozen=True)
class ParamInfo:
    """What ``Kron`` keeps for one parameter (see ``Kron.describe``)."""

    group: int
    index: int
    shape: tuple[int, ...]
    factor_shape: tuple[int, ...]
    diag: tuple[bool, ...]
    factor_shapes: tuple[tuple[int, ...], ...]
    momentum_bytes: int
    precond_bytes: int
    cache_bytes: int  # the cached P_i (0 with precond_cache=False or for PRO4P/QUAD4P); a
    # vector's (or scalar's) is its row of the zero-padded stack it shares (optim.padding)
    owner: int = 0  # the rank that keeps this parameter's state (distributed="shard")
    budget_diag: tuple[int, ...] = ()  # dims made diagonal by precond_budget


def group_key(group: dict) -> tuple:
    """The settings of ``group`` a plan depends on (compute once per step and group)."""
    return tuple(group[k] for k in _KEYS)


def structure(opt, p: Tensor, group: dict, budget_dims: bool = False, gkey=None):
    """The plan of ``p`` under ``group``'s settings (cached per parameter, checked against the
    settings, so a changed group is re-planned); its ``shape`` is the factor shape (kron-torch's
    merged shape with ``merge_dims``). ``budget_dims``: also return the dims ``precond_budget``
    made diagonal. ``gkey``: ``group_key(group)``, if already computed."""
    shape = opt._shape(p)
    key = (shape, p.dtype, gkey if gkey is not None else group_key(group))
    cached = opt._plans.get(id(p))
    if cached is None or cached[0] != key:
        fshape = merged_shape(shape) if group["merge_dims"] and len(shape) > 2 else shape
        diag = diag_dims(fshape, group["max_size_triangular"], group["min_ndim_triangular"],
                         group["memory_save_mode"], group["max_skew"])  # fmt: skip
        forced: tuple = ()
        if group["precond_budget"] is not None:
            pd, n = precond_dtype(group, p), math.prod(shape)
            limit = group["precond_budget"] * n * itemsize(p.dtype) / itemsize(pd)
            diag, forced = fit_budget(fshape, diag, limit)
        cached = opt._plans[id(p)] = (key, make_plan(fshape, diag), forced)
    return (cached[1], cached[2]) if budget_dims else cached[1]


def factor_bytes(plan: KronPlan, group: dict, p: Tensor) -> int:
    return plan.factor_numel() * itemsize(precond_dtype(group, p))


def warn(opt, gi: int) -> None:
    """Once per optimiser: a parameter of group ``gi`` whose factors take more than
    ``WARN_RATIO`` times its own bytes (and over ``WARN_BYTES``), named, with the settings that
    would shrink them."""
    group = opt.param_groups[gi]
    for pi, p in enumerate(group["params"]):
        plan = structure(opt, p, group)
        fbytes, pbytes = factor_bytes(plan, group, p), max(p.numel() * p.element_size(), 1)
        if "memory" in opt._warned or fbytes <= max(WARN_RATIO * pbytes, WARN_BYTES):
            continue
        opt._warned.add("memory")
        warnings.warn(
            f"Kron: parameter {pi} of group {gi}, shape {tuple(p.shape)} (factor shape "
            f"{plan.shape}), gets {fbytes / 2**20:.1f} MiB of preconditioner factors, "
            f"{fbytes / pbytes:.0f}x its own {pbytes / 2**10:.1f} KiB. precond_budget=4 makes "
            "its largest factors diagonal until they fit in 4x its size; max_skew=1 or "
            "memory_save_mode='one_diag' also shrink them",
            UserWarning,
            stacklevel=_caller_level(),
        )


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside psgd_lab and torch.optim: the user's
    ``Kron(...)`` or ``add_param_group`` line, wherever the warning is raised from."""
    frame, level = sys._getframe(1), 1
    while frame is not None and any(k in frame.f_code.co_filename for k in _OWN):
        frame, level = frame.f_back, level + 1
    return level


_OWN = (os.path.join("psgd_lab", ""), os.path.join("torch", "optim", ""))


def describe(opt) -> list[ParamInfo]:
    """``Kron.describe``: one ``ParamInfo`` per parameter, in group order."""
    cache_bytes: dict[int, int] = {}
    for key, kept in opt._cache.items():
        ids = key if isinstance(key, tuple) else (key,)
        for b, pid in enumerate(ids):
            cache_bytes[pid] = sum(x[b].nbytes for x in kept or () if x is not None)
    own, out = opt._owners(), []
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            plan, forced = structure(opt, p, group, budget_dims=True)
            out.append(
                ParamInfo(
                    group=gi,
                    index=pi,
                    shape=tuple(p.shape),
                    factor_shape=plan.shape,
                    diag=plan.diag,
                    factor_shapes=tuple(tuple(s) for s in plan.factor_shapes()),
                    momentum_bytes=math.prod(opt._shape(p)) * itemsize(mu_dtype(group, p)),
                    precond_bytes=factor_bytes(plan, group, p),
                    cache_bytes=cache_bytes.get(id(p), 0),
                    owner=own.get(p, 0),
                    budget_diag=forced,
                )
            )
    return out
