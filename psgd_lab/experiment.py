"""Seeded optimiser studies: self-extending learning-rate grids, paired seeds, cached tidy results.

Declare a ``Task`` (what to train), configurations (``Config``: an optimiser and its options), a
learning-rate grid, seeds and a step budget; ``study(...)`` trains every (configuration, lr, seed)
and returns a ``Study``: tidy rows for pandas/seaborn (``rows``, ``to_frame()``), the best learning
rate per configuration and whether it is interior, and seed statistics (``summary()``,
``compare()``; the functions themselves are in ``psgd_lab.stats``).

The contracts that make comparisons fair and results reusable:

- **Paired seeds.** ``task.make(seed)`` builds the model and the batches from the seed alone, and
  ``Trial.batch(step)`` depends on the seed and the step only, so seed ``s`` gives every
  configuration the same initialisation and the same batch order. The global torch RNG is also
  seeded with ``s`` for the run (and restored afterwards); an optimiser's own generator (Kron's
  ``seed``) is an option of its configuration: pass ``SEED`` to tie it to the run's seed.
- **Lower is better.** ``Trial.metric`` returns a loss or an error rate. A run whose training loss
  is not finite, or exceeds ``diverge_factor`` times its first loss, stops there: it is recorded
  as diverged at that step and its final metric counts as ``+inf``, the worst value.
- **The grid extends itself.** While a configuration's best learning rate (lowest median final
  metric over the seeds) sits at an end of its grid, one more point is added beyond that end, at
  the grid's ratio, up to ``max_extensions`` times; ``Study.best`` says whether the optimum ended
  up interior, and ``summary()`` reports it for every configuration.
- **Cache.** Every run is stored as one JSON file under ``cache_dir`` (default
  ``$PSGD_LAB_CACHE`` or ``.psgd_lab_cache``), keyed by a hash of the task's name and parameters,
  the optimiser and its options, lr, seed, the budget and ``psgd_lab.__version__``: re-running
  reuses results, a new library version recomputes them. Rename a task (or add a ``version``
  parameter) when you change its factory's code: the cache cannot see code.
- **One thread per run**, in-process (``workers=1``, what notebooks and tests use) or in worker
  processes, so a result does not depend on how it was scheduled.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import runs, stats
from .cache import Cache, canonical, default_cache_dir
from .runs import batch_generator, resolve_optimizer, run_key, run_one

SEED = "<run seed>"  # an option value replaced by the run's seed, e.g. Kron's {"seed": SEED}


@dataclass
class Trial:
    """One seed's instance of a task, what ``Task.make(seed)`` returns.

    ``model``: initialised from the seed. ``batch(step)``: that step's batch, a function of the
    seed and the step only (see ``batch_generator``). ``loss(model, batch)``: the training loss, a
    scalar tensor. ``metric(model)``: the number the study compares, lower is better, evaluated
    with the model in ``eval()`` mode and without gradients.
    """

    model: torch.nn.Module
    batch: Callable[[int], Any]
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]
    metric: Callable[[torch.nn.Module], float]


@dataclass(frozen=True)
class Task:
    """A named problem: ``factory(seed, **params)`` returns a ``Trial``.

    ``name`` and ``params`` identify the task in the cache. The factory must be a module-level
    function when ``workers > 1`` (worker processes import it by name).
    """

    name: str
    factory: Callable[..., Trial]
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not (isinstance(self.name, str) and self.name.strip()):
            raise ValueError(f"Task name must be a non-empty string; got {self.name!r}")
        if not callable(self.factory):
            raise ValueError(f"Task factory must be callable; got {self.factory!r}")
        canonical(dict(self.params), "Task params")

    def make(self, seed: int) -> Trial:
        trial = self.factory(seed, **self.params)
        if not isinstance(trial, Trial):
            raise TypeError(f"task {self.name!r}: the factory must return a Trial; got {trial!r}")
        return trial


@dataclass(frozen=True)
class Config:
    """An optimiser configuration. ``optimizer``: ``"Kron"``, a ``torch.optim`` class name
    (``"AdamW"``, ``"SGD"``, ...), a dotted path ``"package.module.Class"``, or the class itself;
    ``options``: its keyword arguments besides ``lr`` (a value ``SEED`` becomes the run's seed);
    ``lrs``: this configuration's starting grid, if not the study's."""

    name: str
    optimizer: str | type
    options: Mapping[str, Any] = field(default_factory=dict)
    lrs: Sequence[float] | None = None

    def __post_init__(self):
        if not (isinstance(self.name, str) and self.name.strip()):
            raise ValueError(f"Config name must be a non-empty string; got {self.name!r}")
        if "lr" in self.options:
            raise ValueError(f"config {self.name!r}: options must not set lr (the grid sets it)")
        resolve_optimizer(self.optimizer)
        canonical(dict(self.options), f"config {self.name!r} options")

    def build(self, model, lr: float, seed: int) -> torch.optim.Optimizer:
        """The optimiser for ``model`` (a module, or an iterable of parameters). A class with a
        ``from_model(model, lr=..., **options)`` classmethod builds its own parameter groups
        from the module (e.g. ``psgd_lab.rivals.MuonWithAdamW``: Muon on hidden weights, AdamW
        on the rest); any other gets ``model.parameters()``."""
        options = {
            k: seed if isinstance(v, str) and v == SEED else v for k, v in self.options.items()
        }
        cls = resolve_optimizer(self.optimizer)
        if isinstance(model, torch.nn.Module):
            if hasattr(cls, "from_model"):
                return cls.from_model(model, lr=lr, **options)
            model = model.parameters()
        return cls(model, lr=lr, **options)

    def key(self) -> dict:
        cls = resolve_optimizer(self.optimizer)
        return {
            "optimizer": canonical(cls, "optimizer"),
            "options": canonical(dict(self.options), "options"),
        }


# ---------------------------------------------------------------------------- the study


def _round(lr: float) -> float:
    return float(f"{lr:.12g}")  # 1e-3 * 10 ** 0.5 and its re-computation hash alike


def _grid(lrs, where: str, extend: bool) -> tuple[list[float], float]:
    """``(sorted grid, ratio)``; the grid must be log-spaced so that extending it is defined."""
    try:
        grid = sorted(_round(float(x)) for x in lrs)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a sequence of learning rates; got {lrs!r}") from None
    if not grid or not all(math.isfinite(x) and x > 0 for x in grid) or len(set(grid)) < len(grid):
        raise ValueError(f"{where} must be distinct positive finite learning rates; got {lrs!r}")
    if len(grid) == 1:
        if extend:
            raise ValueError(f"{where} needs 2 or more points to extend (or max_extensions=0)")
        return grid, math.nan
    ratios = [b / a for a, b in zip(grid, grid[1:])]
    if max(ratios) > min(ratios) * (1 + 1e-6):
        raise ValueError(
            f"{where} must be log-spaced (a constant ratio, which extending repeats); got ratios "
            f"{[float(f'{r:.4g}') for r in ratios]}: use e.g. numpy.geomspace(1e-3, 1e-1, 5)"
        )
    return grid, (grid[-1] / grid[0]) ** (1 / (len(grid) - 1))


def _final(record: dict) -> float:
    """A run's final metric; ``+inf`` (the worst) if it diverged."""
    metric = record["rows"][-1]["metric"]
    return math.inf if record["diverged_step"] is not None or metric is None else metric


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}; got {value!r}")
    return int(value)


