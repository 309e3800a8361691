"""Fill a notebook's committed results by running the notebook's own code, in two worker processes.

    cd notebooks && MPLBACKEND=Agg PYTHONPATH=.. python results/fill_from_notebook.py \
        03_skew_and_memory.ipynb [--stop "text"] [--workers 2]

Runs the notebook's code cells in order, as ``__main__`` (so a class or a task factory the
notebook defines gets the same cache key as in the kernel), up to the first cell containing
``--stop`` (default ``.rerun(``: the live re-run), with every ``experiment.study`` call given
``workers`` fork-started processes. The notebook itself then finds every run in its results
directory; ``psgd-lab reproduce --full`` recomputes them in-process instead. Runs already stored
are reused, so an interrupted fill resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from psgd_lab import experiment as ex


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("notebook")
    parser.add_argument("--stop", default=".rerun(")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    study = ex.study

    def parallel_study(*a, **kw):
        kw.update(workers=args.workers, start_method="fork", progress=True)
        return study(*a, **kw)

    ex.study = parallel_study  # the notebook imports the module, then calls ex.study
    # the script's own globals: worker processes unpickle what the notebook defines from __main__
    scope = vars(sys.modules["__main__"])
    cells = json.load(open(args.notebook))["cells"]
    start = time.perf_counter()
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        if cell["cell_type"] != "code":
            continue
        if args.stop in source:
            break
        exec(compile(source, f"{args.notebook}[{i}]", "exec"), scope)
    print(f"filled from {args.notebook} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
