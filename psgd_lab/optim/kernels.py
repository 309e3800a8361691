"""The maths of one ``Kron`` step for the parameters of one group (docs/maths.md §5), in two
kernels.

- ``single_step``: the plain reference, one tensor at a time, reading like the paper; a
  non-finite gradient is found on the host and the tensor skipped.
- ``stacked_step``: the maths of the grouped kernel (``grouped``): tensors of equal structure
  (factor shape, diagonal flags, dtypes, device) stacked, each line one batched op for the whole
  stack; a non-finite or all-zero gradient is masked on the device (``torch.where``), so the
  step needs no host sync. The default.

Both end in the same thing per tensor: the update direction ``u`` (in the factor shape) and a
flag ``ok`` (False: non-finite, skipped), to be applied as ``θ ← θ·(1 − lr·wd·ok) − lr·u``
(``apply_updates``). Both share the maths of the fit (``geometry.fit``) and of applying ``P``
(``precondition``), so a tested difference between them can only come from stacking and masking.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import factors
from .. import geometry as geo
from ..pairs import Draws
from ..structure import KronPlan
from .config import Hyper
from .padding import paddable

CHUNK_BYTES = 32 * 2**20  # at most this much gradient and factors per stack (or one tensor)


@dataclass
class Item:
    """One parameter this step, as the kernels see it."""

    p: Tensor  # the parameter (the kernels never write it)
    grad: Tensor  # its whole gradient (gathered for FSDP2), the parameter's shape and dtype
    state: dict  # step, momentum_buffer, Q (and L with lipschitz="ema", initialised)
    plan: KronPlan
    draws: Draws | None = None  # this update's draws (no batch dim); None on apply-only steps
    hv: tuple[Tensor, Tensor] | None = None  # Newton mode: (v, H v), the parameter's shape

    def key(self) -> tuple:
        """Tensors with equal keys are stacked together: equal plans, or any vectors and scalars
        with a diagonal factor (zero-padded to a common length, ``padding.Rows``)."""
        st = self.state
        plan = "padded" if paddable(self.plan) else self.plan
        return (plan, self.grad.dtype, st["momentum_buffer"].dtype, st["Q"][0].dtype,
                self.grad.device, self.hv is not None)  # fmt: skip


def cached_dims(plan: KronPlan, prob: float | None) -> tuple[bool, ...]:
    """Which factors keep ``P_i = Q_iᴴQ_i`` between updates: diagonal ones always; a dense one
    while ``prob · d_i² ≤ numel`` (its ``d_i³`` product after each update of ``Q`` is cheaper
    than the ``d_i · numel`` product it saves on every step). ``prob=None``: none (no cache)."""
    numel = max(plan.numel, 1)
    if prob is None:
        return (False,) * max(len(plan.shape), 1)
    if not plan.shape:
        return (True,)
    return tuple(dg or prob * d * d <= numel for d, dg in zip(plan.shape, plan.diag))


def precondition(
    Q: Sequence[Tensor], X: Tensor, hy: Hyper, keep: tuple[bool, ...], cached: list | None
) -> tuple[Tensor, list | None]:
    """``P X`` for stacks, axis by axis, dense factors first (``factors.dense_first``): a
    cached ``P_i`` where ``keep[i]`` (computed now if ``cached`` lacks it), else
    ``Q_iᴴ (Q_i X)``. Returns ``(P X, the P_i to keep)``; factors of ``P`` (``PRO4P``,
    ``QUAD4P``) are applied as they are."""
    if hy.geometry.fits_p:
        return factors.apply_q(Q, X), None
    P = list(cached) if cached is not None else [None] * len(Q)
    fresh = False  # X is the caller's (the momentum itself) until a first product
    for i in factors.dense_first([q if q is not None else p for q, p in zip(Q, P)]):
        q = Q[i]  # None on apply-only steps that keep every P_i
        if keep[i]:
            if P[i] is None:
                P[i] = factors.factor_p_compact(q, hy.geometry.triangular)
            if factors.is_dense(P[i]):
                X = factors.apply_one(P[i], i, X)
            else:  # a diagonal P_i scales a fresh product in place
                X = factors.scale_axis(X, P[i], i, fresh)
        else:
            P[i] = None
            X = _apply_p_one(q, i, X, hy.geometry.triangular)
        fresh = True
    return X, P


def _apply_p_one(q: Tensor, i: int, X: Tensor, triangular: bool) -> Tensor:
    """``Q_iᴴ (Q_i X)``; a large upper-triangular factor reads only its upper blocks
    (``linalg.triu_mm``, ``triu_h_mm``): fewer bytes where the product is memory-bound (a
    1x1-convolution-like unfolding with few columns), 5/8 of the FLOPs where it is not."""
    if triangular and factors.is_dense(q):
        _, a, d, b = factors._axes(X, i)
        if min(a, b) == 1:  # along the first or the last axis
            one_pass = factors.one_pass(q, a * b)
            # measured: the blocks win from d = 2048 at any width, and at d = 1024 from 64 columns
            if one_pass or (d > 256 and (d >= 2048 or a * b >= 64)):
                return factors.apply_p_one_triangular(q, i, X, one_pass=one_pass)
    return factors.apply_one(factors.adjoint(q), i, factors.apply_one(q, i, X))


def _pair(hy: Hyper, m_hat: Tensor, g: Tensor, hv) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(h, v, what decides an all-zero pair)``: whitening fits ``m̂`` (or ``g``), Newton
    ``(v, Hv)``; a step whose gradient (Newton: ``Hv``) is all zero carries no information."""
    if hv is not None:
        v, h = hv
        return h, v, h
    return (m_hat if hy.momentum_into_precond_update else g), None, g


