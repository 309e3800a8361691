"""Long runs: preconditioner updates against a slowly drifting Hessian, and Kron training for
thousands of steps, in float32 and with bfloat16 factors.

The README's test command runs the short versions (10,000 updates, 5,000 steps); the soak
versions (100,000 updates, 20,000 steps, about 5 minutes of CPU) carry the ``soak`` marker, which
the default run deselects: ``python -m pytest -m soak tests`` runs them, and the README reports
their figures."""

from __future__ import annotations

import math

import pytest
import torch
from psgd_reference import RefKron, apply_p

from psgd_lab import Kron, KronPreconditioner
from psgd_lab.problems import digits, mlp, random_spd

pytestmark = pytest.mark.slow

SOAK = pytest.mark.soak


def _apply(Hs, x):
    """``(H_1 ⊗ ... ⊗ H_k) x`` for a tensor ``x`` of the factors' shape."""
    for i, H in enumerate(Hs):
        x = torch.movedim(torch.tensordot(H, torch.movedim(x, i, 0), dims=1), 0, i)
    return x


@pytest.mark.parametrize("steps", [10_000, pytest.param(100_000, marks=SOAK)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64,), (32, 32, 8)])
def test_updates_track_a_drifting_hessian(shape, dtype, steps):
    """Newton pairs ``(v, H_t v)``, ``H_t = ⊗ R_i(t) H_i R_i(t)ᵀ`` with each rotation ``R_i`` making
    one slow swing over the run (cond 10 per factor; dense factors everywhere, kron-torch's
    normalisation, lr 0.1, balanced every 100 updates as Kron does). At every tenth of the run:
    all factors finite, the fit ``‖P H_t − I‖_F/√n`` (8 random probes) below the stated bound,
    and the factors' scales within 10x of each other just before a balance. The short run swings
    ten times faster, so it tracks a harder target for fewer updates."""
    n, check = math.prod(shape), steps // 10
    g = torch.Generator().manual_seed(0)
    H0 = [random_spd(d, g, cond=10.0) for d in shape]
    gens = [torch.randn(d, d, generator=g, dtype=torch.float64) for d in shape]
    gens = [(A - A.T) / d for A, d in zip(gens, shape)]
    pre = KronPreconditioner(shape, dtype=dtype, init_scale=None, damping=0.0, seed=0,
                             diag=(False,) * len(shape))  # fmt: skip
    bound = 0.5 if dtype == torch.float32 else 0.6  # first 5,000 updates: ≤ 0.29 and ≤ 0.37
    for t in range(steps):
        if t % 100 == 0:  # the Hessian drifts slowly: refresh it every 100 updates
            s = math.sin(2 * math.pi * t / steps)
            rots = [torch.linalg.matrix_exp(s * A) for A in gens]
            Hs = [R @ H @ R.T for R, H in zip(rots, H0)]
        v = torch.randn(shape, generator=g, dtype=torch.float64)
        pre.update(_apply(Hs, v).to(dtype), v.to(dtype), lr=0.1)
        if t % 100 == 99:
            if len(shape) > 1 and (t + 1) % check == 0:
                norms = [q.abs().max().item() for q in pre.Q]
                assert max(norms) / min(norms) < 10, (t, norms)
            pre.balance()
        if (t + 1) % check == 0:
            assert all(torch.isfinite(q).all() for q in pre.Q), t
            err = 0.0
            for _ in range(8):
                z = torch.randn(shape, generator=g, dtype=torch.float64)
                pz = pre.precondition(_apply(Hs, z).to(dtype)).double()
                err += ((pz - z).norm() ** 2 / n).item() / 8
            assert math.sqrt(err) < bound, (t, math.sqrt(err))


@pytest.mark.parametrize("steps", [5_000, pytest.param(20_000, marks=SOAK)])
@pytest.mark.parametrize("precond_dtype", [torch.float32, torch.bfloat16])
def test_kron_trains_long_without_divergence(precond_dtype, steps):
    """Past the default schedule's anneal (probability 0.03 from step 4007) and, in the soak run,
    far beyond it."""
    X, Y, _, _ = digits()
    model = mlp((64, 32, 10), seed=0)
    opt = Kron(model.parameters(), lr=1e-3, weight_decay=1e-4, precond_dtype=precond_dtype)
    g = torch.Generator().manual_seed(0)
    for t in range(steps):
        i = torch.randint(0, len(Y), (128,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[i]), Y[i])
        loss.backward()
        opt.step()
        if t % 5000 == 4999:
            assert math.isfinite(loss.item()), t
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(model(X), Y).item()
    assert opt.nonfinite_count == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(q).all() for st in opt.state.values() for q in st["Q"])
    assert final < 0.05, final


