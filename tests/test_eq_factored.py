"""The EQ update in factored form (docs/maths.md §3.2) against the plain formula, in float64.

``triu(L Rᴴ) Q`` by suffix sums over blocks of rows equals the dense product then ``triu``; and
``geometry.update_eq``, which takes the factored path for a dense factor whose unfoldings are
thin, equals ``Q_i − lr/ℓ_i · triu(T1 − T2) Q_i`` written out with the dense ``T1``, ``T2``.
"""

from __future__ import annotations

import pytest
import torch

from psgd_lab import factors, geometry, linalg
from psgd_lab.linalg import triu_outer_mm

F64 = dict(rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("d, k, block", [(1, 3, 32), (5, 2, 32), (64, 4, 32), (100, 6, 32),
                                         (130, 16, 16), (256, 3, 64)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_triu_outer_mm_is_the_dense_triangular_product(d, k, block, dtype):
    """Any ``d`` (a multiple of the block or not), a batch of two, real and complex."""
    g = torch.Generator().manual_seed(d * 7 + k)
    L, R = (torch.randn(2, d, k, generator=g, dtype=dtype) for _ in range(2))
    Q = torch.randn(2, d, d + 3, generator=g, dtype=dtype)  # any n: Q needs no structure here
    want = torch.triu(L @ R.mH) @ Q
    torch.testing.assert_close(triu_outer_mm(L, R, Q, block), want, **F64)


def test_the_factored_path_is_taken_only_where_it_is_cheaper():
    assert geometry._factored(1024, 32) and geometry._factored(256, 32)
    assert geometry._factored(4096, 20)  # the old 'conv' set's (10, 4096) weight
    assert not geometry._factored(1024, 256)  # gpt2-d128's (1024, 128): dense is cheaper
    assert not geometry._factored(4096, 512)  # fewer FLOPs, but 1 GB of suffix sums
    assert not geometry._factored(64, 2)  # small: the dense product is one dispatch


def _plain_eq(Q, v, h, lr, method, starts):
    """``Q_i − lr/ℓ_i · triu(T1 − T2) Q_i`` for every factor, from the dense grams, and the
    ``ℓ_i``. A factored factor's ``ℓ_i`` bounds the same norm ``‖T1 + T2‖₂ = ‖Lᴴ L‖₂`` on the
    small Gram (the subspace bound from the start rows ``V L``, RMS 1 per row); the others bound
    ``T1 + T2`` itself."""
    A = factors.apply_q(Q, h)
    Bv = factors.solve_qh(Q, v)
    out, ells = [], []
    for i, q in enumerate(Q):
        if not factors.is_dense(q):
            T1, T2 = factors.gram_diag(i, A, A), factors.gram_diag(i, Bv, Bv)
            ell = (T1 + T2).amax(dim=-1)
            out.append(q - (lr / ell)[:, None] * (T1 - T2) * q)
            ells.append(ell)
            continue
        T1, T2 = factors.gram(i, A, A), factors.gram(i, Bv, Bv)
        start = starts[i]
        if geometry._factored(q.shape[-1], 2 * factors.unfold(A, i).shape[-1]):
            Lf = torch.cat([factors.unfold(A, i), factors.unfold(Bv, i)], dim=-1)
            W = None if start is None else start @ Lf
            W = None if W is None else W / (W.abs().square().mean(-1, keepdim=True).sqrt())
            ell = linalg.norm_lower_bound(Lf.mH @ Lf, method, W)
        else:
            ell = linalg.norm_lower_bound(T1 + T2, method, start)
        out.append(q - (lr / ell)[:, None, None] * torch.triu(T1 - T2) @ q)
        ells.append(ell)
    return out, ells, A, Bv


@pytest.mark.parametrize("method", ["power", "subspace"])
@pytest.mark.parametrize("shape, diag", [((300, 4), (False, False)), ((3, 200, 2), (True, False,
                                          False)), ((160, 7), (False, True))])  # fmt: skip
def test_update_eq_factored_equals_the_plain_formula(shape, diag, method):
    """Shapes whose long axis takes the factored path (the first axis, a middle one, next to a
    diagonal factor); 3 updates from a random upper-triangular ``Q``, with either norm bound
    (the subspace one from explicit start rows). Besides the formula, each factored ``ℓ_i`` is
    checked against the true ``‖T1 + T2‖₂``: a lower bound, and not a loose one."""
    g = torch.Generator().manual_seed(len(shape))
    assert any(geometry._factored(d, 2 * (torch.Size(shape).numel() // d))
               for d, dg in zip(shape, diag) if not dg)  # fmt: skip
    Q = []
    for d, dg in zip(shape, diag):
        if dg:
            Q.append(torch.rand(2, d, generator=g, dtype=torch.float64) + 0.5)
        else:
            Q.append(torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(
                2, d, d, generator=g, dtype=torch.float64).triu())  # fmt: skip
    L = [torch.zeros(2, dtype=torch.float64) for _ in Q]
    for _ in range(3):
        v, h = (torch.randn(2, *shape, generator=g, dtype=torch.float64) for _ in range(2))
        starts = [None if dg or method == "power" else 1e-3 * torch.randn(
            2, linalg.SUBSPACE_ROWS, d, generator=g, dtype=torch.float64)
            for d, dg in zip(shape, diag)]  # fmt: skip  # any scale: RMS 1 per row is taken
        want, ells, A, Bv = _plain_eq(Q, v, h, 0.1, method, starts)
        geometry.update("EQ", Q, L, v, h, lr=0.1, lipschitz="kron", norm_bound=method,
                        starts=starts)  # fmt: skip
        for got, w in zip(Q, want):
            torch.testing.assert_close(got, w, **F64)
        for i, dg in enumerate(diag):
            torch.testing.assert_close(L[i], ells[i], **F64)  # lipschitz="kron": L_i = ℓ_i
            if not dg:
                UA, UB = factors.unfold(A, i), factors.unfold(Bv, i)
                true = torch.linalg.matrix_norm(UA @ UA.mH + UB @ UB.mH, ord=2)
                assert bool((L[i] <= true * (1 + 1e-12)).all() and (L[i] >= 0.5 * true).all())


@pytest.mark.parametrize("method", ["power", "subspace"])
def test_the_factored_bound_is_a_lower_bound_of_the_same_norm(method):
    """The factored path bounds ``‖T1 + T2‖₂ = ‖L Lᴴ‖₂`` on the ``k x k`` Gram ``Lᴴ L`` (the same
    nonzero eigenvalues; the subspace start rows ``V`` become ``V L``): never above the true
    norm, and as tight as the bound on the ``d x d`` matrix. Over 80 random ``(512, 24)``
    factors, flat spectra to one dominant direction: at least 0.85 of the norm (measured 0.856
    for power, 0.929 for subspace; the ``d x d`` bound 0.868 and 0.919), and on average within
    0.005 of the ``d x d`` bound's ratio (measured 0.9943 against 0.9946, 0.9976 against 0.9975)."""
    g = torch.Generator().manual_seed(0)
    small, big = [], []
    for seed in range(20):
        Lf = torch.randn(4, 512, 24, generator=g, dtype=torch.float64)
        Lf[..., 0] *= 1 + seed  # a range of spectra, from flat to one dominant direction
        true = torch.linalg.matrix_norm(Lf, ord=2) ** 2
        start = torch.randn(4, linalg.SUBSPACE_ROWS, 512, generator=g, dtype=torch.float64)
        small.append(linalg.norm_lower_bound(Lf.mH @ Lf, method, start @ Lf) / true)
        big.append(linalg.norm_lower_bound(Lf @ Lf.mH, method, start) / true)
    small, big = torch.cat(small), torch.cat(big)
    assert float(small.max()) <= 1 + 1e-12  # a lower bound
    assert float(small.min()) >= 0.85
    assert abs(float(small.mean() - big.mean())) <= 0.005
