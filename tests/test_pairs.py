"""Hessian-vector products (exact and finite differences), damping, kron-torch's pair."""

from __future__ import annotations

import torch

from psgd_lab import KronPreconditioner
from psgd_lab.pairs import damp, fd_delta, hvp_autograd, hvp_finite_difference, kron_torch_damp
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
        # O(δ‖v‖) error with δ = sqrt(eps)·max(1, ‖θ‖/‖v‖): measured 1.2e-6 relative
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
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


def test_damp_and_kron_torch_damp_per_tensor_of_a_stack():
    g = torch.randn(2, 3, 4)
    g[1] *= 100
    n, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(damp(g, 1e-9, n), g + (1e-9 + eps * g.abs()) * n)
    h = kron_torch_damp(g, v)
    for b in range(2):  # each tensor's own mean|h|
        scale = eps**0.5 * g[b].abs().mean()
        torch.testing.assert_close(h[b], g[b] + scale * v[b])
    zero = kron_torch_damp(torch.zeros(1, 3), torch.ones(1, 3))
    assert torch.equal(zero, torch.full((1, 3), 1e-20))  # floored: a zero gradient stays damped


def test_finite_difference_in_bfloat16_is_relative_and_exact_about_its_step():
    """bf16: an absolute δ = sqrt(eps) = 0.06 is lost against |θ| ≫ 1 (and the difference of two
    bf16 gradients cancels); δ scaled by ‖θ‖/‖v‖, the difference taken in float32, and the step
    actually taken returned give a usable pair. Measured: relative error 0.03 (the old fixed δ
    with a bf16 difference: 1.0, every entry of Hv cancelled to 0)."""
    gen = torch.Generator().manual_seed(0)
    H = random_spd(6, gen, cond=10.0).float()
    theta = (100 + torch.randn(6, generator=gen)).to(torch.bfloat16).requires_grad_()

    def grad_fn():
        x = theta.float()
        return torch.autograd.grad(0.5 * x @ H @ x, [theta])

    v = torch.randn(6, generator=gen).to(torch.bfloat16)
    assert fd_delta([theta], [v]) > 1.0  # ‖θ‖/‖v‖ ≈ 100
    (hv,), (taken,) = hvp_finite_difference(grad_fn, [theta], [v], return_v=True)
    assert hv.dtype == torch.float32 and taken.dtype == torch.float32
    rel = ((hv - H @ taken).norm() / (H @ taken).norm()).item()
    assert rel < 0.1, rel


def test_kron_damping_in_place_gives_the_same_pair_and_leaves_a_callers_h_alone():
    """``inplace=True`` (an ``h`` the caller made for this fit) damps in ``h``'s storage, bit for
    bit what the out-of-place form gives; without it ``h`` (a gradient, say) is left unchanged."""
    gen = torch.Generator().manual_seed(3)
    h, v = torch.randn(2, 300, 40, generator=gen), torch.randn(2, 300, 40, generator=gen)
    before = h.clone()
    ref = kron_torch_damp(h, v)
    assert torch.equal(h, before)
    got = kron_torch_damp(h, v, inplace=True)
    assert got.data_ptr() == h.data_ptr() and torch.equal(got, ref)
