"""Where the fitting pair ``(v, h)`` comes from, and its damping (docs/maths.md §2).

- whitening: ``h = g`` (gradient or momentum), ``v`` a probe independent of it (or integrated out);
- Newton: ``v ~ N(0, I)``, ``h = H v`` from autograd (double backward) or finite differences.

Randomness is drawn ahead of the maths (``draw``) from a generator the caller owns, so the maths
itself is deterministic given its inputs (and traces under ``torch.compile``). Tensors here are
stacks ``(B, *shape)`` as in ``psgd_lab.factors``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .factors import batch_mean
from .structure import KronPlan

HVP_METHODS = ("autograd", "finite_difference")
SQRT_EPS_F32 = torch.finfo(torch.float32).eps ** 0.5
# The floor of kron-torch's relative damping. With h = 0 the relative term vanishes, nothing
# balances T2 and Q grows by ~(1 + lr) per update until it overflows. Floored, P settles near
# 1/KRON_DAMP_FLOOR, and any mean|h| above 3e-17 (every real gradient) gives exactly kron-torch's
# pair. (All-zero gradients do not reach the fit at all in ``Kron``: they carry no information.)
KRON_DAMP_FLOOR = 1e-20


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``N(0, I)`` of ``x``'s shape, dtype and device, drawn from ``generator``."""
    return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


def _per_tensor(x: Tensor, like: Tensor) -> Tensor:
    return x.reshape(x.shape + (1,) * (like.dim() - 1))


def damp(h: Tensor, damping: float, noise: Tensor) -> Tensor:
    """``h + (damping + eps·|h|) ⊙ n`` with ``n ~ N(0, I)`` drawn ahead (the newer reference):
    bounds ``P ≤ I / damping``."""
    eps = torch.finfo(h.dtype).eps
    return h + (damping + eps * h.abs()) * noise


def kron_torch_damp(h: Tensor, v: Tensor, numel: Tensor | None = None,
                    inplace: bool = False) -> Tensor:  # fmt: skip
    """kron-torch's damping, per tensor of the stack: ``h + max(sqrt(eps_f32)·mean|h|, 1e-20)·v``
    with the pair's own probe ``v`` (``numel``: see ``factors.batch_mean``). ``inplace``: ``h`` is
    the caller's temporary, damped in its own storage (the same values, no fresh copy)."""
    mean = batch_mean(h.abs(), numel)
    scale = _per_tensor((SQRT_EPS_F32 * mean).clamp(min=KRON_DAMP_FLOOR), h)
    return h.addcmul_(v, scale) if inplace else torch.addcmul(h, v, scale)


@dataclass
class Draws:
    """What one preconditioner update draws, in this order: the probe ``v`` (whitening's, or
    Newton's ``v`` for ``Hv``), the damping noise (a float damping), and the norm bound's random
    starts (one per factor, None where none is drawn)."""

    v: Tensor | None = None
    noise: Tensor | None = None
    starts: list[Tensor | None] = field(default_factory=list)

    @staticmethod
    def stack(draws: Sequence[Draws]) -> Draws:
        """One ``Draws`` for a stack from each tensor's own (unbatched) draws."""

        def st(xs):
            return None if xs[0] is None else torch.stack(list(xs))

        return Draws(
            v=st([d.v for d in draws]),
            noise=st([d.noise for d in draws]),
            starts=[st(list(s)) for s in zip(*(d.starts for d in draws))],
        )


def draw(
    plan: KronPlan,
    starts: Sequence[tuple[int, ...] | None],
    *,
    probe: bool,
    noise: bool,
    dtype: torch.dtype,
    device: torch.device | str | None,
    generator: torch.Generator | None,
    randn: Callable = torch.randn,
) -> Draws:
    """Draw one tensor's ``Draws`` (no batch dim) from ``generator``: the probe if ``probe``,
    damping noise if ``noise``, then each start of ``starts`` (``Geometry.starts``)."""

    def normal(shape):
        return randn(shape, dtype=dtype, device=device, generator=generator)

    return Draws(
        v=normal(plan.shape) if probe else None,
        noise=normal(plan.shape) if noise else None,
        starts=[None if s is None else normal(s) for s in starts],
    )


def damped(h: Tensor, damping: float | str, probe: Tensor | None, noise: Tensor | None,
           numel: Tensor | None = None, h_owned: bool = False) -> Tensor:  # fmt: skip
    """``h`` with its damping: ``"kron"`` (kron-torch's, relative, with the pair's probe), a
    float ``λ > 0`` (independent noise), or 0 (none). ``numel``: see ``factors.batch_mean``.
    ``h_owned``: ``h`` is a temporary of the caller's that kron-torch's damping may overwrite."""
    if damping == "kron":
        return kron_torch_damp(h, probe, numel, inplace=h_owned)
    if damping > 0:
        return damp(h, damping, noise)
    return h


# ---------------------------------------------------------------------------- Hessian-vector


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


def fd_delta(params: Sequence[Tensor], vs: Sequence[Tensor]) -> float:
    """The finite-difference step: ``sqrt(eps)`` of the parameters' dtype scaled by
    ``‖θ‖/‖v‖`` (at least ``sqrt(eps)``), so the perturbation is a relative one: in bf16 an
    absolute ``δ = 0.06`` is lost against ``|θ| ≫ 1`` or swamps ``|θ| ≪ 1``."""
    root = torch.finfo(params[0].dtype).eps ** 0.5
    theta = torch.sqrt(sum(p.detach().double().square().sum() for p in params))
    v = torch.sqrt(sum(x.double().square().sum() for x in vs)).clamp(min=1e-30)
    return root * max(1.0, float(theta / v))


def hvp_finite_difference(
    grad_fn: Callable[[], Sequence[Tensor]],
    params: Sequence[Tensor],
    vs: Sequence[Tensor],
    grads: Sequence[Tensor] | None = None,
    delta: float | None = None,
    return_v: bool = False,
):
    """``H v ≈ (g(θ + δv) − g(θ)) / δ`` (docs/maths.md §2), with ``δ = fd_delta(params, vs)`` unless
    given, in at least float32 (bf16 gradients would cancel to 0).

    ``grad_fn()`` returns the gradients at the current ``params``; ``grads`` are those at ``θ``
    if already known (saves one call). Parameters are restored exactly afterwards. In a low
    precision the step actually taken, ``(round(θ + δv) − θ)/δ``, differs from ``v``;
    ``return_v=True`` also returns it, so the pair stays exact: ``(hvs, vs_taken)``.
    Cost: one extra forward and backward pass; no second derivatives needed.
    """
    if grads is None:
        grads = [g.detach().clone() for g in grad_fn()]
    if delta is None:
        delta = fd_delta(params, vs)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, vs):
            p.add_(v.to(p.dtype), alpha=delta)
        taken = [(p.detach().to(_work(p)) - s.to(_work(p))) / delta for p, s in zip(params, saved)]
    try:
        shifted = [g.detach().clone() for g in grad_fn()]
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    hvs = [(gs.to(_work(gs)) - g0.to(_work(gs))) / delta for gs, g0 in zip(shifted, grads)]
    return (hvs, taken) if return_v else hvs


def _work(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)
