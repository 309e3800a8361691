"""The Lie-group update rules for the Kronecker factors of ``Q`` (MATH.md §3).

Every rule has one signature::

    rule(Q, L, v, h, plan, *, lr, lipschitz="kron", beta_L=0.9, norm_bound="power", generator=None)

and updates the factors ``Q`` and the Lipschitz estimates ``L`` (0-dim tensors) in place from one
pair ``(v, h)``. ``v is None`` means whitening with ``v`` integrated out: ``E[gram_i(v, v)]`` is
replaced by ``(numel/d_i) I``. Rules that need an explicit ``v`` (``EQ``) draw it from
``generator``. Whitening (``h = g``) and Newton (``h = Hv``) differ only in the pair, so each rule
is written once. Dense factors use matrix products; diagonal ones the same formulas elementwise.

The step is ``lr / L_i`` where ``ℓ_i`` bounds the spectral norm of the factor's total term
(``T1 + T2``, or ``‖T1‖ + numel/d_i`` when ``T2`` is that multiple of ``I``) and
``L_i = ℓ_i`` (``lipschitz="kron"``, kron-torch) or the EMA ``L_i <- max(β L_i + (1-β) ℓ_i, ℓ_i)``
(``lipschitz="ema"``, the newer reference).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .factors import apply_one, apply_p, apply_q_triangular, balance, gram_self, solve_qh
from .linalg import (
    SUBSPACE_ROWS,
    hermitian_defect,
    norm_lower_bound,
    procrustes_step,
    triu_matmul,
)
from .structure import KronPlan

GEOMETRIES = ("EQ", "QEQ", "QEP", "Q0.5EQ1.5", "QUAD", "PRO4P", "QUAD4P")
LIPSCHITZ = ("kron", "ema")
# rules that fit P directly (each factor is a factor of P, not of Q; initial scale squared)
FITS_P = frozenset({"PRO4P", "QUAD4P"})
# rules whose T2 cannot be integrated out: whitening draws v internally
NEEDS_V = frozenset({"EQ"})
# rules whose dense factors must stay upper-triangular
TRIANGULAR = frozenset({"EQ"})

T2Term = Tensor | float  # a tensor, or c meaning c·I


def check_geometry(geometry: str) -> None:
    if geometry not in GEOMETRIES:
        allowed = ", ".join(repr(g) for g in GEOMETRIES)
        raise ValueError(f"geometry must be one of {allowed}; got {geometry!r}")


def check_lipschitz(lipschitz: str) -> None:
    if lipschitz not in LIPSCHITZ:
        raise ValueError(f"lipschitz must be one of 'kron', 'ema'; got {lipschitz!r}")


# --------------------------------------------------------------------------- shared pieces


def _c(plan: KronPlan, i: int) -> float:
    """``numel / d_i``: the integrated-out ``E[gram_i(v, v)]`` is this multiple of ``I``."""
    return plan.numel / plan.shape[i] if plan.shape else 1.0


def _minus(T1: Tensor, T2: T2Term) -> Tensor:
    """``T1 − T2`` where a float ``T2`` means ``T2 · I``. Overflowed entries become 0: the step
    is then 0 too (``_step``), so a pair that overflowed leaves the factor unchanged."""
    if isinstance(T2, Tensor):
        E = T1 - T2
    elif T1.dim() == 2:
        E = T1 - T2 * torch.eye(T1.shape[0], dtype=T1.dtype, device=T1.device)
    else:
        E = T1 - T2
    return E.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _ell(T1: Tensor, T2: T2Term, norm_bound: str, generator) -> Tensor:
    """``ℓ``: a lower bound of the spectral norm of ``T1 + T2`` (``max`` for diagonal terms)."""
    if isinstance(T2, Tensor):
        total = T1 + T2
        if total.dim() == 2:
            return norm_lower_bound(total, norm_bound, generator).real
        return total.real.amax()
    base = norm_lower_bound(T1, norm_bound, generator).real if T1.dim() == 2 else T1.real.amax()
    return base + T2


def _step(ell: Tensor, L_i: Tensor, lr: float, lipschitz: str, beta_L: float) -> Tensor:
    """Update ``L_i`` in place from ``ℓ`` and return the step ``lr / L_i``.

    A non-finite ``ℓ`` (the pair overflowed, e.g. gradients of 1e30 in float32) gives step 0 and
    leaves ``L_i`` alone, without a host sync: the factor is left unchanged by that pair.
    """
    ell = ell.to(L_i.dtype)
    ok = torch.isfinite(ell)
    new = torch.maximum(beta_L * L_i + (1 - beta_L) * ell, ell) if lipschitz == "ema" else ell
    L_i.copy_(torch.where(ok, new, L_i))
    step = lr / L_i.clamp(min=torch.finfo(L_i.dtype).tiny)
    return torch.where(ok, step, torch.zeros_like(step))


def _lr_over_L(T1, T2, L_i, q, lr, lipschitz, beta_L, norm_bound, generator) -> Tensor:
    """``lr / L_i`` after updating ``L_i`` from this pair's ``ℓ``, in ``q``'s real dtype."""
    ell = _ell(T1, T2, norm_bound, generator)
    return _step(ell, L_i, lr, lipschitz, beta_L).to(q.real.dtype)


def _grams(Q, v, h, plan, fits_p: bool):
    """``T1 = gram_i(Ph, Ph)``, ``T2 = gram_i(v, v)`` or ``numel/d_i`` for every factor."""
    Ph = apply_p(Q, h, plan, fits_p)
    for i in range(len(Q)):
        T2 = gram_self(i, v, plan) if v is not None else _c(plan, i)
        yield i, gram_self(i, Ph, plan), T2


def _procrustes_until(q: Tensor, tol: float = 1e-3, max_iters: int = 10) -> None:
    """Procrustes steps until ``‖Qᴴ − Q‖ < tol ‖Q‖`` (at most ``max_iters``), in place.

    A converged factor is frozen by ``torch.where``, so the result does not depend on whether
    the loop exits early; it exits early only on the CPU, where reading the flag costs no sync.
    """
    for _ in range(max_iters):
        done = hermitian_defect(q) < tol
        if q.device.type == "cpu" and bool(done):
            return
        q.copy_(torch.where(done, q, procrustes_step(q.clone())))


# --------------------------------------------------------------------------- the rules


def update_eq(Q, L, v, h, plan, *, lr, lipschitz="kron", beta_L=0.9, norm_bound="power",
              generator=None) -> None:  # fmt: skip
    """``dQ = E Q``: ``Q_i <- Q_i − lr/L_i · triu(T1 − T2) Q_i`` with ``A = Qh``, ``B = Q⁻ᴴv``."""
    if v is None:
        v = torch.randn(h.shape, dtype=h.dtype, device=h.device, generator=generator)
    A = apply_q_triangular(Q, h)
    B = solve_qh(Q, v)
    for i, q in enumerate(Q):
        T1, T2 = gram_self(i, A, plan), gram_self(i, B, plan)
        s = _lr_over_L(T1, T2, L[i], q, lr, lipschitz, beta_L, norm_bound, generator)
        E = _minus(T1, T2)
        if q.dim() == 2:  # triu(E) and Q_i are upper-triangular: skip the zero blocks
            q.addcmul_(triu_matmul(E.triu_(), q), s, value=-1)
        else:
            q.addcmul_(E * q, s, value=-1)


def update_qeq(Q, L, v, h, plan, *, lr, lipschitz="kron", beta_L=0.9, norm_bound="power",
               generator=None) -> None:  # fmt: skip
    """``dQ = Q E Q``: ``Q_i <- Q_i − lr/L_i · Q_i (T1 − T2)``, ``T1 = gram_i(Ph, Ph)``.

    MATH.md writes the whitening case as ``Q_i T1 − T2 Q_i``; with ``v`` integrated out
    ``T2 = c·I`` and the two agree. With an explicit ``v`` we keep ``Q_i (T1 − T2)``, the form
    whose generator ``T1 − T2`` is Hermitian, whichever mode produced the pair.
    """
    for i, T1, T2 in _grams(Q, v, h, plan, fits_p=False):
        q = Q[i]
        s = _lr_over_L(T1, T2, L[i], q, lr, lipschitz, beta_L, norm_bound, generator)
        E = _minus(T1, T2)
        q.sub_(s * (q @ E if q.dim() == 2 else q * E))


def _update_eq_then_procrustes(Q, L, v, h, plan, *, fits_p, lr, lipschitz, beta_L, norm_bound,
                               generator) -> None:  # fmt: skip
    """``Q_i <- Q_i − lr/L_i · (T1 − T2) Q_i``, then Procrustes (once, or to convergence for P)."""
    for i, T1, T2 in _grams(Q, v, h, plan, fits_p=fits_p):
        q = Q[i]
        s = _lr_over_L(T1, T2, L[i], q, lr, lipschitz, beta_L, norm_bound, generator)
        E = _minus(T1, T2)
        if q.dim() == 2:
            q.sub_(s * E @ q)
            if fits_p:
                _procrustes_until(q)
            else:
                procrustes_step(q)
        else:
            q.mul_(1 - s * E)


def update_q05eq15(Q, L, v, h, plan, **kw) -> None:
    """``dQ = Q^½ E Q^{3/2}``: ``Q_i <- Q_i − lr/L_i (T1 − T2) Q_i``, then one Procrustes step."""
    _update_eq_then_procrustes(Q, L, v, h, plan, fits_p=False, **_defaults(kw))


def update_pro4p(Q, L, v, h, plan, **kw) -> None:
    """``dP = P^½ E P`` on factors of ``P``; Procrustes steps until ``P_i`` is Hermitian."""
    _update_eq_then_procrustes(Q, L, v, h, plan, fits_p=True, **_defaults(kw))


def _update_quadratic(Q, L, v, h, plan, *, fits_p, lr, lipschitz, beta_L, norm_bound,
                      generator) -> None:  # fmt: skip
    """``p = Q_i − E Q_i; p = p − p E; Q_i <- (p + pᴴ)/2`` with ``E = lr/(2L_i)(T1 − T2)``.

    For ``QUAD4P`` (``fits_p``) the factor is a factor of ``P`` and ``E = lr/L_i (T1 − T2)``.
    """
    half = 1.0 if fits_p else 0.5
    for i, T1, T2 in _grams(Q, v, h, plan, fits_p=fits_p):
        q = Q[i]
        s = _lr_over_L(T1, T2, L[i], q, lr, lipschitz, beta_L, norm_bound, generator)
        E = (half * s) * _minus(T1, T2)
        if q.dim() == 2:
            p = q - E @ q
            p = p - p @ E
            q.copy_((p + p.mH) / 2)
        else:
            q.mul_((1 - E) * (1 - E))


def update_quad(Q, L, v, h, plan, **kw) -> None:
    """Quadratic form on ``Q``: keeps every dense ``Q_i`` Hermitian."""
    _update_quadratic(Q, L, v, h, plan, fits_p=False, **_defaults(kw))


def update_quad4p(Q, L, v, h, plan, **kw) -> None:
    """Quadratic form on the factors of ``P`` directly (risky in half precision)."""
    _update_quadratic(Q, L, v, h, plan, fits_p=True, **_defaults(kw))


def update_qep(Q, L, v, h, plan, *, lr, lipschitz="kron", beta_L=0.9, norm_bound="power",
               generator=None) -> None:  # fmt: skip
    """``dQ = Q E P``: ``Q_i <- Q_i − lr/L_i (T1 − T2) Q_i``, ``Q_i`` applied to ``Ph`` and ``v``.

    ``T1 = gram_i(Q_i·Ph, Q_i·Ph)``; ``T2 = gram_i(Q_i·v, Q_i·v)``, or ``(numel/d_i) Q_i Q_iᴴ`` when
    ``v`` is integrated out. Factors are balanced first: ``L_i`` is not invariant to their scales.
    """
    balance(Q)
    Ph = apply_p(Q, h, plan)
    for i, q in enumerate(Q):
        X = apply_one(q, i, Ph, plan)
        T1 = gram_self(i, X, plan)
        if v is not None:
            Qv = apply_one(q, i, v, plan)
            T2 = gram_self(i, Qv, plan)
        elif q.dim() == 2:
            T2 = _c(plan, i) * (q @ q.mH)
        else:
            T2 = _c(plan, i) * (q * q.conj())
        s = _lr_over_L(T1, T2, L[i], q, lr, lipschitz, beta_L, norm_bound, generator)
        E = _minus(T1, T2)
        q.sub_(s * (E @ q if q.dim() == 2 else E * q))


def default_norm_bound(lipschitz: str, norm_bound: str | None = None) -> str:
    """``norm_bound`` if given, else ``"power"`` (kron-torch) for ``lipschitz="kron"`` and
    ``"subspace"`` (the newer reference) for ``"ema"``."""
    return norm_bound or ("power" if lipschitz == "kron" else "subspace")


def draws(plan: KronPlan, lipschitz: str, norm_bound: str | None = None) -> list[tuple[int, ...]]:
    """The shapes, in order, of what one update of any rule draws from its ``generator`` when
    given ``v``: the subspace norm bound draws ``(k, d_i)`` once per dense factor; the power
    bound draws nothing. (``Kron(distributed="shard")`` replays them to keep ranks in step.)"""
    if default_norm_bound(lipschitz, norm_bound) != "subspace":
        return []
    return [(SUBSPACE_ROWS, d) for d, diag in zip(plan.shape, plan.diag) if not diag]


def _defaults(kw: dict) -> dict:
    out = {"lipschitz": "kron", "beta_L": 0.9, "norm_bound": "power", "generator": None}
    out.update(kw)
    return out


Rule = Callable[..., None]

RULES: dict[str, Rule] = {
    "EQ": update_eq,
    "QEQ": update_qeq,
    "QEP": update_qep,
    "Q0.5EQ1.5": update_q05eq15,
    "QUAD": update_quad,
    "PRO4P": update_pro4p,
    "QUAD4P": update_quad4p,
}
assert tuple(RULES) == GEOMETRIES


def update(
    geometry: str,
    Q: Sequence[Tensor],
    L: Sequence[Tensor],
    v: Tensor | None,
    h: Tensor,
    plan: KronPlan,
    *,
    lr: float,
    lipschitz: str = "kron",
    beta_L: float = 0.9,
    norm_bound: str | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """One fitting step of ``geometry`` on the pair ``(v, h)``; ``Q`` and ``L`` change in place.

    ``norm_bound`` defaults to ``"power"`` (kron-torch) with ``lipschitz="kron"`` and to
    ``"subspace"`` (newer reference) with ``lipschitz="ema"``.
    """
    check_geometry(geometry)
    check_lipschitz(lipschitz)
    norm_bound = default_norm_bound(lipschitz, norm_bound)
    RULES[geometry](
        Q, L, v, h, plan, lr=lr, lipschitz=lipschitz, beta_L=beta_L, norm_bound=norm_bound,
        generator=generator,
    )  # fmt: skip
