"""The experiment tasks of psgd_lab.problems used by notebooks 07 and 08: known values at the
start, paired seeds (same batches for every optimiser, a seed that changes them), the stated
metrics, and a short run that trains."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from psgd_lab import experiment as ex
from psgd_lab import problems


def test_rosenbrock_start_minimum_and_seed_independence():
    t0, t1 = problems.rosenbrock(0), problems.rosenbrock(1, shape=(2,))
    assert t0.metric(t0.model) == pytest.approx(24.2)  # the classic start (-1.2, 1)
    assert torch.equal(t0.model.x, t1.model.x)  # deterministic: the seed is the optimiser's
    assert t0.batch(5) is None and t0.model.x.dtype == torch.float64
    t8 = problems.rosenbrock(0, shape=(2, 4))
    assert t8.model.x.shape == (2, 4)
    assert t8.model.x.reshape(-1).tolist() == [-1.2, 1.0] * 4
    assert problems.rosenbrock_value(torch.ones(8)).item() == 0.0
    assert t8.loss(t8.model, None).item() == pytest.approx(t8.metric(t8.model))


@pytest.mark.parametrize("n", [None, 256])
def test_rotated_regression_metric_and_pairing(n):
    kw = {"n": n, "noise": 0.0 if n else 0.1, "init_std": 0.1 if n else 0.0}
    a, b, c = (problems.rotated_regression(s, **kw) for s in (3, 3, 4))
    xa, ya = a.batch(7)
    xb, yb = b.batch(7)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)  # same seed and step: same batch
    assert not torch.equal(xa, c.batch(7)[0])  # another seed: another batch
    assert xa.shape == (32, 16) and ya.shape == (32, 4) and xa.dtype == torch.float64
    if n is None:
        assert torch.count_nonzero(a.model.weight) == 0
        # excess risk at W = 0 is ½ tr(W* Σ W*ᵀ); a large-batch loss estimates it + noise²·out/2
        big = problems.rotated_regression(0, batch=200_000)
        X, Y = big.batch(0)
        loss = big.loss(big.model, (X, Y)).item()
        assert loss == pytest.approx(a.metric(a.model) + 0.5 * 0.1**2 * 4, rel=0.02)
    else:
        assert not torch.equal(a.model.weight, c.model.weight)  # init from the seed
    assert a.metric(a.model) > 0


def test_rotated_regression_fixed_set_metric_is_full_loss():
    t = problems.rotated_regression(0, n=64, batch=64, noise=0.0, init_std=0.1)
    # recover the whole fixed set through many batches: the metric equals ½ mean over all rows
    seen = {}
    for step in range(200):
        X, Y = t.batch(step)
        for x, y in zip(X, Y):
            seen[tuple(x.tolist())] = (x, y)
    assert len(seen) == 64
    X = torch.stack([v[0] for v in seen.values()])
    Y = torch.stack([v[1] for v in seen.values()])
    assert t.loss(t.model, (X, Y)).item() == pytest.approx(t.metric(t.model), rel=1e-10)


def test_first_input_rnn_and_digits_train_metric():
    t, u = problems.first_input_rnn(0), problems.first_input_rnn(1)
    assert torch.equal(t.batch(2), problems.first_input_rnn(0).batch(2))
    assert not torch.equal(t.model.head.weight, u.model.head.weight)
    assert 0.8 < t.metric(t.model) < 1.1  # predicting ~0 scores the inputs' mean square
    d = problems.digits_mlp(0, metric="train", dtype="float64")
    X, y, _, _ = problems.digits(0)
    assert d.metric(d.model) == pytest.approx(F.cross_entropy(d.model(X.double()), y).item())
    assert next(d.model.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match="metric"):
        problems.digits_mlp(0, metric="val")
    with pytest.raises(ValueError, match="dtype"):
        problems.rosenbrock(0, dtype="half")


@pytest.mark.parametrize(
    "task, steps",
    [
        (ex.Task("rosenbrock", problems.rosenbrock, {}), 60),
        (ex.Task("rotated-regression", problems.rotated_regression, {}), 60),
        (ex.Task("first-input-rnn", problems.first_input_rnn, {"length": 5}), 30),
    ],
)
def test_tasks_train_with_kron_in_both_modes(task, steps):
    for mode, lr in (("whiten", 0.01), ("newton", 0.3)):
        config = ex.Config(mode, "Kron", {"mode": mode, "seed": ex.SEED})
        record = ex.run_one(task, config, lr, 0, steps, steps, 100.0)
        first, last = record["rows"][0]["metric"], record["rows"][-1]["metric"]
        assert record["diverged_step"] is None and math.isfinite(last) and last < first
