"""The expected best result of a random search after ``k`` of its ``n`` trials, with bootstrap
bands (Dodge et al. 2019, "Show your work"): the estimators behind ``psgd_lab.tunability``.

``expected_best(values, ks)`` is exact for the trials run: with trials sorted best first, the
``i``-th is the best of ``k`` drawn without replacement with probability
``C(n - i, k - 1) / C(n, k)`` (``replace=True``: Dodge et al.'s ``F̂^k``, drawing with
replacement). Lower is better, as everywhere in the harness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import stats


def _ks(ks, n: int, replace: bool) -> np.ndarray:
    k = np.atleast_1d(np.asarray(ks))
    if k.ndim != 1 or k.size == 0 or not np.issubdtype(k.dtype, np.integer) or k.min() < 1:
        raise ValueError(f"ks must be integers >= 1; got {ks!r}")
    if not replace and k.max() > n:
        raise ValueError(f"without replacement k can be at most the number of trials {n}")
    return k.astype(int)


def best_of_k_weights(n: int, ks, replace: bool = False) -> np.ndarray:
    """``W[j, i]``: the probability that the ``(i+1)``-th smallest of ``n`` values is the best
    (lowest) of ``ks[j]`` draws, without replacement (``C(n-i-1, k-1) / C(n, k)``) or with it
    (``((n-i)/n)^k - ((n-i-1)/n)^k``). Ties are harmless: equal values share their weight."""
    ks = _ks(ks, n, replace)
    W = np.zeros((ks.size, n))
    for j, k in enumerate(ks):
        if replace:
            i = np.arange(n)
            W[j] = ((n - i) / n) ** k - ((n - i - 1) / n) ** k
        else:
            total = math.comb(n, int(k))
            W[j] = [math.comb(n - i - 1, int(k) - 1) / total for i in range(n)]
    return W


def _curves(sorted_values: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``sorted_values`` (..., n) ascending; the expected best per k, ``+inf`` where an infinite
    value has positive weight (never ``0 * inf``)."""
    finite = np.isfinite(sorted_values)
    out = np.where(finite, sorted_values, 0.0) @ W.T
    hit = (~finite).astype(float) @ (W.T > 0)
    return np.where(hit > 0, math.inf, out)


def expected_best(values, ks, replace: bool = False) -> np.ndarray:
    """The expected lowest of ``k`` values drawn at random from ``values``, for each ``k`` in
    ``ks``: without replacement by default (unbiased for the population's expected best of
    ``k``; needs ``k <= len(values)``), with replacement (Dodge et al. 2019's ``F̂^k``) if
    ``replace``."""
    x = stats._values(values, "values")
    return _curves(np.sort(x), best_of_k_weights(x.size, ks, replace))


@dataclass(frozen=True)
class Curve:
    """``expected_best_ci``'s answer: per ``k``, the estimate and its bootstrap band."""

    ks: np.ndarray
    estimate: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def expected_best_ci(
    values,
    ks,
    replace: bool = False,
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Curve:
    """``expected_best`` with a percentile-bootstrap band: the ``n`` trials resampled with
    replacement ``n_resamples`` times (generator seeded with ``seed``), the curve recomputed on
    each resample; per ``k`` the ``level`` interval of those curves. The band is the uncertainty
    from having run ``n`` trials of the search, not a seed-to-seed interval of one trial."""
    x = stats._values(values, "values")
    stats._check(level, n_resamples)
    ks = _ks(ks, x.size, replace)
    W = best_of_k_weights(x.size, ks, replace)
    resampled = np.sort(x[stats._resample_index(x.size, n_resamples, seed)], axis=1)
    curves = _curves(resampled, W)
    tail = (1 - level) / 2
    lo, hi = np.quantile(curves, [tail, 1 - tail], axis=0, method="inverted_cdf")
    return Curve(ks, _curves(np.sort(x), W), lo, hi)


def expected_best_ratio(
    a,
    b,
    ks,
    replace: bool = False,
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Curve:
    """``expected_best(a, k) / expected_best(b, k)`` per ``k`` (below 1: ``a``'s search does
    better at a budget of ``k`` trials), with a percentile-bootstrap band from resampling the
    trials of ``a`` and of ``b`` independently (a random search's trials are independent draws;
    sharing a seed index does not pair them)."""
    x, y = stats._values(a, "a"), stats._values(b, "b")
    stats._check(level, n_resamples)
    ks = _ks(ks, min(x.size, y.size), replace)
    Wx, Wy = best_of_k_weights(x.size, ks, replace), best_of_k_weights(y.size, ks, replace)
    rx = _curves(np.sort(x[stats._resample_index(x.size, n_resamples, seed)], axis=1), Wx)
    ry = _curves(np.sort(y[stats._resample_index(y.size, n_resamples, seed + 1)], axis=1), Wy)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = rx / ry
        estimate = _curves(np.sort(x), Wx) / _curves(np.sort(y), Wy)
    tail = (1 - level) / 2
    lo, hi = np.quantile(ratios, [tail, 1 - tail], axis=0, method="inverted_cdf")
    return Curve(ks, estimate, lo, hi)


def fraction_reaching(
    values, target: float, level: float = 0.95, n_resamples: int = 4000, seed: int = 0
) -> stats.Interval:
    """The fraction of trials at or below ``target``, with its bootstrap interval."""
    x = stats._values(values, "values")
    return stats.bootstrap_ci((x <= target).astype(float), "mean", level, n_resamples, seed)


def prob_reaching(values, target: float, ks, replace: bool = False) -> np.ndarray:
    """The probability that the best of ``k`` random trials is at or below ``target``, per
    ``k``: ``1 - C(n-m, k) / C(n, k)`` without replacement (``m`` trials reach it), ``1 -
    (1 - m/n)^k`` with replacement."""
    x = stats._values(values, "values")
    n, m = x.size, int((x <= target).sum())
    ks = _ks(ks, n, replace)
    if replace:
        return 1.0 - (1.0 - m / n) ** ks
    return np.array([1.0 - math.comb(n - m, int(k)) / math.comb(n, int(k)) for k in ks])


__all__ = [
    "Curve",
    "best_of_k_weights",
    "expected_best",
    "expected_best_ci",
    "expected_best_ratio",
    "fraction_reaching",
    "prob_reaching",
]
