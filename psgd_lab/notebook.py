"""What every notebook shares: a deterministic set-up, and checks that hold on any machine.

A notebook's stored outputs are compared by nbval on machines we have never seen (other CPUs,
other vector kernels, other thread counts), so what it prints in a checked cell must be stable
by construction (``notebooks/README.md`` states the convention):

- ``setup()`` in the first code cell: one thread (``$PSGD_LAB_THREADS`` overrides it), the
  deterministic algorithms, seeded global RNGs and the figure style;
- ``within(name, value, lo, hi)`` asserts a number the answer rests on lies in a stated bound and
  prints only the bound, so the check passes wherever the conclusion holds;
- ``check(claim, ok)`` asserts a qualitative conclusion and prints it;
- ``stored_timings(path, live)`` keeps the timings an answer quotes in a committed file, measured
  once with nothing else running, so re-executing the notebook elsewhere (or under ``psgd-lab
  reproduce --full``, which runs beside other work) prints the same quoted numbers beside its own.

Exact values and per-seed tables go in cells marked ``# NBVAL_IGNORE_OUTPUT``: printed, stored
with the notebook and quoted by its answer, but not compared digit for digit.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

THREADS_ENV = "PSGD_LAB_THREADS"
RETIME_ENV = "PSGD_LAB_RETIME"  # "1": re-measure and rewrite stored timings (reproduce --retime)


@dataclass(frozen=True)
class Setup:
    """What ``setup()`` fixed, and what it could not (printed by ``str()`` in an ignored cell)."""

    threads: int
    deterministic: bool
    seed: int
    cpu_capability: str
    torch_version: str

    def __str__(self) -> str:
        return (
            f"torch {self.torch_version}, {self.threads} thread(s), CPU kernels "
            f"{self.cpu_capability}, deterministic algorithms {self.deterministic}, "
            f"seed {self.seed}, {platform.machine()}"
        )


def setup(threads: int | None = None, seed: int = 0, deterministic: bool = True) -> Setup:
    """Make a notebook kernel as deterministic as the hardware allows and apply the figure style.

    ``threads`` defaults to ``$PSGD_LAB_THREADS`` or 1: one thread fixes the order of every
    reduction inside an op, and the lab's problems are too small to gain from more. What remains
    machine-dependent is the CPU's vector kernels (AVX-512, AVX2 or none; ``ATEN_CPU_CAPABILITY``
    selects them) and BLAS code paths: float32 results may differ in the last bits, so checked
    outputs are bounds, never raw digits.
    """
    if threads is None:
        threads = int(os.environ.get(THREADS_ENV, "1"))
    if threads < 1:
        raise ValueError(f"threads must be >= 1; got {threads!r}")
    torch.set_num_threads(threads)
    # warn_only: an op without a deterministic implementation (some CUDA kernels) warns, not fails
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    try:
        from . import plotting

        plotting.set_style()
    except ImportError:  # matplotlib/seaborn come with the [lab] extra
        pass
    return Setup(
        threads=threads,
        deterministic=deterministic,
        seed=seed,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        torch_version=torch.__version__,
    )


def _fmt(x: float) -> str:
    return f"{x:g}" if math.isfinite(x) else str(x)


def within(name: str, value: float, lo: float = -math.inf, hi: float = math.inf) -> None:
    """Assert ``lo <= value <= hi`` and print ``✓ name in [lo, hi]``. Returns None, so a check
    on a cell's last line adds no result for nbval to compare.

    The bound is the claim the notebook's answer makes, with room for the machine-to-machine and
    seed-to-seed spread (state how it was chosen in a comment beside the call). On failure the
    ``AssertionError`` names the quantity, its value and the bound.
    """
    value = float(value)
    if not lo <= hi:
        raise ValueError(f"the bound of {name!r} is empty: [{lo}, {hi}]")
    ok = lo <= value <= hi
    if not ok:
        raise AssertionError(
            f"{name} = {value:.6g} is outside the bound the answer states, [{_fmt(lo)}, {_fmt(hi)}]"
        )
    if lo == -math.inf:
        print(f"✓ {name} <= {_fmt(hi)}")
    elif hi == math.inf:
        print(f"✓ {name} >= {_fmt(lo)}")
    else:
        print(f"✓ {name} in [{_fmt(lo)}, {_fmt(hi)}]")


def check(claim: str, ok: bool, detail: str = "") -> None:
    """Assert a qualitative conclusion and print ``✓ claim``; the ``AssertionError`` says what
    was seen (``detail``) when it does not hold."""
    if not bool(ok):
        raise AssertionError(f"does not hold: {claim}" + (f" ({detail})" if detail else ""))
    print(f"✓ {claim}")


def stored_timings(path, live: dict) -> dict:
    """The timings a notebook's answer quotes: those stored at ``path`` (JSON), else ``live``.

    ``live`` is what this execution measured (a JSON-able dict). When ``path`` is missing, or
    ``$PSGD_LAB_RETIME`` is ``1`` (``psgd-lab reproduce --retime``), ``live`` is written there with
    the machine it was measured on (``"_meta"``) and returned; otherwise the stored dict is
    returned and ``live`` is only for printing beside it. Timings are not results a recomputation
    regenerates: they belong to one machine and one load, so they are re-measured on purpose,
    alone (an exclusive CPU lock here), and the answer cites the stored ones, which every
    re-execution prints unchanged. Check the live ones against a machine-independent bound.
    """
    path = Path(path)
    if path.exists() and os.environ.get(RETIME_ENV, "") != "1":
        return json.loads(path.read_text())
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
    }
    stored = {**live, "_meta": meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    return json.loads(path.read_text())  # what a later execution reads: the same rounding


def timing_source(stored: dict) -> str:
    """Where ``stored_timings`` measured: ``"measured alone with torch …, N thread(s), CPU kernels
    …"``, for the line a notebook prints above the stored timings it quotes."""
    m = stored["_meta"]
    return (
        f"measured alone with torch {m['torch']}, {m['threads']} thread(s), "
        f"CPU kernels {m['cpu_capability']}"
    )


