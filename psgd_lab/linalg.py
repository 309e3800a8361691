"""Small dense linear algebra on stacks of matrices: spectral-norm lower bounds, the Procrustes
step, triangular solves and products that skip zero blocks.

Every function takes ``(..., d, d)`` stacks (any leading batch dims; ``(d, d)`` is a stack of
none) and is branch-free on tensor values (no ``.item()``), so it runs without host syncs on any
device and traces under ``torch.compile``. Random starts are passed in, never drawn here.
"""

from __future__ import annotations

import torch
from torch import Tensor

NORM_BOUNDS = ("power", "subspace")
SUBSPACE_ROWS = 32  # rows of the subspace iteration's random start


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


def _real(dtype: torch.dtype) -> torch.dtype:
    return torch.empty((), dtype=dtype).real.dtype


_OUT_DTYPES = (torch.float32, torch.complex64, torch.bfloat16)  # mm(out=) in place


def mm(A: Tensor, B: Tensor, out: Tensor | None = None) -> Tensor:
    """``A @ B``; for two stacks of one batch dim, ``torch.bmm`` itself (the same kernel without
    ``matmul``'s expand and reshape dispatches, half of a small product's cost). ``out``: written
    there, e.g. a block of a larger matrix. In float32, complex64 and bfloat16 BLAS writes a
    row-major block in place (on this machine the same values as the product, without a
    temporary and its copy); in other dtypes (float64's 2-D product takes another MKL path, with
    other roundings), under ``torch.compile`` (dynamo refuses a strided ``out=``) and when
    autograd records the product (``out=`` refuses it), the product is copied into ``out``."""
    if out is not None and (
        out.dtype not in _OUT_DTYPES
        or torch.compiler.is_compiling()
        or (torch.is_grad_enabled() and (A.requires_grad or B.requires_grad))
    ):
        return out.copy_(mm(A, B))
    if A.dim() == 3 == B.dim() and A.shape[0] == B.shape[0]:
        return torch.bmm(A, B) if out is None else torch.bmm(A, B, out=out)
    return A @ B if out is None else torch.matmul(A, B, out=out)


def sq_norm(x: Tensor, dim, keepdim: bool = False) -> Tensor:
    """``Σ |x|²`` over ``dim``: ``torch.linalg.vector_norm(x, dim=...)²`` without its slow CPU
    reduction (over 10x slower on a 1024 x 1024 matrix here). Callers scale ``x`` first where
    the squares could overflow."""
    if not x.is_complex():  # two dispatches fewer: they are most of the cost on small stacks
        return (x * x).sum(dim=dim, keepdim=keepdim)
    return (x * x.conj()).real.sum(dim=dim, keepdim=keepdim)


def rms1_rows(V: Tensor) -> Tensor:
    """``V`` with each row scaled to an RMS of 1, as a standard normal row's. The subspace
    bound mixes its start rows with ``A``'s largest row (scaled to max 1): a start made from the
    data (``geometry.update_eq``'s ``V L``) must not bring the data's scale into that mix."""
    ms = sq_norm(V, -1, keepdim=True) / V.shape[-1]
    return V * torch.rsqrt(ms + torch.finfo(ms.dtype).tiny)


def norm(x: Tensor, dim, keepdim: bool = False) -> Tensor:
    """``‖x‖₂`` over ``dim`` (see ``sq_norm``)."""
    return sq_norm(x, dim, keepdim).sqrt()


def _max_abs(A: Tensor) -> Tensor:
    """``max|A|`` per matrix; for a large real ``A`` from its max and min, without an ``|A|``
    copy (a small one's copy costs less than two more dispatches)."""
    if A.is_complex() or A.shape[-1] <= _LEAF:
        return A.abs().amax(dim=(-2, -1))
    return torch.maximum(A.amax(dim=(-2, -1)), -A.amin(dim=(-2, -1)))


