"""Spectral-norm lower bounds, the Procrustes step and triangular algebra, on single matrices and
on stacks (every function takes any leading batch dims and treats each matrix alone)."""

from __future__ import annotations

import pytest
import torch

from psgd_lab import linalg
from psgd_lab.linalg import (
    hermitian_defect,
    norm_lower_bound,
    norm_lower_bound_power,
    procrustes_step,
    procrustes_until,
    self_gram,
    solve_triangular_lowp,
    subspace_start,
    triu_gram,
    triu_matmul,
    triu_mm,
)
from psgd_lab.problems import random_spd


@pytest.mark.parametrize("method", ["power", "subspace"])
@pytest.mark.parametrize("d", [2, 8, 64, 256])
def test_norm_bounds_are_tight_lower_bounds_on_spd(method, d):
    gen = torch.Generator().manual_seed(d)
    ratios = []
    for _ in range(20):
        A = random_spd(d, gen, cond=1e3)
        A = A @ A  # a wider spectrum, as T1 + T2 has
        true = torch.linalg.matrix_norm(A, 2)
        bound = norm_lower_bound(A, method, subspace_start(A, gen))
        assert bound <= true * (1 + 1e-12)
        ratios.append((bound / true).item())
    # one power step from the largest column, two subspace half-iterations: measured mean ratios
    # >= 0.89 (power) and >= 0.97 (subspace) at d = 256
    assert min(ratios) > 0.5 and sum(ratios) / len(ratios) > 0.85


@pytest.mark.parametrize("method", ["power", "subspace"])
def test_norm_bounds_on_skew_and_complex(method):
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float64, torch.complex128):
        A = torch.randn(16, 16, generator=gen, dtype=dtype)
        for M in (A - A.mH, A + A.mH):
            true = torch.linalg.matrix_norm(M, 2)
            bound = norm_lower_bound(M, method, subspace_start(M, gen))
            assert bound <= true * (1 + 1e-12)
            assert bound > 0.5 * true


def test_norm_bound_of_zero_is_zero():
    assert norm_lower_bound_power(torch.zeros(4, 4)) == 0


def test_unknown_norm_bound_method():
    with pytest.raises(ValueError, match="'power', 'subspace'"):
        norm_lower_bound(torch.eye(3), "exact")


def test_procrustes_rotates_toward_spd():
    gen = torch.Generator().manual_seed(0)
    S = random_spd(6, gen)
    W = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    Q_rot = torch.linalg.matrix_exp(0.3 * (W - W.T))  # a rotation, away from I
    Q = Q_rot @ S
    P_before = Q.mH @ Q
    defects = [hermitian_defect(Q).item()]
    for _ in range(60):
        procrustes_step(Q)
        defects.append(hermitian_defect(Q).item())
    assert defects[-1] < 1e-6 < defects[0]
    # a rotation: P = QᴴQ is unchanged up to the truncation of exp(aR) at second order,
    # ‖aR‖⁴/4 <= 6e-5 per step with a <= 1/8 (summed over 60 steps: ~4e-3 measured)
    torch.testing.assert_close(Q.mH @ Q, P_before, rtol=1e-2, atol=1e-2)


