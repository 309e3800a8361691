"""Synthetic problems with known answers: Kronecker-structured SPD Hessians (MATH.md §6)."""

from __future__ import annotations

import math

import torch

# name -> list of (size, is_diagonal); () is the scalar
STRUCTURES = {
    "scalar": [],
    "diag": [(5, True)],
    "dense": [(5, False)],
    "kron(diag,diag)": [(3, True), (4, True)],
    "kron(diag,dense)": [(3, True), (4, False)],
    "kron(dense,diag)": [(3, False), (4, True)],
    "kron(dense,dense)": [(3, False), (4, False)],
    "kron(dense,dense,dense)": [(2, False), (3, False), (4, False)],
}


def random_spd(d: int, gen: torch.Generator, cond: float = 10.0, dtype=torch.float64, diag=False):
    """A random ``d x d`` SPD (Hermitian PD for complex dtypes) matrix with condition ``cond``."""
    ev = torch.logspace(0, math.log10(cond), d, dtype=torch.float64)
    ev = ev[torch.randperm(d, generator=gen)].to(dtype)
    if diag:
        return torch.diag(ev)
    A = torch.randn(d, d, generator=gen, dtype=dtype)
    U, _ = torch.linalg.qr(A)
    return U @ torch.diag(ev) @ U.mH


def kron_problem(structure: str, seed: int = 0, dtype=torch.float64):
    """``(shape, diag flags, H, factors)`` with ``H = H_1 ⊗ ... ⊗ H_k`` of the given structure."""
    gen = torch.Generator().manual_seed(seed)
    spec = STRUCTURES[structure]
    if not spec:
        return (), (), torch.tensor([[2.5]], dtype=dtype), [torch.tensor([[2.5]], dtype=dtype)]
    Hs = [random_spd(d, gen, dtype=dtype, diag=dg) for d, dg in spec]
    H = Hs[0]
    for Hi in Hs[1:]:
        H = torch.kron(H, Hi)
    return tuple(d for d, _ in spec), tuple(dg for _, dg in spec), H, Hs


def hvp(H: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``H v`` for a tensor ``v`` whose flattening indexes ``H``."""
    return (H @ v.reshape(-1)).reshape(v.shape)


def fit_error(P: torch.Tensor, H: torch.Tensor) -> float:
    """``‖P H − I‖_F / ‖I‖_F``."""
    n = H.shape[0]
    eye = torch.eye(n, dtype=H.dtype)
    return (torch.linalg.matrix_norm(P @ H - eye) / math.sqrt(n)).item()