@pytest.mark.parametrize("steps", [pytest.param(100_000, marks=SOAK)])  # ~1 min: soak only
def test_ill_conditioned_newton_fit_in_float32(steps):
    """``H = diag(logspace(-2, 2, 16)) ⊗ diag(logspace(-1, 1, 12))`` (condition 1e6), Newton pairs,
    ``Q0.5EQ1.5`` at lr 0.1 in float32 under the reference's settings (EMA Lipschitz estimate,
    ``damping=1e-9``). The relative error ``‖P H v − v‖/‖v‖`` (256 probes) reaches a round-off
    floor and wanders on it: measured at every 20,000th of 100,000 updates 0.16, 0.08, 0.12,
    0.20, 0.17 (mean 0.15; the reference's own functions were measured at 0.14 after 100,000), and
    with kron-torch's per-sample normalisation 0.23, 0.17, 0.23, 0.35, 0.24. Bound on the mean of
    five checkpoints over the run: 0.25."""
    errors = ill_conditioned_newton_fit(steps)[0]
    assert all(math.isfinite(e) for e in errors)
    assert sum(errors) / len(errors) < 0.25, errors


def ill_conditioned_newton_fit(steps: int, reference: bool = False):
    """``(ours, theirs)``: the relative error ``‖P H v − v‖/‖v‖`` (256 probes) at five checkpoints
    of ``KronPreconditioner``'s float32 Newton fit of the condition-1e6 ``H`` below, and, with
    ``reference``, of the reference's own step (tests/psgd_reference.py) on the same pairs (its
    draws from a generator of its own, so ``ours`` does not depend on ``reference``)."""
    H = torch.kron(torch.diag(torch.logspace(-2, 2, 16)), torch.diag(torch.logspace(-1, 1, 12)))
    pre = KronPreconditioner((16, 12), geometry="Q0.5EQ1.5", lipschitz="ema", seed=0)
    ref = RefKron((16, 12), (True, True), dtype=torch.float32)
    ref.init(torch.tensor(1.0))
    gen, draws = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    V = torch.randn(256, 192, generator=torch.Generator().manual_seed(9))
    ours, theirs = [], []

    def error(apply) -> float:
        PHv = torch.stack([apply(x.reshape(16, 12)).reshape(-1) for x in V @ H.T])
        return ((PHv - V).norm() / V.norm()).item()

    for i in range(steps):
        v = torch.randn(16, 12, generator=gen)
        h = (H @ v.reshape(-1)).reshape(16, 12)
        pre.update(h, v, lr=0.1)
        if reference:
            noise = torch.randn(16, 12, generator=draws)
            starts = [torch.randn(32, d, generator=draws) for d in (16, 12)]
            turns = [torch.randn(32, d, generator=draws) for d in (16, 12)]
            ref.newton(v, h, noise, starts, turns, lr=0.1)
        if (i + 1) % (steps // 5) == 0:
            ours.append(error(pre.precondition))
            if reference:
                theirs.append(error(lambda x: apply_p(ref.Q, x)))
    return ours, theirs


@pytest.mark.parametrize("steps", [pytest.param(100_000, marks=SOAK)])  # ~3 min: soak only
def test_ill_conditioned_newton_fit_matches_the_references_own(steps):
    """The fit above against the reference's own Newton step (``update_precond_kron_newton_
    q0p5eq1p5``, written out in tests/psgd_reference.py) in float32, on the same pairs: both sit
    on the same round-off floor. Measured at every 20,000th update: psgd_lab 0.165, 0.079, 0.121,
    0.199, 0.166 (mean 0.146), the reference 0.165, 0.079, 0.121, 0.198, 0.165 (mean 0.146). Bound:
    psgd_lab's mean at most 10% (+0.02) above the reference's."""
    ours, theirs = ill_conditioned_newton_fit(steps, reference=True)
    assert all(math.isfinite(e) for e in ours + theirs)
    assert sum(ours) / 5 <= 1.1 * sum(theirs) / 5 + 0.02, (ours, theirs)
