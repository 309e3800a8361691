"""KronPreconditioner: the object a researcher drives by hand; clear errors on bad input."""

from __future__ import annotations

import pytest
import torch

from psgd_lab import GEOMETRIES, KronPreconditioner


def test_attributes_tell_the_structure():
    pre = KronPreconditioner((50000, 8), memory_save_mode=None)
    assert pre.diag == (True, False)
    assert pre.diag_dims == (0,) and pre.dense_dims == (1,)
    assert [tuple(q.shape) for q in pre.Q] == [(50000,), (8, 8)]
    assert "diag, dense" in repr(pre)


def test_merge_dims():
    pre = KronPreconditioner((64, 3, 3, 3), merge_dims=True)
    assert pre.shape == (64, 3, 3, 3) and pre.factor_shape == (576, 3)
    g = torch.randn(64, 3, 3, 3)
    pre.update(g)
    assert pre.precondition(g).shape == g.shape


def test_matrix_refuses_large_shapes():
    with pytest.raises(ValueError, match="numel <= 4096"):
        KronPreconditioner((100, 100)).matrix()


def test_data_driven_init_scale():
    """init_scale=None: the first update scales Q so that P g has about unit size."""
    g = 1e3 * torch.randn(8, 8, dtype=torch.float64)
    pre = KronPreconditioner((8, 8), init_scale=None, dtype=torch.float64, seed=0)
    pre.update(g, lr=1e-12)  # a negligible fitting step: only the initial scale acts
    ratio = pre.precondition(g).square().mean().sqrt() / g.square().mean().sqrt()
    assert 1e-4 < ratio.item() < 1e-2  # P ≈ (mean g⁴)^(-1/4) I ≈ I/1700


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_state_dict_round_trip_is_exact(geometry):
    a = KronPreconditioner((4, 5), geometry=geometry, seed=1)
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(4, 5, generator=gen) for _ in range(6)]
    for g in gs[:3]:
        a.update(g)
    b = KronPreconditioner((4, 5), geometry=geometry, seed=99)
    b.load_state_dict(a.state_dict())
    for g in gs[3:]:
        a.update(g)
        b.update(g)
    for qa, qb in zip(a.Q, b.Q):
        assert torch.equal(qa, qb)


def test_load_state_dict_from_another_shape_fails():
    with pytest.raises(ValueError, match="factor shapes"):
        KronPreconditioner((4, 5)).load_state_dict(KronPreconditioner((5, 4)).state_dict())


def test_seed_makes_updates_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    runs = []
    for _ in range(2):
        pre = KronPreconditioner((3, 4), seed=7)
        pre.update(torch.ones(3, 4))
        runs.append(pre.Q[0].clone())
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(torch.rand(3), expected)


def test_bf16_factors_run():
    pre = KronPreconditioner((6, 7), geometry="QUAD", dtype=torch.bfloat16)
    g = torch.randn(6, 7)
    for _ in range(5):
        pre.update(g)
    out = pre.precondition(g)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ------------------------------------------------------------------ errors


def test_unknown_geometry():
    with pytest.raises(ValueError, match=r"geometry must be one of 'EQ', 'QEQ', .*got 'XYZ'"):
        KronPreconditioner((3,), geometry="XYZ")


def test_unknown_memory_save_mode():
    with pytest.raises(ValueError, match="memory_save_mode must be one of None"):
        KronPreconditioner((3, 3), memory_save_mode="some_diag")


def test_unknown_lipschitz():
    with pytest.raises(ValueError, match="lipschitz must be one of 'kron', 'ema'"):
        KronPreconditioner((3, 3), lipschitz="max")


def test_integer_tensors_are_refused():
    pre = KronPreconditioner((3, 3))
    with pytest.raises(TypeError, match="h must have a floating-point or complex dtype"):
        pre.update(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="v must have a floating-point or complex dtype"):
        pre.update(torch.ones(3, 3), torch.ones(3, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="g must have"):
        pre.precondition(torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtype must be a floating-point or complex"):
        KronPreconditioner((3, 3), dtype=torch.int64)
    with pytest.raises(TypeError, match="h must be a torch.Tensor"):
        pre.update([[1.0] * 3] * 3)


@pytest.mark.parametrize("lr", [0, -0.1, float("nan"), "0.1", True])
def test_non_positive_lr(lr):
    with pytest.raises(ValueError, match="lr must be a positive number"):
        KronPreconditioner((3, 3)).update(torch.ones(3, 3), lr=lr)


def test_shape_mismatch():
    pre = KronPreconditioner((3, 4))
    with pytest.raises(ValueError, match=r"h has shape \(4, 3\), but .* shape \(3, 4\)"):
        pre.update(torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"v has shape \(3, 5\)"):
        pre.update(torch.ones(3, 4), torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"g has shape \(12,\)"):
        pre.precondition(torch.ones(12))


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="init_scale must be a positive number"):
        KronPreconditioner((3,), init_scale=0.0)
    with pytest.raises(ValueError, match="beta_L must be in"):
        KronPreconditioner((3,), beta_L=1.0)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        KronPreconditioner((3,), damping=-1.0)
    with pytest.raises(ValueError, match="diag must have one flag per dim"):
        KronPreconditioner((3, 4), diag=(True,))


def test_update_on_a_pair_that_requires_grad_fits_without_recording():
    """``h`` (and ``v``) may come out of a graph, e.g. ``w * 2`` of a leaf: the fit is not
    differentiated, so it runs as on the detached pair (same factors bit for bit), the factors
    stay plain tensors, and large dense factors (block products, d > 256) work too."""
    w = torch.randn(300, 280, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for v in (None, torch.randn(300, 280, generator=torch.Generator().manual_seed(1))):
        a = KronPreconditioner((300, 280), seed=0)
        b = KronPreconditioner((300, 280), seed=0)
        for _ in range(2):
            a.update(w * 2.0, None if v is None else v * w.detach())
            b.update((w * 2.0).detach(), None if v is None else v * w.detach())
        assert not any(q.requires_grad for q in a.Q) and not any(x.requires_grad for x in a.L)
        assert all(torch.equal(x, y) for x, y in zip(a.Q, b.Q))
