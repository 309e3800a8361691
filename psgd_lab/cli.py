"""``psgd-lab reproduce | bench | nbval-matrix | docs | info``: run the notebooks headless and
regenerate ``figures/``; time the optimisers side by side; check the notebooks under simulated
machines; build the documentation site offline and check its links; print versions."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _figures(folder: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime for p in folder.glob("*") if p.is_file()}


def run_notebook(path: Path, timeout: int | None = 600) -> tuple[float, str | None]:
    """Execute ``path`` in place; return (seconds, error message naming the cell or None)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    error = None
    try:
        client.execute()
    except CellExecutionError as exc:
        index = next(
            (
                i
                for i, cell in enumerate(nb.cells)
                if any(o.get("output_type") == "error" for o in cell.get("outputs", []))
            ),
            None,
        )
        error = f"{path.name}: cell {index} failed: {str(exc).strip().splitlines()[-1]}"
    nbformat.write(nb, path)
    return time.perf_counter() - start, error


def reproduce(notebooks: list[Path], figures: Path, timeout: int | None = 600) -> int:
    """Run every notebook, print a table (notebook, seconds, figures written); 1 on failure."""
    from tqdm import tqdm

    rows, errors = [], []
    for path in tqdm(notebooks, desc="notebooks", unit="nb", file=sys.stderr):
        before = _figures(figures) if figures.exists() else {}
        seconds, error = run_notebook(path, timeout)
        after = _figures(figures) if figures.exists() else {}
        written = sorted(p.name for p, t in after.items() if before.get(p) != t)
        rows.append((path.name, seconds, written))
        if error:
            errors.append(error)
    width = max(len(r[0]) for r in rows) if rows else 8
    print(f"| {'notebook':<{width}} | seconds | figures written |")
    print(f"|{'-' * (width + 2)}|--------:|-----------------|")
    for name, seconds, written in rows:
        print(f"| {name:<{width}} | {seconds:7.1f} | {', '.join(written) or '-'} |")
    total = sum(r[1] for r in rows)
    from .cache import recompute

    mode = "recomputed every study run" if recompute() else "read committed results"
    print(f"total: {total:.1f} s for {len(rows)} notebooks ({mode})")
    for error in errors:
        print(f"FAILED {error}", file=sys.stderr)
    return 1 if errors else 0


def nbval_matrix(notebooks: list[Path], configs: list[str] | None) -> int:
    """Run nbval once per simulated machine; print a table; 1 if any configuration failed."""
    from .notebook import MATRIX, run_matrix

    paths = [str(p) for p in notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))]
    results = run_matrix(paths, configs)
    print("| configuration | environment | result | seconds |")
    print("|---|---|---|---:|")
    for name, status, seconds in results:
        env = " ".join(f"{k}={v}" for k, v in MATRIX[name].items()) or "(native: nothing set)"
        verdict = "pass" if status == 0 else f"FAIL (exit {status})"
        print(f"| {name} | {env} | {verdict} | {seconds:.0f} |")
    return 0 if all(status == 0 for _, status, _ in results) else 1


def info() -> int:
    import torch

    import psgd_lab

    print(f"psgd_lab {psgd_lab.__version__}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"python {platform.python_version()} on {platform.machine()}")
    print(f"geometries: {', '.join(psgd_lab.GEOMETRIES)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="psgd-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="execute every notebook and regenerate figures/")
    rep.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    rep.add_argument(
        "--full",
        action="store_true",
        help="recompute every study run instead of reading the committed results in "
        "notebooks/results/ (and rewrite them): hours here, not minutes",
    )
    rep.add_argument(
        "--retime",
        action="store_true",
        help="re-measure the timings the answers quote (notebooks/results/NN/timings.json) "
        "instead of reading them: run it with nothing else on the machine",
    )
    sub.add_parser("info", help="versions and available geometries")
    mat = sub.add_parser(
        "nbval-matrix",
        help="run nbval over the notebooks under simulated machines (CPU kernels, threads, MKL)",
    )
    mat.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    mat.add_argument("--configs", nargs="*", help="default: all (see psgd_lab.notebook.MATRIX)")
    bench = sub.add_parser("bench", help="time AdamW, kron-torch, heavyball and psgd_lab.Kron")
    from .bench import PARAM_SETS

    bench.add_argument("--sets", nargs="*", choices=list(PARAM_SETS), help="default: all")
    bench.add_argument("--shapes", help="your own parameter set, e.g. '1024x1024,1024'")
    bench.add_argument("--probs", nargs="*", type=float, default=[1.0, 0.03],
                       help="preconditioner update probabilities (default: 1.0 0.03)")  # fmt: skip
    bench.add_argument("--repeats", type=int, default=9, help="timed steps per optimiser")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    bench.add_argument("--json", type=Path, help="also write the full report as JSON here")
    bench.add_argument("--only", nargs="*", help="optimizers to time (default: all installed)")
    bench.add_argument("--device", default="cpu", help="where to time: cpu (default), cuda, ...")
    bench.add_argument(
        "--compiled", action="store_true", help="also time Kron(compile=True) beside eager"
    )
    docs = sub.add_parser(
        "docs",
        help="build the documentation site into docs/_build/html (offline, warnings are errors) "
        "and check its internal links",
    )
    docs.add_argument("--out", type=Path, help="output folder (default: docs/_build/html)")
    docs.add_argument(
        "--incremental",
        action="store_true",
        help="reuse Sphinx's saved environment (faster; warnings of unchanged pages not repeated)",
    )
    docs.add_argument("--no-check", action="store_true", help="skip the link check")
    args = parser.parse_args(argv)
    if args.command == "docs":
        from . import docs as docs_mod

        out = args.out or docs_mod.OUT
        return docs_mod.main(out, fresh=not args.incremental, check=not args.no_check)
    if args.command == "info":
        return info()
    if args.command == "nbval-matrix":
        return nbval_matrix(args.notebooks, args.configs)
    if args.command == "bench":
        from . import bench as bench_mod

        return bench_mod.main(args)
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    if not notebooks:
        print("no notebooks found under notebooks/", file=sys.stderr)
        return 1
    figures = Path(os.environ.get("PSGD_LAB_FIGURES", ROOT / "figures"))
    if args.full:  # the kernels inherit the environment; the cache then misses on every run
        from .cache import RECOMPUTE_ENV

        os.environ[RECOMPUTE_ENV] = "1"
    if args.retime:
        from .notebook import RETIME_ENV

        os.environ[RETIME_ENV] = "1"
    return reproduce(notebooks, figures, timeout=None if args.full else 600)


if __name__ == "__main__":
    sys.exit(main())