def _fit(hy: Hyper, Q: list, state_L, h, v, draws: Draws, balance: bool, init, numel=None,
         h_owned: bool = False) -> list:  # fmt: skip
    """Balance (if due), the data-driven initial scale (if pending), one fit; Lipschitz state.
    ``numel``: per tensor, its length in a zero-padded stack (``padding``); None: the shape's.
    ``h_owned``: ``h`` is this step's own temporary (see ``geo.fit``)."""
    if balance and len(Q) > 1:
        factors.balance(Q)
    if init is not None:  # precond_init_scale=None: scale Q to the first informative pair
        s = factors.data_scale(h, v, hy.init_damping, len(Q), hy.geometry.fits_p, numel)
        s = torch.where(init, torch.ones_like(s), s)
        for q in Q:
            q.mul_(s.reshape(s.shape + (1,) * (q.dim() - 1)).to(q.dtype))
    real = torch.promote_types(Q[0].real.dtype, torch.float32)
    L = state_L if state_L is not None else [h.new_zeros(h.shape[0], dtype=real) for _ in Q]
    geo.fit(hy.geometry, Q, L, h, v, draws, lr=hy.precond_lr, lipschitz=hy.lipschitz,
            beta_L=hy.beta_L, norm_bound=hy.norm_bound, damping=hy.damping,
            numel=numel, h_owned=h_owned)  # fmt: skip
    return L


def _clip(Pm: Tensor, debias: Tensor, hy: Hyper, numel: Tensor | None = None):
    """Per tensor of the stack: ``(scale, finite)`` with ``u = scale · P m`` = ``P m̂`` clipped
    to RMS ``hy.clip_max_amp`` (1.1: kron-torch's, docs/maths.md §5.4) with ``clip="tensor"``,
    else ``P m̂`` as it is (``"global"`` clips the whole group afterwards: ``clip_global``); ``P``
    is linear, so the debias folds into the scale. ``finite``: where the norm the clip takes is
    finite, so is ``P m`` (None: no norm taken). ``numel``: the tensors' lengths in a zero-padded
    stack (``√n`` rounded from double, as the Python float of a plain stack is)."""
    if hy.clip != "tensor":
        return 1 / debias, None
    if numel is None:
        root = math.sqrt(math.prod(Pm.shape[1:]))
    else:
        root = numel.double().sqrt().to(debias.dtype)
    norm = torch.linalg.vector_norm(Pm.reshape(Pm.shape[0], -1), dim=1)
    rms = norm / (root * debias)
    return torch.clamp(hy.clip_max_amp / (rms + 1e-12), max=1.0) / debias, torch.isfinite(norm)


def _debias(b1: float, steps: Tensor, dtype: torch.dtype) -> Tensor:
    """``1 − b1ᵗ`` per tensor, in ``dtype``'s real precision (at least float32)."""
    real = _REAL.get(dtype) or torch.promote_types(torch.empty(0, dtype=dtype).real.dtype,
                                                   torch.float32)  # fmt: skip
    # before the first finite step (t = 0, 1 − b1⁰ = 0) the momentum is 0 and any positive
    # value does: the clamp keeps the division finite in one op where torch.where takes three
    return (1 - torch.pow(b1, steps.to(real))).clamp_(min=torch.finfo(real).tiny)


