"""Priors for a random search over hyperparameters (``psgd_lab.tunability.SearchSpace``): each
draws one value from a ``numpy.random.Generator`` (``draw(rng)``) and is plain data, so a search
space enters the harness's cache key."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


def _round(x: float) -> float:
    return float(f"{x:.12g}")  # a drawn value and its re-computation hash alike


@dataclass(frozen=True)
class LogUniform:
    """``exp(Uniform(log lo, log hi))``: every decade of ``[lo, hi]`` equally likely."""

    lo: float
    hi: float

    def __post_init__(self):
        if not (0 < self.lo < self.hi < math.inf):
            raise ValueError(f"LogUniform needs 0 < lo < hi < inf; got [{self.lo}, {self.hi}]")

    def draw(self, rng: np.random.Generator) -> float:
        return _round(math.exp(rng.uniform(math.log(self.lo), math.log(self.hi))))

    def contains(self, x) -> bool:
        return isinstance(x, float) and self.lo * (1 - 1e-9) <= x <= self.hi * (1 + 1e-9)

    def __str__(self) -> str:
        return f"log-uniform [{self.lo:g}, {self.hi:g}]"


@dataclass(frozen=True)
class OneMinusLogUniform:
    """``1 - LogUniform(lo, hi)``: a momentum or a beta in ``[1 - hi, 1 - lo]``, log-uniform in
    its distance to 1 (0.9, 0.99 and 0.999 one decade apart)."""

    lo: float
    hi: float

    def __post_init__(self):
        if not (0 < self.lo < self.hi <= 1):
            raise ValueError(
                f"OneMinusLogUniform needs 0 < lo < hi <= 1; got [{self.lo}, {self.hi}]"
            )

    def draw(self, rng: np.random.Generator) -> float:
        return _round(1.0 - LogUniform(self.lo, self.hi).draw(rng))

    def contains(self, x) -> bool:
        return isinstance(x, float) and 1 - self.hi - 1e-12 <= x <= 1 - self.lo + 1e-12

    def __str__(self) -> str:
        return f"1 - log-uniform [{self.lo:g}, {self.hi:g}]"


@dataclass(frozen=True)
class Choice:
    """One of ``values``, with probabilities ``weights`` (default: equal)."""

    values: tuple
    weights: tuple | None = None

    def __post_init__(self):
        if not self.values:
            raise ValueError("Choice needs at least one value")
        if self.weights is not None and (
            len(self.weights) != len(self.values)
            or min(self.weights) < 0
            or not math.isclose(sum(self.weights), 1.0)
        ):
            n = len(self.values)
            raise ValueError(f"Choice weights must be {n} probabilities summing to 1")

    def draw(self, rng: np.random.Generator):
        p = None if self.weights is None else np.asarray(self.weights, dtype=float)
        return self.values[int(rng.choice(len(self.values), p=p))]

    def contains(self, x) -> bool:
        return x in self.values

    def __str__(self) -> str:
        w = "" if self.weights is None else f", weights {list(self.weights)}"
        return f"one of {list(self.values)}{w}"


@dataclass(frozen=True)
class Or:
    """``value`` with probability ``p``, otherwise a draw from ``otherwise`` (e.g. a weight decay
    that is exactly 0 a quarter of the time: ``Or(0.0, 0.25, LogUniform(1e-5, 1.0))``)."""

    value: Any
    p: float
    otherwise: Any

    def __post_init__(self):
        if not 0 <= self.p <= 1:
            raise ValueError(f"Or needs a probability p in [0, 1]; got {self.p!r}")

    def draw(self, rng: np.random.Generator):
        # two draws every time, so the stream (and the later hyperparameters) does not depend
        # on which branch was taken
        u, x = rng.uniform(), self.otherwise.draw(rng)
        return self.value if u < self.p else x

    def contains(self, x) -> bool:
        return x == self.value or self.otherwise.contains(x)

    def __str__(self) -> str:
        return f"{self.value!r} with probability {self.p:g}, else {self.otherwise}"


__all__ = ["Choice", "LogUniform", "OneMinusLogUniform", "Or"]
