"""The Lie-group update rules for the Kronecker factors of ``Q`` (docs/maths.md §3), one
record each.

A ``Geometry`` record holds everything about a rule: the update itself, whether it needs an
explicit ``v`` in whitening, whether its factors are factors of ``P``, whether its dense factors
stay triangular, and what random starts its norm bounds draw. ``register`` adds one; adding a
geometry touches nothing else. Every rule has one signature::

    rule(Q, L, v, h, *, lr, lipschitz, beta_L, norm_bound, starts)

and updates a stack of factors ``Q`` (``factors``: ``(B, d, d)``, ``(B, d)`` or ``(B,)``) and
their Lipschitz estimates ``L`` (``(B,)`` each) in place from the stacked pair ``(v, h)``.
``v is None`` means whitening with ``v`` integrated out: ``E[gram_i(v, v)]`` is ``(numel/d_i) I``.
Whitening (``h = g``) and Newton (``h = Hv``) differ only in the pair, so each rule is written
once. The step is ``lr / L_i``, where ``ℓ_i`` bounds the spectral norm of the factor's total term
(``T1 + T2``, or ``‖T1‖ + numel/d_i`` when ``T2`` is that multiple of ``I``) and ``L_i = ℓ_i``
(``lipschitz="kron"``, kron-torch) or ``L_i <- max(β L_i + (1-β) ℓ_i, ℓ_i)`` (``"ema"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .factors import (
    apply_one,
    apply_p,
    apply_q_triangular,
    balance,
    gram_self,
    is_dense,
    solve_qh,
    unfold,
)
from .linalg import (
    SUBSPACE_ROWS,
    mm,
    norm_lower_bound,
    procrustes_step,
    procrustes_until,
    rms1_rows,
    triu_matmul,
    triu_outer_mm,
)
from .pairs import Draws, damped
from .structure import KronPlan

LIPSCHITZ = ("kron", "ema")
T2Term = Tensor | float  # a tensor, or c meaning c·I
Rule = Callable[..., None]


@dataclass(frozen=True)
class Geometry:
    """One Lie-group rule and everything the rest of the library needs to know about it."""

    name: str
    rule: Rule
    needs_v: bool = False  # whitening cannot integrate v out: it draws one (EQ)
    fits_p: bool = False  # factors are factors of P itself (initial scale squared)
    triangular: bool = False  # dense factors stay upper-triangular
    summary: str = ""

    def starts(self, plan: KronPlan, norm_bound: str) -> list[tuple[int, ...] | None]:
        """Per factor, the shape of the random start its norm bound draws per update (the
        subspace bound: ``(k, d)`` per dense factor), or None."""
        if norm_bound != "subspace" or not plan.shape:
            return [None] * max(len(plan.shape), 1)
        return [None if dg else (SUBSPACE_ROWS, d) for d, dg in zip(plan.shape, plan.diag)]


REGISTRY: dict[str, Geometry] = {}


def register(geometry: Geometry) -> Geometry:
    """Add a rule to the registry (``Kron(geometry=name)`` and ``KronPreconditioner`` find it)."""
    if not isinstance(geometry, Geometry):
        raise TypeError(f"register wants a Geometry record; got {type(geometry).__name__}")
    REGISTRY[geometry.name] = geometry
    return geometry


def get(name: str) -> Geometry:
    """The record of ``name``, or a ``ValueError`` listing the registered names."""
    check_geometry(name)
    return REGISTRY[name]


def check_geometry(geometry: str) -> None:
    if geometry not in REGISTRY:
        allowed = ", ".join(repr(g) for g in REGISTRY)
        raise ValueError(f"geometry must be one of {allowed}; got {geometry!r}")


def check_lipschitz(lipschitz: str) -> None:
    if lipschitz not in LIPSCHITZ:
        raise ValueError(f"lipschitz must be one of 'kron', 'ema'; got {lipschitz!r}")


def default_norm_bound(lipschitz: str, norm_bound: str | None = None) -> str:
    """``norm_bound`` if given, else ``"power"`` (kron-torch) for ``lipschitz="kron"`` and
    ``"subspace"`` (the newer reference) for ``"ema"``."""
    return norm_bound or ("power" if lipschitz == "kron" else "subspace")


# --------------------------------------------------------------------------- shared pieces


def _s(x: Tensor, q: Tensor) -> Tensor:
    """A per-tensor ``(B,)`` value shaped to broadcast against the stacked factor ``q``."""
    x = x.reshape(x.shape + (1,) * (q.dim() - 1))
    return x if x.dtype == q.dtype else x.to(q.dtype)


def _c(h: Tensor, i: int) -> float:
    """``numel / d_i``: the integrated-out ``E[gram_i(v, v)]`` is this multiple of ``I``."""
    shape = h.shape[1:]
    return math.prod(shape) / shape[i] if shape else 1.0


def difference(T1: Tensor, T2: T2Term) -> Tensor:
    """``T1 − T2``, computed in ``T1``'s storage (``T1`` is spent), where a float ``T2`` means
    ``T2 · I``. Overflowed entries become 0: the step is then 0 too (``_step``), so a pair that
    overflowed leaves the factor unchanged."""
    if isinstance(T2, Tensor):
        E = T1.sub_(T2)
    elif T1.dim() == 3:
        E = T1
        E.diagonal(dim1=-2, dim2=-1).sub_(T2)
    else:
        E = T1.sub_(T2)
    return E.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _bound(T: Tensor, norm_bound: str, start: Tensor | None, spent: bool = False) -> Tensor:
    """Per tensor, a lower bound of ``‖T‖₂``: the norm bound (dense) or ``max`` (diagonal).
    ``spent``: ``T`` is a temporary the bound may overwrite."""
    if T.dim() == 3:
        return norm_lower_bound(T, norm_bound, start, overwrite=spent).real
    return T.real if T.dim() == 1 else T.real.amax(dim=-1)


def _step(ell: Tensor, L_i: Tensor, lr: float, lipschitz: str, beta_L: float) -> Tensor:
    """Update ``L_i`` in place from ``ℓ`` and return the step ``lr / L_i`` (all ``(B,)``).

    A non-finite ``ℓ`` (the pair overflowed, e.g. gradients of 1e30 in float32) gives step 0 and
    leaves ``L_i`` alone, without a host sync: the factor is left unchanged by that pair.
    """
    ell = ell if ell.dtype == L_i.dtype else ell.to(L_i.dtype)
    ok = torch.isfinite(ell)
    new = torch.maximum(beta_L * L_i + (1 - beta_L) * ell, ell) if lipschitz == "ema" else ell
    L_i.copy_(torch.where(ok, new, L_i))
    step = lr / L_i.clamp(min=torch.finfo(L_i.dtype).tiny)
    return torch.where(ok, step, 0.0)


def step_size(T1, T2, L_i, q, lr, lipschitz, beta_L, norm_bound, start) -> Tensor:
    """``lr / L_i`` shaped against ``q``, after updating ``L_i`` from this pair's ``ℓ``."""
    if isinstance(T2, Tensor):
        ell = _bound(T1 + T2, norm_bound, start, spent=True)
    else:
        ell = _bound(T1, norm_bound, start) + T2
    return _s(_step(ell, L_i, lr, lipschitz, beta_L), q)


