"""The experiment harness's result cache: one JSON file per run, keyed by a stable hash.

A key is plain JSON (``canonical`` turns options into it) and names everything a run's result
depends on that the cache can see: task name and parameters, optimiser and options, lr, seed,
budget, and the library version (``psgd_lab.experiment.run_key`` builds it). The files are meant
to be committed beside the notebooks that read them, so the layout is stable and readable: the
key spelt out, then one line per logged row.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

CACHE_ENV = "PSGD_LAB_CACHE"
RECOMPUTE_ENV = "PSGD_LAB_RECOMPUTE"  # "1": ignore stored runs, recompute and overwrite them
DEFAULT_CACHE = ".psgd_lab_cache"
FORMAT = 1  # version of the files' layout, part of every key


def default_cache_dir() -> Path:
    """``$PSGD_LAB_CACHE``, or ``.psgd_lab_cache`` in the working directory."""
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE))


def recompute() -> bool:
    """True when ``$PSGD_LAB_RECOMPUTE`` is ``1`` (what ``psgd-lab reproduce --full`` sets): every
    lookup misses, so each run is recomputed and its file rewritten."""
    return os.environ.get(RECOMPUTE_ENV, "") == "1"


def _qualname(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def canonical(x: Any, where: str = "value") -> Any:
    """``x`` as plain JSON for a cache key: numbers, strings, lists, string-keyed dicts;
    ``torch.dtype``, module-level functions and classes by name, dataclasses and plain objects by
    type and fields. Anything else raises a ``ValueError`` naming ``where``."""
    if x is None or isinstance(x, bool | int | str):
        return x
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else str(float(x))
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, list | tuple):
        return [canonical(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, Mapping):
        if not all(isinstance(k, str) for k in x):
            raise ValueError(f"{where} must have string keys; got {list(x)!r}")
        return {k: canonical(v, f"{where}[{k!r}]") for k, v in x.items()}
    if isinstance(x, torch.dtype):
        return str(x)
    if hasattr(x, "__qualname__"):  # a class or a function: stable by name unless it is local
        if "<" not in x.__qualname__:  # (a lambda, or defined inside a function)
            return _qualname(x)
    elif is_dataclass(x):
        state = {f.name: getattr(x, f.name) for f in fields(x)}
        return {"type": _qualname(type(x)), **canonical(state, where)}
    elif hasattr(x, "__dict__"):  # a plain object, e.g. an UpdateProbSchedule: type and fields
        return {"type": _qualname(type(x)), **canonical(vars(x), where)}
    raise ValueError(
        f"{where} must be JSON-like (numbers, strings, lists, dicts, dtypes, module-level "
        f"functions, dataclasses) to enter the cache key; got {type(x).__name__}: {x!r}"
    )


def digest(key: dict) -> str:
    """16 hex digits of the SHA-256 of ``key`` as sorted, compact JSON."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_") or "_"


def _without_clock(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _same_result(stored: dict, key: dict, record: dict) -> bool:
    """Whether a stored file holds ``record``'s result for ``key``, its timings aside."""
    return (
        stored.get("key") == key
        and stored.get("diverged_step") == record["diverged_step"]
        and _without_clock(stored.get("rows", []))
        == _without_clock(json.loads(json.dumps(record["rows"])))
    )


class Cache:
    """Run results under ``root``: ``<task>/<Optimizer>_lr<lr>_seed<seed>_<hash>.json``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: dict) -> Path:
        name = f"{key['optimizer'].rpartition('.')[2]}_lr{key['lr']:.4g}_seed{key['seed']}"
        return self.root / _slug(key["task"]) / f"{_slug(name)}_{digest(key)}.json"

    def load(self, key: dict) -> dict | None:
        """The stored ``{"rows", "diverged_step"}`` for ``key``, or None (always None under
        ``$PSGD_LAB_RECOMPUTE=1``)."""
        path = self.path(key)
        if recompute() or not path.exists():
            return None
        data = json.loads(path.read_text())
        if data.get("key") != key:  # another layout or a hash collision: recompute
            return None
        return {"rows": data["rows"], "diverged_step": data["diverged_step"]}

    def save(self, key: dict, record: dict) -> None:
        """Write ``record`` under ``key``. A stored file that already holds the same result (rows
        equal but for the wall-clock ``seconds``) is left as it is, so after a recomputation
        (``psgd-lab reproduce --full``) ``git status`` lists just the runs whose results moved."""
        path = self.path(key)
        if path.exists() and _same_result(json.loads(path.read_text()), key, record):
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        head = {"key": key, "diverged_step": record["diverged_step"], "torch": torch.__version__}
        text = json.dumps({**head, "rows": "@ROWS@"}, indent=1, sort_keys=True)
        rows = ",\n  ".join(json.dumps(r, sort_keys=True) for r in record["rows"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text.replace('"@ROWS@"', f"[\n  {rows}\n ]") + "\n")
        os.replace(tmp, path)  # a reader never sees half a file
