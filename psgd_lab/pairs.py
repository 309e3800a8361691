"""Where the fitting pair ``(v, h)`` comes from (MATH.md §2).

- whitening: ``h = g`` (gradient or momentum), ``v`` independent of it (or integrated out);
- Newton: ``v ~ N(0, I)``, ``h = H v`` from autograd (double backward) or finite differences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

HVP_METHODS = ("autograd", "finite_difference")


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``N(0, I)`` of ``x``'s shape, dtype and device, drawn from ``generator``."""
    return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


def damp(h: Tensor, damping: float, generator: torch.Generator | None = None) -> Tensor:
    """``h + (damping + eps·|h|) ⊙ n`` with ``n ~ N(0, I)``: bounds ``P ≤ I / damping``."""
    eps = torch.finfo(h.dtype).eps
    return h + (damping + eps * h.abs()) * randn_like(h, generator)


SQRT_EPS_F32 = torch.finfo(torch.float32).eps ** 0.5
# The floor of kron-torch's relative damping. With h = 0 (a gradient that is zero for many steps)
# the relative term vanishes, nothing balances T2 and Q grows by ~(1 + lr) per update until it
# overflows. Floored, P settles near 1/KRON_DAMP_FLOOR, T1 stays above float32's underflow, and
# any mean|h| above 3e-17 (every real gradient) gives exactly kron-torch's pair.
KRON_DAMP_FLOOR = 1e-20


def kron_torch_damp(h: Tensor, v: Tensor) -> Tensor:
    """kron-torch's damping: ``h + max(sqrt(eps_f32)·mean|h|, 1e-20)·v`` with the pair's ``v``."""
    return torch.addcmul(h, v, (SQRT_EPS_F32 * h.abs().mean()).clamp(min=KRON_DAMP_FLOOR))


def kron_torch_pair(m: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """kron-torch's whitening pair: ``v ~ N(0, I)``, ``h = m + sqrt(eps_f32)·mean|m|·v``."""
    v = randn_like(m, generator)
    return v, kron_torch_damp(m, v)


def hvp_autograd(
    grads: Sequence[Tensor], params: Sequence[Tensor], vs: Sequence[Tensor]
) -> list[Tensor]:
    """Exact ``H v`` by double backward; ``grads`` must come from ``backward(create_graph=True)``.

    Cost: one extra backward pass through the graph of the gradient (about 2x a plain backward),
    and the graph of the first backward is kept alive until this returns.
    """
    # a gradient with no graph (its parameter is not in the loss, or enters it linearly) has
    # H v = 0 for that block; autograd refuses it as an output, so leave it out
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    out: list[Tensor | None] = [None] * len(params)
    if live:
        hv = torch.autograd.grad(
            [grads[i] for i in live], params, [vs[i] for i in live], allow_unused=True
        )
        out = list(hv)
    return [torch.zeros_like(p) if x is None else x for p, x in zip(params, out)]


def hvp_finite_difference(
    grad_fn: Callable[[], Sequence[Tensor]],
    params: Sequence[Tensor],
    vs: Sequence[Tensor],
    grads: Sequence[Tensor] | None = None,
    delta: float | None = None,
) -> list[Tensor]:
    """``H v ≈ (g(θ + δv) − g(θ)) / δ`` with ``δ = sqrt(eps(dtype))`` (MATH.md §2).

    ``grad_fn()`` returns the gradients at the current ``params``; ``grads`` are those at ``θ``
    if already known (saves one call). Parameters are restored exactly afterwards.
    Cost: one extra forward and backward pass; no second derivatives needed.
    """
    if grads is None:
        grads = [g.detach().clone() for g in grad_fn()]
    if delta is None:
        delta = torch.finfo(params[0].dtype).eps ** 0.5
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, vs):
            p.add_(v.to(p.dtype), alpha=delta)
    try:
        shifted = [g.detach().clone() for g in grad_fn()]
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return [(gs - g0) / delta for gs, g0 in zip(shifted, grads)]