def norm_lower_bound_power(A: Tensor, overwrite: bool = False) -> Tensor:
    """Lower bound of ``‖A‖₂`` per matrix (shape ``(...)``) from one power step from A's largest
    column (kron-torch's bound): with ``c`` that column and ``y = Aᴴc``, ``‖A y‖ / ‖y‖ ≤ ‖A‖₂``.
    ``A`` is scaled by ``max|A|`` first against over/underflow; ``A = 0`` gives 0.

    The column is found as the largest *row*: for the Hermitian and skew-Hermitian matrices PSGD
    bounds the two are the same (and the fast contiguous reduction avoids a 10x slower strided
    one); for any other ``A`` the result is still a lower bound. ``overwrite``: ``A`` is a
    temporary of the caller's, scaled in place (the same values, one ``d x d`` copy fewer).
    """
    max_abs = _max_abs(A)
    scale = max_abs.clamp(min=_tiny(max_abs.dtype)).to(A.dtype)[..., None, None]
    As = A.div_(scale) if overwrite else A / scale
    j = torch.linalg.vector_norm(As, dim=-1).argmax(dim=-1)
    c = torch.take_along_dim(As, j[..., None, None], -2)  # the row, (..., 1, d)
    # as rows: x = c A is yᴴ for y = Aᴴ cᴴ (for a Hermitian A, the row's column), and x Aᴴ is
    # (A y)ᴴ; entries stay below d² (A is scaled to max 1), so nothing overflows unnormalised
    x = mm(c, As)
    tiny = _tiny(max_abs.dtype)
    return norm(mm(x, As.mH), (-2, -1)) / norm(x, (-2, -1)).clamp(min=tiny) * max_abs


def norm_lower_bound_subspace(
    A: Tensor, start: Tensor, half_iters: int = 2, overwrite: bool = False
) -> Tensor:
    """Lower bound of ``‖A‖₂`` per matrix by a random subspace iteration (the newer reference).

    ``start`` is ``(..., k, d)`` standard normal rows; they are rotated toward A's largest row,
    then ``half_iters`` times ``V <- V A; normalise rows; V <- V A``. Every row ends as ``u A`` for
    a unit ``u``, so the largest row norm is a lower bound. Hermitian or skew-Hermitian ``A``.
    ``overwrite``: as ``norm_lower_bound_power``'s.
    """
    smallest = torch.finfo(A.dtype).smallest_normal
    scale = A.abs().amax(dim=(-2, -1), keepdim=True) + smallest
    A = A.div_(scale) if overwrite else A / scale
    j = sq_norm(A, -1).argmax(dim=-1)  # the largest row
    row = torch.take_along_dim(A, j[..., None, None].expand(*A.shape[:-2], 1, A.shape[-1]), dim=-2)
    V = start.to(A.dtype)
    V = row + torch.sgn((row * V.conj()).sum(dim=-1, keepdim=True)) * V
    for _ in range(half_iters):
        V = V @ A
        V = V / (norm(V, -1, keepdim=True) + smallest)
        V = V @ A
    return scale[..., 0, 0].real * norm(V, -1).amax(dim=-1)


def norm_lower_bound(
    A: Tensor, method: str = "power", start: Tensor | None = None, overwrite: bool = False
) -> Tensor:
    """Dispatch to ``norm_lower_bound_power`` or ``norm_lower_bound_subspace`` (which needs
    ``start``, see ``subspace_start_shape``); ``overwrite``: ``A`` may be scaled in place."""
    if method == "power":
        return norm_lower_bound_power(A, overwrite)
    if method == "subspace":
        if start is None:
            raise ValueError("norm_lower_bound(method='subspace') needs its random start rows")
        return norm_lower_bound_subspace(A, start, overwrite=overwrite)
    raise ValueError(f"norm bound method must be one of {NORM_BOUNDS}; got {method!r}")


