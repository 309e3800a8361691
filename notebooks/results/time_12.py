"""Measure each optimiser's time per training step on each of notebook 12's workloads.

    cd notebooks && flock -x /tmp/psgd_cpu.lock env MPLBACKEND=Agg PYTHONPATH=.. \
        python results/time_12.py [--workloads CharGPT "MNIST-1D MLP" ...]

Runs the notebook's definition cells (up to its first ``ex.study(``) so the workloads and
configurations are the notebook's own, then, per workload and configuration: seed 0's model and
batches, the optimiser at the middle of its starting grid (its documented default lr), ``N_WARMUP``
untimed steps (torch.compile in kron-torch and heavyball compiles there), then ``N_TIMED`` timed
steps, each timed as the harness's step is (batch, zero_grad, forward, backward, step; Newton
mode's closure). Writes mean and median ms/step into ``results/12/step_times.json`` (merging with
the workloads already there). One thread; run it alone, under the exclusive CPU lock.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

N_WARMUP, N_TIMED = 10, 50
OUT = Path("results/12/step_times.json")


def time_config(task, config) -> dict:
    trial = task.make(0)
    model = trial.model
    opt = config.build(model, config.lrs[len(config.lrs) // 2], 0)
    newton = getattr(opt, "mode", None) == "newton"
    times = []
    for t in range(N_WARMUP + N_TIMED):
        start = time.perf_counter()
        batch = trial.batch(t)
        opt.zero_grad(set_to_none=True)
        if newton:
            opt.step(lambda batch=batch: trial.loss(model, batch))
        else:
            trial.loss(model, batch).backward()
            opt.step()
        if t >= N_WARMUP:
            times.append(time.perf_counter() - start)
    ms = 1e3 * np.array(times)
    return {"ms_mean": round(float(ms.mean()), 3), "ms_median": round(float(np.median(ms)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--notebook", default="12_rivals.ipynb")
    parser.add_argument("--workloads", nargs="*")
    args = parser.parse_args()
    scope = vars(sys.modules["__main__"])
    for i, cell in enumerate(json.load(open(args.notebook))["cells"]):
        source = "".join(cell["source"])
        if cell["cell_type"] != "code":
            continue
        if "ex.study(" in source:
            break
        exec(compile(source, f"{args.notebook}[{i}]", "exec"), scope)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    out = json.loads(OUT.read_text()) if OUT.exists() else {}
    for w in args.workloads or list(scope["TASKS"]):
        rows = {}
        for config in scope["configs"](w):
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # kron-torch prints
                    rows[config.name] = time_config(scope["TASKS"][w], config)
            except Exception as exc:  # a rival failing at its defaults is a result, recorded
                rows[config.name] = {"error": f"{type(exc).__name__}: {exc}"[:160]}
            print(w, config.name, rows[config.name], flush=True)
        out[w] = rows
    out["_meta"] = {"warmup": N_WARMUP, "steps": N_TIMED, "threads": 1,
                    "torch": torch.__version__, "machine": platform.machine(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability()}  # fmt: skip
    OUT.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
