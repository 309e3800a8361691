"""The Kronecker factors of ``Q``: init, applying ``Q``, ``Qᴴ`` and ``P``, ``gram_i``, balancing.

docs/maths.md §1 and §4. A *stack* holds ``B`` tensors of one shape ``(d_1, ..., d_k)`` as
``X: (B, d_1, ..., d_k)``, and their factors as a list of ``k`` stacks, one per dim: ``(B, d, d)``
for a dense factor, ``(B, d)`` for a diagonal one; a scalar's one factor is ``(B,)``. Every
function here works on stacks (``B = 1`` for one tensor), so one code path serves a single tensor
and a group of equal-structured tensors. Nothing materialises the ``prod(d) x prod(d)`` Kronecker
product except ``kron_matrix``, which is for small shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .linalg import (
    _NARROW,
    mm,
    narrow_mm,
    self_gram,
    solve_triangular_lowp,
    triu_gram,
    triu_h_mm,
    triu_mm,
    triu_p_mm,
)
from .structure import KronPlan

MAX_MATRIX_SIZE = 4096
ROWS_AT_ONCE = 2**18  # gram_diag: entries (not rows) of a large stack multiplied at a time


def is_dense(q: Tensor) -> bool:
    """A stacked dense factor ``(B, d, d)`` (diagonal: ``(B, d)``; a scalar's: ``(B,)``)."""
    return q.dim() == 3


def init_factors(
    plan: KronPlan,
    scale: float | Tensor = 1.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    fits_p: bool = False,
) -> list[Tensor]:
    """One tensor's factors (no batch dim) of ``Q = scale · I``: each of the ``k`` factors gets
    ``scale**(1/k)`` (docs/maths.md §4); factors of ``P`` itself (``fits_p``: ``PRO4P``, ``QUAD4P``)
    start at ``scale²`` so that ``P`` does too."""
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


def batch_mean(x: Tensor, numel: Tensor | None = None) -> Tensor:
    """Per tensor of the stack, the mean of its entries; ``numel``: of a zero-padded stack of
    vectors, each one's length (its sum over the real entries divided by it)."""
    flat = x.reshape(x.shape[0], -1)
    return flat.mean(dim=1) if numel is None else flat.sum(dim=1) / numel


def data_scale(h: Tensor, v: Tensor | None, damping: float, k: int, fits_p: bool,
               numel: Tensor | None = None) -> Tensor:  # fmt: skip
    """Per tensor of the stack ``h`` (shape ``(B,)``), what each of the ``k`` factors is multiplied
    by to take ``Q = I`` to the data-driven scale of docs/maths.md §4 (squared for factors of
    ``P``):
    whitening ``(mean|h|⁴ + damping⁴)^(-1/8)``, Newton times ``(mean|v|²)^(1/4)``. Finite even for
    ``h = 0`` (the damping is floored at 1e-30); computed in float64, no host sync. ``numel``: see
    ``batch_mean``."""
    damping = max(damping, 1e-30)
    s = (batch_mean(h.abs().double().pow(4), numel) + damping**4).pow(-0.125)
    if v is not None:
        s = s * batch_mean(v.abs().double().square(), numel).pow(0.25)
    if fits_p:
        s = s * s
    return s.pow(1.0 / max(k, 1))


def _axes(X: Tensor, i: int) -> tuple[int, int, int, int]:
    """``(B, a, d, b)``: the stack ``X`` seen as ``B`` blocks of ``a x d x b`` around axis ``i``."""
    shape = X.shape[1:]
    return X.shape[0], math.prod(shape[:i]), shape[i], math.prod(shape[i + 1 :])


def _bcast(q: Tensor, i: int, X: Tensor) -> Tensor:
    """A diagonal ``(B, d)`` or scalar ``(B,)`` factor shaped to broadcast along axis ``i`` of X."""
    if q.dim() == 1:
        return q.reshape((-1,) + (1,) * (X.dim() - 1))
    return q.reshape((q.shape[0],) + (1,) * i + (q.shape[1],) + (1,) * (X.dim() - 2 - i))


def apply_one(q: Tensor, i: int, X: Tensor) -> Tensor:
    """Factor ``i`` alone along axis ``i``: ``Y[..a..] = sum_b q[a, b] X[..b..]``."""
    if not is_dense(q):
        return X * _bcast(q, i, X)
    B, a, d, b = _axes(X, i)
    if a == 1:
        return narrow_mm(q, X.reshape(B, d, b)).reshape(X.shape)
    if b == 1:
        return mm(X.reshape(B, a, d), q.mT).reshape(X.shape)
    return torch.einsum("bij,bajc->baic", q, X.reshape(B, a, d, b)).reshape(X.shape)


def apply_p_one_triangular(q: Tensor, i: int, X: Tensor, one_pass: bool = False) -> Tensor:
    """``Q_iᴴ (Q_i X)`` along axis ``i`` for an upper-triangular dense ``q`` (``EQ``), reading
    only its upper blocks: a matrix-vector-like product is memory-bound, and this halves the
    bytes read; ``one_pass`` (see ``one_pass``) reads them once (``linalg.triu_p_mm``). Axis
    ``i`` must be the first or the last of the tensor (the 1- and 2-D cases)."""
    B, a, d, b = _axes(X, i)
    P = triu_p_mm if one_pass else lambda q, Y: triu_h_mm(q, triu_mm(q, Y))
    if a == 1:
        return P(q, X.reshape(B, d, b)).reshape(X.shape)
    Y = X.reshape(B, a, d).mT  # (B, d, a): the rows of X as columns
    return P(q, Y).mT.reshape(X.shape)


def one_pass(q: Tensor, cols: int) -> bool:
    """Whether ``Q_iᴴ (Q_i X)`` with ``cols`` columns reads ``q`` once (``linalg.triu_p_mm``):
    for ``d ≥ 1024`` (an upper triangle of 2 MiB or more in float32, past this CPU's 2 MiB of L2
    per core) and at most ``linalg._NARROW`` columns, in float32, float64 and complex (bf16
    would round its sum over blocks in bf16), eagerly (a compiled step keeps the two passes) and
    not for a factor autograd records. Measured here in float32 (blocks of 128 rows):
    0.53-0.93x of the time of the two passes on two threads and 0.53-0.92x on one, d = 1024-8192,
    1-64 columns; float64 and complex take it on the same reasoning, unmeasured. The rule reads
    one tensor's factor, never the stack's size, so a tensor takes the same path alone or
    stacked (in eager mode)."""
    return (
        q.shape[-1] >= 1024
        and cols <= _NARROW
        and q.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128)
        and not torch.compiler.is_compiling()
        and not (torch.is_grad_enabled() and q.requires_grad)
    )