def step_and_difference(T1, T2, L_i, q, lr, lipschitz, beta_L, norm_bound, start):
    """``(step_size(...), difference(T1, T2), spare)``; ``T1``'s storage becomes the difference.
    For a stack of large dense terms (``d > 256``), ``T1 + T2`` and ``T1 − T2`` are made one
    matrix at a time through one ``d x d`` temporary into ``T2``'s and ``T1``'s own storage (the
    same values): no fresh ``B x d x d`` sum, whose pages the CPU would fault in on every update;
    ``T2`` is spent too and returned as ``spare``, free once the bound has read it. Otherwise
    ``T2`` is left as it was and ``spare`` is None."""
    if not (isinstance(T2, Tensor) and T1.dim() == 3 and T1.shape[-1] > 256):
        s = step_size(T1, T2, L_i, q, lr, lipschitz, beta_L, norm_bound, start)
        return s, difference(T1, T2), None
    total = torch.empty_like(T1[0])
    for a, b in zip(T1, T2):  # (a, b) <- (a − b, a + b)
        torch.add(a, b, out=total)
        a.sub_(b)
        b.copy_(total)
    ell = _bound(T2, norm_bound, start, spent=True)
    s = _s(_step(ell, L_i, lr, lipschitz, beta_L), q)
    return s, T1.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0), T2


