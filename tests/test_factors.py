"""Applying Q, Qᴴ and P without the Kronecker product; gram_i; balancing; solves."""

from __future__ import annotations

import pytest
import torch

from psgd_lab import GEOMETRIES, KronPreconditioner, factors
from psgd_lab.problems import STRUCTURES, kron_problem
from psgd_lab.structure import make_plan


def random_factors(shape, diag, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    plan = make_plan(shape, diag)
    if not shape:
        return plan, [torch.randn((), generator=gen, dtype=dtype)]
    Q = [
        torch.randn(d, generator=gen, dtype=dtype)
        if dg
        else torch.triu(torch.randn(d, d, generator=gen, dtype=dtype)) + 3 * torch.eye(d)
        for d, dg in zip(shape, diag)
    ]
    return plan, Q


def dense(q):
    return torch.diag(q) if q.dim() == 1 else (q.reshape(1, 1) if q.dim() == 0 else q)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_apply_q_qh_p_equal_explicit_kron(structure, dtype):
    shape, diag, _, _ = kron_problem(structure)
    plan, Q = random_factors(shape, diag, dtype)
    Qm = factors.kron_matrix([dense(q) for q in Q])
    X = torch.randn(shape, dtype=dtype)
    x = X.reshape(-1)
    torch.testing.assert_close(factors.apply_q(Q, X, plan).reshape(-1), Qm @ x)
    torch.testing.assert_close(factors.apply_qh(Q, X, plan).reshape(-1), Qm.mH @ x)
    torch.testing.assert_close(factors.apply_p(Q, X, plan).reshape(-1), Qm.mH @ Qm @ x)
    torch.testing.assert_close(
        factors.solve_qh(Q, X).reshape(-1), torch.linalg.solve(Qm.mH, x.reshape(-1, 1))[:, 0]
    )


@pytest.mark.parametrize("structure", STRUCTURES)
def test_gram(structure):
    shape, diag, _, _ = kron_problem(structure)
    plan = make_plan(shape, diag)
    X = torch.randn(shape, dtype=torch.complex128)
    Y = torch.randn(shape, dtype=torch.complex128)
    for i in range(len(shape)):
        Xi = X.movedim(i, 0).reshape(shape[i], -1)
        Yi = Y.movedim(i, 0).reshape(shape[i], -1)
        full = Xi @ Yi.mH
        expected = torch.diagonal(full) if diag[i] else full
        torch.testing.assert_close(factors.gram(i, X, Y, plan), expected)


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
    plan, Q = random_factors(shape, diag)
    Q[0].mul_(1e3)
    before = factors.kron_matrix([factors.factor_p(q) for q in Q])
    factors.balance(Q)
    after = factors.kron_matrix([factors.factor_p(q) for q in Q])
    torch.testing.assert_close(after, before)
    norms = torch.stack([q.abs().amax() for q in Q])
    torch.testing.assert_close(norms, norms.mean().expand_as(norms))


def test_init_scale_is_split_across_factors():
    plan = make_plan((3, 4, 5), (False, True, False))
    Q = factors.init_factors(plan, 8.0, torch.float64)
    P = factors.kron_matrix([factors.factor_p(q) for q in Q])
    torch.testing.assert_close(P, 64.0 * torch.eye(60, dtype=torch.float64))


def test_data_init_scale():
    h = torch.full((4, 4), 2.0, dtype=torch.float64)
    torch.testing.assert_close(factors.data_init_scale(h, damping=0.0).item(), 2.0**-0.5)
    v = torch.full((4, 4), 3.0, dtype=torch.float64)
    torch.testing.assert_close(factors.data_init_scale(h, v, damping=0.0).item(), 3**0.5 / 2**0.5)


def test_kron_matrix_refuses_large():
    with pytest.raises(ValueError, match="limited to"):
        factors.kron_matrix([torch.eye(100), torch.eye(100)])


@pytest.mark.parametrize(
    "shape, diag",
    [((), ()), ((7,), (True,)), ((5, 6), (False, True)), ((300, 3), (False, False)),
     ((3, 4, 5), (False, True, False)), ((2, 3, 2, 3), (False, False, False, False))],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_structured_gram_and_triangular_apply_equal_the_plain_ones(shape, diag, dtype):
    from psgd_lab.factors import apply_q, apply_q_triangular, gram, gram_self
    from psgd_lab.structure import make_plan

    g = torch.Generator().manual_seed(0)
    plan = make_plan(shape, diag)
    X = torch.randn(shape, generator=g, dtype=dtype)
    Q = [
        torch.randn(s, generator=g, dtype=dtype).triu() if len(s) == 2 else
        torch.randn(s, generator=g, dtype=dtype) for s in plan.factor_shapes()
    ]  # fmt: skip
    torch.testing.assert_close(apply_q_triangular(Q, X), apply_q(Q, X, plan))
    for i in range(len(shape)):
        torch.testing.assert_close(gram_self(i, X, plan), gram(i, X, X, plan))