def study(
    task: Task,
    configs: Sequence[Config],
    *,
    seeds: Sequence[int],
    steps: int,
    lrs: Sequence[float] | None = None,
    max_extensions: int = 4,
    log_every: int | None = None,
    diverge_factor: float | None = 100.0,
    cache_dir: str | os.PathLike | None | bool = None,
    workers: int = 1,
    start_method: str = "spawn",
    progress: bool = True,
) -> Study:
    """Train every configuration at every learning rate of its grid from every seed.

    ``lrs`` is the log-spaced starting grid (a ``Config``'s own ``lrs`` replaces it); a
    configuration's grid grows by one point beyond the end holding its best learning rate until
    that best is interior or ``max_extensions`` points were added. ``log_every`` (default:
    ``steps``) spaces the rows. ``diverge_factor``: a training loss above this times the first
    one is a divergence (None: only non-finite losses are). ``cache_dir``: where runs are stored
    (None: ``$PSGD_LAB_CACHE`` or ``.psgd_lab_cache``; False: no cache). ``workers > 1`` runs in
    that many processes (``start_method`` ``"spawn"``, whose workers import the task's factory
    by name, so a script needs the ``if __name__ == "__main__":`` guard; or ``"fork"`` on Linux
    for a factory defined in a notebook); ``progress`` shows a tqdm bar on stderr.
    """
    if not isinstance(task, Task):
        raise ValueError(f"task must be a Task; got {task!r}")
    configs = list(configs)
    if not configs or not all(isinstance(c, Config) for c in configs):
        raise ValueError(f"configs must be a non-empty sequence of Config; got {configs!r}")
    names = [c.name for c in configs]
    if len(set(names)) < len(names):
        raise ValueError(f"configs must have distinct names; got {names}")
    seeds = [_check_int("seeds", s, 0) for s in seeds]
    if not seeds or len(set(seeds)) < len(seeds):
        raise ValueError(f"seeds must be distinct integers >= 0, at least one; got {seeds!r}")
    steps = _check_int("steps", steps, 1)
    max_extensions = _check_int("max_extensions", max_extensions, 0)
    log_every = steps if log_every is None else _check_int("log_every", log_every, 1)
    if diverge_factor is not None and not (math.isfinite(diverge_factor) and diverge_factor > 1):
        raise ValueError(
            f"diverge_factor must be None or a finite number > 1; got {diverge_factor!r}"
        )
    workers = _check_int("workers", workers, 1)
    if start_method not in multiprocessing.get_all_start_methods():
        methods = multiprocessing.get_all_start_methods()
        raise ValueError(f"start_method must be one of {methods}; got {start_method!r}")
    grids, ratios = {}, {}
    for c in configs:
        if c.lrs is None and lrs is None:
            raise ValueError(f"lrs must be given: config {c.name!r} has no grid of its own")
        where = f"config {c.name!r} lrs" if c.lrs is not None else "lrs"
        grids[c.name], ratios[c.name] = _grid(
            c.lrs if c.lrs is not None else lrs, where, max_extensions > 0
        )
    if cache_dir is True or cache_dir is None:
        cache_dir = default_cache_dir()
    cache = Cache(cache_dir) if cache_dir is not False else None
    budget = (steps, log_every, diverge_factor)
    result = Study(task, configs, seeds, steps, grids, {c.name: 0 for c in configs}, {}, budget)
    runner = runs.Runner(task, budget, cache, workers, start_method, progress)
    try:
        pending = {c.name: list(grids[c.name]) for c in configs}
        while any(pending.values()):
            result.runs.update(
                runner.run([(c, lr, s) for c in configs for lr in pending[c.name] for s in seeds])
            )
            for c in configs:
                grid, i = grids[c.name], result._best_index(c.name)
                pending[c.name] = []
                if 0 < i < len(grid) - 1 or result.extensions[c.name] >= max_extensions:
                    continue
                new = _round(grid[0] / ratios[c.name] if i == 0 else grid[-1] * ratios[c.name])
                grid.insert(0 if i == 0 else len(grid), new)
                pending[c.name] = [new]
                result.extensions[c.name] += 1
    finally:
        runner.close()
    return result