_REAL = {torch.float32: torch.float32, torch.float64: torch.float64,
         torch.bfloat16: torch.float32, torch.float16: torch.float32,
         torch.complex64: torch.float32, torch.complex128: torch.float64}  # fmt: skip


def _known(mask: Tensor) -> bool | None:
    """Whether every entry of ``mask`` holds, where knowing it costs nothing: eagerly on the
    CPU (a host read there waits for no device). None on an accelerator or under
    ``torch.compile``: the kernel then masks on the device instead, without a sync. With
    ``False`` (some entry fails) the caller masks too; it is only ``True`` that skips work."""
    if mask.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    return True if bool(mask.all()) else None


def _momentum(M: Tensor, G: Tensor, b1: float, ok: Tensor, every: bool | None) -> Tensor:
    """``m <- b1·m + (1 − b1)·g`` (docs/maths.md §5.1) in place where ``ok``, ``m`` where not: a
    weight of 0 keeps ``m`` exactly, and ``nan_to_num`` (the identity on a finite gradient)
    keeps NaN out of ``0·(g − m)``. Arithmetic, not ``torch.where`` (several times slower on
    the CPU). ``every``: all ``ok`` (known on the host), so no masking. Returns ``M``."""
    if every:
        return M.lerp_(G.to(M.dtype), 1 - b1)
    weight = ok.to(M.real.dtype) * (1 - b1)  # in M's precision: a float32 0.1 is not 1 − b1
    return M.lerp_(torch.nan_to_num(G.to(M.dtype)), _per(weight, M))


def _per(x: Tensor, like: Tensor) -> Tensor:
    """A per-tensor ``(B,)`` value shaped to broadcast against the stack ``like``."""
    return x.reshape(x.shape + (1,) * (like.dim() - 1))


# ---------------------------------------------------------------------------- the reference


def single_step(items: Sequence[Item], hy: Hyper, *, do_update: bool, prob: float | None,
                balance: bool, cache: dict) -> list[tuple[Tensor, Tensor]]:  # fmt: skip
    """The reference kernel: each tensor on its own (a stack of one), skipped on the host when
    its gradient (or ``Hv``) is not finite. ``cache``: ``id(p) -> P_i`` between calls."""
    out = []
    for it in items:
        st, fshape = it.state, it.plan.shape
        g = it.grad.reshape(1, *fshape)
        hv = None if it.hv is None else tuple(x.reshape(1, *fshape) for x in it.hv)
        finite = torch.isfinite(g).all() & (True if hv is None else torch.isfinite(hv[1]).all())
        if not bool(finite):
            out.append((torch.zeros(fshape, dtype=st["Q"][0].dtype, device=g.device),
                        torch.zeros((), dtype=torch.bool, device=g.device)))  # fmt: skip
            continue
        m = st["momentum_buffer"].view(1, *fshape)
        _momentum(m, g, hy.b1, finite.reshape(1), True)
        st["step"] += 1
        Q = [q.unsqueeze(0) for q in st["Q"]]  # views: updated in place
        pd = Q[0].dtype
        debias = _debias(hy.b1, st["step"].reshape(1), pd)
        m_p = m.to(pd)
        if do_update:
            pair = None if hv is None else (hv[0].to(pd), hv[1].to(pd))
            h, v, info = _pair(hy, (m_p / _per(debias, m_p)).to(pd), g.to(pd), pair)
            if bool((info != 0).any()):
                init = None
                if hy.init_scale is None:
                    init = st["initialised"].reshape(1)
                L = None if "L" not in st else [x.reshape(1) for x in st["L"]]
                backup = [x.clone() for x in [*Q, *(L or [])]]
                _fit(hy, Q, L, h, v, Draws.stack([it.draws]), balance, init)
                if not all(bool(torch.isfinite(q).all()) for q in Q):  # overflowed: keep Q
                    torch._foreach_copy_([*Q, *(L or [])], backup)
                if init is not None:
                    st["initialised"].fill_(True)
            cache.pop(id(it.p), None)
        keep = cached_dims(it.plan, prob)
        Pm, cache[id(it.p)] = precondition(Q, m_p, hy, keep, cache.get(id(it.p)))
        if not bool(torch.isfinite(Pm).all()):  # P m̂ overflowed (a 1e20 entry): skip the step
            out.append(
                (torch.zeros_like(Pm[0]), torch.zeros((), dtype=torch.bool, device=g.device))
            )
            continue
        u = Pm.mul_(_per(_clip(Pm, debias, hy)[0], Pm))
        out.append((u[0], torch.ones((), dtype=torch.bool, device=g.device)))
    return out


