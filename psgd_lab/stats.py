"""Seed statistics for comparing optimisers: percentile-bootstrap intervals and paired differences.

Everything is numpy, vectorised over the resamples, and seeded, so an interval printed by a
notebook is the same on every run. Lower values are better (a loss, an error rate): a run that
diverged enters as ``+inf``, the worst value, and is never dropped. ``NaN`` is refused, because a
missing value has no rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

STATISTICS: dict[str, Callable[..., np.ndarray]] = {"median": np.median, "mean": np.mean}


class Interval(NamedTuple):
    """A statistic's value on the data and its bootstrap interval ``[lo, hi]``."""

    estimate: float
    lo: float
    hi: float


class Paired(NamedTuple):
    """``a`` against ``b`` seed by seed: intervals for the median and the mean of ``a - b``
    (negative: ``a`` is lower, so better) and the fraction of seeds where ``a`` is lower (ties
    count one half)."""

    median_diff: Interval
    mean_diff: Interval
    win_rate: float
    n: int


def _values(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(
            f"{name} must be a 1-D sequence of at least 2 numbers; got shape {x.shape}"
        )
    if np.isnan(x).any():
        raise ValueError(f"{name} must not contain NaN (a diverged run enters as +inf)")
    return x


def _check(level: float, n_resamples: int) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level!r}")
    if not (isinstance(n_resamples, int) and n_resamples >= 100):
        raise ValueError(f"n_resamples must be an integer >= 100; got {n_resamples!r}")


def _statistic(stat: str | Callable) -> Callable[..., np.ndarray]:
    if callable(stat):
        return stat
    if stat not in STATISTICS:
        raise ValueError(f"stat must be one of {', '.join(map(repr, STATISTICS))} or a callable")
    return STATISTICS[stat]


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    # "inverted_cdf" takes order statistics without interpolating, so +inf values (diverged
    # runs) give +inf bounds instead of inf - inf = NaN
    tail = (1 - level) / 2
    lo, hi = np.quantile(stats, [tail, 1 - tail], method="inverted_cdf")
    return float(lo), float(hi)


def _resample_index(n: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    stat: str | Callable = "median",
    level: float = 0.95,
    n_resamples: int = 4000,
    seed: int = 0,
) -> Interval:
    """Percentile-bootstrap interval of ``stat`` (``"median"``, ``"mean"``, or a numpy reduction
    taking ``axis=``) over ``values`` (one per seed), from ``n_resamples`` resamples drawn by a
    generator seeded with ``seed``.

    With few values the interval is a rough guide: at n = 20 normal draws a 95% interval of the
    mean covers the true mean about 93% of the time; at 5 seeds the median's interval is the
    range of the middle three values or wider.
    """
    x = _values(values, "values")
    _check(level, n_resamples)
    fn = _statistic(stat)
    with np.errstate(invalid="ignore"):  # -inf and +inf averaged by a median: NaN, kept
        estimate = float(fn(x))
        stats = fn(x[_resample_index(x.size, n_resamples, seed)], axis=1)
    return Interval(estimate, *_percentiles(stats, level))


def paired(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    level: float = 0.95,
    n_resamples: int = 4000,
    seed: int = 0,
) -> Paired:
    """Compare ``a`` and ``b``, where ``a[i]`` and ``b[i]`` come from the same seed (same
    initialisation and batches), through the differences ``a[i] - b[i]``: the seeds are
    resampled, never ``a`` and ``b`` apart, so the pairing is kept.

    Two diverged runs (both ``+inf``) are a tie: their difference is 0.
    """
    x, y = _values(a, "a"), _values(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must pair up seed by seed; got {x.size} and {y.size} values")
    _check(level, n_resamples)
    both_inf = np.isinf(x) & np.isinf(y) & (np.sign(x) == np.sign(y))
    with np.errstate(invalid="ignore"):  # inf - inf, replaced by the tie's 0
        d = np.where(both_inf, 0.0, x - y)
    resampled = d[_resample_index(d.size, n_resamples, seed)]
    with np.errstate(invalid="ignore"):
        median = Interval(float(np.median(d)), *_percentiles(np.median(resampled, axis=1), level))
        mean = Interval(float(np.mean(d)), *_percentiles(np.mean(resampled, axis=1), level))
    wins = float(np.mean((d < 0) + 0.5 * (d == 0)))
    return Paired(median, mean, wins, int(d.size))