@dataclass
class Study:
    """What ``study`` ran: ``grids`` (each configuration's final grid), ``extensions`` (points it
    added), ``runs`` (``(config name, lr, seed) -> run_one's record``) and ``budget``
    (``(steps, log_every, diverge_factor)``)."""

    task: Task
    configs: list[Config]
    seeds: list[int]
    steps: int
    grids: dict[str, list[float]]
    extensions: dict[str, int]
    runs: dict[tuple[str, float, int], dict]
    budget: tuple = ()

    def rerun(self, config: str, seed: int | None = None, lr: float | None = None) -> dict:
        """Train one stored run again, live (the cache is neither read nor written), and compare.

        ``seed`` defaults to the first seed, ``lr`` to the configuration's best. Returns
        ``{"config", "lr", "seed", "stored", "live", "relative"}``: the final metric of the
        stored run and of the live one, and ``|live - stored| / |stored|``. A notebook that reads
        committed results re-runs one seed this way and bounds ``relative``, so nbval notices when
        the library (or the machine) no longer reproduces them; float32 training drifts a little
        between CPUs, so the bound is a tolerance, not zero.
        """
        grid = self._grid(config)
        lr = grid[self._best_index(config)] if lr is None else lr
        if not any(math.isclose(x, lr, rel_tol=1e-9) for x in grid):
            raise ValueError(f"lr must be on config {config!r}'s grid {grid}; got {lr!r}")
        lr = next(x for x in grid if math.isclose(x, lr, rel_tol=1e-9))
        seed = self.seeds[0] if seed is None else seed
        if seed not in self.seeds:
            raise ValueError(f"seed must be one of {self.seeds}; got {seed!r}")
        c = next(c for c in self.configs if c.name == config)
        live = _final(run_one(self.task, c, lr, seed, *self.budget))
        stored = _final(self.runs[config, lr, seed])
        relative = abs(live - stored) / abs(stored) if stored not in (0.0,) else abs(live)
        if math.isinf(stored) or math.isinf(live):
            relative = 0.0 if live == stored else math.inf
        return {"config": config, "lr": lr, "seed": seed, "stored": stored, "live": live,
                "relative": relative}  # fmt: skip

    def _grid(self, config: str) -> list[float]:
        if config not in self.grids:
            raise ValueError(f"config must be one of {list(self.grids)}; got {config!r}")
        return self.grids[config]

    def final(self, config: str, lr: float | None = None) -> np.ndarray:
        """The final metric per seed (in ``seeds`` order) at ``lr`` (default: the best one),
        ``+inf`` where the run diverged."""
        grid = self._grid(config)
        if lr is None:
            lr = grid[self._best_index(config)]
        match = [x for x in grid if math.isclose(x, lr, rel_tol=1e-9)]
        if not match:
            raise ValueError(f"lr must be on config {config!r}'s grid {grid}; got {lr!r}")
        return np.array([_final(self.runs[config, match[0], s]) for s in self.seeds])

    def _best_index(self, config: str) -> int:
        # the lowest median over seeds; all diverged (all +inf) picks the smallest lr
        medians = [np.median(self.final(config, lr)) for lr in self._grid(config)]
        return int(np.argmin(medians))

    def best(self, config: str) -> tuple[float, bool]:
        """``(lr, interior)``: the learning rate with the lowest median final metric, and whether
        it has a grid point on both sides (False: the true optimum may lie beyond the grid)."""
        grid, i = self._grid(config), self._best_index(config)
        return grid[i], 0 < i < len(grid) - 1

    @property
    def rows(self) -> list[dict]:
        """One dict per run per logged step: config, lr, seed, step, metric, train_loss, seconds,
        diverged, diverged_step (NaN for a value that was not finite)."""
        out = []
        for c in self.configs:
            for lr in self.grids[c.name]:
                for seed in self.seeds:
                    record = self.runs[c.name, lr, seed]
                    d = record["diverged_step"]
                    for r in record["rows"]:
                        nan = {k: math.nan for k in ("metric", "train_loss") if r[k] is None}
                        out.append({"config": c.name, "lr": lr, "seed": seed, **r, **nan,
                                    "diverged": d is not None, "diverged_step": d})  # fmt: skip
        return out

    def to_frame(self):
        """``rows`` as a pandas DataFrame (pandas is imported here, not by the module)."""
        import pandas as pd

        frame = pd.DataFrame(self.rows)
        frame["diverged_step"] = frame["diverged_step"].astype("Int64")
        return frame

    def summary(self, level: float = 0.95, n_resamples: int = 4000, seed: int = 0) -> list[dict]:
        """Per configuration at its best lr: the median final metric over the seeds with its
        bootstrap interval, how many seeds diverged, and whether the best lr is interior.

        The lr was chosen on these seeds, so the interval leans optimistic; to quote a number,
        re-run the chosen lrs (``max_extensions=0``) on fresh seeds."""
        if len(self.seeds) < 5:
            warnings.warn(
                f"intervals over {len(self.seeds)} seeds (fewer than 5) are rough", stacklevel=2
            )
        out = []
        for c in self.configs:
            lr, interior = self.best(c.name)
            values = self.final(c.name, lr)
            if len(values) > 1:
                ci = stats.bootstrap_ci(values, "median", level, n_resamples, seed)
            else:
                ci = stats.Interval(float(values[0]), math.nan, math.nan)
            grid = self.grids[c.name]
            out.append({"config": c.name, "best_lr": lr, "interior": interior,
                        "extensions": self.extensions[c.name], "lr_min": grid[0],
                        "lr_max": grid[-1], "seeds": len(values),
                        "diverged": int(np.isinf(values).sum()),
                        "median": ci.estimate, "lo": ci.lo, "hi": ci.hi})  # fmt: skip
        return out

    def compare(
        self, a: str, b: str, level: float = 0.95, n_resamples: int = 4000, seed: int = 0
    ) -> stats.Paired:
        """Configuration ``a`` against ``b``, each at its best lr, paired seed by seed
        (``stats.paired``: negative differences and a win rate above 1/2 favour ``a``)."""
        return stats.paired(self.final(a), self.final(b), level, n_resamples, seed)


__all__ = [
    "SEED",
    "Config",
    "Study",
    "Task",
    "Trial",
    "batch_generator",
    "resolve_optimizer",
    "run_key",
    "run_one",
    "study",
]
