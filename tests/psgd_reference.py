"""The PSGD reference implementation's (``psgd.py``) Kron steps written out in float64, from its
published formulas, for the tests that check psgd_lab against them (tests/test_presets.py step by
step, tests/test_geometry.py the error a whitening fit settles at)."""

from __future__ import annotations

import torch

F64 = torch.float64


def bound(A: torch.Tensor, start: torch.Tensor, skew: bool = False) -> torch.Tensor:
    """psgd.py's norm_lower_bound_spd/_skh: normalise, turn the random rows towards A's largest
    row, two half-iterations ``V <- V A``, rows normalised, ``V A``; the largest row norm."""
    tiny = torch.finfo(A.dtype).smallest_normal
    nf = (A.abs().amax() if skew else A.diagonal().amax()) + tiny
    A = A / nf
    row = A[torch.argmax(torch.linalg.vector_norm(A, dim=1))]
    V = row + torch.sign((row * start).sum(dim=1, keepdim=True)) * start
    for _ in range(2):
        V = V @ A
        V = V / (torch.linalg.vector_norm(V, dim=1, keepdim=True) + tiny)
        V = V @ A
    return nf * torch.linalg.vector_norm(V, dim=1).amax()


def procrustes(q: torch.Tensor, start: torch.Tensor) -> None:
    """psgd.py's procrustes_step2: rotate ``q`` by ``exp(aR)``, ``R = qᵀ − q`` normalised,
    ``a = min(−tr(Rq)/tr(RRq), 1/8)`` when ``tr(RRq) < 0``."""
    R = q.T - q
    R = R / (bound(R, start, skew=True) + torch.finfo(q.dtype).smallest_normal)
    RQ = R @ q
    RRQ = R @ RQ
    tr_RQ, tr_RRQ = RQ.trace(), RRQ.trace()
    eighth = torch.tensor(1 / 8, dtype=q.dtype)
    a = torch.clamp(-tr_RQ / tr_RRQ, max=1 / 8) if tr_RRQ < 0 else eighth
    q.add_(a * (RQ + 0.5 * a * RRQ))


def along(q: torch.Tensor, i: int, X: torch.Tensor) -> torch.Tensor:
    """Factor ``q`` (dense ``(d, d)`` or diagonal ``(d,)``) applied along axis ``i`` of ``X``."""
    Xi = X.movedim(i, 0)
    flat = Xi.reshape(Xi.shape[0], -1)
    out = q[:, None] * flat if q.dim() == 1 else q @ flat
    return out.reshape(Xi.shape).movedim(0, i)


def gram(i: int, X: torch.Tensor, dense: bool) -> torch.Tensor:
    """psgd.py's exprGs[i](X, X): the contraction of X with itself over every axis but ``i``."""
    Xi = X.movedim(i, 0).reshape(X.shape[i], -1)
    return Xi @ Xi.T if dense else (Xi * Xi).sum(dim=1)


def apply_p(Q: list, X: torch.Tensor) -> torch.Tensor:
    for i, q in enumerate(Q):
        X = along(q.T if q.dim() == 2 else q, i, along(q, i, X))
    return X


class RefKron:
    """One tensor's Q (a list of factors) and L, as psgd.py's init_kron keeps them."""

    def __init__(self, shape, dense: tuple[bool, ...], dtype: torch.dtype = F64):
        self.shape, self.dense, self.dtype = shape, dense, dtype
        self.Q, self.L = None, [torch.zeros((), dtype=dtype) for _ in shape]

    def init(self, scale: torch.Tensor) -> None:
        s = scale ** (1 / len(self.shape))
        self.Q = [s * (torch.eye(d, dtype=self.dtype) if dn else torch.ones(d, dtype=self.dtype))
                  for d, dn in zip(self.shape, self.dense)]  # fmt: skip

    def _ema(self, i: int, ell: torch.Tensor) -> torch.Tensor:
        self.L[i] = torch.maximum(0.9 * self.L[i] + 0.1 * ell, ell)
        return self.L[i]

    def whiten(self, G, noise, starts, turns, lr=0.1, damping=1e-9) -> None:
        """update_precond_kron_whiten_q0p5eq1p5."""
        n = G.numel()
        Pg = apply_p(self.Q, G + (damping + torch.finfo(self.dtype).eps * G.abs()) * noise)
        for i, q in enumerate(self.Q):
            term1, term2 = gram(i, Pg, self.dense[i]), n / q.shape[0]
            if not self.dense[i]:
                L = self._ema(i, term1.amax() + term2)
                q.mul_(1 - lr / L * (term1 - term2))
            else:
                L = self._ema(i, bound(term1, starts.pop(0)) + term2)
                q.sub_(lr / L * (term1 @ q - term2 * q))
                procrustes(q, turns.pop(0))

    def newton(self, V, Hv, noise, starts, turns, lr=0.1, damping=1e-9) -> None:
        """update_precond_kron_newton_q0p5eq1p5."""
        Ph = apply_p(self.Q, Hv + damping * noise)
        for i, q in enumerate(self.Q):
            term1, term2 = gram(i, Ph, self.dense[i]), gram(i, V, self.dense[i])
            if not self.dense[i]:
                L = self._ema(i, (term1 + term2).amax())
                q.mul_(1 - lr / L * (term1 - term2))
            else:
                L = self._ema(i, bound(term1 + term2, starts.pop(0)))
                q.sub_(lr / L * (term1 - term2) @ q)
                procrustes(q, turns.pop(0))
