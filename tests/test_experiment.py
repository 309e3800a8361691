"""psgd_lab.experiment and psgd_lab.stats: the learning-rate search finds a known optimum and says
when it could not, bootstrap intervals cover at their nominal rate, seeds pair configurations,
the cache is reused until the library version changes, divergence is recorded with its step,
and worker processes reproduce in-process results."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import psgd_lab
from psgd_lab import cache, problems, runs, stats
from psgd_lab import experiment as ex

# ---------------------------------------------------------------------------- toy tasks


class _Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.ones(()))


def scalar_task(seed: int, target: float = 0.0) -> ex.Trial:
    """One parameter starting at 1; loss p², metric (p - target)²."""
    return ex.Trial(
        _Scalar(), lambda step: None, lambda m, b: m.p**2, lambda m: float((m.p - target) ** 2)
    )


class LrProbe(torch.optim.Optimizer):
    """Sets every parameter to log10(lr): on ``scalar_task`` one step makes the final metric
    ``(log10(lr) - target)²``, a known function of lr with its optimum at ``10**target``."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.fill_(math.log10(group["lr"]))


class NanAt(torch.optim.Optimizer):
    """Leaves parameters alone, then sets them to NaN at update number ``at``."""

    def __init__(self, params, lr, at: int = 3):
        super().__init__(params, {"lr": lr})
        self.at, self.count = at, 0

    @torch.no_grad()
    def step(self, closure=None):
        self.count += 1
        for group in self.param_groups:
            for p in group["params"]:
                p.fill_(math.nan if self.count == self.at else 1.0)


