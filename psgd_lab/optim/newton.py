"""Newton mode's pairs: the closure's loss, its gradient and ``H v`` for the parameters whose
group updates ``P`` this step (docs/maths.md §2)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import distributed as dist_
from ..pairs import hvp_autograd, hvp_finite_difference


def call_closure(closure: Callable | None):
    """The closure's loss (with grad enabled), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        loss = closure()
    if loss is None:
        raise TypeError("the closure passed to Kron.step must return the loss; it returned None")
    return loss


def pairs(opt, closure: Callable | None, params: list[Tensor], probes: dict) -> tuple:
    """``(loss, {p: (v, Hv)})``: the closure's loss; its gradient *added* to each ``p.grad`` (as
    ``backward()`` would, so gradients accumulated over micro-batches before ``step`` count);
    ``Hv`` for each ``p`` of ``probes`` (``p -> v``, the parameter's dtype). Under a process
    group the gradient and ``Hv`` are averaged (DDP's hooks do not see ``autograd.grad``; every
    rank drew the same ``v``, so the mean ``Hv`` is the mean loss's)."""
    if closure is None:
        raise RuntimeError(
            "Kron(mode='newton') needs step(closure): a closure that evaluates the model and "
            "returns the loss (without calling backward())"
        )
    if any(dist_.is_dtensor(p) for p in params):
        raise NotImplementedError(
            "Kron(mode='newton') does not support FSDP2 (DTensor) parameters: FSDP2 reduces "
            "gradients in backward() hooks, which the optimiser's own autograd.grad/Hessian-"
            "vector products bypass. Use mode='whiten', or DDP"
        )
    upd = [p for p in params if p in probes]
    with torch.enable_grad():
        loss = call_closure(closure)
        if not isinstance(loss, Tensor) or not loss.requires_grad:
            raise TypeError(
                "in Newton mode the closure must return the loss as a tensor that requires "
                f"grad; got {type(loss).__name__}"
            )
        try:
            graph = bool(upd) and opt.hvp == "autograd"
            grads = torch.autograd.grad(loss, params, allow_unused=True, create_graph=graph)
        except RuntimeError as e:
            if "second time" not in str(e):
                raise
            raise RuntimeError(
                "Kron(mode='newton') differentiates the closure's loss itself: the closure "
                f"must not call backward() ({e})"
            ) from e
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        hvs: dict = {}
        if upd:
            by_p = dict(zip(params, grads))
            vs = [probes[p] for p in upd]
            if opt.hvp == "autograd":
                try:
                    hv = hvp_autograd([by_p[p] for p in upd], upd, vs)
                except RuntimeError as e:  # e.g. CPU fused attention: no double backward
                    if "derivative for" not in str(e) or "not implemented" not in str(e):
                        raise
                    raise RuntimeError(
                        "Kron(mode='newton', hvp='autograd') differentiates the gradient again, "
                        f"and an op of this model has no double backward ({e}); pass "
                        "hvp='finite_difference' (one extra forward and backward instead)"
                    ) from e
            else:

                def grad_fn():
                    out = torch.autograd.grad(call_closure(closure), upd, allow_unused=True)
                    return [torch.zeros_like(p) if g is None else g for p, g in zip(upd, out)]

                g0 = [by_p[p].detach() for p in upd]
                hv, vs = hvp_finite_difference(grad_fn, upd, vs, g0, return_v=True)
            hvs = {p: (v, x.detach()) for p, v, x in zip(upd, vs, hv)}
    grads = [g.detach() for g in grads]
    dist_.average([*grads, *(x for _, x in hvs.values())], opt.process_group)
    for p, g in zip(params, grads):
        p.grad = g.contiguous() if p.grad is None else p.grad + g
    return loss.detach(), hvs
