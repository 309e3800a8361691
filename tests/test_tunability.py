"""psgd_lab.tunability: the expected-best-of-k estimator equals brute-force enumeration, the
bootstrap band holds the estimate, draws are seeded and inside their priors, a search runs
through the harness's cache, and problems.digits_cnn is a valid, paired task."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from psgd_lab import experiment as ex
from psgd_lab import problems
from psgd_lab import tunability as tu

# a tiny set with ties, so the ordering of equal values cannot matter
VALUES = [0.3, 0.1, 0.7, 0.3, 0.2, 0.9]


@pytest.mark.parametrize("replace", [False, True])
def test_expected_best_equals_enumeration(replace):
    n = len(VALUES)
    ks = list(range(1, n + 1))
    got = tu.expected_best(VALUES, ks, replace=replace)
    for k, value in zip(ks, got):
        if replace:  # every ordered k-tuple of indices, equally likely
            draws = itertools.product(range(n), repeat=k)
        else:  # every k-subset, equally likely
            draws = itertools.combinations(range(n), k)
        brute = [min(VALUES[i] for i in d) for d in draws]
        assert value == pytest.approx(np.mean(brute), rel=1e-12)
    assert got[0] == pytest.approx(np.mean(VALUES))  # k = 1: the mean
    if not replace:
        assert got[-1] == pytest.approx(min(VALUES))  # k = n: the minimum


def test_expected_best_with_an_infinite_value():
    values = [1.0, math.inf, 2.0]
    got = tu.expected_best(values, [1, 2, 3])
    assert math.isinf(got[0])  # a single draw can be the infinite one
    # pairs: {1, inf}, {1, 2}, {inf, 2} -> 1, 1, 2
    assert got[1] == pytest.approx(4 / 3) and got[2] == 1.0


def test_weights_are_distributions():
    for replace in (False, True):
        W = tu.best_of_k_weights(10, range(1, 11), replace)
        assert np.allclose(W.sum(1), 1.0) and (W >= 0).all()
    with pytest.raises(ValueError, match="at most"):
        tu.best_of_k_weights(5, [6])


def test_prob_reaching_equals_enumeration():
    n, target = len(VALUES), 0.25  # two values reach it
    for k, p in zip(range(1, n + 1), tu.prob_reaching(VALUES, target, range(1, n + 1))):
        subsets = list(itertools.combinations(VALUES, k))
        assert p == pytest.approx(np.mean([min(s) <= target for s in subsets]))
    frac = tu.fraction_reaching(VALUES, target)
    assert frac.estimate == pytest.approx(2 / 6) and frac.lo <= frac.estimate <= frac.hi


def test_bootstrap_band_holds_the_estimate_and_is_seeded():
    x = np.random.default_rng(0).lognormal(size=40)
    a = tu.expected_best_ci(x, range(1, 31), n_resamples=500, seed=3)
    b = tu.expected_best_ci(x, range(1, 31), n_resamples=500, seed=3)
    assert np.array_equal(a.lo, b.lo) and np.array_equal(a.hi, b.hi)
    assert np.allclose(a.estimate, tu.expected_best(x, range(1, 31)))
    assert (a.lo <= a.estimate + 1e-12).all() and (a.estimate <= a.hi + 1e-12).all()
    assert (np.diff(a.estimate) <= 1e-12).all()  # more trials never hurt in expectation


def test_sampling_is_seeded_and_inside_the_priors():
    for space in (tu.KRON, tu.ADAMW, tu.SGD, tu.KRON_LR):
        a, b = space.sample(200, seed=5), space.sample(200, seed=5)
        assert a == b
        assert a != space.sample(200, seed=6)
        assert space.sample(20, seed=5) == a[:20]  # a longer search extends a shorter one
        for draw in a:
            assert set(draw) == set(space.prior)
            for k, v in draw.items():
                assert space.prior[k].contains(v), (space.name, k, v)
    lrs = np.array([d["lr"] for d in tu.KRON.sample(2000)])
    assert lrs.min() >= 1e-5 and lrs.max() <= 1.0
    # log-uniform: about a fifth of the draws in each of the five decades
    counts = np.histogram(np.log10(lrs), bins=5, range=(-5, 0))[0]
    assert (np.abs(counts / 2000 - 0.2) < 0.04).all()
    wd = np.array([d["weight_decay"] for d in tu.ADAMW.sample(2000)])
    assert abs((wd == 0).mean() - 0.25) < 0.04
    modes = [d["memory_save_mode"] for d in tu.KRON.sample(400)]
    assert set(modes) == {None, "one_diag", "smart_one_diag", "all_diag"}


def test_options_gather_betas_and_keep_the_base():
    draw = tu.ADAMW.sample(1, seed=1)[0]
    options = tu.ADAMW.options(draw)
    assert options["betas"] == [draw["betas.0"], draw["betas.1"]] and "lr" not in options
    assert tu.KRON.options(tu.KRON.sample(1)[0])["seed"] == ex.SEED
    config = tu.ADAMW.config(draw)  # a valid Config: AdamW accepts the options
    config.build([torch.nn.Parameter(torch.zeros(2))], draw["lr"], 0)
    with pytest.raises(ValueError, match="lr"):
        tu.SearchSpace("x", "AdamW", {"momentum": tu.MOMENTUM})
    with pytest.raises(ValueError, match="both fixed and drawn"):
        tu.SearchSpace("x", "SGD", {"lr": tu.LR, "momentum": tu.MOMENTUM}, {"momentum": 0.9})


def test_search_runs_through_the_cache(tmp_path):
    task = ex.Task("linreg", problems.linear_regression, {"d": 8})
    kwargs = dict(steps=5, cache_dir=tmp_path, progress=False)
    first = tu.search(task, tu.ADAMW, 4, **kwargs)
    assert len(list(tmp_path.rglob("*.json"))) == 4
    again = tu.search(task, tu.ADAMW, 4, **kwargs)
    assert np.array_equal(first.final(), again.final())
    assert first.seeds == [0, 1, 2, 3]
    frame = first.to_frame()
    assert len(frame) == 4 and {"lr", "betas.0", "final", "diverged"} <= set(frame.columns)
    rerun = first.rerun()
    assert rerun["trial"] == first.best()[0] and rerun["relative"] == 0.0
    # capped: no trial counts as worse than its untrained model
    assert (first.final() <= first.initial()).all()


def test_a_diverged_trial_is_capped_at_its_initial_metric(tmp_path):
    task = ex.Task("linreg", problems.linear_regression, {"d": 8})
    space = tu.SearchSpace("huge lr", "SGD", {"lr": tu.LogUniform(1e3, 1e4)})
    s = tu.search(task, space, 2, steps=20, cache_dir=tmp_path, progress=False)
    assert s.diverged().all() and np.isinf(s.final(cap=False)).all()
    assert np.array_equal(s.final(), s.initial())


def test_digits_cnn_is_a_paired_task():
    a, b = problems.digits_cnn(0), problems.digits_cnn(0)
    x, y = a.batch(3)
    assert x.shape == (64, 1, 8, 8) and y.shape == (64,)
    assert torch.equal(x, b.batch(3)[0])  # the batch depends on (seed, step) only
    assert not torch.equal(x, problems.digits_cnn(1).batch(3)[0])
    shapes = [tuple(p.shape) for p in a.model.parameters()]
    assert shapes == [(8, 1, 3, 3), (8,), (16, 8, 3, 3), (16,), (10, 256), (10,)]
    assert a.metric(a.model) == pytest.approx(b.metric(b.model))  # seeded initialisation
    record = ex.run_one(ex.Task("cnn", problems.digits_cnn, {}), ex.Config("A", "AdamW"),
                        1e-2, 0, 30, 30, 100.0)  # fmt: skip
    assert record["rows"][-1]["metric"] < 0.7 * record["rows"][0]["metric"]


def test_ratio_of_curves():
    rng = np.random.default_rng(1)
    a, b = rng.lognormal(size=30), 2 * rng.lognormal(size=30)
    r = tu.expected_best_ratio(a, b, [1, 5, 30], n_resamples=500)
    want = tu.expected_best(a, [1, 5, 30]) / tu.expected_best(b, [1, 5, 30])
    assert np.allclose(r.estimate, want)
    assert (r.lo <= r.estimate + 1e-12).all() and (r.estimate <= r.hi + 1e-12).all()
    same = tu.expected_best_ratio(a, a, [1, 5], n_resamples=500)
    assert np.allclose(same.estimate, 1.0) and (same.lo < 1).all() and (same.hi > 1).all()
