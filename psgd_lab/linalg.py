"""Small dense linear algebra: spectral-norm lower bounds, the Procrustes step, triangular solves.

All branch-free on tensor values (no ``.item()``), so they run without host syncs on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

NORM_BOUNDS = ("power", "subspace")


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


def norm_lower_bound_power(A: Tensor) -> Tensor:
    """Lower bound of ``‖A‖₂`` from one power step from A's largest column (kron-torch's bound).

    With ``c`` the column of largest norm and ``y = Aᴴc``, returns ``‖A y‖ / ‖y‖ ≤ ‖A‖₂``.
    ``A`` is scaled by ``max|A|`` first to avoid over/underflow. Returns 0 for ``A = 0``.
    """
    max_abs = A.abs().amax()
    scale = max_abs.clamp(min=_tiny(max_abs.dtype))
    A = A / scale
    j = torch.argmax(torch.linalg.vector_norm(A, dim=0))
    c = A.index_select(1, j.reshape(1)).squeeze(1)
    y = A.mH @ c
    y = y / torch.linalg.vector_norm(y).clamp(min=_tiny(scale.dtype))
    return torch.linalg.vector_norm(A @ y) * max_abs


SUBSPACE_ROWS = 32  # rows of the subspace iteration's random start


def norm_lower_bound_subspace(
    A: Tensor, generator: torch.Generator | None = None, k: int = SUBSPACE_ROWS, half_iters: int = 2
) -> Tensor:
    """Lower bound of ``‖A‖₂`` by a ``k``-row random subspace iteration (the newer reference).

    The random rows are rotated toward A's largest row, then ``half_iters`` times
    ``V <- V A; normalise rows; V <- V A``. Every row ends with ``‖v A‖`` for a unit ``v``, so the
    largest row norm is a lower bound. Works for Hermitian and skew-Hermitian ``A``.
    """
    dtype = A.dtype
    smallest = torch.finfo(dtype).smallest_normal
    scale = A.abs().amax() + smallest
    A = A / scale
    j = torch.argmax(torch.linalg.vector_norm(A, dim=1))
    row = A[j]
    V = torch.randn(k, A.shape[1], dtype=dtype, device=A.device, generator=generator)
    V = row + torch.sgn((row * V.conj()).sum(dim=1, keepdim=True)) * V
    for _ in range(half_iters):
        V = V @ A
        V = V / (torch.linalg.vector_norm(V, dim=1, keepdim=True) + smallest)
        V = V @ A
    return scale * torch.linalg.vector_norm(V, dim=1).amax()


def norm_lower_bound(A: Tensor, method: str = "power", generator: torch.Generator | None = None):
    """Dispatch to ``norm_lower_bound_power`` or ``norm_lower_bound_subspace``."""
    if method == "power":
        return norm_lower_bound_power(A)
    if method == "subspace":
        return norm_lower_bound_subspace(A, generator)
    raise ValueError(f"norm bound method must be one of {NORM_BOUNDS}; got {method!r}")


def procrustes_step(Q: Tensor, max_step: float = 0.125) -> Tensor:
    """One online orthogonal-Procrustes step that rotates ``Q`` toward SPD, in place (MATH.md §3).

    ``R = Qᴴ − Q`` normalised by its norm bound; ``Q <- Q + a (RQ + a/2 · RRQ)`` with the line
    search ``a = min(−tr(RQ)/tr(RRQ), max_step)`` when ``tr(RRQ) < 0``, else ``max_step``.
    Returns ``Q``.
    """
    R = Q.mH - Q
    R = R / (norm_lower_bound_power(R) + torch.finfo(R.dtype).smallest_normal)
    RQ = R @ Q
    RRQ = R @ RQ
    tr_RQ = RQ.diagonal().real.sum()
    tr_RRQ = RRQ.diagonal().real.sum()
    a = torch.where(tr_RRQ < 0, torch.clamp(-tr_RQ / tr_RRQ, max=max_step), max_step)
    return Q.add_(a * (RQ + 0.5 * a * RRQ))


def hermitian_defect(Q: Tensor) -> Tensor:
    """``‖Qᴴ − Q‖_F / ‖Q‖_F`` (0 for a Hermitian factor)."""
    return torch.linalg.matrix_norm(Q.mH - Q) / torch.linalg.matrix_norm(Q).clamp(
        min=_tiny(Q.real.dtype)
    )


def solve_upper_right(X: Tensor, U: Tensor) -> Tensor:
    """``X @ inv(U)`` for upper-triangular ``U`` along X's last axis, solved in >= float32."""
    work = torch.promote_types(U.dtype, torch.float32)
    out = torch.linalg.solve_triangular(
        U.to(work), X.reshape(-1, X.shape[-1]).to(work), upper=True, left=False
    )
    return out.to(X.dtype).reshape(X.shape)