def adjoint(q: Tensor) -> Tensor:
    """The factor of ``Qᴴ``: ``q.mH`` (dense) or ``conj(q)`` (diagonal, scalar)."""
    return q.mH if is_dense(q) else q.conj()


def apply_q(Q: Sequence[Tensor], X: Tensor) -> Tensor:
    """``Q X``: every factor along its axis."""
    for i, q in enumerate(Q):
        X = apply_one(q, i, X)
    return X


def apply_qh(Q: Sequence[Tensor], X: Tensor) -> Tensor:
    """``Qᴴ X``."""
    for i, q in enumerate(Q):
        X = apply_one(adjoint(q), i, X)
    return X


def apply_p(Q: Sequence[Tensor], X: Tensor, fits_p: bool = False) -> Tensor:
    """``P X = Qᴴ (Q X)``, axis by axis; ``fits_p``: the factors are factors of ``P`` itself
    (``PRO4P``, ``QUAD4P``), so ``P X = Q X``."""
    if fits_p:
        return apply_q(Q, X)
    for i, q in enumerate(Q):
        X = apply_one(adjoint(q), i, apply_one(q, i, X))
    return X


def apply_q_triangular(Q: Sequence[Tensor], X: Tensor) -> Tensor:
    """``Q X`` for upper-triangular dense factors (``EQ``), skipping their zero blocks. Dense
    factors go first (``dense_first``)."""
    fresh = False
    for i in dense_first(Q):
        q = Q[i]
        if not is_dense(q):
            X = scale_axis(X, q, i, fresh)
        elif q.shape[-1] <= 256:
            X = apply_one(q, i, X)
        else:
            Xi = X.movedim(i + 1, 1)
            X = triu_mm(q, Xi.reshape(X.shape[0], q.shape[-1], -1)).reshape(Xi.shape)
            X = X.movedim(1, i + 1)
        fresh = True
    return X


