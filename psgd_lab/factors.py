"""The Kronecker factors of ``Q``: init, applying ``Q``, ``Qᴴ`` and ``P``, ``gram_i``, balancing.

MATH.md §1 and §4. ``Q`` is a list of factors, one per dim: a ``(d, d)`` matrix (dense) or a
``(d,)`` vector (diagonal); a scalar has one factor of shape ``()``. Nothing here materialises the
``prod(d) x prod(d)`` Kronecker product except ``kron_matrix``, which is for small shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .linalg import self_gram, solve_upper_right, triu_gram, triu_mm
from .structure import KronPlan

MAX_MATRIX_SIZE = 4096


def init_factors(
    plan: KronPlan,
    scale: float | Tensor = 1.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    fits_p: bool = False,
) -> list[Tensor]:
    """``Q = scale · I``: each of the ``k`` factors gets ``scale**(1/k)`` (MATH.md §4); factors of
    ``P`` itself (``fits_p``: ``PRO4P``, ``QUAD4P``) start at ``scale²`` so that ``P`` does too."""
    if fits_p:
        scale = scale * scale
    if not plan.shape:
        return [torch.full((), float(scale), dtype=dtype, device=device)]
    s = scale ** (1.0 / len(plan.shape))
    return [
        torch.full((d,), float(s), dtype=dtype, device=device)
        if dg
        else float(s) * torch.eye(d, dtype=dtype, device=device)
        for d, dg in zip(plan.shape, plan.diag)
    ]


def data_init_scale(h: Tensor, v: Tensor | None = None, damping: float = 1e-9) -> Tensor:
    """Data-driven ``Q`` scale (MATH.md §4), a 0-dim tensor (no host sync).

    Whitening (``v is None``): ``(mean|h|⁴ + damping⁴)^(-1/8)``;
    Newton: ``(mean|v|²)^(1/4) · (mean|h|⁴ + damping⁴)^(-1/8)``.
    """
    h4 = h.abs().double().pow(4).mean() + damping**4
    s = h4.pow(-0.125)
    if v is not None:
        s = s * v.abs().double().square().mean().pow(0.25)
    return s


def scale_to_data(
    Q: Sequence[Tensor], h: Tensor, v: Tensor | None, damping: float, fits_p: bool = False
) -> None:
    """Rescale ``Q = I·c`` in place to the data-driven scale of MATH.md §4 (squared when the
    factors are factors of ``P``), shared evenly by the ``k`` factors."""
    s = data_init_scale(h, v, max(damping, 1e-30))  # finite even for h = 0
    if fits_p:
        s = s * s
    s = s.pow(1.0 / max(len(Q), 1))
    for q in Q:
        q.mul_(s.to(q.real.dtype))


def _conj_all(Q: Sequence[Tensor]) -> list[Tensor]:
    return [q.conj() for q in Q]


def apply_q(Q: Sequence[Tensor], X: Tensor, plan: KronPlan) -> Tensor:
    """``Q X``: along every axis ``i``, ``Y[..a..] = sum_b Q_i[a, b] X[..b..]``."""
    return plan.apply_q(*Q, X)


def apply_qh(Q: Sequence[Tensor], X: Tensor, plan: KronPlan) -> Tensor:
    """``Qᴴ X``."""
    return plan.apply_q(*[q.conj() if q.dim() < 2 else q.mH for q in Q], X)


def apply_p(Q: Sequence[Tensor], X: Tensor, plan: KronPlan, fits_p: bool = False) -> Tensor:
    """``P X = Qᴴ (Q X)`` in one contraction; ``fits_p``: the factors are factors of ``P`` itself
    (``PRO4P``, ``QUAD4P``), so ``P X = Q X``."""
    if fits_p:
        return apply_q(Q, X, plan)
    return plan.apply_p(*_conj_all(Q), *Q, X)


def apply_one(Q_i: Tensor, i: int, X: Tensor, plan: KronPlan) -> Tensor:
    """Factor ``i`` alone applied along axis ``i``."""
    return plan.apply_one[i](Q_i, X)


def gram(i: int, X: Tensor, Y: Tensor, plan: KronPlan) -> Tensor:
    """``gram_i(X, Y)``: contract ``X`` and ``conj(Y)`` over every axis but ``i`` (MATH.md §1)."""
    return plan.grams[i](X, Y.conj())


def gram_self(i: int, X: Tensor, plan: KronPlan) -> Tensor:
    """``gram_i(X, X)``: for a dense factor the mode-``i`` unfolding ``X_(i) X_(i)ᴴ``, computed
    once per symmetric pair of blocks (``linalg.self_gram``); for a diagonal one, the plan's."""
    if X.dim() == 0 or plan.diag[i] or 2 * plan.numel < plan.shape[i] ** 2:
        # a thin unfolding (fewer columns than d_i / 2) makes the product memory-bound: the
        # block splitting would only add copies of the d_i x d_i result
        return plan.grams[i](X, X.conj())
    return self_gram(X.movedim(i, 0).reshape(X.shape[i], -1))


