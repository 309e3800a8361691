"""Applying Q, Qᴴ and P without the Kronecker product; gram_i; balancing; solves; on stacks."""

from __future__ import annotations

import math

import pytest
import torch

from psgd_lab import GEOMETRIES, KronPreconditioner, factors
from psgd_lab import Kron as KronOpt
from psgd_lab.problems import STRUCTURES, kron_problem
from psgd_lab.structure import make_plan


def random_factors(shape, diag, dtype=torch.float64, seed=0, batch=1):
    """A stack of ``batch`` random factor sets (dense ones upper-triangular, well conditioned)."""
    gen = torch.Generator().manual_seed(seed)
    if not shape:
        return [torch.randn(batch, generator=gen, dtype=dtype)]
    eye = torch.eye
    return [
        torch.randn(batch, d, generator=gen, dtype=dtype)
        if dg
        else torch.triu(torch.randn(batch, d, d, generator=gen, dtype=dtype)) + 3 * eye(d)
        for d, dg in zip(shape, diag)
    ]


def dense(q):
    return torch.diag(q) if q.dim() == 1 else (q.reshape(1, 1) if q.dim() == 0 else q)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_apply_q_qh_p_equal_explicit_kron(structure, dtype):
    """On a stack of 3: each tensor's result equals its explicit Kronecker matrix's product."""
    shape, diag, _, _ = kron_problem(structure)
    Q = random_factors(shape, diag, dtype, batch=3)
    X = torch.randn((3, *shape), dtype=dtype)
    outs = {
        "q": factors.apply_q(Q, X),
        "qh": factors.apply_qh(Q, X),
        "p": factors.apply_p(Q, X),
        "solve": factors.solve_qh(Q, X),
        "tri": factors.apply_q_triangular(Q, X),
    }
    for b in range(3):
        Qm = factors.kron_matrix([dense(q[b]) for q in Q])
        x = X[b].reshape(-1)
        torch.testing.assert_close(outs["q"][b].reshape(-1), Qm @ x)
        torch.testing.assert_close(outs["tri"][b].reshape(-1), Qm @ x)
        torch.testing.assert_close(outs["qh"][b].reshape(-1), Qm.mH @ x)
        torch.testing.assert_close(outs["p"][b].reshape(-1), Qm.mH @ Qm @ x)
        expected = torch.linalg.solve(Qm.mH, x.reshape(-1, 1))[:, 0]
        torch.testing.assert_close(outs["solve"][b].reshape(-1), expected)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_gram(structure):
    shape, diag, _, _ = kron_problem(structure)
    X = torch.randn((2, *shape), dtype=torch.complex128)
    Y = torch.randn((2, *shape), dtype=torch.complex128)
    for i in range(len(shape)):
        for b in range(2):
            Xi = X[b].movedim(i, 0).reshape(shape[i], -1)
            Yi = Y[b].movedim(i, 0).reshape(shape[i], -1)
            full = Xi @ Yi.mH
            torch.testing.assert_close(factors.gram(i, X, Y)[b], full)
            torch.testing.assert_close(factors.gram_diag(i, X, Y)[b], torch.diagonal(full))
            got = factors.gram_self(i, X, dense=not diag[i])[b]
            want = torch.diagonal(Xi @ Xi.mH) if diag[i] else Xi @ Xi.mH
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_precondition_equals_dense_matrix(structure, geometry):
    shape, diag, H, _ = kron_problem(structure)
    pre = KronPreconditioner(shape, geometry=geometry, diag=diag, dtype=torch.float64, seed=0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        v = torch.randn(shape, generator=gen, dtype=torch.float64)
        pre.update((H @ v.reshape(-1)).reshape(shape), v)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(pre.precondition(g).reshape(-1), pre.matrix() @ g.reshape(-1))


@pytest.mark.parametrize("structure", [s for s in STRUCTURES if len(STRUCTURES[s]) > 1])
def test_balancing_keeps_p(structure):
    shape, diag, _, _ = kron_problem(structure)
    Q = random_factors(shape, diag, batch=2)
    Q[0][1].mul_(1e3)  # only the second tensor's first factor is out of scale

    def p_of(b):
        return factors.kron_matrix([factors.factor_p(q[b]) for q in Q])

    before = [p_of(b) for b in range(2)]
    factors.balance(Q)
    for b in range(2):
        torch.testing.assert_close(p_of(b), before[b])
        norms = torch.stack([q[b].abs().amax() for q in Q])
        torch.testing.assert_close(norms, norms.mean().expand_as(norms))


def test_init_scale_is_split_across_factors():
    plan = make_plan((3, 4, 5), (False, True, False))
    Q = factors.init_factors(plan, 8.0, torch.float64)
    P = factors.kron_matrix([factors.factor_p(q) for q in Q])
    torch.testing.assert_close(P, 64.0 * torch.eye(60, dtype=torch.float64))


def test_data_scale():
    """``(mean|h|⁴)^(-1/8)`` (times ``(mean|v|²)^(1/4)`` in Newton mode) spread over k factors."""
    h = torch.stack([torch.full((4, 4), 2.0), torch.full((4, 4), 0.5)]).double()
    s = factors.data_scale(h, None, 0.0, k=2, fits_p=False)
    torch.testing.assert_close(s**2, torch.tensor([2.0**-0.5, 2.0**0.5], dtype=torch.float64))
    v = torch.full((2, 4, 4), 3.0, dtype=torch.float64)
    s = factors.data_scale(h, v, 0.0, k=1, fits_p=True)
    torch.testing.assert_close(s[0], torch.tensor((3**0.5 / 2**0.5) ** 2, dtype=torch.float64))
    assert torch.isfinite(factors.data_scale(torch.zeros(1, 3), None, 0.0, 1, False)).all()


def test_kron_matrix_refuses_large():
    with pytest.raises(ValueError, match="limited to"):
        factors.kron_matrix([torch.eye(100), torch.eye(100)])


@pytest.mark.parametrize("d", [300, 600])
def test_large_triangular_and_gram_paths_equal_plain_products(d):
    """Above 256 the triangular apply and the self gram split into blocks; same result."""
    g = torch.Generator().manual_seed(d)
    Q = [torch.randn(2, d, d, generator=g, dtype=torch.float64).triu(),
         torch.randn(2, 5, generator=g, dtype=torch.float64)]  # fmt: skip
    X = torch.randn(2, d, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(factors.apply_q_triangular(Q, X), factors.apply_q(Q, X))
    Y = torch.randn(2, 3, d, d, generator=g, dtype=torch.float64)  # axis 1 and 2 of (3, d, d)
    for i in (1, 2):
        torch.testing.assert_close(factors.gram_self(i, Y), factors.gram(i, Y, Y))


def test_stacked_p_factors_apply_p():
    """``apply_q`` with ``factor_p_compact`` of each factor applies ``P`` (triangular or not)."""
    Q = random_factors((4, 3), (False, True), batch=2)
    X = torch.randn(2, 4, 3, dtype=torch.float64)
    for tri in (True, False):
        P = [factors.factor_p_compact(q, triangular=tri) for q in Q]
        torch.testing.assert_close(factors.apply_q(P, X), factors.apply_p(Q, X))


@pytest.mark.parametrize("shape,i", [((600, 1), 0), ((2, 600), 1), ((600, 70), 0)])
def test_triangular_apply_p_equals_dense(shape, i):
    """The apply path that reads only the upper blocks of an EQ factor equals Qᴴ(Q X)."""
    gen = torch.Generator().manual_seed(0)
    d = shape[i]
    q = torch.randn(3, d, d, generator=gen, dtype=torch.float64).triu()
    X = torch.randn(3, *shape, generator=gen, dtype=torch.float64)
    want = factors.apply_one(factors.adjoint(q), i, factors.apply_one(q, i, X))
    torch.testing.assert_close(factors.apply_p_one_triangular(q, i, X), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize("shape", [(9000, 140), (8300, 128), (90, 160, 120), (5000, 16)])
def test_solve_by_inverse_agrees_with_the_triangular_solve(shape, dtype, monkeypatch):
    """A factor of at most 256 with enough right-hand sides along another axis than the first
    (``factors._by_inverse``: 64d) is solved through its inverse; it agrees with the triangular
    solve to float round-off (relative 5e-6 in single precision, 1e-12 in double), on the last
    and a middle axis, wide and narrow (an embedding's 16)."""
    diag = tuple(not (i > 0 and d <= 256) for i, d in enumerate(shape))
    Q = random_factors(shape, diag, dtype, batch=2)
    X = torch.randn((2, *shape), dtype=dtype, generator=torch.Generator().manual_seed(1))
    used = []
    real_eye = factors._eye
    monkeypatch.setattr(factors, "_eye", lambda q: used.append(q.shape[-1]) or real_eye(q))
    got = factors.solve_qh(Q, X)
    assert used == [d for d, dg in zip(shape, diag) if not dg]  # every dense factor took it
    monkeypatch.setattr(factors, "_by_inverse", lambda d, rhs, first: False)
    want = factors.solve_qh(Q, X)
    tol = 1e-12 if dtype == torch.float64 else 5e-6
    assert float((got - want).abs().max() / want.abs().max()) < tol


def test_solve_by_inverse_only_where_it_pays():
    """Only along an axis other than the first, with 64d right-hand sides (there the solve runs
    well below that); fewer right-hand sides, factors past 256 and the first axis (where the
    row solve runs well) keep the solve."""
    assert factors._by_inverse(128, 50257, first=False)  # a GPT-2 embedding
    assert factors._by_inverse(256, 64 * 256, first=False)
    assert not factors._by_inverse(192, 768, first=False)  # a ViT MLP weight's last axis
    assert not factors._by_inverse(192, 768, first=True)  # its first axis
    assert not factors._by_inverse(128, 50257, first=True)
    assert factors._by_inverse(16, 50257, first=False)  # a narrow embedding's (d = 16)
    assert factors._by_inverse(64, 64 * 64, False)
    assert not factors._by_inverse(64, 196, first=False)  # a ViT's (196, 64): too few
    assert not factors._by_inverse(384, 64 * 4096, False)  # the inverse (a cubic solve) costs more


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize("shape", [(300, 64), (600, 5, 40), (300, 63), (1000, 200)])
def test_first_axis_solve_on_rows_agrees_with_the_column_solve(shape, dtype, monkeypatch):
    """Along the first axis with at least ``_ROW_SOLVE`` right-hand sides, ``Q⁻ᴴ V`` is solved as
    ``Yᴴ Q = Vᴴ`` on V's rows as they lie in memory (MKL's first-axis solve copies them
    column-major first; measured 0.3-0.9x of its time on 1 and 2 threads). It agrees with the
    column solve to round-off, complex stacks included; fewer columns keep the column solve."""
    gen = torch.Generator().manual_seed(0)
    d = shape[0]
    cplx = dtype.is_complex  # genuinely complex factors and stack: nonzero imaginary parts

    def rand(*size, scale=1.0):
        r = torch.randn(*size, generator=gen)
        return torch.complex(r, torch.randn(*size, generator=gen)) * scale if cplx else r * scale

    Q = [torch.eye(d) + rand(2, d, d, scale=1 / (2 * d**0.5)).triu()]
    Q += [torch.rand(2, n, generator=gen) + 0.5 + (1j * rand(2, n, scale=0.3) if cplx else 0)
          for n in shape[1:]]  # fmt: skip  # well conditioned
    Q = [q.to(dtype) for q in Q]
    X = rand(2, *shape).to(dtype)
    assert not cplx or all(float(t.imag.abs().max()) > 1e-3 for t in (*Q, X))
    calls = []
    real = torch.linalg.solve_triangular
    monkeypatch.setattr(torch.linalg, "solve_triangular",
                        lambda *a, **k: calls.append(k["left"]) or real(*a, **k))  # fmt: skip
    got = factors.solve_qh(Q, X)
    rows = math.prod(shape[1:]) >= factors._ROW_SOLVE
    assert calls == [not rows]
    monkeypatch.setattr(factors, "_ROW_SOLVE", 10**9)
    want = factors.solve_qh(Q, X)
    assert got.dtype == dtype and got.shape == X.shape
    tol = {torch.float64: 1e-12, torch.bfloat16: 2**-7}.get(dtype, 5e-6)
    assert float((got - want).abs().max() / want.abs().max()) <= tol


@pytest.mark.parametrize("seed", range(5))
def test_half_precision_factors_keep_the_float32_solve(seed, monkeypatch):
    """bf16 factors are solved in float32 (``solve_triangular_lowp``), never inverted in bf16:
    the result is the float32 solve of the same numbers rounded to bf16, up to the roundings
    to bf16 between factors (one bf16 step, 2⁻⁷ of the largest entry)."""
    gen = torch.Generator().manual_seed(seed)
    Q = random_factors((160, 400), (False, True), torch.float32, seed=seed)
    Q = [q.to(torch.bfloat16) for q in Q]
    X = torch.randn(1, 160, 400, generator=gen).to(torch.bfloat16)
    real = factors._by_inverse
    monkeypatch.setattr(factors, "_by_inverse", lambda d, rhs, first: False)
    want = factors.solve_qh([q.float() for q in Q], X.float())  # float32, by solves
    monkeypatch.setattr(factors, "_by_inverse", real)
    monkeypatch.setattr(factors, "_eye", lambda q: pytest.fail("inverted a bf16 factor"))
    got = factors.solve_qh(Q, X)
    assert got.dtype == torch.bfloat16
    assert float((got.float() - want).abs().max() / want.abs().max()) <= 2**-7


def test_kron_trains_the_same_with_the_inverse_or_the_solve(monkeypatch):
    """End to end: 30 steps of ``Kron`` (EQ, kron-torch's defaults) on an embedding-like
    9000 x 128 weight, whose 128 factor takes the inverse (its rows are diagonal), against the
    same run with every factor solved: in float64 (its factors too) the parameters agree to 1e-10
    relative."""

    def run():
        gen = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.randn(9000, 128, generator=gen, dtype=torch.float64))
        target = torch.randn(9000, 128, generator=gen, dtype=torch.float64)
        opt = KronOpt(
            [w], lr=3e-3, preconditioner_update_probability=1.0, seed=1, precond_dtype=torch.float64
        )
        for _ in range(30):
            opt.zero_grad()
            ((w - target) ** 2).sum().backward()
            opt.step()
        return w.detach().clone()

    fast = run()
    monkeypatch.setattr(factors, "_by_inverse", lambda d, rhs, first: False)
    slow = run()
    assert not torch.equal(fast, slow)  # the paths did differ
    assert float((fast - slow).abs().max() / slow.abs().max()) < 1e-10


@pytest.mark.parametrize("shape", [(2, 3001, 97), (1, 9, 32000), (1, 7, 40000), (1, 3, 300000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64, torch.bfloat16])
def test_gram_diag_of_a_large_stack_row_by_row_is_bit_identical(shape, dtype):
    """A contiguous stack past ``ROWS_AT_ONCE`` entries has its first-axis diagonal gram summed
    in row blocks: the same sums bit for bit (the last block partial, or one row: (1, 9, 32000));
    rows of 2^15 entries and more keep the single product (torch sums one long row in another
    order: (1, 7, 40000)'s last block, (1, 3, 300000)'s rows); a column-major stack keeps the
    single product too (its sums run in another order) and gives that product's values."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(shape, generator=gen).to(dtype)
    Y = torch.randn(shape, generator=gen).to(dtype)
    assert X.numel() > factors.ROWS_AT_ONCE
    ref = (X * Y.conj()).sum(dim=-1)
    assert torch.equal(factors.gram_diag(0, X, Y), ref)
    Xc = X.mT.contiguous().mT  # same values, column-major
    assert torch.equal(factors.gram_diag(0, Xc, Y), (Xc * Y.conj()).sum(dim=-1))


@pytest.mark.parametrize("diag", [(True, False), (True, True), (False, True, True)])
def test_diagonal_factors_scale_fresh_products_in_place_and_never_the_input(diag):
    """``apply_q_triangular`` and ``solve_qh`` take the dense factors first and scale their
    fresh products by the diagonal ones in place: the input is left as it was, the values are
    the plain out-of-place ones (``apply_q``, and ``Qᴴ`` maps the solve back), and an all-diagonal
    stack gives the out-of-place products in the original order bit for bit."""
    shape = (300, 40, 3)[: len(diag)]
    gen = torch.Generator().manual_seed(2)
    Q = [torch.rand(2, d, generator=gen) + 0.5 if dg
         else torch.eye(d) + torch.randn(2, d, d, generator=gen).triu() / (2 * d**0.5)
         for d, dg in zip(shape, diag)]  # fmt: skip
    X = torch.randn(2, *shape, generator=gen)
    X0 = X.clone()
    got = factors.apply_q_triangular(Q, X)
    assert torch.equal(X, X0)
    torch.testing.assert_close(got, factors.apply_q(Q, X))
    sol = factors.solve_qh(Q, X)
    assert torch.equal(X, X0)
    torch.testing.assert_close(factors.apply_qh(Q, sol), X, rtol=1e-4, atol=1e-4)
    if all(diag):
        want, inv = X, X
        for i, q in enumerate(Q):
            want, inv = want * factors._bcast(q, i, X), inv / factors._bcast(q, i, X)
        assert torch.equal(got, want) and torch.equal(sol, inv)


@pytest.mark.parametrize("diag", [(True, False), (False, True)])
def test_solves_and_products_keep_their_gradients(diag):
    """Under autograd the diagonal factors scale out of place: ``solve_triangular`` keeps its
    result for its backward, so scaling it in place would break ``backward()``. Gradients
    through ``solve_qh`` and ``apply_q_triangular`` (to ``V`` and to every factor) equal those
    of the plain out-of-place composition."""
    shape = (80, 70)
    gen = torch.Generator().manual_seed(3)
    Q0 = [torch.rand(2, d, generator=gen, dtype=torch.float64) + 0.5 if dg
          else torch.eye(d, dtype=torch.float64)
          + torch.randn(2, d, d, generator=gen, dtype=torch.float64).triu() / (2 * d**0.5)
          for d, dg in zip(shape, diag)]  # fmt: skip
    V0 = torch.randn(2, *shape, generator=gen, dtype=torch.float64)

    def grads(fn):
        Q = [q.clone().requires_grad_() for q in Q0]
        V = V0.clone().requires_grad_()
        out = fn(Q, V * 1.0)  # a non-leaf input, as inside a model
        out.square().sum().backward()
        return [out.detach(), V.grad, *(q.grad for q in Q)]

    def plain_solve(Q, V):
        for i, q in enumerate(Q):
            if factors.is_dense(q):
                Vi = V.movedim(i + 1, 1)
                Y = torch.linalg.solve_triangular(q.mH, Vi.reshape(2, q.shape[-1], -1), upper=False)
                V = Y.reshape(Vi.shape).movedim(1, i + 1)
            else:
                V = V / factors._bcast(q, i, V)
        return V

    for fn, ref in ((factors.solve_qh, plain_solve), (factors.apply_q_triangular, factors.apply_q)):
        for got, want in zip(grads(fn), grads(ref)):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