def dense_first(Q: Sequence[Tensor]) -> list[int]:
    """The factors' indices, dense ones first. Factors on different axes commute, and a dense
    one's product is a fresh tensor that the diagonal ones then scale in place
    (``scale_axis``): for a large embedding (a diagonal factor on its rows), no second fresh
    block of its size, which the CPU would fault in page by page on every step."""
    return sorted(range(len(Q)), key=lambda i: not is_dense(Q[i]))


def scale_axis(X: Tensor, q: Tensor, i: int, fresh: bool, divide: bool = False) -> Tensor:
    """``X`` times (``divide``: over) the diagonal or scalar factor ``q`` along axis ``i``; in
    place when ``X`` is a ``fresh`` temporary of the result's dtype and autograd does not
    record it (a solve keeps its result for its backward: scaling that in place breaks it)."""
    s = _bcast(q, i, X)
    taped = torch.is_grad_enabled() and (X.requires_grad or s.requires_grad)
    if fresh and not taped and X.dtype == torch.promote_types(X.dtype, s.dtype):
        return X.div_(s) if divide else X.mul_(s)
    return X / s if divide else X * s


def unfold(X: Tensor, i: int) -> Tensor:
    """The stack ``X`` unfolded along axis ``i``: ``(B, d_i, numel/d_i)`` (a view where it can
    be), so ``gram_i(X, Y) = unfold(X, i) unfold(Y, i)ᴴ``."""
    B, a, d, b = _axes(X, i)
    if a == 1:
        return X.reshape(B, d, b)
    if b == 1:
        return X.reshape(B, a, d).mT
    return X.movedim(i + 1, 1).reshape(B, d, a * b)


def gram(i: int, X: Tensor, Y: Tensor) -> Tensor:
    """``gram_i(X, Y)`` per tensor of the stacks: contract ``X`` and ``conj(Y)`` over every axis
    but ``i`` (docs/maths.md §1); ``(B, d, d)``, or ``(B, d)`` with ``diag`` (only its diagonal)."""
    B, a, d, b = _axes(X, i)
    if a == 1:
        return mm(X.reshape(B, d, b), Y.reshape(B, d, b).mH)
    if b == 1:
        return mm(X.reshape(B, a, d).mT, Y.reshape(B, a, d).conj())
    return torch.einsum("baic,bajc->bij", X.reshape(B, a, d, b), Y.reshape(B, a, d, b).conj())