class Double(torch.optim.Optimizer):
    """Doubles every parameter each step: on ``scalar_task`` the loss after t steps is 4**t."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.mul_(2.0)


FIRST: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []


def recorded_regression(seed: int) -> ex.Trial:
    """``problems.linear_regression`` that records (seed, initial weight, first batch)."""
    trial = problems.linear_regression(seed)
    weight = trial.model.weight.detach().clone()

    def batch(step):
        b = trial.batch(step)
        if step == 0:
            FIRST.append((seed, weight, b[0].clone(), b[1].clone()))
        return b

    return ex.Trial(trial.model, batch, trial.loss, trial.metric)


def _quiet(**kw):
    return {"cache_dir": False, "progress": False, **kw}


# ---------------------------------------------------------------------------- the lr search


@pytest.mark.parametrize("target, best, added", [(-2.2, 1e-2, 3), (-7.8, 1e-8, 3)])
def test_grid_extends_from_an_edge_to_an_interior_known_optimum(target, best, added):
    task = ex.Task("probe", scalar_task, {"target": target})
    result = ex.study(task, [ex.Config("probe", LrProbe)], seeds=[0], steps=1,
                      lrs=[1e-6, 1e-5, 1e-4], **_quiet())  # fmt: skip
    lr, interior = result.best("probe")
    assert lr == pytest.approx(best) and interior
    assert result.extensions["probe"] == added  # no extension once the optimum is interior
    grid = result.grids["probe"]
    assert len(grid) == 3 + added and np.allclose(np.diff(np.log10(grid)), 1.0)
    assert result.final("probe")[0] == pytest.approx(0.2**2, rel=1e-5)  # float32


def test_too_few_extensions_are_reported_as_not_interior():
    task = ex.Task("probe", scalar_task, {"target": -2.2})
    result = ex.study(task, [ex.Config("probe", LrProbe)], seeds=range(5), steps=1,
                      lrs=[1e-6, 1e-5, 1e-4], max_extensions=2, **_quiet())  # fmt: skip
    assert result.best("probe") == (pytest.approx(1e-2), False)
    (row,) = result.summary()
    assert row["interior"] is False and row["extensions"] == 2
    assert row["lr_max"] == pytest.approx(1e-2)


def test_a_diverging_lr_counts_as_worst_in_the_search():
    # NaN at the first update: every lr of this config diverges except under a finite one
    task = ex.Task("scalar", scalar_task, {"target": 1.0})  # the initial value is the optimum
    configs = [ex.Config("nan", NanAt, {"at": 1}), ex.Config("still", NanAt, {"at": 99})]
    result = ex.study(task, configs, seeds=[0, 1], steps=2, lrs=[1e-2, 1e-1], **_quiet())
    assert np.isinf(result.final("nan")).all() and (result.final("still") == 0).all()
    assert result.extensions["nan"] == 4  # all diverged: it searched down to the limit
    assert result.compare("still", "nan").win_rate == 1.0


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


# ---------------------------------------------------------------------------- seeds, cache, runs


def test_paired_seeds_give_every_configuration_the_same_start_and_batches():
    FIRST.clear()
    task = ex.Task("recorded", recorded_regression)
    configs = [ex.Config("sgd", "SGD", {"momentum": 0.9}), ex.Config("adam", "Adam")]
    result = ex.study(task, configs, seeds=[0, 1], steps=3, lrs=[1e-2], max_extensions=0,
                      **_quiet())  # fmt: skip
    by_seed = {s: [r[1:] for r in FIRST if r[0] == s] for s in (0, 1)}
    assert [len(v) for v in by_seed.values()] == [2, 2]  # one run per configuration
    for (w0, x0, y0), (w1, x1, y1) in by_seed.values():
        assert torch.equal(w0, w1) and torch.equal(x0, x1) and torch.equal(y0, y1)
    (w0, x0, _), (w1, x1, _) = by_seed[0][0], by_seed[1][0]
    assert not torch.equal(w0, w1) and not torch.equal(x0, x1)  # seeds differ
    start = {(r["config"], r["seed"]): r["metric"] for r in result.rows if r["step"] == 0}
    assert start["sgd", 0] == start["adam", 0] != start["sgd", 1] == start["adam", 1]
    final = {(r["config"], r["seed"]): r["metric"] for r in result.rows if r["step"] == 3}
    assert final["sgd", 0] != final["adam", 0]  # the configurations did train differently


def test_cached_results_are_reused_until_the_library_version_changes(tmp_path, monkeypatch):
    calls = []
    original = runs.run_one

    def counted(*args):
        calls.append(args[2:4])
        return original(*args)

    monkeypatch.setattr(runs, "run_one", counted)
    task = ex.Task("linreg", problems.linear_regression, {"d": 8})
    configs = [ex.Config("sgd", "SGD"), ex.Config("adam", "Adam")]
    kw = {"seeds": [0, 1], "steps": 5, "lrs": [1e-2, 1e-1], "max_extensions": 0}
    first = ex.study(task, configs, cache_dir=tmp_path, progress=False, **kw)
    assert len(calls) == 8
    again = ex.study(task, configs, cache_dir=tmp_path, progress=False, **kw)
    assert len(calls) == 8 and again.rows == first.rows  # nothing re-run, the same numbers
    files = sorted(tmp_path.rglob("*.json"))
    assert len(files) == 8 and json.loads(files[0].read_text())["key"]["psgd_lab"] == "0.1.0"
    other = [ex.Config("sgd", "SGD", {"momentum": 0.5}), configs[1]]
    ex.study(task, other, cache_dir=tmp_path, progress=False, **kw)
    assert len(calls) == 12  # only the changed configuration
    monkeypatch.setenv("PSGD_LAB_RECOMPUTE", "1")  # what `psgd-lab reproduce --full` sets
    ex.study(task, configs, cache_dir=tmp_path, progress=False, **kw)
    assert len(calls) == 20 and len(list(tmp_path.rglob("*.json"))) == 12  # rewritten in place
    monkeypatch.delenv("PSGD_LAB_RECOMPUTE")
    monkeypatch.setattr(psgd_lab, "__version__", "0.1.0+changed")
    ex.study(task, configs, cache_dir=tmp_path, progress=False, **kw)
    assert len(calls) == 28


def test_a_recomputed_run_with_the_same_result_keeps_its_file(tmp_path):
    key = {"task": "t", "optimizer": "torch.optim.SGD", "lr": 0.1, "seed": 0}
    store = cache.Cache(tmp_path)
    rows = [{"step": 0, "metric": 1.5, "train_loss": None, "seconds": 0.0},
            {"step": 5, "metric": 0.25, "train_loss": 0.5, "seconds": 0.125}]  # fmt: skip
    store.save(key, {"rows": rows, "diverged_step": None})
    path = store.path(key)
    before = path.read_text()
    slower = [{**r, "seconds": 3 * r["seconds"]} for r in rows]  # a recompute on a busier CPU
    store.save(key, {"rows": slower, "diverged_step": None})
    assert path.read_text() == before  # only the clock moved: the committed file stays as it is
    moved = [rows[0], {**rows[1], "metric": 0.2500001}]
    store.save(key, {"rows": moved, "diverged_step": None})
    assert store.load(key)["rows"] == moved  # a result that moved is rewritten
    store.save(key, {"rows": moved, "diverged_step": 5})
    assert store.load(key)["diverged_step"] == 5


def test_a_diverged_run_is_recorded_with_its_step():
    task = ex.Task("scalar", scalar_task)
    configs = [ex.Config("nan", NanAt, {"at": 3}), ex.Config("double", Double)]
    result = ex.study(task, configs, seeds=[0], steps=6, lrs=[1.0], max_extensions=0,
                      log_every=1, **_quiet())  # fmt: skip
    frame = result.to_frame()
    for name, step in (("nan", 3), ("double", 4)):  # NaN at update 3; 4**4 > 100 × the first loss
        rows = frame[frame.config == name]
        assert rows.diverged.all() and (rows.diverged_step == step).all()
        assert rows.step.max() == step and len(rows) == step + 1  # the run stopped there
    assert math.isnan(frame[frame.config == "nan"].metric.iloc[-1])
    assert np.isinf(result.final("nan")).all()
    patient = ex.study(task, configs[1:], seeds=[0], steps=6, lrs=[1.0], max_extensions=0,
                       diverge_factor=None, **_quiet())  # fmt: skip
    assert patient.rows[-1]["step"] == 6 and not patient.rows[-1]["diverged"]


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_worker_processes_give_the_in_process_results(start_method):
    # spawn (the default) re-imports psgd_lab in each worker: a few seconds, most of this test
    task = ex.Task("linreg", problems.linear_regression, {"d": 8})
    configs = [ex.Config("sgd", "SGD", {"momentum": 0.9}), ex.Config("kron", "Kron")]
    kw = _quiet(seeds=[0, 1], steps=20, lrs=[3e-3, 3e-2], max_extensions=0, log_every=10)
    here = ex.study(task, configs, workers=1, **kw)
    pool = ex.study(task, configs, workers=2, start_method=start_method, **kw)

    def numbers(s):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in s.rows]

    assert numbers(pool) == numbers(here) and len(here.rows) == 24


def test_kron_newton_mode_trains_through_a_closure():
    # Newton mode differentiates the loss itself: the harness hands it a closure, not backward()
    task = ex.Task("linreg", problems.linear_regression, {"d": 8})
    configs = [ex.Config("newton", "Kron", {"mode": "newton", "seed": ex.SEED})]
    result = ex.study(task, configs, seeds=[0, 1], steps=20, lrs=[0.3], max_extensions=0,
                      **_quiet())  # fmt: skip
    start = [r["metric"] for r in result.rows if r["step"] == 0]
    assert (result.final("newton") < 0.5 * np.array(start)).all()


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lrs": [1e-3, 1e-2, 3e-2]}, "lrs must be log-spaced"),
        ({"lrs": [1e-3]}, "lrs needs 2 or more points"),
        ({"lrs": [0.0, 1.0]}, "lrs must be distinct positive"),
        ({"seeds": []}, "seeds must be"),
        ({"seeds": [-1]}, "seeds must be an integer >= 0"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"workers": 0}, "workers must be an integer >= 1"),
        ({"diverge_factor": 0.5}, "diverge_factor must be"),
        ({"start_method": "thread"}, "start_method must be one of"),
        ({"configs": [ex.Config("a", "SGD"), ex.Config("a", "Adam")]}, "distinct names"),
    ],
)
def test_bad_arguments_raise_naming_them(kw, match):
    args = {"seeds": [0], "steps": 1, "lrs": [1e-2, 1e-1], "configs": [ex.Config("s", "SGD")]}
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        ex.study(ex.Task("t", scalar_task), **_quiet(**args))


def test_bad_declarations_raise_naming_them():
    with pytest.raises(ValueError, match="optimizer must be 'Kron'"):
        ex.Config("x", "NoSuchOptimizer")
    with pytest.raises(ValueError, match="options must not set lr"):
        ex.Config("x", "SGD", {"lr": 0.1})
    with pytest.raises(ValueError, match="Task params.*JSON-like"):
        ex.Task("t", scalar_task, {"target": lambda: 0})
    with pytest.raises(ValueError, match="must not contain NaN"):
        stats.bootstrap_ci([1.0, math.nan])
    with pytest.raises(ValueError, match="stat must be one of"):
        stats.bootstrap_ci([1.0, 2.0], stat="mode")


def test_rerun_trains_a_stored_run_live_and_compares(tmp_path, monkeypatch):
    task = ex.Task("linreg", problems.linear_regression, {"d": 8})
    configs = [ex.Config("sgd", "SGD"), ex.Config("adam", "Adam")]
    kw = {"seeds": [3, 4], "steps": 5, "lrs": [1e-2, 1e-1], "max_extensions": 0}
    result = ex.study(task, configs, cache_dir=tmp_path, progress=False, **kw)
    check = result.rerun("adam")
    assert check["seed"] == 3 and check["lr"] == result.best("adam")[0]
    assert check["live"] == check["stored"] and check["relative"] == 0.0  # same machine: exact
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.json")}
    doctored = next(p for p in files if "Adam_lr0.1_seed4" in p.name)
    data = json.loads(doctored.read_text())
    data["rows"][-1]["metric"] *= 2  # a committed result the library no longer reproduces
    doctored.write_text(json.dumps(data))
    again = ex.study(task, configs, cache_dir=tmp_path, progress=False, **kw)
    assert again.rerun("adam", seed=4, lr=0.1)["relative"] == pytest.approx(0.5)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.json") if p != doctored} == {
        p: t for p, t in files.items() if p != doctored
    }  # the live run wrote nothing
    with pytest.raises(ValueError, match="seed must be one of"):
        result.rerun("adam", seed=9)
    with pytest.raises(ValueError, match="lr must be on"):
        result.rerun("adam", lr=0.5)


def test_digits_mlp_metrics_measure_what_they_name():
    import torch.nn.functional as F

    X_train, y_train, X_test, y_test = problems.digits(0)
    trials = {m: problems.digits_mlp(3, sizes=(64, 16, 10), metric=m)
              for m in problems.DIGITS_METRICS}  # fmt: skip
    model = trials["test_loss"].model
    for trial in trials.values():  # the same seed: the same model and batches, whatever the metric
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), trial.model.parameters()))
        assert torch.equal(trial.batch(7)[1], trials["test_loss"].batch(7)[1])
    with torch.no_grad():
        assert trials["test_loss"].metric(model) == F.cross_entropy(model(X_test), y_test).item()
        wrong = int((model(X_test).argmax(1) != y_test).sum())
        assert 0 < wrong < len(y_test)  # untrained: most images wrong, as a percentage of 449
        assert trials["test_error"].metric(model) == pytest.approx(100 * wrong / len(y_test))

        # a model that fits every training image with margin 40: float32's cross-entropy rounds
        # to 0, the float64 train loss resolves log(1 + 9 e^-40) = 9 e^-40
        class Fitted(torch.nn.Module):
            def forward(self, x):
                return 40.0 * F.one_hot(y_train, 10).float()

        assert F.cross_entropy(Fitted()(X_train), y_train).item() == 0.0
        fit64 = problems.digits_mlp(0, metric="train_loss").metric(Fitted())
        assert fit64 == pytest.approx(9 * math.exp(-40), rel=1e-6)
    with pytest.raises(ValueError, match="metric must be one of"):
        problems.digits_mlp(0, metric="accuracy")
