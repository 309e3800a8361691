"""Hessian-vector products (exact and finite differences), damping, kron-torch's pair."""

from __future__ import annotations

import torch

from psgd_lab import KronPreconditioner
from psgd_lab.pairs import damp, hvp_autograd, hvp_finite_difference, kron_torch_pair
from psgd_lab.problems import fit_error, random_spd


def quartic_problem(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=gen, dtype=dtype)
    w = torch.randn(5, 3, generator=gen, dtype=dtype, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=dtype, requires_grad=True)

    def f(w, b):
        return ((A @ w + b).pow(4)).sum() + (w * w).sum()

    return [w, b], f


def test_hvp_exact_equals_explicit_hessian():
    params, f = quartic_problem()
    vs = [torch.randn_like(p) for p in params]
    grads = torch.autograd.grad(f(*params), params, create_graph=True)
    hv = hvp_autograd(grads, params, vs)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    H = torch.autograd.functional.hessian(lambda x: f(x[:15].reshape(5, 3), x[15:]), flat)
    expected = H @ torch.cat([v.reshape(-1) for v in vs])
    torch.testing.assert_close(torch.cat([x.reshape(-1) for x in hv]), expected)


def test_finite_difference_matches_exact_and_restores_params():
    params, f = quartic_problem()
    before = [p.detach().clone() for p in params]
    vs = [torch.randn_like(p) for p in params]
    exact = hvp_autograd(torch.autograd.grad(f(*params), params, create_graph=True), params, vs)

    def grad_fn():
        return torch.autograd.grad(f(*params), params)

    fd = hvp_finite_difference(grad_fn, params, vs)
    for a, b in zip(fd, exact):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # O(δ) error, δ = sqrt(eps)
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_newton_fit_from_autograd_hvp_reaches_inverse_hessian():
    """End to end: fit P from autograd Hv pairs on a quadratic with H = H1 ⊗ H2; P -> H⁻¹."""
    gen = torch.Generator().manual_seed(0)
    H1, H2 = (random_spd(d, gen, cond=30.0) for d in (3, 4))
    H = torch.kron(H1, H2)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    pre = KronPreconditioner((3, 4), geometry="QEQ", damping=0.0, dtype=torch.float64, seed=0)
    for _ in range(1000):
        (g,) = torch.autograd.grad(0.5 * x.reshape(-1) @ H @ x.reshape(-1), [x], create_graph=True)
        v = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        (hv,) = hvp_autograd([g], [x], [v])
        pre.update(hv, v, lr=0.2)
    assert fit_error(pre.matrix(), H) < 1e-6


def test_damp_bounds_the_preconditioner():
    """With h = 0 (no curvature information) damping keeps P ≤ I/damping."""
    pre = KronPreconditioner((4, 4), geometry="QEQ", damping=1e-2, dtype=torch.float64, seed=0)
    for _ in range(2000):
        pre.update(torch.zeros(4, 4, dtype=torch.float64))
    assert torch.linalg.eigvalsh(pre.matrix()).max() < 2 / 1e-2


def test_damp_and_kron_torch_pair_shapes():
    g = torch.randn(3, 4)
    gen = torch.Generator().manual_seed(0)
    assert damp(g, 1e-9, gen).shape == g.shape
    v, h = kron_torch_pair(g, gen)
    scale = (torch.finfo(torch.float32).eps ** 0.5) * g.abs().mean()
    torch.testing.assert_close(h, g + scale * v)