# ---------------------------------------------------------------------------- the grouped kernel


def stacked_step(G, M, steps, Q, L, init, hv, draws, *, hy: Hyper, pd: torch.dtype,
                 do_update: bool, balance: bool, keep: tuple, cached, numel=None):  # fmt: skip
    """The grouped maths on stacks, without host syncs (a pure function of its inputs; what
    ``Kron(compile=True)`` compiles): returns ``(M, steps, Q, L, init, u, ok, P_i kept)``.
    ``numel``: per tensor, its length in a zero-padded stack of vectors (``padding.Rows``)."""
    top = _top(G)  # max|g|: finite, and not all zero
    ok = _finite(top)
    if hv is not None:
        top = _top(hv[1])
        ok = ok & _finite(top)
    all_ok = _known(ok)
    M = _momentum(M, G, hy.b1, ok, all_ok)
    steps = steps + ok
    debias = _debias(hy.b1, steps, pd)
    m_p = M.to(pd)
    if do_update:
        pair = None if hv is None else (hv[0].to(pd), hv[1].to(pd))
        h, v, _ = _pair(hy, (m_p / _per(debias, m_p)).to(pd), G.to(pd), pair)
        fit_ok = ok & (top != 0)
        every = _known(fit_ok)
        if every:  # the CPU knows every pair is fit: update in place (L too), keep a copy
            work, L_work = Q, L
            Q, L = [q.clone() for q in Q], None if L is None else [x.clone() for x in L]
        else:  # unknown (an accelerator, compiled) or mixed: fit copies, then mask
            work = [q.clone() for q in Q]
            L_work = None if L is None else [x.clone() for x in L]
        owned = hv is None and hy.momentum_into_precond_update  # h is m̂, made just above
        fitted_L = _fit(hy, work, L_work, h, v, draws, balance, init, numel, owned)
        L_work = None if L is None else fitted_L  # lipschitz="kron" keeps no L
        for w in work:  # a fit that overflowed (a 1e20 gradient once P has grown) keeps Q
            fit_ok = fit_ok & _finite(_top(w))
        if _known(fit_ok):
            Q, L = work, L_work
        else:
            Q = [torch.where(_per(fit_ok, q), w, q) for q, w in zip(Q, work)]
            if L is not None:
                L = [torch.where(fit_ok, w, x) for x, w in zip(L, L_work)]
        if init is not None:
            init = init | fit_ok
        cached = None
    Pm, cached = precondition(Q, m_p, hy, keep, cached)
    scale, finite = _clip(Pm, debias, hy, numel)
    if finite is None or not _known(finite):  # a finite norm says it; else look at P m̂
        finite = _finite(_top(Pm))  # it can overflow where m̂ is finite (a 1e20 entry): skip it
        ok, all_ok = ok & finite, None
    if not all_ok:  # (with every norm finite and every gradient too, the scale is as it is)
        scale = torch.nan_to_num(scale) * ok
    if not (all_ok or _known(ok)):  # inf · 0 is NaN: zero the skipped tensors' updates outright
        Pm = torch.where(_per(ok, Pm), Pm, 0)
    return M, steps, Q, L, init, Pm.mul_(_per(scale, Pm)), ok, cached


def _top(x: Tensor) -> Tensor:
    """Per tensor of the stack, ``max|x|``: NaN or Inf where ``x`` has one, 0 where it is all
    zero. A large real tensor's from its maximum and minimum, without a temporary: fused
    ``torch.aminmax`` over a dim is many times slower on the CPU, and so is ``abs().amax()``'s copy
    of a large tensor (page faults), and the infinity norm 10-20x; a small tensor's ``|x|`` copy
    costs less than the two dispatches it saves."""
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] == 0:
        return flat.new_zeros(flat.shape[0], dtype=flat.real.dtype)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(flat.shape[0], -1)
    if flat.shape[1] <= 4096:
        return flat.abs().amax(dim=1)  # NaN propagates
    return torch.maximum(flat.amax(dim=1), flat.amin(dim=1).neg_())


def _finite(top: Tensor) -> Tensor:
    """``_top``'s tensors that are finite (one op: ``torch.isfinite`` dispatches four)."""
    return top < math.inf  # False for NaN and Inf
