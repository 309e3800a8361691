"""psgd_lab.stats: bootstrap intervals cover at their nominal rate; paired differences keep the
pairing and count a diverged run as the worst."""

from __future__ import annotations

import math

import numpy as np
import pytest

from psgd_lab import stats

# ---------------------------------------------------------------------------- statistics


def test_bootstrap_intervals_cover_a_known_mean_at_their_nominal_rate():
    # 400 simulated data sets of 20 normal draws; the standard error of a coverage is ~1-2 %
    data = np.random.default_rng(1).normal(3.0, 2.0, size=(400, 20))
    for level, lo, hi in ((0.95, 0.90, 0.99), (0.8, 0.72, 0.86)):  # the level is honoured
        cis = [stats.bootstrap_ci(x, "mean", level, 2000, seed=i) for i, x in enumerate(data)]
        coverage = np.mean([ci.lo <= 3.0 <= ci.hi for ci in cis])
        assert lo <= coverage <= hi, (level, coverage)
        assert all(ci.lo < ci.estimate < ci.hi for ci in cis)


def test_paired_differences_and_win_rate():
    b = np.array([5.0, 1.0, 9.0, 2.0, 7.0, 3.0])  # large seed-to-seed spread
    a = b - 0.5  # but a is better on every seed by exactly 0.5
    p = stats.paired(a, b)
    assert p.median_diff == (-0.5, -0.5, -0.5) and p.mean_diff == (-0.5, -0.5, -0.5)
    assert p.win_rate == 1.0 and stats.paired(b, a).win_rate == 0.0
    # both diverged on a seed: a tie; one diverged: a loss for that one
    q = stats.paired([1.0, math.inf, math.inf], [2.0, math.inf, 1.0])
    assert q.win_rate == 0.5 and q.median_diff.estimate == 0.0 and q.mean_diff.hi == math.inf


def test_bad_statistics_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="must not contain NaN"):
        stats.bootstrap_ci([1.0, math.nan])
    with pytest.raises(ValueError, match="stat must be one of"):
        stats.bootstrap_ci([1.0, 2.0], stat="mode")