def apply_q_triangular(Q: Sequence[Tensor], X: Tensor) -> Tensor:
    """``Q X`` for upper-triangular dense factors (``EQ``), axis by axis, skipping zero blocks."""
    if X.dim() == 0:
        return Q[0] * X
    for i, q in enumerate(Q):
        if q.dim() < 2:
            X = X * q.reshape((-1,) + (1,) * (X.dim() - i - 1))
        else:
            Xi = X.movedim(i, 0)
            X = triu_mm(q, Xi.reshape(q.shape[0], -1)).reshape(Xi.shape).movedim(0, i)
    return X


def solve_qh(Q: Sequence[Tensor], V: Tensor) -> Tensor:
    """``Q⁻ᴴ V`` for upper-triangular dense factors and diagonal factors (triangular solves).

    Along axis ``i`` the factor ``Q_i⁻ᴴ`` acts as ``X @ conj(Q_i)⁻¹`` on the axis moved last.
    """
    if V.dim() == 0:
        return V / Q[0].conj()
    out = V
    for i, q in enumerate(Q):
        out = out.movedim(i, -1)
        out = out / q.conj() if q.dim() < 2 else solve_upper_right(out, q.conj())
        out = out.movedim(-1, i)
    return out


def balance(Q: list[Tensor]) -> list[Tensor]:
    """Rescale factors in place to a common ``max|Q_i|`` (their geometric mean); ``Q`` unchanged."""
    if len(Q) < 2:
        return Q
    norms = torch.stack([q.abs().amax() for q in Q])
    norms = norms.clamp(min=torch.finfo(norms.dtype).tiny)  # an all-zero factor stays zero
    gmean = norms.log().mean().exp()
    torch._foreach_mul_(Q, list((gmean / norms).unbind()))
    return Q


def factor_p_compact(q: Tensor, triangular: bool = False) -> Tensor:
    """``P_i = Q_iᴴ Q_i`` in the factor's own storage: ``(d, d)`` dense, ``(d,)`` or ``()`` as
    ``|q|²``. ``apply_q`` with these factors applies ``P`` (each ``P_i`` is Hermitian).
    ``triangular``: ``q`` is upper-triangular (``EQ``), so its zero blocks are skipped."""
    if q.dim() == 2:
        return triu_gram(q) if triangular else q.mH @ q
    return q.conj() * q


def factor_p(q: Tensor, fits_p: bool = False) -> Tensor:
    """The dense ``P_i`` of one factor: ``Q_iᴴ Q_i`` (or ``Q_i`` itself when ``P`` is fitted)."""
    P = q if fits_p else factor_p_compact(q)
    return torch.diag(P) if P.dim() == 1 else (P.reshape(1, 1) if P.dim() == 0 else P)


def kron_matrix(factors: Sequence[Tensor]) -> Tensor:
    """Dense ``factors[0] ⊗ factors[1] ⊗ ...`` (row-major, matching ``X.reshape(-1)``)."""
    n = math.prod(f.shape[0] for f in factors)
    if n > MAX_MATRIX_SIZE:
        raise ValueError(
            f"the dense matrix would be {n} x {n}; kron_matrix is limited to "
            f"{MAX_MATRIX_SIZE} x {MAX_MATRIX_SIZE}: use apply_p / precondition instead"
        )
    out = factors[0]
    for f in factors[1:]:
        out = torch.kron(out, f)
    return out
