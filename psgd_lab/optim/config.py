"""``Kron``'s hyperparameters: validation (errors name the argument and the allowed values) and
the per-group settings the kernels read."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import geometry as geo
from ..structure import check_memory_save_mode

MODES = ("whiten", "newton")
NONFINITE = ("skip", "raise")
KERNELS = ("grouped", "single")


def check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(
            f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}"
        )


def check_number(name: str, value, lo: float, hi: float, lo_open=False, hi_open=False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}; got {value!r}")


def check_options(*, mode, hvp, nonfinite, kernel, seed, precond_cache, compile, distributed,
                  dtensor) -> None:  # fmt: skip
    """Validate ``Kron``'s optimiser-wide options; ``ValueError`` naming the argument."""
    from .. import distributed as dist_
    from ..pairs import HVP_METHODS

    for name, value, allowed in [("mode", mode, MODES), ("hvp", hvp, HVP_METHODS),
                                 ("nonfinite", nonfinite, NONFINITE), ("kernel", kernel, KERNELS),
                                 ("distributed", distributed, dist_.DISTRIBUTED),
                                 ("dtensor", dtensor, dist_.DTENSOR)]:  # fmt: skip
        check_choice(name, value, allowed)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}")
    for name, value in (("precond_cache", precond_cache), ("compile", compile)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False; got {value!r}")
    if distributed == "shard" and dtensor == "local":
        raise ValueError(
            "dtensor='local' already keeps each rank's shards on that rank; it does not combine "
            "with distributed='shard' (use one or the other)"
        )
    if distributed is not None:
        dist_.require_process_group(distributed)


def check_step_settings(g: dict) -> None:
    """The settings every psgd_lab optimiser shares (``Kron``, ``LRA``, ``Dense``): ``lr``,
    ``b1``, ``weight_decay``, the schedule, ``precond_lr``, ``precond_init_scale``, ``beta_L`` and
    the clip; ``ValueError`` naming the argument."""
    check_number("lr", g["lr"], 0, math.inf)
    check_number("b1", g["b1"], 0, 1, hi_open=True)
    check_number("weight_decay", g["weight_decay"], 0, math.inf)
    prob = g["preconditioner_update_probability"]
    if not callable(prob):
        check_number("preconditioner_update_probability", prob, 0, 1, lo_open=True)
    check_number("precond_lr", g["precond_lr"], 0, math.inf, lo_open=True)
    if g["precond_init_scale"] is not None:
        scale = g["precond_init_scale"]
        check_number("precond_init_scale", scale, 0, math.inf, lo_open=True, hi_open=True)
    check_number("beta_L", g["beta_L"], 0, 1, hi_open=True)
    check_clip(
        g.get("clip", "tensor"), g.get("clip_max_amp", 1.1), g.get("clip_max_entry", math.inf)
    )


def check_group(g: dict) -> None:
    """Validate one ``Kron`` group's hyperparameters; ``ValueError`` naming the argument."""
    check_step_settings(g)
    check_number("max_size_triangular", g["max_size_triangular"], 0, math.inf)
    mnt = g["min_ndim_triangular"]
    if isinstance(mnt, bool) or not isinstance(mnt, int) or mnt < 0:
        raise ValueError(f"min_ndim_triangular must be an int >= 0; got {mnt!r}")
    check_memory_save_mode(g["memory_save_mode"])
    for name in ("momentum_into_precond_update", "merge_dims"):
        if not isinstance(g[name], bool):
            raise ValueError(f"{name} must be True or False; got {g[name]!r}")
    for name in ("mu_dtype", "precond_dtype"):
        dt, kind = g[name], "floating-point or complex"
        ok = dt is None or (isinstance(dt, torch.dtype) and (dt.is_floating_point or dt.is_complex))
        if not ok:
            raise ValueError(f"{name} must be None or a {kind} torch.dtype; got {dt!r}")
    if g["precond_dtype"] in (torch.float16, torch.complex32):
        raise ValueError(
            "precond_dtype=torch.float16 is not supported: its range (largest 65504, smallest "
            "normal 6e-5) overflows the preconditioner's norms and flushes its damping to 0; use "
            "torch.bfloat16 (the same bytes with float32's range) or torch.float32"
        )
    geo.check_geometry(g["geometry"])
    check_number("max_skew", g["max_skew"], 0, math.inf, lo_open=True)
    if g["damping"] is not None:
        check_number("damping", g["damping"], 0, math.inf, hi_open=True)
    geo.check_lipschitz(g["lipschitz"])
    if g["precond_budget"] is not None:
        check_number("precond_budget", g["precond_budget"], 0, math.inf, lo_open=True)


CLIPS = ("tensor", "global", None)


def check_clip(clip, max_amp, max_entry=math.inf) -> None:
    check_choice("clip", clip, CLIPS)
    check_number("clip_max_amp", max_amp, 0, math.inf, lo_open=True)
    check_number("clip_max_entry", max_entry, 0, math.inf, lo_open=True)


def check_param(p: Tensor, group: dict) -> None:
    """A parameter Kron can step under ``group``'s settings, or a ``ValueError`` saying why."""
    if not (p.is_floating_point() or p.is_complex()):
        raise ValueError(f"Kron optimises floating-point or complex tensors; got {p.dtype}")
    mu = group["mu_dtype"]
    if mu is not None and p.is_complex() != mu.is_complex:
        if p.is_complex():
            raise ValueError(
                f"mu_dtype={mu} would drop the imaginary part of a {p.dtype} parameter's "
                "momentum; use a complex mu_dtype (or None: the parameter's dtype)"
            )
        raise ValueError(f"mu_dtype={mu} is complex but the parameter is {p.dtype}")
    precond_dtype(group, p)


def precond_dtype(group: dict, p: Tensor) -> torch.dtype:
    """float32 by default; the matching complex dtype for complex parameters."""
    pd = group["precond_dtype"]
    if pd is None:
        return torch.promote_types(torch.complex64, p.dtype) if p.is_complex() else torch.float32
    if p.is_complex() and not pd.is_complex:
        raise ValueError(
            f"precond_dtype={pd} would drop the imaginary part of a {p.dtype} parameter; "
            "use a complex precond_dtype (or None)"
        )
    return pd


def mu_dtype(group: dict, p: Tensor) -> torch.dtype:
    return group["mu_dtype"] or p.dtype


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Hyper:
    """One group's settings as the kernels read them (built once per step and group)."""

    lr: float
    b1: float
    weight_decay: float
    precond_lr: float
    geometry: geo.Geometry
    lipschitz: str
    beta_L: float
    norm_bound: str
    damping: float | str  # "kron", a float λ, or 0.0
    momentum_into_precond_update: bool
    init_scale: float | None
    clip: str | None = "tensor"  # "tensor" (kron-torch), "global" (the reference's) or None
    clip_max_amp: float = 1.1

    @staticmethod
    def of(group: dict, newton: bool) -> Hyper:
        damping = group["damping"]
        if damping is None:  # kron-torch's relative damping; Newton pairs are exact: none
            damping = 0.0 if newton else "kron"
        return Hyper(
            lr=group["lr"],
            b1=group["b1"],
            weight_decay=group["weight_decay"],
            precond_lr=group["precond_lr"],
            geometry=geo.get(group["geometry"]),
            lipschitz=group["lipschitz"],
            beta_L=group["beta_L"],
            norm_bound=geo.default_norm_bound(group["lipschitz"]),
            damping=damping,
            momentum_into_precond_update=group["momentum_into_precond_update"],
            init_scale=group["precond_init_scale"],
            clip=group.get("clip", "tensor"),  # absent from checkpoints saved before it existed
            clip_max_amp=group.get("clip_max_amp", 1.1),
        )

    @property
    def init_damping(self) -> float:
        """The damping of the data-driven initial scale (docs/maths.md §4)."""
        return self.damping if isinstance(self.damping, float) and self.damping > 0 else 1e-9


def decide(prob, prob_step: int, counter: int) -> tuple[bool, int, float]:
    """The deterministic update decision of docs/maths.md §5.2: ``(update now, the next counter,
    prob(n))``; update when ``counter + 1 >= 1/prob(n)``. kron-torch's arithmetic: a callable
    gets ``n`` as a float32 tensor, and a tensor probability is inverted in its own dtype (a CPU
    tensor: no device sync; a schedule returning a device tensor costs one)."""
    if callable(prob):
        prob = prob(torch.tensor(prob_step, dtype=torch.float32))
    value = float(prob)
    if not 0 < value <= 1:
        raise ValueError(
            f"preconditioner_update_probability must be in (0, 1]; the schedule gave "
            f"{value!r} at step {prob_step}"
        )
    inverse = float(1 / prob) if isinstance(prob, Tensor) else 1 / value
    counter += 1
    return (True, 0, value) if counter >= inverse else (False, counter, value)