def terms(Q, v, h, fits_p: bool):
    """``T1 = gram_i(Ph, Ph)`` and ``T2 = gram_i(v, v)`` (or ``numel/d_i``) for every factor."""
    Ph = apply_p(Q, h, fits_p)
    for i, q in enumerate(Q):
        dense = is_dense(q)
        T2 = gram_self(i, v, dense) if v is not None else _c(h, i)
        yield i, q, gram_self(i, Ph, dense), T2


# --------------------------------------------------------------------------- the rules


def update_eq(Q, L, v, h, *, lr, lipschitz, beta_L, norm_bound, starts) -> None:
    """``dQ = E Q``: ``Q_i <- Q_i − lr/L_i · triu(T1 − T2) Q_i`` with ``A = Qh``, ``B = Q⁻ᴴv``.
    A dense factor whose unfoldings are thin (``_factored``) never forms ``T1 − T2``: it is
    ``L Rᴴ`` with ``L = [A_i, B_i]``, ``R = [A_i, −B_i]``, and ``triu(L Rᴴ) Q_i`` is summed in
    factored form (``linalg.triu_outer_mm``, docs/maths.md §3.2); its step's norm bound is taken
    on the small Gram ``Lᴴ L``, whose spectral norm is that of ``T1 + T2 = L Lᴴ``."""
    if v is None:
        raise ValueError("EQ needs an explicit v (whitening draws one; see Geometry.needs_v)")
    A = apply_q_triangular(Q, h)
    Bv = solve_qh(Q, v)
    for i, q in enumerate(Q):
        dense = is_dense(q)
        if dense and _factored(q.shape[-1], 2 * _c(h, i)):
            Lf = torch.cat([unfold(A, i), unfold(Bv, i)], dim=-1)  # (B, d, k), k = 2·numel/d
            # ‖T1 + T2‖ = ‖Lf Lfᴴ‖ = ‖Lfᴴ Lf‖ (the same nonzero eigenvalues): the bound reads
            # the k x k Gram, never the d x d product; the subspace start rows go along (V Lf)
            start = None if starts[i] is None else rms1_rows(mm(starts[i].to(Lf.dtype), Lf))
            s = step_size(mm(Lf.mH, Lf), 0.0, L[i], q, lr, lipschitz, beta_L, norm_bound,
                          start)  # fmt: skip
            Rf = torch.cat([unfold(A, i), unfold(Bv, i).neg()], dim=-1)
            q.addcmul_(triu_outer_mm(Lf, Rf, q).nan_to_num_(0.0, 0.0, 0.0), s, value=-1)
            continue
        T1, T2 = gram_self(i, A, dense), gram_self(i, Bv, dense)
        s, E, spare = step_and_difference(T1, T2, L[i], q, lr, lipschitz, beta_L, norm_bound,
                                          starts[i])  # fmt: skip
        if dense:  # triu(E) and Q_i are upper-triangular: skip the zero blocks
            q.addcmul_(triu_matmul(E.triu_(), q, out=spare), s, value=-1)
        else:
            q.addcmul_(E.mul_(q), s, value=-1)