def procrustes_step(Q: Tensor, max_step: float = 0.125) -> Tensor:
    """One online orthogonal-Procrustes step rotating each ``Q`` toward SPD, in place
    (docs/maths.md §3).

    ``R = Qᴴ − Q`` normalised by its norm bound; ``Q <- Q + a (RQ + a/2 · RRQ)`` with the line
    search ``a = min(−tr(RQ)/tr(RRQ), max_step)`` when ``tr(RRQ) < 0``, else ``max_step``.
    """
    R = Q.mH - Q
    bound = norm_lower_bound_power(R) + torch.finfo(R.real.dtype).smallest_normal
    R = R / bound[..., None, None].to(R.dtype)
    RQ = R @ Q
    RRQ = R @ RQ
    tr_RQ = RQ.diagonal(dim1=-2, dim2=-1).real.sum(-1)
    tr_RRQ = RRQ.diagonal(dim1=-2, dim2=-1).real.sum(-1)
    a = torch.where(tr_RRQ < 0, torch.clamp(-tr_RQ / tr_RRQ, max=max_step), max_step)
    a = a[..., None, None].to(Q.dtype)
    return Q.add_(a * (RQ + 0.5 * a * RRQ))


def hermitian_defect(Q: Tensor) -> Tensor:
    """``‖Qᴴ − Q‖_F / ‖Q‖_F`` per matrix (0 for a Hermitian one)."""
    num = sq_norm(Q.mH - Q, (-2, -1))
    return (num / sq_norm(Q, (-2, -1)).clamp(min=_tiny(num.dtype))).sqrt()


def procrustes_until(Q: Tensor, tol: float = 1e-3, max_iters: int = 10) -> Tensor:
    """Procrustes steps until ``‖Qᴴ − Q‖ < tol ‖Q‖`` for every matrix (at most ``max_iters``),
    in place. A converged matrix is frozen by ``torch.where``, so the result does not depend on
    when the loop exits; it exits early only eagerly on the CPU, where the check costs no sync."""
    early = Q.device.type == "cpu" and not torch.compiler.is_compiling()
    for _ in range(max_iters):
        done = (hermitian_defect(Q) < tol)[..., None, None]
        if early and bool(done.all()):
            break
        Q.copy_(torch.where(done, Q, procrustes_step(Q.clone())))
    return Q


def solve_triangular_lowp(U: Tensor, X: Tensor, *, upper: bool, left: bool) -> Tensor:
    """``torch.linalg.solve_triangular`` computed in at least float32 (it refuses bf16/fp16) and
    returned in ``X``'s dtype."""
    work = torch.promote_types(torch.promote_types(U.dtype, X.dtype), torch.float32)
    if U.dtype == X.dtype == work:  # the usual case: no conversions to dispatch
        return torch.linalg.solve_triangular(U, X, upper=upper, left=left)
    out = torch.linalg.solve_triangular(U.to(work), X.to(work), upper=upper, left=left)
    return out.to(X.dtype)


# ---------------------------------------------------------------------------- triangular products
# Products of upper-triangular factors skip their zero blocks: splitting at k = d/2,
#   [[A11, A12], [0, A22]] @ [[B11, B12], [0, B22]] = [[A11 B11, A11 B12 + A12 B22], [0, A22 B22]]
# and recursing on the diagonal blocks costs 3/8 of a dense product at d = 1024 (1/3 in the
# limit). Below _LEAF a single dense product is faster than splitting further.
_LEAF = 256


_NARROW = 64
# With a narrow right-hand side (at most _NARROW columns: a matrix-vector-like product, bound by
# the bytes of U it reads) splitting below this size costs more in dispatches than the zero
# blocks it skips save
_NARROW_LEAF = 1024


def _leaf(X: Tensor) -> int:
    """The size below which ``triu_mm`` / ``triu_h_mm`` stop splitting for right-hand side ``X``."""
    return _NARROW_LEAF if X.shape[-1] <= _NARROW else _LEAF


def narrow_mm(A: Tensor, X: Tensor) -> Tensor:
    """``A @ X`` for a stack of square ``A`` and ``X`` with few columns. On the CPU a batched
    matrix-vector product (``(B, d, d) @ (B, d, 1)``) runs 3-5x slower than the same product
    written as rows times a matrix, ``(Xᵀ Aᵀ)ᵀ``, and 7-25x slower when ``A`` is a transposed view
    (``Qᴴ X``): measured at d = 1024-8192. The result is the transposed view of that product."""
    if X.shape[-1] <= _NARROW and X.dim() == 3:
        return mm(X.mT, A.mT).mT
    return mm(A, X)


