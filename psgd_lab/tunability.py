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

from . import best_of_k, runs
from . import experiment as ex
from .best_of_k import *  # noqa: F403 (the estimators, re-exported: best_of_k.__all__)
from .cache import Cache, canonical, default_cache_dir
from .priors import Choice, LogUniform, OneMinusLogUniform, Or


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


__all__ = [  # this module's names, then the estimators it re-exports from best_of_k
    "ADAMW",
    "ADAMW_LR",
    "KRON",
    "KRON_LR",
    "LR",
    "MOMENTUM",
    "SGD",
    "WEIGHT_DECAY",
    "Choice",
    "LogUniform",
    "OneMinusLogUniform",
    "Or",
    "Search",
    "SearchSpace",
    "search",
    *best_of_k.__all__,
]
