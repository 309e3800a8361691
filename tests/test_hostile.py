"""Hostile gradients: every optimiser (Kron, LRA, Dense) on the digits MLP stays finite and
recovers.

Each scenario runs a hostile phase, then 300 ordinary steps, and checks that no parameter or
optimiser state is non-finite and that the final training loss reaches the bound given (the clean
run reaches 0.005 in 300 steps; the initial loss is 2.3). Scaled gradients must also train while
scaled: their loss at the end of the hostile phase is bounded too. Measured final losses: zeros
0.035, ×1e6 0.0005, ×1e-6 0.0015, ×1e30 1.35 (finite only), outliers 0.0007, sparse rows 0.0000,
sign flips 0.0028, NaN/Inf bursts 0.0036 (240 parameter-steps skipped).

``LRA`` (lr 1e-2) and ``Dense`` (lr 3e-2, on a 64-4-10 MLP: a dense ``Q`` over the 2,410 weights
of the 64-32-10 one would cost ~14 GFLOP per update) run the same battery against
``max(bound, 3 x their own clean loss)``: their clean runs are weaker (measured 0.012 and 0.34).
LRA does not recover from the 1e6 outlier every 100 steps (measured 0.47): its diagonal step is
normalised by the largest entry, which the outlier owns, so the fit stalls until the next one (an
expected failure below, strict: it fails the suite if it starts passing).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from psgd_lab import LRA, Dense, Kron
from psgd_lab.problems import digits, mlp

X, Y, _, _ = digits()


def _outlier(g, t):
    if t % 100 == 7:
        g.view(-1)[0] = 1e6
    return g


def _sparse_rows(g, t):
    keep = torch.rand(g.shape[0], generator=torch.Generator().manual_seed(t)) < 0.1
    return g * keep.reshape((-1,) + (1,) * (g.dim() - 1))


# name: (transform of a gradient at step t during the hostile phase, hostile steps, loss bound)
SCENARIOS = {
    "zero for 1000 steps": (lambda g, t: g * 0, 1000, 0.1),
    "scaled by 1e6": (lambda g, t: g * 1e6, 300, 0.02),
    "scaled by 1e-6": (lambda g, t: g * 1e-6, 300, 0.02),
    # finite only: momentum holds the 1e30 gradients for ~650 steps (0.9^650 ≈ 1e-30), so
    # training is frozen in their direction well past the 300 steps after (measured: loss 1.35)
    "scaled by 1e30": (lambda g, t: g * 1e30, 300, float("inf")),
    "an outlier of 1e6 every 100 steps": (_outlier, 300, 0.02),
    "sparse rows (10% kept)": (_sparse_rows, 300, 0.02),
    "sign flipped every step": (lambda g, t: g * (-1) ** t, 300, 0.02),
    "NaN/Inf bursts": (lambda g, t: g * (float("nan") if t % 20 < 3 else float("inf")), 60, 0.02),
}


# name: (hidden sizes of the MLP, the optimiser)
OPTIMISERS = {
    "Kron": ((64, 32, 10), lambda ps: Kron(ps, lr=3e-3)),
    "LRA": ((64, 32, 10), lambda ps: LRA(ps, lr=1e-2)),
    "Dense": ((64, 4, 10), lambda ps: Dense(ps, lr=3e-2)),
}
KNOWN_FAILURES = {("LRA", "an outlier of 1e6 every 100 steps")}


def _run(transform, hostile_steps, normal_steps=300, optimiser="Kron"):
    sizes, make = OPTIMISERS[optimiser]
    model = mlp(sizes, seed=0)
    opt = make(model.parameters())
    g = torch.Generator().manual_seed(0)
    during = None
    for t in range(hostile_steps + normal_steps):
        if t == hostile_steps:
            with torch.no_grad():
                during = torch.nn.functional.cross_entropy(model(X), Y).item()
        i = torch.randint(0, len(Y), (128,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[i]), Y[i]).backward()
        if t < hostile_steps:
            with torch.no_grad():
                for p in model.parameters():
                    p.grad = transform(p.grad, t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(X), Y).item()
    return model, opt, loss, during


@functools.cache
def _clean(optimiser: str) -> float:
    return _run(lambda g, t: g, 0, optimiser=optimiser)[2]


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


CASES = [
    pytest.param(o, n, marks=pytest.mark.xfail(strict=True, reason="LRA's diagonal step is "
                                               "normalised by the outlier's entry: it stalls"))
    if (o, n) in KNOWN_FAILURES else (o, n)
    for o in OPTIMISERS for n in SCENARIOS
]  # fmt: skip


@pytest.mark.parametrize(("optimiser", "name"), CASES)
def test_hostile_gradients_stay_finite_and_training_recovers(optimiser, name):
    transform, hostile_steps, bound = SCENARIOS[name]
    model, opt, loss, during = _run(transform, hostile_steps, optimiser=optimiser)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = [t for t in _tensors(opt.state_dict()["state"]) if t.is_floating_point()]
    assert state and all(torch.isfinite(t).all() for t in state)
    if optimiser != "Kron":
        bound = max(bound, 3 * _clean(optimiser))
    assert loss < bound, loss
    if optimiser == "Kron" and name.startswith("scaled by 1e") and name != "scaled by 1e30":
        # trains while scaled; measured 0.002 (1e6) and 0.05 (1e-6: P = I must first grow by the
        # 1e6 it absorbs, ~(1 + lr)² per update, about 70 updates)
        assert during < 0.1, during


def test_zero_gradients_do_not_grow_the_preconditioner_without_bound():
    """kron-torch's damping is relative to mean|h|, so it vanishes for h = 0 and nothing stops
    Q from growing by ~(1 + lr) per update; the 1e-20 floor holds P near 1e20 (|Q_i| ~ 1e10)."""
    model, opt, _, _ = _run(lambda g, t: g * 0, 1000, normal_steps=0)
    biggest = max(q.abs().max().item() for st in opt.state.values() for q in st["Q"])
    assert biggest < 1e11
