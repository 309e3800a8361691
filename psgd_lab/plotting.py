"""One figure style for the project, and saving figures to ``figures/``.

``set_style()`` applies the seaborn theme every notebook uses; ``save(fig, name)`` writes
``figures/<name>.<fmt>`` (the repository's ``figures/`` folder, or ``$PSGD_LAB_FIGURES``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

FIGURES_ENV = "PSGD_LAB_FIGURES"
DPI = 150


def set_style() -> None:
    """Apply the project's seaborn theme (notebook context, white grid, colour-blind palette)."""
    import seaborn

    seaborn.set_theme(context="notebook", style="whitegrid", palette="colorblind")


def figures_dir() -> Path:
    """The folder figures are written to: ``$PSGD_LAB_FIGURES`` or the repository's ``figures/``."""
    override = os.environ.get(FIGURES_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return Path(__file__).resolve().parent.parent / "figures"


def save(fig: Figure, name: str, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Write ``fig`` to ``figures_dir()/<name>.<fmt>`` for each format; return the paths written."""
    if not name or Path(name).name != name:
        raise ValueError(f"name must be a plain file stem without folders; got {name!r}")
    if isinstance(formats, str):
        formats = (formats,)
    if not formats:
        raise ValueError("formats must name at least one file format, e.g. ('png',); got ()")
    out = figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out / f"{name}.{fmt.lstrip('.')}"
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
        paths.append(path)
    return paths