# ---------------------------------------------------------------------------- triangular products
# Products of upper-triangular factors skip their zero blocks: splitting at k = d/2,
#   [[A11, A12], [0, A22]] @ [[B11, B12], [0, B22]] = [[A11 B11, A11 B12 + A12 B22], [0, A22 B22]]
# and recursing on the diagonal blocks costs 3/8 of a dense product at d = 1024 (1/3 in the
# limit). Below _LEAF a single dense product is faster than splitting further.
_LEAF = 256


def triu_matmul(A: Tensor, B: Tensor) -> Tensor:
    """``A @ B`` for upper-triangular ``(d, d)`` ``A`` and ``B``; the result is upper-triangular."""
    d = A.shape[-1]
    if d <= _LEAF:
        return A @ B
    k = d // 2
    out = torch.zeros_like(B)
    out[:k, :k] = triu_matmul(A[:k, :k], B[:k, :k])
    out[k:, k:] = triu_matmul(A[k:, k:], B[k:, k:])
    out[:k, k:] = A[:k, :k] @ B[:k, k:] + A[:k, k:] @ B[k:, k:]
    return out


def triu_mm(U: Tensor, X: Tensor) -> Tensor:
    """``U @ X`` for upper-triangular ``(d, d)`` ``U`` and any ``(d, m)`` ``X``:
    ``[U11 X1 + U12 X2; U22 X2]``, recursively on the triangular blocks (5/8 of a dense product
    at d = 1024)."""
    d = U.shape[-1]
    if d <= _LEAF:
        return U @ X
    k = d // 2
    top = triu_mm(U[:k, :k], X[:k]).addmm_(U[:k, k:], X[k:])
    return torch.cat([top, triu_mm(U[k:, k:], X[k:])])


def self_gram(X: Tensor) -> Tensor:
    """``X Xᴴ`` for ``(d, m)`` ``X`` (Hermitian): the off-diagonal block once, mirrored, and
    recursively the diagonal blocks (5/8 of a dense product at d = 1024)."""
    d = X.shape[0]
    if d <= _LEAF:
        return X @ X.mH
    k = d // 2
    out = torch.empty(d, d, dtype=X.dtype, device=X.device)
    out[:k, :k] = self_gram(X[:k])
    out[k:, k:] = self_gram(X[k:])
    out[:k, k:] = X[:k] @ X[k:].mH
    out[k:, :k] = out[:k, k:].mH
    return out


def triu_gram(U: Tensor) -> Tensor:
    """``Uᴴ U`` for upper-triangular ``(d, d)`` ``U`` (Hermitian result), skipping zero blocks:
    ``[[AᴴA, AᴴB], [BᴴA, BᴴB + CᴴC]]`` for ``U = [[A, B], [0, C]]``, recursing on the squares."""
    d = U.shape[-1]
    if d <= _LEAF:
        return U.mH @ U
    k = d // 2
    A, B, C = U[:k, :k], U[:k, k:], U[k:, k:]
    out = torch.empty_like(U)
    out[:k, :k] = triu_gram(A)
    out[:k, k:] = A.mH @ B
    out[k:, :k] = out[:k, k:].mH
    out[k:, k:] = B.mH @ B + triu_gram(C)
    return out