def triu_matmul(A: Tensor, B: Tensor, out: Tensor | None = None) -> Tensor:
    """``A @ B`` for upper-triangular ``(..., d, d)`` ``A`` and ``B``; upper-triangular result,
    written into ``out`` (one allocation for the whole recursion)."""
    d = A.shape[-1]
    if d <= _LEAF:
        return mm(A, B, out=out)
    if out is None:
        out = torch.empty_like(B)
    k = d // 2
    out[..., k:, :k] = 0
    triu_matmul(A[..., :k, :k], B[..., :k, :k], out[..., :k, :k])
    triu_matmul(A[..., k:, k:], B[..., k:, k:], out[..., k:, k:])
    top = mm(A[..., :k, :k], B[..., :k, k:], out=out[..., :k, k:])
    top.add_(A[..., :k, k:] @ B[..., k:, k:])
    return out


def triu_mm(U: Tensor, X: Tensor) -> Tensor:
    """``U @ X`` for upper-triangular ``(..., d, d)`` ``U`` and any ``(..., d, m)`` ``X``:
    ``[U11 X1 + U12 X2; U22 X2]``, recursively on the triangular blocks (5/8 of a dense product
    at d = 1024, and about half the memory traffic when ``X`` is narrow)."""
    d = U.shape[-1]
    if d <= _leaf(X):
        return narrow_mm(U, X)
    k = d // 2
    top = triu_mm(U[..., :k, :k], X[..., :k, :]) + narrow_mm(U[..., :k, k:], X[..., k:, :])
    return torch.cat([top, triu_mm(U[..., k:, k:], X[..., k:, :])], dim=-2)


def triu_h_mm(U: Tensor, X: Tensor) -> Tensor:
    """``Uᴴ @ X`` for upper-triangular ``U`` (so ``Uᴴ`` is lower-triangular):
    ``[U11ᴴ X1; U12ᴴ X1 + U22ᴴ X2]``, recursively, reading only the upper blocks of ``U``."""
    d = U.shape[-1]
    if d <= _leaf(X):
        return narrow_mm(U.mH, X)
    k = d // 2
    bottom = triu_h_mm(U[..., k:, k:], X[..., k:, :]) + narrow_mm(U[..., :k, k:].mH, X[..., :k, :])
    return torch.cat([triu_h_mm(U[..., :k, :k], X[..., :k, :]), bottom], dim=-2)


ROW_BLOCK = 128  # triu_p_mm: rows of U per block (measured 64-256 here; 128 the steadiest)


def triu_p_mm(U: Tensor, X: Tensor, block: int = ROW_BLOCK) -> Tensor:
    """``Uᴴ (U X)`` for an upper-triangular stack ``U`` ``(B, d, d)`` and a narrow ``X``
    ``(B, d, m)``, in one pass over ``U``: ``Uᴴ U X = Σ_t U_tᴴ (U_t X)`` over blocks ``U_t`` of
    ``block`` rows, each read once from memory and again from cache, and only from its diagonal
    on (``U_t``'s columns left of it are zero). ``triu_h_mm(U, triu_mm(U, X))`` reads ``U``'s upper
    blocks twice, which is what a product with few columns costs (memory-bound). The products are
    rows times a matrix, as ``narrow_mm``'s; the result is a transposed view, as theirs. The
    same values up to the order of the sums over blocks."""
    B, d, m = X.shape
    xt = X.mT  # (B, m, d)
    zt = X.new_zeros(B, m, d)
    for i in range(0, d, block):
        Ut = U[..., i : i + block, i:]  # (B, b, d - i): the block's nonzero columns
        yt = mm(xt[..., i:], Ut.mT)  # (U_t X)ᵀ, (B, m, b)
        zt[..., i:].baddbmm_(yt, Ut.conj())  # += (U_tᴴ U_t X)ᵀ
    return zt.mT