def _factored(d: int, k: float) -> bool:
    """Whether ``triu(L Rᴴ) Q_i`` with ``k`` columns in ``L``, ``R`` is cheaper in factored form:
    ``(4k + 64)·d²`` FLOPs (blocks of 32) against the dense product's ``2d³`` (``d ≤ 256``) or
    ``0.8 d³`` (``linalg.triu_matmul``'s blocks); from ``d = 128`` on (below, dispatches
    dominate), and while its block suffix sums, ``(d/32)·k·d`` numbers, stay under 16 M: past
    that their memory traffic costs more than the FLOPs saved (measured: a (4096, 256) weight,
    ``k = 512``, 1 GB of sums, ran 20% slower than the dense product)."""
    small = (d // 32) * k * d <= 2**24
    return d >= 128 and small and 4 * k + 64 < (2.0 if d <= 256 else 0.8) * d


def update_qeq(Q, L, v, h, *, lr, lipschitz, beta_L, norm_bound, starts) -> None:
    """``dQ = Q E Q``: ``Q_i <- Q_i − lr/L_i · Q_i (T1 − T2)``, ``T1 = gram_i(Ph, Ph)``.

    With ``v`` integrated out ``T2 = c·I`` and ``Q_i T1 − T2 Q_i`` (docs/maths.md §3's whitening
    form) is the same; with an explicit ``v`` we keep ``Q_i (T1 − T2)``, whose generator is
    Hermitian.
    """
    for i, q, T1, T2 in terms(Q, v, h, fits_p=False):
        s = step_size(T1, T2, L[i], q, lr, lipschitz, beta_L, norm_bound, starts[i])
        E = difference(T1, T2)
        q.addcmul_(mm(q, E) if is_dense(q) else E.mul_(q), s, value=-1)


def _eq_then_procrustes(Q, L, v, h, *, fits_p, lr, lipschitz, beta_L, norm_bound, starts):
    """``Q_i <- Q_i − lr/L_i · (T1 − T2) Q_i``, then Procrustes (once, or to convergence for P)."""
    for i, q, T1, T2 in terms(Q, v, h, fits_p=fits_p):
        s = step_size(T1, T2, L[i], q, lr, lipschitz, beta_L, norm_bound, starts[i])
        E = difference(T1, T2)
        if is_dense(q):
            q.addcmul_(mm(E, q), s, value=-1)
            procrustes_until(q) if fits_p else procrustes_step(q)
        else:
            q.mul_(E.mul_(s).neg_().add_(1))


def update_q05eq15(Q, L, v, h, **kw) -> None:
    """``dQ = Q^½ E Q^{3/2}``: ``Q_i <- Q_i − lr/L_i (T1 − T2) Q_i``, then one Procrustes step."""
    _eq_then_procrustes(Q, L, v, h, fits_p=False, **kw)


def update_pro4p(Q, L, v, h, **kw) -> None:
    """``dP = P^½ E P`` on factors of ``P``; Procrustes steps until ``P_i`` is Hermitian."""
    _eq_then_procrustes(Q, L, v, h, fits_p=True, **kw)


def _quadratic(Q, L, v, h, *, fits_p, lr, lipschitz, beta_L, norm_bound, starts):
    """``p = Q_i − E Q_i; p = p − p E; Q_i <- (p + pᴴ)/2`` with ``E = lr/(2L_i)(T1 − T2)``;
    for factors of ``P`` (``QUAD4P``) ``E = lr/L_i (T1 − T2)``."""
    half = 1.0 if fits_p else 0.5
    for i, q, T1, T2 in terms(Q, v, h, fits_p=fits_p):
        s = step_size(T1, T2, L[i], q, lr, lipschitz, beta_L, norm_bound, starts[i])
        E = (half * s) * difference(T1, T2)
        if is_dense(q):
            p = q - E @ q
            p = p - p @ E
            q.copy_((p + p.mH) / 2)
        else:
            q.mul_((1 - E) * (1 - E))


def update_quad(Q, L, v, h, **kw) -> None:
    """Quadratic form on ``Q``: keeps every dense ``Q_i`` Hermitian."""
    _quadratic(Q, L, v, h, fits_p=False, **kw)


def update_quad4p(Q, L, v, h, **kw) -> None:
    """Quadratic form on the factors of ``P`` directly (risky in half precision)."""
    _quadratic(Q, L, v, h, fits_p=True, **kw)


def update_qep(Q, L, v, h, *, lr, lipschitz, beta_L, norm_bound, starts) -> None:
    """``dQ = Q E P``: ``Q_i <- Q_i − lr/L_i (T1 − T2) Q_i``, ``Q_i`` applied to ``Ph`` and ``v``.

    ``T1 = gram_i(Q_i·Ph, Q_i·Ph)``; ``T2 = gram_i(Q_i·v, Q_i·v)``, or ``(numel/d_i) Q_i Q_iᴴ`` when
    ``v`` is integrated out. Factors are balanced first: ``L_i`` is not invariant to their scales.
    """
    balance(Q)
    Ph = apply_p(Q, h)
    for i, q in enumerate(Q):
        dense = is_dense(q)
        T1 = gram_self(i, apply_one(q, i, Ph), dense)
        if v is not None:
            T2 = gram_self(i, apply_one(q, i, v), dense)
        else:
            T2 = _c(h, i) * (q @ q.mH if dense else q * q.conj())
        s = step_size(T1, T2, L[i], q, lr, lipschitz, beta_L, norm_bound, starts[i])
        E = difference(T1, T2)
        q.addcmul_(mm(E, q) if dense else E.mul_(q), s, value=-1)


for _g in (
    Geometry("EQ", update_eq, needs_v=True, triangular=True, summary="dQ = E Q (kron-torch)"),
    Geometry("QEQ", update_qeq, summary="dQ = Q E Q, inverse-free"),
    Geometry("QEP", update_qep, summary="dQ = Q E P, factors balanced first"),
    Geometry("Q0.5EQ1.5", update_q05eq15, summary="dQ = Q^0.5 E Q^1.5, Q kept near SPD"),
    Geometry("QUAD", update_quad, summary="quadratic form on Q, Q kept Hermitian"),
    Geometry("PRO4P", update_pro4p, fits_p=True, summary="dP = P^0.5 E P on factors of P"),
    Geometry("QUAD4P", update_quad4p, fits_p=True, summary="quadratic form on factors of P"),
):
    register(_g)
GEOMETRIES = tuple(REGISTRY)  # the seven built-in rules


def update(
    geometry: str | Geometry,
    Q: Sequence[Tensor],
    L: Sequence[Tensor],
    v: Tensor | None,
    h: Tensor,
    *,
    lr: float,
    lipschitz: str = "kron",
    beta_L: float = 0.9,
    norm_bound: str | None = None,
    starts: Sequence[Tensor | None] | None = None,
) -> None:
    """One fitting step of ``geometry`` on the stacked pair ``(v, h)``; ``Q`` and ``L`` change in
    place. ``starts``: the random starts ``Geometry.starts`` asks for (needed by the subspace bound,
    which ``lipschitz="ema"`` uses by default)."""
    record = geometry if isinstance(geometry, Geometry) else get(geometry)
    check_lipschitz(lipschitz)
    norm_bound = default_norm_bound(lipschitz, norm_bound)
    starts = list(starts) if starts is not None else [None] * len(Q)
    record.rule(
        Q, L, v, h, lr=lr, lipschitz=lipschitz, beta_L=beta_L, norm_bound=norm_bound, starts=starts
    )


def fit(
    geometry: str | Geometry,
    Q: Sequence[Tensor],
    L: Sequence[Tensor],
    h: Tensor,
    v: Tensor | None,
    draws: Draws,
    *,
    lr: float,
    lipschitz: str = "kron",
    beta_L: float = 0.9,
    norm_bound: str | None = None,
    damping: float | str = "kron",
    numel: Tensor | None = None,
    h_owned: bool = False,
) -> None:
    """One preconditioner update from a stacked pair, the path ``Kron`` and
    ``KronPreconditioner`` share: whitening (``v is None``: ``h`` is a gradient; ``draws.v`` is
    the probe, passed to the rule only where it cannot be integrated out) or Newton (``h = H v``);
    ``h`` damped first (``pairs.damped``); then the rule with ``draws.starts``.

    ``numel``: ``(B,)`` lengths of a stack of vectors zero-padded to a common length (``h``, ``v``
    and the draws 0 past each length; each diagonal factor's padding a copy of its own entries,
    see ``psgd_lab.optim.padding``); the damping's mean is taken over each real length. The rules
    need nothing else: for a vector ``numel/d`` is 1, padded or not. ``h_owned``: ``h`` is the
    caller's temporary (e.g. a debiased momentum made for this fit), which the damping may
    overwrite."""
    if numel is not None and h.dim() != 2:
        raise ValueError(f"numel is for stacks of vectors (B, D); got a stack of shape {h.shape}")
    record = geometry if isinstance(geometry, Geometry) else get(geometry)
    probe = v if v is not None else draws.v
    v_rule = v if v is not None else (probe if record.needs_v else None)
    h = damped(h, damping, probe, draws.noise, numel, h_owned)
    update(record, Q, L, v_rule, h, lr=lr, lipschitz=lipschitz, beta_L=beta_L,
           norm_bound=norm_bound, starts=draws.starts)  # fmt: skip
