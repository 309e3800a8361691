"""Fill notebooks/results/07 and /08 with the harness runs notebooks 07 and 08 read, in two worker
processes (the same study arguments as the notebooks, so the same cache keys).

    cd notebooks && PYTHONPATH=.. python results/fill_07_08.py [07|08|08:<task>] ...

The notebooks themselves run with ``workers=1`` and find every run here; ``psgd-lab reproduce
--full`` recomputes them in-process instead.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from psgd_lab import GEOMETRIES, problems
from psgd_lab import experiment as ex

SEEDS = range(5)
KW = {"workers": 2, "start_method": "fork", "progress": True}

# ---------------------------------------------------------------------------- notebook 07
GRID07 = {"whiten": np.geomspace(10**-2.5, 0.1, 4), "newton": np.geomspace(0.1, 10**0.5, 4)}
TASKS07 = {
    "2-D Rosenbrock": (ex.Task("rosenbrock", problems.rosenbrock, {"shape": [2]}), 400, 20),
    "8-D Rosenbrock": (ex.Task("rosenbrock", problems.rosenbrock, {"shape": [2, 4]}), 600, 30),
    "regression": (ex.Task("rotated-regression", problems.rotated_regression, {}), 300, 15),
}


def kron07(mode, geometry, **extra):
    options = {"mode": mode, "geometry": geometry, "precond_dtype": torch.float64}
    return {**options, **extra, "seed": ex.SEED}


def configs07(problem):
    out = []
    structures = {"dense": {"min_ndim_triangular": 1}, "diag": {}}
    for geometry in ("EQ", "Q0.5EQ1.5"):
        for structure, extra in structures.items() if problem == "2-D Rosenbrock" else [("", {})]:
            if structure == "diag" and geometry != "EQ":
                continue
            for mode in ("whiten", "newton"):
                name = ", ".join(x for x in (mode, geometry, structure) if x)
                out.append(ex.Config(name, "Kron", kron07(mode, geometry, **extra), GRID07[mode]))
    return out


def studies07(**kw):
    return {
        p: ex.study(task, configs07(p), seeds=SEEDS, steps=steps, log_every=every,
                    cache_dir="results/07", **kw)
        for p, (task, steps, every) in TASKS07.items()
    }  # fmt: skip


def fd_studies07(studies, **kw):
    """Newton mode with finite-difference Hv at autograd's best lr, the same seeds."""
    out = {}
    for p, (task, steps, every) in TASKS07.items():
        configs = []
        for c in studies[p].configs:
            if c.name.startswith("newton"):
                lr, _ = studies[p].best(c.name)
                options = {**c.options, "hvp": "finite_difference"}
                configs.append(ex.Config(c.name + ", fd", "Kron", options, [lr]))
        out[p] = ex.study(task, configs, seeds=SEEDS, steps=steps, log_every=every,
                          max_extensions=0, cache_dir="results/07", **kw)  # fmt: skip
    return out


# ---------------------------------------------------------------------------- notebook 08
GRID08 = {
    "whiten": np.geomspace(10**-2.5, 10**-1.5, 3),
    "newton": np.geomspace(0.1, 1.0, 3),
    "AdamW": np.geomspace(0.01, 0.1, 3),
}
TASKS08 = {
    "digits": (ex.Task("digits-mlp", problems.digits_mlp,
                       {"metric": "train", "dtype": "float64"}), 80),
    "regression": (ex.Task("rotated-regression", problems.rotated_regression,
                           {"cond": 1e4, "batch": 64, "n": 1024, "noise": 0.0, "init_std": 0.1}),
                   120),
    "rnn": (ex.Task("first-input-rnn", problems.first_input_rnn, {}), 80),
}  # fmt: skip
DEFAULT = "whiten / EQ"  # kron-torch's defaults, lr tuned


# QUAD4P is left out: it is the same update of P as QEQ (notebook 08's aside checks it)
RULES08 = [g for g in GEOMETRIES if g != "QUAD4P"]


def configs08():
    out = []
    for mode in ("whiten", "newton"):
        for geometry in RULES08:
            options = {"mode": mode, "lipschitz": "kron", "geometry": geometry,
                       "precond_dtype": torch.float64, "seed": ex.SEED}  # fmt: skip
            out.append(ex.Config(f"{mode} / {geometry}", "Kron", options, GRID08[mode]))
    out.append(ex.Config("AdamW", "AdamW", {"weight_decay": 0.0}, GRID08["AdamW"]))
    return out


SHIPPED = ex.Config("Kron() as shipped", "Kron", {"seed": ex.SEED}, [3e-4])


def studies08(tasks=TASKS08, **kw):
    tuned = {
        t: ex.study(task, configs08(), seeds=SEEDS, steps=steps, cache_dir="results/08", **kw)
        for t, (task, steps) in tasks.items()
    }
    shipped = {
        t: ex.study(task, [SHIPPED], seeds=SEEDS, steps=steps, max_extensions=0,
                    cache_dir="results/08", **kw)
        for t, (task, steps) in tasks.items()
    }  # fmt: skip
    return tuned, shipped


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        if arg == "07":
            fd_studies07(studies07(**KW), **KW)
        elif arg == "08":
            studies08(**KW)
        elif arg.startswith("08:"):
            name = arg[3:]
            studies08({name: TASKS08[name]}, **KW)
        else:
            raise SystemExit(f"unknown argument {arg!r}")