def test_solve_triangular_in_low_precision():
    U = torch.triu(torch.randn(5, 5, dtype=torch.float64)) + 5 * torch.eye(5)
    X = torch.randn(12, 5, dtype=torch.float64)
    torch.testing.assert_close(solve_triangular_lowp(U, X, upper=True, left=False) @ U, X)
    Xb = X.to(torch.bfloat16)  # solve_triangular refuses bf16; solved in float32, returned bf16
    Y = solve_triangular_lowp(U.to(torch.bfloat16), Xb, upper=True, left=False)
    assert Y.dtype == torch.bfloat16
    torch.testing.assert_close(Y.double() @ U, X, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_every_function_treats_each_matrix_of_a_stack_alone(dtype, one_thread):
    """A stack of 5 matrices gives what each matrix gives on its own, to round-off: the batched
    reductions may vectorise in another order (measured: at most 2 ulp in float64)."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(5, 12, 12, generator=g, dtype=dtype)
    A = A + A.mH
    A[2] = 0  # a zero matrix in the stack stays harmless
    start = subspace_start(A, g)
    pairs = [
        (norm_lower_bound_power(A), [norm_lower_bound_power(a) for a in A]),
        (norm_lower_bound(A, "subspace", start),
         [norm_lower_bound(a, "subspace", s) for a, s in zip(A, start)]),
        (hermitian_defect(A + 0.1 * A.mT.conj().triu()),
         [hermitian_defect(a + 0.1 * a.mT.conj().triu()) for a in A]),
    ]  # fmt: skip
    B = A + 3 * torch.eye(12, dtype=dtype)
    stacked = procrustes_step(B.clone() @ torch.linalg.matrix_exp(0.1 * (A - A.mH)))
    single = [procrustes_step(b.clone() @ torch.linalg.matrix_exp(0.1 * (a - a.mH)))
              for a, b in zip(A, B)]  # fmt: skip
    pairs.append((stacked, single))
    for batched, each in pairs:
        torch.testing.assert_close(batched, torch.stack(each), rtol=1e-14, atol=1e-14)


def test_procrustes_until_freezes_converged_matrices():
    g = torch.Generator().manual_seed(0)
    S = torch.stack([random_spd(6, g) for _ in range(3)])
    W = torch.randn(6, 6, generator=g, dtype=torch.float64)
    S[1] = S[1] @ torch.linalg.matrix_exp(0.02 * (W - W.T))  # only this one is not Hermitian
    before = S.clone()
    procrustes_until(S)
    assert torch.equal(S[0], before[0]) and torch.equal(S[2], before[2])
    assert hermitian_defect(S[1]) < 1e-3 < hermitian_defect(before[1])


@pytest.mark.parametrize("d", [1, 5, 256, 257, 600, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
def test_triangular_products_equal_dense_products(d, dtype):
    g = torch.Generator().manual_seed(d)
    A = torch.randn(d, d, generator=g, dtype=dtype).triu()
    B = torch.randn(d, d, generator=g, dtype=dtype).triu()
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype != torch.float64 else {}
    AB = triu_matmul(A, B)
    torch.testing.assert_close(AB, A @ B, **tol)
    assert torch.equal(AB.tril(-1), torch.zeros_like(AB))  # exactly triangular
    torch.testing.assert_close(triu_gram(A), A.mH @ A, **tol)
    X = torch.randn(d, 37, generator=g, dtype=dtype)
    torch.testing.assert_close(triu_mm(A, X), A @ X, **tol)
    torch.testing.assert_close(self_gram(X), X @ X.mH, **tol)
    # and on a stack of two
    A2, X2 = torch.stack([A, A.mH.triu()]), torch.stack([X, 2 * X])
    torch.testing.assert_close(triu_gram(A2), A2.mH @ A2, **tol)
    torch.testing.assert_close(triu_mm(A2, X2), A2 @ X2, **tol)
    torch.testing.assert_close(self_gram(X2), X2 @ X2.mH, **tol)


@pytest.mark.parametrize(
    "d,m", [(7, 1), (300, 1), (600, 3), (600, 80), (1100, 2), (2100, 1), (1100, 65)]
)
def test_triangular_products_equal_dense(d, m):
    """triu_mm and triu_h_mm (block recursion, narrow products as rows times a matrix) equal the
    dense products on stacks."""
    gen = torch.Generator().manual_seed(d)
    U = torch.randn(2, d, d, generator=gen, dtype=torch.float64).triu()
    X = torch.randn(2, d, m, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(linalg.triu_mm(U, X), U @ X)
    torch.testing.assert_close(linalg.triu_h_mm(U, X), U.mT @ X)
    torch.testing.assert_close(linalg.narrow_mm(U, X), U @ X)


@pytest.mark.parametrize("method", ["power", "subspace"])
def test_norm_bound_overwrite_gives_the_same_bound_and_scales_in_place(method):
    """``overwrite=True`` (the fit's own ``T1 + T2``) saves a copy and changes no bit."""
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(4, 300, 300, generator=gen)
    A = A + A.mT
    start = subspace_start(A, gen) if method == "subspace" else None
    want = norm_lower_bound(A, method, start)
    B = A.clone()
    got = norm_lower_bound(B, method, start, overwrite=True)
    assert torch.equal(got, want)
    assert not torch.equal(B, A)  # scaled in place


def test_products_into_blocks_are_the_plain_products():
    """``mm(out=)`` writes a product into a block of a larger matrix and nowhere else.
    ``triu_matmul`` and ``self_gram`` built from blocks give the plain product's values up to
    round-off; on this machine's MKL (float32, complex64), bit for bit (that is not a property
    of BLAS: under ``MKL_CBWR=COMPATIBLE`` the blocked Gram rounds differently, so the exact
    check is only of a block against its own product). float64 and complex128 take the copy
    path (float64's 2-D in-place product rounds differently here): bit for bit as well."""
    from psgd_lab.linalg import mm, self_gram, triu_matmul

    gen = torch.Generator().manual_seed(0)
    for shape in [(3, 600, 600), (1100, 1100)]:
        for dtype in (torch.float32, torch.complex64, torch.float64, torch.complex128):
            A = torch.randn(shape, generator=gen).to(dtype).triu_()
            B = torch.randn(shape, generator=gen).to(dtype).triu_()
            out = torch.full(shape, float("nan")).to(dtype)
            got = triu_matmul(A, B, out=out)
            assert got.data_ptr() == out.data_ptr() and torch.equal(got, triu_matmul(A, B))
            torch.testing.assert_close(got, A @ B, rtol=1e-4, atol=1e-3)  # zero blocks skipped
            X = torch.randn(shape[:-1] + (200,), generator=gen).to(dtype)
            torch.testing.assert_close(self_gram(X), X @ X.mH)
            big = torch.full(shape[:-2] + (700, 700), 7.0, dtype=dtype)
            block = big[..., 100:400, 200:500]
            mm(X[..., :300, :], X[..., 300:600, :].mH, out=block)
            assert torch.equal(block, X[..., :300, :] @ X[..., 300:600, :].mH)
            outside = torch.ones(700, 700, dtype=torch.bool)
            outside[100:400, 200:500] = False
            assert torch.all(big[..., outside] == 7.0)
    for dtype in (torch.float32, torch.complex64, torch.bfloat16, torch.float64, torch.complex128):
        A = torch.randn(1100, 1100, generator=gen).to(dtype)
        out = torch.empty(1100, 1100, dtype=dtype)
        for r, c, k in [(slice(0, 550), slice(550, 1100), slice(0, 550)),
                        (slice(0, 275), slice(275, 550), slice(0, 275)),  # float64's other path
                        (slice(100, 400), slice(200, 500), slice(0, 1100))]:  # fmt: skip
            mm(A[r, k], A[k, c], out=out[r, c])
            assert torch.equal(out[r, c], A[r, k] @ A[k, c]), (dtype, r, c)


def test_products_into_blocks_under_autograd_are_recorded():
    """With an operand that requires grad, ``mm(out=)`` copies the product into the block (BLAS
    ``out=`` refuses autograd): values and gradients are the plain product's."""
    from psgd_lab.linalg import mm

    gen = torch.Generator().manual_seed(1)
    X = torch.randn(300, 40, generator=gen, requires_grad=True)
    big = torch.zeros(400, 400)
    mm(X, X.mT, out=big[50:350, 100:400])
    big.sum().backward()
    assert torch.equal(big[50:350, 100:400].detach(), (X @ X.mT).detach())
    torch.testing.assert_close(X.grad, 2 * X.sum(0, keepdim=True).expand(300, 40).detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize("B, d, m, block", [(1, 1030, 1, 128), (3, 300, 5, 64), (2, 257, 64, 128),
                                            (1, 100, 2, 128), (2, 1024, 16, 128)])  # fmt: skip
def test_triu_p_mm_is_p_applied_in_one_pass(B, d, m, block, dtype):
    """``triu_p_mm(U, X) = Uᴴ (U X)`` for upper-triangular ``U`` (blocks of rows, the last one
    short, or one block), real and complex, to round-off; ``U`` and ``X`` are left as they were."""
    g = torch.Generator().manual_seed(d + m)
    U = torch.randn(B, d, d, generator=g, dtype=torch.float64).triu()
    X = torch.randn(B, d, m, generator=g, dtype=torch.float64)
    if dtype.is_complex:
        U = torch.complex(U, torch.randn(B, d, d, generator=g, dtype=torch.float64).triu())
        X = torch.complex(X, torch.randn(B, d, m, generator=g, dtype=torch.float64))
    want = U.mH @ (U @ X)
    U, X = U.to(dtype), X.to(dtype)
    U0, X0 = U.clone(), X.clone()
    got = linalg.triu_p_mm(U, X, block)
    assert got.dtype == dtype and got.shape == X.shape
    assert torch.equal(U, U0) and torch.equal(X, X0)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert float((got - want.to(dtype)).abs().max() / want.abs().max()) <= tol