def gram_diag(i: int, X: Tensor, Y: Tensor) -> Tensor:
    """The diagonal of ``gram_i(X, Y)``: ``(B, d)``; for a scalar stack ``(B,)``, ``X conj(Y)``.
    Along a large contiguous stack's first axis (an embedding's rows), rows of ``ROWS_AT_ONCE``
    entries in all at a time: each row's sum is the same bit for bit, and the product's
    temporary stays small instead of the size of the stack (a fresh block the CPU faults in on
    every update). A column-major stack, or rows of 2^15 entries or more, keep the one product:
    their sums run in another order (torch splits a long single row's sum)."""
    if X.dim() == 1:
        return X * Y.conj()
    B, a, d, b = _axes(X, i)
    rows = a == 1 and b < 2**15 and X.numel() > ROWS_AT_ONCE
    if rows and X.is_contiguous() and Y.is_contiguous():
        X, Y = X.reshape(B, d, b), Y.reshape(B, d, b)
        n = max(1, ROWS_AT_ONCE // (B * b))
        parts = [(X[:, j : j + n] * Y[:, j : j + n].conj()).sum(dim=-1) for j in range(0, d, n)]
        return torch.cat(parts, dim=1)
    return (X * Y.conj()).reshape(B, a, d, b).sum(dim=(1, 3))


def gram_self(i: int, X: Tensor, dense: bool = True) -> Tensor:
    """``gram_i(X, X)`` for a dense (``(B, d, d)``) or diagonal (``(B, d)``) factor ``i``. A
    large dense one computes each symmetric pair of blocks once (``linalg.self_gram``)."""
    if not dense or X.dim() == 1:
        return gram_diag(i, X, X)
    B, a, d, b = _axes(X, i)
    if d <= 256 or 3 * a * b <= d:
        # a thin unfolding (at most d / 3 columns): the product writes far more than it reads,
        # and the block splitting adds the mirror copies of the d x d result. Measured here
        # (1 and 2 threads): whole ViT-S update steps (its (768, 192) and (576, 192) weights)
        # 0.97-0.98x of the blocks' time with one product; products alone, the blocks at
        # 1.36-1.41x of one product's time for (2048, 256), about even for (1024, 256) and
        # (512, 192), and winning from about d / 2 columns on: 0.69-0.92x for (1024, 500),
        # (1536, 700) and (2048, 1000)
        return gram(i, X, X)
    return self_gram(X.movedim(i + 1, 1).reshape(B, d, -1))


_ROW_SOLVE = 64  # solve_qh: from this many right-hand sides, a first-axis solve as Yᵀ Q = Vᵀ


def solve_qh(Q: Sequence[Tensor], V: Tensor) -> Tensor:
    """``Q⁻ᴴ V`` for upper-triangular dense factors and diagonal ones, by triangular solves, or
    for a mid-size factor with many right-hand sides along another axis than the first
    (``_by_inverse``) by its inverse; dense factors first (``dense_first``). Along the first axis
    a ``V`` with ``_ROW_SOLVE`` columns or more is solved as ``Yᴴ Q = Vᴴ``: the solve of
    ``Qᴴ Y = V`` copies ``V`` to column-major first, the row solve reads it as it lies (measured
    here on two days, float32, stacks of 1-12, d = 128-4096, 64-1536 columns: 0.3-0.96x of its
    time on one thread; on two mostly 0.5-1.0x, but a stack of four ``(1024, 128)`` took
    1.0-1.3x, erratic; below 64 columns it can lose up to 4x on two threads)."""
    fresh = False
    for i in dense_first(Q):
        q = Q[i]
        if not is_dense(q):
            V, fresh = scale_axis(V, q.conj(), i, fresh, divide=True), True
            continue
        fresh = True
        B, a, d, b = _axes(V, i)
        full = q.dtype == V.dtype == torch.promote_types(q.dtype, torch.float32)  # not half
        if full and _by_inverse(d, a * b, first=a == 1):
            R = torch.linalg.solve_triangular(q, _eye(q), upper=True)  # Q⁻¹
            V = apply_one(R.mH, i, V)  # Q⁻ᴴ along axis i
        elif a == 1 and b >= _ROW_SOLVE:  # Yᴴ Q = Vᴴ: V's rows as they lie
            Y = solve_triangular_lowp(q, V.reshape(B, d, b).mH, upper=True, left=False)
            V = Y.mH.resolve_conj().reshape(V.shape)  # (a copy only for complex V)
        elif a == 1:  # along the first axis: solve Qᴴ Y = V (Qᴴ is lower-triangular)
            Y = solve_triangular_lowp(q.mH, V.reshape(B, d, b), upper=False, left=True)
            V = Y.reshape(V.shape)
        else:  # along axis i moved last: Y conj(Q) = V
            Vi = V.movedim(i + 1, -1)
            Y = solve_triangular_lowp(q.conj(), Vi.reshape(B, -1, d), upper=True, left=False)
            V = Y.reshape(Vi.shape).movedim(-1, i + 1)
    return V


def _by_inverse(d: int, rhs: int, first: bool) -> bool:
    """Whether ``Q⁻ᴴ V`` along a ``d x d`` factor with ``rhs`` right-hand sides is cheaper as
    ``(Q⁻¹)ᴴ V``: the inverse costs one solve on ``d`` right-hand sides, the rest is a product.
    Measured (float32, 1 and 2 threads, an Intel and an AMD CPU), as a fraction of the solve's
    time: along an axis other than the first, 0.7-0.95x from ``rhs = 64d`` for ``128 ≤ d ≤ 256``
    (below that it can take 2x on one thread); most for a narrow factor with a long other axis,
    a GPT-2 embedding's ``(50257, 16)`` 0.37-0.38x (AMD, 1 and 2 threads; 0.25x and 0.39x on the
    Intel), ``(50257, 64)`` 0.33-0.35x, ``(50257, 128)`` 0.5-0.6x; about even at the fewest
    right-hand sides the rule admits at ``d = 16``, a stack of four ``(4096, 16)`` (0.79-0.99x)
    and one ``(1024, 16)`` (1.00-1.01x). With ``3d`` (twelve ``(196, 64)``, Intel) it took
    1.1-1.5x: hence the ``64d`` floor. Along the first axis (``first``) it shows no consistent
    gain over the row solve ``solve_qh`` uses there (1.2-2.4x on one thread; 0.5-1.4x on two,
    erratic, about even overall), so the simpler solve stays. Past ``d = 256`` the inverse (a
    cubic solve) costs more; a half-precision factor keeps the solve (it runs in float32). The
    two agree to ~5e-7 relative in float32. The cut-offs were measured on CPUs and are used on
    every device."""
    return d <= 256 and not first and rhs >= 64 * d


def _eye(q: Tensor) -> Tensor:
    """The identity broadcast to the stack of factors ``q``."""
    return torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand(q.shape)


def balance(Q: list[Tensor]) -> list[Tensor]:
    """Rescale each tensor's factors in place to a common ``max|Q_i|`` (their geometric mean);
    ``Q`` itself is unchanged."""
    if len(Q) < 2:
        return Q
    norms = torch.stack([q.abs().reshape(q.shape[0], -1).amax(dim=1) for q in Q])
    norms = norms.clamp(min=torch.finfo(norms.dtype).tiny)  # an all-zero factor stays zero
    gmean = norms.log().mean(dim=0).exp()
    for q, n in zip(Q, norms):
        q.mul_(_bcast_factor(gmean / n, q))
    return Q


def _bcast_factor(x: Tensor, q: Tensor) -> Tensor:
    """A per-tensor ``(B,)`` value shaped to broadcast against the stacked factor ``q``."""
    return x.reshape(x.shape + (1,) * (q.dim() - 1)).to(q.dtype)


def factor_p_compact(q: Tensor, triangular: bool = False) -> Tensor:
    """``P_i = Q_iᴴ Q_i`` of a stacked factor in its own storage: ``(B, d, d)`` dense, or ``|q|²``
    for a diagonal or scalar one. ``triangular``: ``q`` is upper-triangular (``EQ``), so its zero
    blocks are skipped. ``apply_q`` with these factors applies ``P`` (each ``P_i`` is Hermitian)."""
    if is_dense(q):
        return triu_gram(q) if triangular else q.mH @ q
    return q.conj() * q


def factor_p(q: Tensor, fits_p: bool = False) -> Tensor:
    """The dense ``P_i`` of one (unstacked) factor: ``Q_iᴴ Q_i``, or ``Q_i`` itself when the
    factors are factors of ``P``; a diagonal factor gives its diagonal matrix."""
    if q.dim() == 2:
        return q if fits_p else q.mH @ q
    P = q if fits_p else q.conj() * q
    return torch.diag(P) if P.dim() == 1 else P.reshape(1, 1)


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


def stack_factors(Qs: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Per-tensor factor lists (each as ``init_factors`` makes them) -> one stack per factor."""
    return [torch.stack(f) for f in zip(*Qs)]
