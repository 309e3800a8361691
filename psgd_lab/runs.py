"""Running the experiment harness's runs: one seeded run, its cache key, and many at once.

``run_one`` trains one (task, configuration, lr, seed) on one thread with the global torch RNG
seeded by the run's seed and records divergence; ``run_key`` names everything its result depends
on for the cache; ``Runner`` takes each result from the cache or computes it, in-process
(``workers=1``) or in a process pool kept for a whole study, behind a tqdm bar.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
import time

import numpy as np
import torch

from .cache import FORMAT, canonical


def resolve_optimizer(spec: str | type) -> type:
    """The optimiser class ``spec`` names (see ``Config``)."""
    if isinstance(spec, type):
        return spec
    if isinstance(spec, str):
        if spec == "Kron":
            from .optim import Kron

            return Kron
        if hasattr(torch.optim, spec):
            return getattr(torch.optim, spec)
        module, _, name = spec.rpartition(".")
        if module:
            try:
                return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                pass
    raise ValueError(
        "optimizer must be 'Kron', a torch.optim class name ('AdamW', 'SGD', ...), a dotted "
        f"path 'package.module.Class' or an optimiser class; got {spec!r}"
    )


def batch_generator(seed: int, step: int) -> torch.Generator:
    """A torch generator seeded from ``(seed, step)`` alone: draw step ``step``'s batch from it,
    and the batch order is the same whatever the optimiser did before."""
    state = np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def minibatches(X: torch.Tensor, y: torch.Tensor, batch: int, seed: int):
    """``step -> (X[idx], y[idx])``: ``batch`` rows drawn uniformly from ``(seed, step)`` alone
    (``batch_generator``), the sampler every classification task of the harness shares."""

    def sample(step: int):
        idx = torch.randint(0, len(y), (batch,), generator=batch_generator(seed, step))
        return X[idx], y[idx]

    return sample


def cross_entropy_loss(model, b) -> torch.Tensor:
    """The training loss of a ``(inputs, labels)`` minibatch: cross-entropy of the logits."""
    return torch.nn.functional.cross_entropy(model(b[0]), b[1])


def run_one(
    task,
    config,
    lr: float,
    seed: int,
    steps: int,
    log_every: int,
    diverge_factor: float | None,
) -> dict:
    """Train ``task.make(seed)`` with ``config`` at ``lr`` for ``steps`` steps on one thread.

    Returns ``{"rows": [...], "diverged_step": int or None}``, a row at step 0, every
    ``log_every`` steps and at the end (or at the step the run diverged, where it stops):
    ``{"step", "metric", "train_loss", "seconds"}``; ``train_loss`` is the mean minibatch loss
    since the previous row, ``seconds`` the training time so far (metric evaluations excluded),
    and a value that is not finite is None.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _train(task.make(seed), config, lr, seed, steps, log_every, diverge_factor)
    finally:
        torch.set_num_threads(threads)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _train(trial, config, lr, seed, steps, log_every, diverge_factor) -> dict:
    model = trial.model
    opt = config.build(model, lr, seed)
    newton = getattr(opt, "mode", None) == "newton"  # Kron differentiates a closure itself
    rows: list[dict] = []
    losses: list[float] = []  # since the last row
    logged: list[float] = []  # the last row's
    elapsed, first, diverged = 0.0, None, None

    def record(step: int) -> float:
        if rows and rows[-1]["step"] == step:  # a divergence seen at a logged step: merge rows
            rows.pop()
            losses[:0] = logged
        model.eval()
        with torch.no_grad():
            metric = float(trial.metric(model))
        model.train()
        mean = sum(losses) / len(losses) if losses else math.nan
        rows.append({"step": step, "metric": _finite(metric), "train_loss": _finite(mean),
                     "seconds": round(elapsed, 4)})  # fmt: skip
        logged[:] = losses
        losses.clear()
        return metric

    record(0)
    for t in range(steps):  # the loss at step t is the model's after t updates
        start = time.perf_counter()
        batch = trial.batch(t)
        opt.zero_grad(set_to_none=True)
        if newton:
            loss = opt.step(lambda batch=batch: trial.loss(model, batch))
        else:
            loss = trial.loss(model, batch)
        value = float(loss.detach())
        first = value if first is None else first
        blown = not math.isfinite(value) or (
            diverge_factor is not None and first > 0 and value > diverge_factor * first
        )
        if not (newton or blown):
            loss.backward()
            opt.step()
        elapsed += time.perf_counter() - start
        losses.append(value)
        if blown:
            diverged = t
            record(t)
            break
        if (t + 1) % log_every == 0 or t + 1 == steps:
            if not math.isfinite(record(t + 1)) and t + 1 == steps:
                diverged = steps  # a finite loss but a metric that is not: worst, too
    return {"rows": rows, "diverged_step": diverged}


def run_key(task, config, lr, seed, steps, log_every, diverge_factor) -> dict:
    """What identifies a run's result: task, optimiser and options, lr, seed, budget, version."""
    import psgd_lab

    return {
        "format": FORMAT,
        "task": task.name,
        "params": canonical(dict(task.params), "Task params"),
        **config.key(),
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "log_every": log_every,
        "diverge_factor": diverge_factor,
        "psgd_lab": psgd_lab.__version__,
    }


def _worker_init() -> None:
    torch.set_num_threads(1)


class Runner:
    """Runs jobs from the cache, in-process or in a pool kept for the whole study."""

    def __init__(self, task, budget, cache, workers, start_method, progress):
        if progress:  # tqdm.auto warns on stderr in a kernel without ipywidgets: only when shown
            from tqdm.auto import tqdm
        else:
            from tqdm import tqdm

        self.task, self.budget, self.cache = task, budget, cache
        self.workers, self.start_method, self.pool, self.cached = workers, start_method, None, 0
        self.bar = tqdm(total=0, desc=task.name, unit="run", disable=not progress)

    def run(self, jobs: list[tuple]) -> dict:
        """``{(config name, lr, seed): record}`` for ``jobs``, a list of (config, lr, seed)."""
        self.bar.total += len(jobs)
        self.bar.refresh()
        out, todo = {}, []
        for config, lr, seed in jobs:
            key = run_key(self.task, config, lr, seed, *self.budget)
            record = self.cache.load(key) if self.cache else None
            if record is None:
                todo.append((key, config, lr, seed))
                continue
            out[config.name, lr, seed] = record
            self.cached += 1
            self._tick()
        if self.workers == 1:
            for key, config, lr, seed in todo:
                record = run_one(self.task, config, lr, seed, *self.budget)
                out[config.name, lr, seed] = self._store(key, record)
            return out
        from concurrent.futures import ProcessPoolExecutor, as_completed

        if self.pool is None and todo:
            ctx = multiprocessing.get_context(self.start_method)
            self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_worker_init)
        futures = {
            self.pool.submit(run_one, self.task, *job[1:], *self.budget): job for job in todo
        }
        for future in as_completed(futures):
            key, config, lr, seed = futures[future]
            out[config.name, lr, seed] = self._store(key, future.result())
        return out

    def _store(self, key: dict, record: dict) -> dict:
        if self.cache:
            self.cache.save(key, record)
        self._tick()
        return record

    def _tick(self) -> None:
        self.bar.set_postfix(cached=self.cached, refresh=False)
        self.bar.update()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        self.bar.close()
