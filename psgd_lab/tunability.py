"""Tunability: random search from stated priors, and the expected best result after k trials.

How easy is an optimiser to tune? Draw ``N`` configurations of its hyperparameters at random
from a prior a user could state in advance (``SearchSpace``: a ``LogUniform`` learning rate over
decades, a weight decay that is 0 with some probability (``Or``), a momentum ``1 - LogUniform``,
a ``Choice`` of modes), train each once through the experiment harness (``search``: cached, one
seed per trial, trial ``i`` on seed ``i`` so that trial ``i`` of every space shares the
initialisation and the batches), and summarise the ``N`` final metrics by:

- ``expected_best(values, ks)``: the expected best (lowest) final metric among ``k`` trials drawn
  at random from the ``N``, for ``k = 1 ... N``: the curve of Dodge et al. (2019), "Show your
  work: improved reporting of experimental results" (EMNLP), which shows what a tuning budget of
  ``k`` trials buys. By default the ``k`` trials are drawn *without* replacement, which makes it
  the unbiased estimate of the population's expected best of ``k`` (the ``i``-th smallest of
  ``N`` is the best of a random ``k``-subset with probability ``C(N-i, k-1) / C(N, k)``);
  ``replace=True`` gives Dodge et al.'s empirical-CDF version, ``F̂(v)^k``;
- ``expected_best_ci``: the same with a percentile-bootstrap band over the trials (resample the
  ``N`` trials with replacement, recompute the curve): the uncertainty from having ``N`` trials;
- ``fraction_reaching`` / ``prob_reaching``: how many trials reach a target, and the probability
  that the best of ``k`` does (``1 - C(N-m, k) / C(N, k)`` with ``m`` trials at or below it).

Lower is better throughout (a loss). A diverged run's metric is ``+inf`` in the harness;
``Search.final()`` by default counts every run that ends worse than it started (diverged ones
included) as its initial metric, "no better than not training", so that means over trials stay
finite; pass ``cap=False`` for the raw values.

One seed per trial is this estimator's norm: the spread over trials mixes the hyperparameters'
effect with seed noise, as a user's own random search would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import experiment as ex
from . import runs, stats
from .cache import Cache, canonical, default_cache_dir

# ---------------------------------------------------------------------------- priors


def _round(x: float) -> float:
    return float(f"{x:.12g}")  # a drawn value and its re-computation hash alike


@dataclass(frozen=True)
class LogUniform:
    """``exp(Uniform(log lo, log hi))``: every decade of ``[lo, hi]`` equally likely."""

    lo: float
    hi: float

    def __post_init__(self):
        if not (0 < self.lo < self.hi < math.inf):
            raise ValueError(f"LogUniform needs 0 < lo < hi < inf; got [{self.lo}, {self.hi}]")

    def draw(self, rng: np.random.Generator) -> float:
        return _round(math.exp(rng.uniform(math.log(self.lo), math.log(self.hi))))

    def contains(self, x) -> bool:
        return isinstance(x, float) and self.lo * (1 - 1e-9) <= x <= self.hi * (1 + 1e-9)

    def __str__(self) -> str:
        return f"log-uniform [{self.lo:g}, {self.hi:g}]"


@dataclass(frozen=True)
class OneMinusLogUniform:
    """``1 - LogUniform(lo, hi)``: a momentum or a beta in ``[1 - hi, 1 - lo]``, log-uniform in
    its distance to 1 (0.9, 0.99 and 0.999 one decade apart)."""

    lo: float
    hi: float

    def __post_init__(self):
        if not (0 < self.lo < self.hi <= 1):
            raise ValueError(
                f"OneMinusLogUniform needs 0 < lo < hi <= 1; got [{self.lo}, {self.hi}]"
            )

    def draw(self, rng: np.random.Generator) -> float:
        return _round(1.0 - LogUniform(self.lo, self.hi).draw(rng))

    def contains(self, x) -> bool:
        return isinstance(x, float) and 1 - self.hi - 1e-12 <= x <= 1 - self.lo + 1e-12

    def __str__(self) -> str:
        return f"1 - log-uniform [{self.lo:g}, {self.hi:g}]"


@dataclass(frozen=True)
class Choice:
    """One of ``values``, with probabilities ``weights`` (default: equal)."""

    values: tuple
    weights: tuple | None = None

    def __post_init__(self):
        if not self.values:
            raise ValueError("Choice needs at least one value")
        if self.weights is not None and (
            len(self.weights) != len(self.values)
            or min(self.weights) < 0
            or not math.isclose(sum(self.weights), 1.0)
        ):
            n = len(self.values)
            raise ValueError(f"Choice weights must be {n} probabilities summing to 1")

    def draw(self, rng: np.random.Generator):
        p = None if self.weights is None else np.asarray(self.weights, dtype=float)
        return self.values[int(rng.choice(len(self.values), p=p))]

    def contains(self, x) -> bool:
        return x in self.values

    def __str__(self) -> str:
        w = "" if self.weights is None else f", weights {list(self.weights)}"
        return f"one of {list(self.values)}{w}"


@dataclass(frozen=True)
class Or:
    """``value`` with probability ``p``, otherwise a draw from ``otherwise`` (e.g. a weight decay
    that is exactly 0 a quarter of the time: ``Or(0.0, 0.25, LogUniform(1e-5, 1.0))``)."""

    value: Any
    p: float
    otherwise: Any

    def __post_init__(self):
        if not 0 <= self.p <= 1:
            raise ValueError(f"Or needs a probability p in [0, 1]; got {self.p!r}")

    def draw(self, rng: np.random.Generator):
        # two draws every time, so the stream (and the later hyperparameters) does not depend
        # on which branch was taken
        u, x = rng.uniform(), self.otherwise.draw(rng)
        return self.value if u < self.p else x

    def contains(self, x) -> bool:
        return x == self.value or self.otherwise.contains(x)

    def __str__(self) -> str:
        return f"{self.value!r} with probability {self.p:g}, else {self.otherwise}"


@dataclass(frozen=True)
class SearchSpace:
    """An optimiser and the prior of its hyperparameters for a random search.

    ``prior`` maps option names to distributions (``LogUniform``, ``OneMinusLogUniform``,
    ``Choice``, ``Or``) and must contain ``"lr"``; names ``"betas.0"``, ``"betas.1"`` are
    gathered into the list option ``betas``. ``base`` holds the fixed options (e.g. Kron's
    ``{"seed": experiment.SEED}``); everything else stays at the optimiser's defaults.
    """

    name: str
    optimizer: str | type
    prior: Mapping[str, Any]
    base: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if "lr" not in self.prior:
            raise ValueError(f"search space {self.name!r}: the prior must contain 'lr'")
        clash = set(self.base) & {k.split(".")[0] for k in self.prior}
        if clash:
            raise ValueError(f"search space {self.name!r}: {sorted(clash)} both fixed and drawn")
        ex.resolve_optimizer(self.optimizer)

    def sample(self, n: int, seed: int = 0) -> list[dict]:
        """``n`` draws of the prior; draw ``i`` comes from a generator seeded with ``(seed, i)``
        alone, so a longer search keeps the first ``n`` draws of a shorter one."""
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"n must be an integer >= 1; got {n!r}")
        out = []
        for i in range(int(n)):
            rng = np.random.default_rng([seed, i])
            out.append({k: dist.draw(rng) for k, dist in self.prior.items()})
        return out

    def options(self, draw: Mapping[str, Any]) -> dict:
        """The optimiser's keyword arguments besides ``lr`` for one draw."""
        options = dict(self.base)
        grouped: dict[str, dict[int, Any]] = {}
        for k, v in draw.items():
            if k == "lr":
                continue
            name, _, index = k.partition(".")
            if index:
                grouped.setdefault(name, {})[int(index)] = v
            else:
                options[k] = v
        for name, parts in grouped.items():
            options[name] = [parts[i] for i in sorted(parts)]
        return options

    def config(self, draw: Mapping[str, Any], name: str | None = None) -> ex.Config:
        return ex.Config(name or self.name, self.optimizer, self.options(draw))

    def describe(self) -> str:
        lines = [f"{self.name} ({getattr(self.optimizer, '__name__', self.optimizer)}):"]
        lines += [f"  {k:34} {dist}" for k, dist in self.prior.items()]
        if self.base:
            lines.append(f"  fixed: {dict(self.base)}; everything else at the defaults")
        return "\n".join(lines)


