"""Factor structure: which dims get dense vs diagonal factors, dim merging, contraction plans.

MATH.md §4. A plan holds the opt_einsum contraction expressions for one (shape, structure) pair;
plans are cached, so every tensor of the same shape and structure reuses one set of paths.
Symbols come from ``opt_einsum.get_symbol``, so there is no limit on the number of dims.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache

import opt_einsum

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
    MATH.md §4 calls it "the first of the largest"; the expression, and so kron-torch, disagree.
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
    """For each dim of ``shape``, True if its factor is diagonal (MATH.md §4).

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
    """The 2-D shape kron-torch merges an ``ndim > 2`` tensor into (MATH.md §4); else unchanged.

    Candidates ``[prod(shape[:-1]), shape[-1]]`` and ``[shape[0], prod(shape[1:])]``; the one with
    the smaller ``second - first`` wins, the first on ties.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) <= 2:
        return shape
    first = (math.prod(shape[:-1]), shape[-1])
    second = (shape[0], math.prod(shape[1:]))
    return first if first[1] - first[0] <= second[1] - second[0] else second


# --------------------------------------------------------------------------- contraction plans


def _sym(i: int) -> str:
    return opt_einsum.get_symbol(i)


@dataclass(frozen=True)
class KronPlan:
    """Contraction expressions for a tensor of ``shape`` whose factors are ``diag`` (True) or dense.

    - ``apply_q(*Q, X)``: ``Q X`` (each factor once along its axis: ``Y[a] = sum_b Q[a, b] X[b]``).
    - ``apply_p(*conj(Q), *Q, X)``: ``Qᴴ Q X``.
    - ``grams[i](X, conj(Y))``: ``gram_i`` (d_i x d_i, or length d_i for a diagonal factor).
    - ``apply_one[i](Q_i, X)``: factor ``i`` alone along axis ``i``.
    """

    shape: tuple[int, ...]
    diag: tuple[bool, ...]
    apply_q: Callable = field(repr=False)
    apply_p: Callable = field(repr=False)
    grams: tuple[Callable, ...] = field(repr=False)
    apply_one: tuple[Callable, ...] = field(repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def factor_shapes(self) -> list[tuple[int, ...]]:
        if not self.shape:
            return [()]
        return [(d,) if dg else (d, d) for d, dg in zip(self.shape, self.diag)]


@cache
def make_plan(shape: tuple[int, ...], diag: tuple[bool, ...]) -> KronPlan:
    """Build (once per shape and structure) the contraction plan for ``shape``."""
    shape = tuple(int(d) for d in shape)
    diag = tuple(bool(x) for x in diag)
    if len(diag) != len(shape):
        raise ValueError(f"diag must have one flag per dim of shape {shape}; got {diag}")
    k = len(shape)
    expr = opt_einsum.contract_expression
    if k == 0:
        apply_q = expr(",->", (), ())
        apply_p = expr(",,->", (), (), ())
        return KronPlan((), (), apply_q, apply_p, (expr(",->", (), ()),), (expr(",->", (), ()),))

    t = [_sym(i) for i in range(k)]  # tensor index of dim i
    o = [_sym(k + i) for i in range(k)]  # output / second index of a dense factor
    r = [_sym(2 * k + i) for i in range(k)]  # row index shared by Qᴴ and Q in P = QᴴQ
    fshapes = [(d,) if dg else (d, d) for d, dg in zip(shape, diag)]

    # Q X: dense factor 'o t', diagonal factor 'o'; tensor 't...' -> 'o...'
    qs = [o[i] if diag[i] else o[i] + t[i] for i in range(k)]
    x_out = "".join(o)
    x_in_diag = "".join(o[i] if diag[i] else t[i] for i in range(k))
    apply_q = expr(",".join(qs) + "," + x_in_diag + "->" + x_out, *fshapes, shape)

    # Qᴴ Q X: conj factor 'r o', factor 'r t'; diagonal factors use 'o' throughout
    qh = [o[i] if diag[i] else r[i] + o[i] for i in range(k)]
    qq = [o[i] if diag[i] else r[i] + t[i] for i in range(k)]
    apply_p = expr(
        ",".join(qh) + "," + ",".join(qq) + "," + x_in_diag + "->" + x_out,
        *fshapes,
        *fshapes,
        shape,
    )

    grams, apply_one = [], []
    for i in range(k):
        left = "".join(o[i] if j == i else t[j] for j in range(k))
        if diag[i]:
            grams.append(expr(f"{left},{left}->{o[i]}", shape, shape))
            apply_one.append(expr(f"{o[i]},{left}->{left}", fshapes[i], shape))
        else:
            right = "".join(r[i] if j == i else t[j] for j in range(k))
            grams.append(expr(f"{left},{right}->{o[i]}{r[i]}", shape, shape))
            apply_one.append(expr(f"{o[i]}{r[i]},{right}->{left}", fshapes[i], shape))
    return KronPlan(shape, diag, apply_q, apply_p, tuple(grams), tuple(apply_one))
