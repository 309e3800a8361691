"""Named recipes: each source's defaults, reproduced through psgd_lab's optimisers.

``make("reference-kron-whiten", model.parameters())`` builds the optimiser a preset names with
the settings it fixes; keyword arguments override any of them (``lr=...``). ``table(name)``
prints the settings as a Markdown table; ``PRESETS`` holds them all.

Sources: kron-torch 0.3.3's ``Kron`` (``"kron-torch"``: ``Kron``'s own defaults) and the PSGD
reference implementation (X.-L. Li's ``psgd_torch``, ``psgd.py``): ``KronWhiten``,
``KronNewton``, ``LRAWhiten``, ``LRANewton`` and ``DenseNewton`` with their constructors'
defaults. The current ``psgd.py`` (Oct. 2025) keeps only ``KronWhiten``, and its defaults,
per-tensor amplitude clipping included, are ``"reference-kron-whiten"``'s; the others are the
Sept. 2025 file's, the last that published them. psgd_lab's rules use the current file's helpers
(the random subspace norm bound, the Procrustes step of at most 1/8, damping
``(λ + eps·|h|)·n``). What psgd_lab does differently is listed in each preset's ``differences``;
``tests/test_presets.py`` checks every reference preset's first 20 steps against the reference's
step written out from those formulas, with the differences kept on the test's side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .optim import LRA, Dense, Kron

# The reference's common choices: no momentum (its default ``momentum=0``), P fitted to the
# gradient itself, updated every step, Q's scale taken from the first gradient, the EMA Lipschitz
# estimate, ``damping=1e-9``, and (the Sept. 2025 file's) no clipping unless ``grad_clip_max_amp``
# is set (then on the RMS of the whole update: ``clip="global"``). The current KronWhiten clips
# per tensor by default; its preset says so.
_REFERENCE = dict(
    b1=0.0, preconditioner_update_probability=1.0, momentum_into_precond_update=False,
    precond_lr=0.1, precond_init_scale=None, damping=1e-9, beta_L=0.9, clip=None,
)  # fmt: skip
_REF_KRON = dict(
    _REFERENCE, geometry="Q0.5EQ1.5", lipschitz="ema", max_size_triangular=math.inf,
    max_skew=1.0, merge_dims=False,
)  # fmt: skip
_MOMENTUM = (
    "the reference's momentum (if set) averages the first gradients equally "
    "(beta_t = min(t/(t+1), momentum)); psgd_lab's b1 is a bias-corrected EMA. Equal at b1 = 0"
)
_INIT = (
    "with precond_init_scale=None the reference takes one scale from the largest mean|g|^4 over "
    "all parameters; psgd_lab takes each tensor's own"
)
_COIN = (
    "the reference decides each preconditioner update with a coin flip of probability p; "
    "psgd_lab's counter rule updates every 1/p steps (the same at p = 1)"
)
_DTYPE = (
    "the reference keeps Q in the parameters' dtype; Kron's precond_dtype=None keeps it in "
    "float32 (pass precond_dtype=torch.float64 for float64 parameters)"
)
_PROCRUSTES = (
    "the Procrustes step normalises R = Q^T - Q by a one-step power bound (the current psgd.py: a "
    "random subspace bound; Sept. 2025: a one-step bound and a largest step of 0.2, not 1/8): the "
    "same rotation whenever the line search sets the step, i.e. while Q stays near symmetric "
    "(every step of tests/test_presets.py)"
)
_SEPT = (
    "KronNewton and DenseNewton are the Sept. 2025 psgd.py's, whose norm bound of T1 + T2 was "
    "one power step from the largest row (psgd_lab: the current file's random subspace bound, "
    "tighter, so L_i is larger by the gap) and whose damping was lambda*n (psgd_lab: "
    "(lambda + eps|h|)*n, the same to round-off)"
)


@dataclass(frozen=True)
class Preset:
    """One recipe: the optimiser class, the settings it fixes, where they come from, and what
    psgd_lab does differently from the source."""

    optimizer: type
    settings: dict
    source: str
    differences: tuple[str, ...] = field(default_factory=tuple)


PRESETS: dict[str, Preset] = {
    "kron-torch": Preset(Kron, {}, "kron-torch 0.3.3, Kron(...) defaults (psgd_lab.Kron's own)"),
    "reference-kron-whiten": Preset(
        Kron,
        dict(_REF_KRON, lr=0.001, clip="tensor", clip_max_amp=2.0, clip_max_entry=10.0),
        "psgd_torch psgd.py (Oct. 2025), KronWhiten(...) defaults, with its clip "
        "grad_clip_max_amps=(2.0, 10.0): each tensor's update to RMS 2, then every entry to ±10",
        (
            _MOMENTUM,
            _INIT,
            _COIN,
            _DTYPE,
            _PROCRUSTES,
            "the Sept. 2025 psgd.py's KronWhiten did not clip by default (grad_clip_max_amp=inf; "
            "when set, on the RMS of the whole update); clip=None, clip_max_entry=math.inf gives "
            "that default, clip='global', clip_max_amp=a its clip",
        ),
    ),
    "reference-kron-newton": Preset(
        Kron,
        dict(_REF_KRON, lr=0.01, mode="newton"),
        "psgd_torch psgd.py, KronNewton(...) defaults (exact Hessian-vector products)",
        (
            _MOMENTUM,
            _INIT,
            _COIN,
            _DTYPE,
            _PROCRUSTES,
            _SEPT,
            "KronNewton's optional grad_clip_max_norm (off by default) clips the norm; psgd_lab "
            "clips the RMS: clip='global' with clip_max_amp = max_norm / sqrt(n) is that clip",
        ),
    ),  # fmt: skip
    "reference-lra-whiten": Preset(
        LRA,
        dict(_REFERENCE, lr=0.001, rank=10, uv_schedule="random"),
        "psgd_torch psgd.py, LRAWhiten(...) defaults",
        (_MOMENTUM, _COIN),
    ),  # fmt: skip
    "reference-lra-newton": Preset(
        LRA,
        dict(_REFERENCE, lr=0.01, rank=10, uv_schedule="random", mode="newton"),
        "psgd_torch psgd.py, LRANewton(...) defaults (exact Hessian-vector products)",
        (_MOMENTUM, _COIN),
    ),  # fmt: skip
    "reference-dense-newton": Preset(
        Dense,
        dict(_REFERENCE, lr=0.01, geometry="Q0.5EQ1.5", lipschitz="ema", mode="newton"),
        "psgd_torch psgd.py, DenseNewton(...) defaults (exact Hessian-vector products)",
        (
            _MOMENTUM,
            _COIN,
            _PROCRUSTES,
            _SEPT,
            "the reference's DenseNewton normalises each step by |a|^2 + |v|^2, an upper bound "
            "of the norm of the rank-2 term a a^T + v v^T; psgd_lab's dense rules are Kron's, "
            "normalised by an estimate of that norm itself, so its steps are up to 2x larger",
        ),
    ),  # fmt: skip
}


def get(name: str) -> Preset:
    """The preset called ``name``, or a ``ValueError`` listing the names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are: {', '.join(PRESETS)}")
    return PRESETS[name]


def make(name: str, params, **overrides) -> torch.optim.Optimizer:
    """The optimiser preset ``name`` describes, over ``params``; ``overrides`` replace any
    setting (or add one the preset leaves at the class default)."""
    preset = get(name)
    return preset.optimizer(params, **{**preset.settings, **overrides})


def table(name: str) -> str:
    """The preset's settings as a Markdown table (``setting | value``), its class and source."""
    preset = get(name)
    rows = [f"| `{k}` | `{v!r}` |" for k, v in sorted(preset.settings.items())]
    head = f"`{name}`: `psgd_lab.{preset.optimizer.__name__}` — {preset.source}\n\n"
    return head + "\n".join(["| setting | value |", "|---|---|", *rows])