# The lab's documented priors (notebooks/11_tunability.ipynb). Every optimiser gets the same
# learning-rate prior, five decades around the defaults (kron-torch 3e-4, AdamW 1e-3), the same
# weight-decay prior (0 a quarter of the time, else log-uniform over five decades; both
# optimisers decouple it, ``p -= lr * wd * p``) and the same momentum prior (``b1``, AdamW's
# first beta, SGD's momentum: 0.5 to 0.999, log-uniform in ``1 - b1``).
LR = LogUniform(1e-5, 1.0)
WEIGHT_DECAY = Or(0.0, 0.25, LogUniform(1e-5, 1.0))
MOMENTUM = OneMinusLogUniform(1e-3, 0.5)
KRON = SearchSpace(
    "Kron",
    "Kron",
    {
        "lr": LR,
        "b1": MOMENTUM,
        "weight_decay": WEIGHT_DECAY,
        # kron-torch's schedule (None: 1 for 500 steps, then decaying to 0.03) half of the time,
        # else a constant probability over two decades
        "preconditioner_update_probability": Or(None, 0.5, LogUniform(0.01, 1.0)),
        # dense factors, or diagonal ones for the largest dim, the largest if alone, or all
        "memory_save_mode": Choice((None, "one_diag", "smart_one_diag", "all_diag")),
        "precond_lr": LogUniform(0.01, 1.0),  # default 0.1
    },
    {"seed": ex.SEED},
)
KRON_LR = SearchSpace("Kron (lr only)", "Kron", {"lr": LR}, {"seed": ex.SEED})
ADAMW = SearchSpace(
    "AdamW",
    "AdamW",
    {
        "lr": LR,
        "betas.0": MOMENTUM,
        "betas.1": OneMinusLogUniform(1e-4, 0.1),  # 0.9 to 0.9999, default 0.999
        "weight_decay": WEIGHT_DECAY,
    },
)
ADAMW_LR = SearchSpace("AdamW (lr only)", "AdamW", {"lr": LR})
SGD = SearchSpace(
    "SGD",
    "SGD",
    {"lr": LogUniform(1e-4, 10.0), "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
)


# ---------------------------------------------------------------------------- the search


@dataclass
class Search:
    """What ``search`` ran: trial ``i`` is ``draws[i]`` on seed ``seeds[i]``, its record
    ``records[i]`` (``run_one``'s: rows and diverged step)."""

    task: ex.Task
    space: SearchSpace
    draws: list[dict]
    seeds: list[int]
    records: list[dict]
    budget: tuple

    def final(self, cap: bool = True) -> np.ndarray:
        """Final metric per trial. ``cap``: a run that ends worse than its initial metric (a
        diverged run included) counts as that initial metric; otherwise diverged is ``+inf``."""
        out = []
        for r in self.records:
            value = ex._final(r)
            if cap:
                first = r["rows"][0]["metric"]
                value = min(value, math.inf if first is None else first)
            out.append(value)
        return np.array(out)

    def initial(self) -> np.ndarray:
        """The metric before training, per trial."""
        return np.array([math.inf if r["rows"][0]["metric"] is None else r["rows"][0]["metric"]
                         for r in self.records])  # fmt: skip

    def diverged(self) -> np.ndarray:
        return np.array([r["diverged_step"] is not None for r in self.records])

    def seconds(self) -> np.ndarray:
        """Training time per trial (the machine that ran it; cached runs keep theirs)."""
        return np.array([r["rows"][-1]["seconds"] for r in self.records])

    def to_frame(self):
        """One row per trial: trial, seed, the drawn hyperparameters, final (capped), raw final,
        diverged, seconds."""
        import pandas as pd

        capped, raw = self.final(), self.final(cap=False)
        rows = []
        for i, draw in enumerate(self.draws):
            rows.append({"space": self.space.name, "trial": i, "seed": self.seeds[i], **draw,
                         "final": capped[i], "raw_final": raw[i],
                         "diverged": bool(self.diverged()[i]),
                         "seconds": self.records[i]["rows"][-1]["seconds"]})  # fmt: skip
        return pd.DataFrame(rows)

    def best(self) -> tuple[int, dict, float]:
        """``(trial, draw, final)`` of the lowest final metric."""
        values = self.final()
        i = int(np.argmin(values))
        return i, self.draws[i], float(values[i])

    def rerun(self, trial: int | None = None) -> dict:
        """Train one stored trial again, live (the cache neither read nor written), and compare
        as ``Study.rerun`` does: ``{"trial", "stored", "live", "relative"}``. ``trial`` defaults
        to the best one."""
        i = self.best()[0] if trial is None else int(trial)
        config = self.space.config(self.draws[i])
        record = runs.run_one(self.task, config, self.draws[i]["lr"], self.seeds[i], *self.budget)
        stored, live = ex._final(self.records[i]), ex._final(record)
        if math.isinf(stored) or math.isinf(live):
            relative = 0.0 if live == stored else math.inf
        else:
            relative = abs(live - stored) / abs(stored) if stored != 0 else abs(live)
        return {"trial": i, "stored": stored, "live": live, "relative": relative}


def search(
    task: ex.Task,
    space: SearchSpace,
    n: int,
    *,
    steps: int,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    log_every: int | None = None,
    diverge_factor: float | None = 100.0,
    cache_dir=None,
    workers: int = 1,
    start_method: str = "spawn",
    progress: bool = True,
) -> Search:
    """Random search: ``n`` draws of ``space``'s prior (``space.sample(n, seed)``), trial ``i``
    trained once on seed ``seeds[i]`` (default ``i``) for ``steps`` steps, through the
    experiment harness's runner and cache (the arguments mean what they mean for
    ``experiment.study``; a trial is cached as the run of its configuration at its lr and seed).
    """
    if not isinstance(task, ex.Task):
        raise ValueError(f"task must be an experiment.Task; got {task!r}")
    draws = space.sample(n, seed)
    seeds = list(range(len(draws))) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(draws):
        raise ValueError(f"seeds must give one seed per trial ({len(draws)}); got {len(seeds)}")
    steps = ex._check_int("steps", steps, 1)
    log_every = steps if log_every is None else ex._check_int("log_every", log_every, 1)
    if cache_dir is True or cache_dir is None:
        cache_dir = default_cache_dir()
    cache = Cache(cache_dir) if cache_dir is not False else None
    budget = (steps, log_every, diverge_factor)
    configs = [space.config(d, f"{space.name} #{i}") for i, d in enumerate(draws)]
    for c in configs:
        canonical(dict(c.options), f"search space {space.name!r} options")
    runner = runs.Runner(task, budget, cache, workers, start_method, progress)
    try:
        out = runner.run([(c, d["lr"], s) for c, d, s in zip(configs, draws, seeds)])
    finally:
        runner.close()
    records = [out[c.name, d["lr"], s] for c, d, s in zip(configs, draws, seeds)]
    return Search(task, space, draws, seeds, records, budget)


# ---------------------------------------------------------------------------- the estimators


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
    "ADAMW",
    "ADAMW_LR",
    "KRON",
    "KRON_LR",
    "LR",
    "MOMENTUM",
    "SGD",
    "WEIGHT_DECAY",
    "Choice",
    "Curve",
    "LogUniform",
    "OneMinusLogUniform",
    "Or",
    "Search",
    "SearchSpace",
    "best_of_k_weights",
    "expected_best",
    "expected_best_ci",
    "expected_best_ratio",
    "fraction_reaching",
    "prob_reaching",
    "search",
]