def self_gram(X: Tensor) -> Tensor:
    """``X Xᴴ`` for ``(..., d, m)`` ``X`` (Hermitian): the off-diagonal block once, mirrored, and
    recursively the diagonal blocks (5/8 of a dense product at d = 1024)."""
    return _self_gram(X, None)


def _self_gram(X: Tensor, out: Tensor | None) -> Tensor:
    """``self_gram`` into ``out`` (a block of the caller's result) or a new matrix."""
    d = X.shape[-2]
    if d <= _LEAF:
        return X @ X.mH if out is None else mm(X, X.mH, out=out)
    k = d // 2
    out = X.new_empty(*X.shape[:-2], d, d) if out is None else out
    _self_gram(X[..., :k, :], out[..., :k, :k])
    _self_gram(X[..., k:, :], out[..., k:, k:])
    mm(X[..., :k, :], X[..., k:, :].mH, out=out[..., :k, k:])
    out[..., k:, :k] = out[..., :k, k:].mH
    return out


def triu_gram(U: Tensor) -> Tensor:
    """``Uᴴ U`` for upper-triangular ``(..., d, d)`` ``U`` (Hermitian result), skipping zero
    blocks: ``[[AᴴA, AᴴB], [BᴴA, BᴴB + CᴴC]]`` for ``U = [[A, B], [0, C]]``, recursively."""
    d = U.shape[-1]
    if d <= _LEAF:
        return U.mH @ U
    k = d // 2
    A, B, C = U[..., :k, :k], U[..., :k, k:], U[..., k:, k:]
    out = torch.empty_like(U)
    out[..., :k, :k] = triu_gram(A)
    out[..., :k, k:] = A.mH @ B
    out[..., k:, :k] = out[..., :k, k:].mH
    out[..., k:, k:] = B.mH @ B + triu_gram(C)
    return out


def subspace_start(A: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal start rows ``(..., SUBSPACE_ROWS, d)`` for ``norm_lower_bound_subspace``
    of the stack ``A``, drawn from ``generator``."""
    shape = (*A.shape[:-2], SUBSPACE_ROWS, A.shape[-1])
    return torch.randn(shape, dtype=A.dtype, device=A.device, generator=generator)


def triu_outer_mm(L: Tensor, R: Tensor, Q: Tensor, block: int = 32) -> Tensor:
    """``triu(L Rᴴ) Q`` for ``(..., d, k)`` ``L``, ``R`` and ``(..., d, n)`` ``Q``, without the
    ``d x d`` product (docs/maths.md §3.2): row ``i`` is ``L_i Σ_{j≥i} R_jᴴ Q_j``. Rows go in
    blocks of ``block``: inside a block the triangular part explicitly, the blocks below through
    the suffix sums ``S_t = Σ_{u>t} R_uᴴ Q_u`` (accumulated in place, block by block: torch's
    ``cumsum`` over a middle dim is many times slower on the CPU). ``(4k + 2·block)·d·n`` FLOPs
    against the dense product's ``~d²·n``: it pays when ``k`` is small beside ``d``."""
    d, k, n = L.shape[-2], L.shape[-1], Q.shape[-1]
    b = min(block, d)
    nb = -(-d // b)
    pad = nb * b - d
    if pad:  # zero rows past d add nothing to any sum
        L, R, Q = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (L, R, Q))
    batch = L.shape[:-2]
    Lb, Rb = L.reshape(*batch, nb, b, k), R.reshape(*batch, nb, b, k)
    Qb = Q.reshape(*batch, nb, b, n)
    out = torch.triu(Lb @ Rb.mH) @ Qb  # the diagonal blocks
    if nb > 1:
        S = Rb[..., 1:, :, :].mH @ Qb[..., 1:, :, :]  # R_uᴴ Q_u for u = 1 .. nb - 1
        for t in range(nb - 3, -1, -1):  # S[t] <- Σ_{u>t} R_uᴴ Q_u
            S[..., t, :, :] += S[..., t + 1, :, :]
        out[..., :-1, :, :] += Lb[..., :-1, :, :] @ S
    out = out.reshape(*batch, nb * b, n)
    return out[..., :d, :] if pad else out
