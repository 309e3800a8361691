"""psgd_lab: PSGD Kron preconditioner primitives, a drop-in ``Kron`` optimiser, and a lab.

Public API: ``KronPreconditioner``, ``GEOMETRIES`` and the primitive modules ``structure``,
``factors``, ``linalg``, ``geometry``, ``pairs``.
"""

from . import factors, geometry, linalg, pairs, structure
from .geometry import GEOMETRIES
from .preconditioner import KronPreconditioner

__version__ = "0.1.0"

__all__ = [
    "GEOMETRIES",
    "KronPreconditioner",
    "factors",
    "geometry",
    "linalg",
    "pairs",
    "structure",
]
