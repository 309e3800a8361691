"""Which dims get dense vs diagonal factors (docs/maths.md §4), dim merging, and plans."""

from __future__ import annotations

import math

import pytest
import torch

from psgd_lab import KronPreconditioner
from psgd_lab.structure import MEMORY_SAVE_MODES, diag_dims, make_plan, merged_shape

D, G = True, False  # diagonal, dense
SHAPES = {
    "conv": (64, 3, 3, 3),
    "embedding": (50000, 256),
    "tall": (256, 128),
    "wide": (128, 256),
    "bias": (10,),
    "scalar": (),
}
# kron-torch defaults: max_size_triangular=8192, min_ndim_triangular=2, no merging
EXPECTED = {
    None: {
        "conv": (G, G, G, G),
        "embedding": (D, G),
        "tall": (G, G),
        "wide": (G, G),
        "bias": (D,),
        "scalar": (),
    },
    "one_diag": {
        "conv": (D, G, G, G),
        "embedding": (D, G),
        "tall": (D, G),
        "wide": (G, D),
        "bias": (D,),
        "scalar": (),
    },
    "all_diag": {
        "conv": (D, D, D, D),
        "embedding": (D, D),
        "tall": (D, D),
        "wide": (D, D),
        "bias": (D,),
        "scalar": (),
    },
}


# no shape above has tied largest dims, so smart_one_diag forces what one_diag does
EXPECTED["smart_one_diag"] = EXPECTED["one_diag"]


@pytest.mark.parametrize("mode", MEMORY_SAVE_MODES)
@pytest.mark.parametrize("name", SHAPES)
def test_structure_table(mode, name):
    assert diag_dims(SHAPES[name], memory_save_mode=mode) == EXPECTED[mode][name]


@pytest.mark.parametrize("mode", MEMORY_SAVE_MODES)
@pytest.mark.parametrize(
    "shape", [*SHAPES.values(), (3, 3), (5, 5, 2), (4, 4, 4), (2, 7, 7), (1, 6), (9000, 2)]
)
@pytest.mark.parametrize("merge", [False, True])
def test_structure_matches_kron_torch(mode, shape, merge):
    """Same flags as kron-torch's own initialiser, which is what ``Kron`` must be a drop-in for."""
    kron = pytest.importorskip("kron_torch.kron")
    t = torch.zeros(shape)
    if merge:
        t = t.reshape(merged_shape(shape))
    Q, _ = kron._init_Q_exprs(t, 1.0, 8192, 2, mode, dtype=torch.float32)
    theirs = tuple(q.dim() < 2 for q in Q) if t.dim() else ()
    assert diag_dims(t.shape, memory_save_mode=mode) == theirs


def test_ties_pick_the_last_largest_dim_like_kron_torch():
    assert diag_dims((256, 256), memory_save_mode="one_diag") == (G, D)
    assert diag_dims((256, 256), memory_save_mode="smart_one_diag") == (G, G)


def test_other_rules():
    assert diag_dims((5, 1)) == (G, D)  # size 1
    assert diag_dims((100, 20), max_size_triangular=50) == (D, G)
    assert diag_dims((4, 4, 4), min_ndim_triangular=4) == (D, D, D)
    assert diag_dims((5,), min_ndim_triangular=1) == (G,)
    # max_skew: d² > max_skew · numel
    assert diag_dims((256, 128), max_skew=1.0) == (D, G)
    assert diag_dims((64, 3, 3, 3), max_skew=1.0) == (D, G, G, G)
    assert diag_dims((256, 128), max_skew=math.inf) == (G, G)


def test_memory_save_mode_error_names_argument_and_values():
    with pytest.raises(ValueError, match="memory_save_mode must be one of None, 'one_diag'"):
        diag_dims((3, 3), memory_save_mode="foo")


@pytest.mark.parametrize(
    "shape,expected",
    [
        ((64, 3, 3, 3), (576, 3)),
        ((3, 4, 5), (12, 5)),
        ((2, 3, 4, 5), (24, 5)),
        ((10, 2, 2), (20, 2)),
        ((2, 10, 10), (20, 10)),
        ((4, 4), (4, 4)),
        ((7,), (7,)),
        ((), ()),
    ],
)
def test_merged_shape(shape, expected):
    assert merged_shape(shape) == expected


def test_plans_are_built_once_per_shape():
    assert make_plan((3, 4), (G, D)) is make_plan((3, 4), (G, D))
    assert make_plan((3, 4), (G, D)) is not make_plan((3, 4), (G, G))


def test_any_number_of_dims():
    """No 13- or 26-letter limit: a 20-dim tensor is preconditioned and fitted."""
    shape = (2,) * 20
    pre = KronPreconditioner(shape, geometry="QEQ", damping=0.0)
    assert len(pre.Q) == 20 and pre.diag == (G,) * 20
    g = torch.randn(shape)
    pre.update(g)
    out = pre.precondition(g)
    assert out.shape == shape and torch.isfinite(out).all()