# ---------------------------------------------------------------------------- cross-machine check

# Simulated machines for ``psgd-lab nbval-matrix``: CPU kernel dispatch (``ATEN_CPU_CAPABILITY``;
# oneDNN's ``ONEDNN_MAX_CPU_ISA`` alike), the notebook kernels' thread count (``PSGD_LAB_THREADS``)
# and MKL's conditional numerical reproducibility mode (``MKL_CBWR``: the code path MKL's BLAS
# takes). "native" leaves each unset: the best this CPU has.
MATRIX: dict[str, dict[str, str]] = {
    "native-1t": {},
    "native-2t-mkl-avx2": {THREADS_ENV: "2", "MKL_CBWR": "AVX2"},
    "avx2-2t-mkl-avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_CBWR": "AVX2",
        THREADS_ENV: "2",
    },
    "default-1t-mkl-compatible": {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "MKL_CBWR": "COMPATIBLE",
    },
    "default-2t": {"ATEN_CPU_CAPABILITY": "default", THREADS_ENV: "2"},
}


def run_matrix(
    notebooks: list[str], configs: list[str] | None = None, workers: int = 2
) -> list[tuple[str, int, float]]:
    """Run nbval over ``notebooks`` once per configuration of ``MATRIX`` (each in a fresh pytest
    process whose environment the notebook kernels inherit); ``(config, exit status, seconds)``.

    Two-thread configurations run one notebook at a time (two kernels of two threads would
    oversubscribe a 2-core machine); one-thread ones use ``workers`` processes.
    """
    import subprocess
    import sys
    import time

    unknown = sorted(set(configs or ()) - set(MATRIX))
    if unknown:
        raise ValueError(f"configs must be among {', '.join(MATRIX)}; got {unknown}")
    results = []
    for name in configs or list(MATRIX):
        env = {**os.environ, **MATRIX[name]}
        n = 1 if int(MATRIX[name].get(THREADS_ENV, "1")) > 1 else workers
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval"]
        if n > 1:
            cmd += ["-n", str(n), "--dist", "loadfile"]
        start = time.perf_counter()
        status = subprocess.run(cmd + list(notebooks), env=env).returncode
        results.append((name, status, time.perf_counter() - start))
    return results


_NUMBER = re.compile(r"(?<![\w.§/-])[-−]?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-−+]?\d+)?(%?)")


def _floats(text: str) -> list[float]:
    return [float(m.group().replace("−", "-").replace(",", "").rstrip("%"))
            for m in _NUMBER.finditer(text)]  # fmt: skip


def _rounds_to(stated: str, printed: float) -> bool:
    """Whether ``printed`` rounds to ``stated`` at the precision ``stated`` is written with."""
    mantissa, _, exponent = stated.lower().partition("e")
    digits = len(mantissa.partition(".")[2])
    unit = 10.0 ** (-digits + (int(exponent) if exponent else 0))
    value = float(stated)
    return abs(printed - value) <= 0.5 * unit * (1 + 1e-9) or (
        printed != 0 and math.isclose(printed, value, rel_tol=1e-12)
    )


def unprinted_numbers(
    path, heading: str = "## Answer", small: int = 20, text: str | None = None
) -> list[str]:
    """Numbers in a notebook's answer cell that none of its outputs prints.

    The answer is the markdown cell starting with ``heading``. A stated number counts as printed
    when some number in a code cell's stored output (stdout, or a displayed text/plain, markdown or
    HTML) rounds to it at the precision it is written with (``0.031`` matches a printed
    ``0.03104``; ``57%`` matches ``57.2%`` or ``0.572``), or when it is written verbatim in a code
    cell's source (a setting, e.g. an lr). Skipped: integers below ``small`` (counts of seeds,
    notebook numbers), code spans, link targets and section marks (``§5.4``). ``text``: check
    this text (e.g. the notebook's summary in docs/findings.md) instead of the answer cell.
    """
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    if text is None:
        answers = [c.source for c in nb.cells if c.cell_type == "markdown"
                   and c.source.startswith(heading)]  # fmt: skip
        if not answers:
            return [f"<no cell starting with {heading!r}>"]
        text = answers[-1]
    text = re.sub(r"`[^`]*`|\]\([^)]*\)|§\s*[\d.]+|\b\d\d_\w+", " ", text)
    printed, sources = [], []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        sources.append(cell.source)
        for out in cell.get("outputs", []):
            chunks = [out.get("text", "")]
            data = out.get("data", {})
            chunks += [data.get(k, "") for k in ("text/plain", "text/markdown", "text/html")]
            printed += _floats("\n".join(c if isinstance(c, str) else "".join(c) for c in chunks))
    source = "\n".join(sources)
    missing = []
    for m in _NUMBER.finditer(text):
        stated = m.group().replace("−", "-").replace(",", "")
        bare = stated.rstrip("%")
        if re.fullmatch(r"-?\d+", bare) and abs(int(bare)) < small:
            continue
        candidates = printed + ([100 * p for p in printed] if stated.endswith("%") else [])
        if any(_rounds_to(bare, p) for p in candidates) or re.search(
            rf"(?<![\w.]){re.escape(m.group())}(?![\w.])", source
        ):
            continue
        missing.append(m.group())
    return missing
