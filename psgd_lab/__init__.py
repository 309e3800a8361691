"""psgd_lab: PSGD Kron preconditioner primitives, a drop-in ``Kron`` optimiser, and a lab.

Public API: the optimisers ``Kron``, ``LRA`` and ``Dense`` (one class per preconditioner
structure, the same arguments), ``precond_update_prob_schedule``, the preconditioners
``KronPreconditioner``, ``DensePreconditioner`` and ``LRAPreconditioner`` (module ``lra``),
``GEOMETRIES`` and the primitive modules ``structure``, ``factors``, ``linalg``, ``geometry``,
``pairs``, ``schedules``, ``distributed`` (what ``Kron`` uses from ``torch.distributed``),
``notebook`` (the deterministic set-up and machine-independent checks the notebooks share),
``experiment`` (seeded optimiser studies: self-extending lr grids, cached tidy results) and
``stats`` (bootstrap intervals and paired comparisons over seeds).
"""

from . import (
    distributed,
    experiment,
    factors,
    geometry,
    linalg,
    lra,
    notebook,
    pairs,
    schedules,
    stats,
    structure,
)
from .geometry import GEOMETRIES
from .lra import LRAPreconditioner
from .optim import LRA, Dense, Kron, ParamInfo
from .preconditioner import DensePreconditioner, KronPreconditioner
from .schedules import UpdateProbSchedule, precond_update_prob_schedule

__version__ = "0.1.0"

__all__ = [
    "GEOMETRIES",
    "Dense",
    "DensePreconditioner",
    "Kron",
    "KronPreconditioner",
    "LRA",
    "LRAPreconditioner",
    "distributed",
    "experiment",
    "ParamInfo",
    "UpdateProbSchedule",
    "factors",
    "geometry",
    "linalg",
    "lra",
    "notebook",
    "pairs",
    "precond_update_prob_schedule",
    "schedules",
    "stats",
    "structure",
]
