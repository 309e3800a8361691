"""Factor structure: which dims get dense vs diagonal factors, dim merging, plans.

docs/maths.md §4. A plan records one tensor's factor shape and which of its factors are diagonal;
any
number of dims is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

MEMORY_SAVE_MODES = (None, "one_diag", "smart_one_diag", "all_diag")


def check_memory_save_mode(memory_save_mode: str | None) -> None:
    if memory_save_mode not in MEMORY_SAVE_MODES:
        raise ValueError(
            "memory_save_mode must be one of None, 'one_diag', 'smart_one_diag', 'all_diag'; "
            f"got {memory_save_mode!r}"
        )


def _largest_dim(shape: Sequence[int]) -> int:
    """The dim kron-torch forces diagonal: ``np.argsort(shape)[::-1][0]``.

    On ties that expression picks the *last* of the largest dims (numpy's argsort keeps equal
    keys in index order, then the reversal puts the highest index first): ``(256, 256) -> 1``.
    docs/maths.md §4 calls it "the first of the largest"; the expression, and so kron-torch,
    disagree.
    """
    biggest = max(shape)
    return max(i for i, d in enumerate(shape) if d == biggest)


def diag_dims(
    shape: Sequence[int],
    max_size_triangular: float = 8192,
    min_ndim_triangular: int = 2,
    memory_save_mode: str | None = None,
    max_skew: float = math.inf,
) -> tuple[bool, ...]:
    """For each dim of ``shape``, True if its factor is diagonal (docs/maths.md §4).

    A dim is diagonal when ``d == 1``, ``d > max_size_triangular``, ``ndim < min_ndim_triangular``,
    ``memory_save_mode`` forces it, or ``d**2 > max_skew * numel``.
    """
    check_memory_save_mode(memory_save_mode)
    shape = tuple(int(d) for d in shape)
    if not shape:
        return ()
    forced = [False] * len(shape)
    if memory_save_mode == "all_diag":
        forced = [True] * len(shape)
    elif memory_save_mode == "one_diag":
        forced[_largest_dim(shape)] = True
    elif memory_save_mode == "smart_one_diag":
        ordered = sorted(shape)
        if len(shape) > 1 and ordered[-1] > ordered[-2]:
            forced[_largest_dim(shape)] = True
    numel = math.prod(shape)
    return tuple(
        d == 1
        or d > max_size_triangular
        or len(shape) < min_ndim_triangular
        or forced[i]
        or d * d > max_skew * numel
        for i, d in enumerate(shape)
    )


def merged_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The 2-D shape kron-torch merges an ``ndim > 2`` tensor into (docs/maths.md §4); else
    unchanged.

    Candidates ``[prod(shape[:-1]), shape[-1]]`` and ``[shape[0], prod(shape[1:])]``; the one with
    the smaller ``second - first`` wins, the first on ties.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) <= 2:
        return shape
    first = (math.prod(shape[:-1]), shape[-1])
    second = (shape[0], math.prod(shape[1:]))
    return first if first[1] - first[0] <= second[1] - second[0] else second


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class KronPlan:
    """The structure of one tensor's preconditioner: its factor shape and, per dim, whether the
    factor is diagonal (True) or dense. Tensors with equal plans (and dtypes) are stacked and
    preconditioned together (``psgd_lab.factors`` works on such stacks)."""

    shape: tuple[int, ...]
    diag: tuple[bool, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def factor_shapes(self) -> list[tuple[int, ...]]:
        if not self.shape:
            return [()]
        return [(d,) if dg else (d, d) for d, dg in zip(self.shape, self.diag)]

    def factor_numel(self) -> int:
        """Elements of all factors together."""
        return sum(math.prod(s) for s in self.factor_shapes())


@cache
def make_plan(shape: tuple[int, ...], diag: tuple[bool, ...]) -> KronPlan:
    """The plan of ``shape`` with the given diagonal flags (one per dim), cached."""
    shape = tuple(int(d) for d in shape)
    diag = tuple(bool(x) for x in diag)
    if len(diag) != len(shape):
        raise ValueError(f"diag must have one flag per dim of shape {shape}; got {diag}")
    return KronPlan(shape, diag)


def fit_budget(
    shape: Sequence[int], diag: Sequence[bool], max_elements: float
) -> tuple[tuple[bool, ...], tuple[int, ...]]:
    """``(diag, forced)``: the largest dense dims made diagonal, one at a time (the first of
    equal ones), until the factors hold at most ``max_elements`` elements; ``forced`` lists the
    dims this changed."""
    diag, forced = list(diag), []

    def elements() -> int:
        return sum(d if dg else d * d for d, dg in zip(shape, diag))

    while elements() > max_elements:
        dense = [i for i, dg in enumerate(diag) if not dg]
        if not dense:
            break
        i = max(dense, key=lambda j: (shape[j], -j))
        diag[i] = True
        forced.append(i)
    return tuple(diag), tuple(forced)
