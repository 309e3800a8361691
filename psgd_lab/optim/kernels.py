"""The maths of one ``Kron`` step for the parameters of one group (docs/maths.md §5), in two
kernels.

- ``single_step``: the plain reference, one tensor at a time, reading like the paper; a
  non-finite gradient is found on the host and the tensor skipped.
- ``grouped_step``: tensors of equal structure (factor shape, diagonal flags, dtypes, device)
  stacked, each line one batched op for the whole stack; a non-finite or all-zero gradient is
  masked on the device (``torch.where``), so the step needs no host sync. The default.

Both end in the same thing per tensor: the update direction ``u`` (in the factor shape) and a
flag ``ok`` (False: non-finite, skipped), to be applied as ``θ ← θ·(1 − lr·wd·ok) − lr·u``
(``apply_updates``). Both share the maths of the fit (``geometry.fit``) and of applying ``P``
(``precondition``), so a tested difference between them can only come from stacking and masking.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import factors
from .. import geometry as geo
from ..pairs import Draws
from ..structure import KronPlan
from .config import Hyper
from .padding import layout, paddable, split, stack, stack_draws

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
    """``P X`` for stacks, axis by axis: a cached ``P_i`` where ``keep[i]`` (computed now if
    ``cached`` lacks it), else ``Q_iᴴ (Q_i X)``. Returns ``(P X, the P_i to keep)``; factors of
    ``P`` (``PRO4P``, ``QUAD4P``) are applied as they are."""
    if hy.geometry.fits_p:
        return factors.apply_q(Q, X), None
    P = list(cached) if cached is not None else [None] * len(Q)
    for i, q in enumerate(Q):
        if keep[i]:
            if P[i] is None:
                P[i] = factors.factor_p_compact(q, hy.geometry.triangular)
            X = factors.apply_one(P[i], i, X)
        else:
            P[i] = None
            X = _apply_p_one(q, i, X, hy.geometry.triangular)
    return X, P


def _apply_p_one(q: Tensor, i: int, X: Tensor, triangular: bool) -> Tensor:
    """``Q_iᴴ (Q_i X)``; a large upper-triangular factor reads only its upper blocks
    (``linalg.triu_mm``, ``triu_h_mm``): fewer bytes where the product is memory-bound (a
    1x1-convolution-like unfolding with few columns), 5/8 of the FLOPs where it is not."""
    if triangular and factors.is_dense(q):
        _, a, d, b = factors._axes(X, i)
        # measured: the blocks win from d = 2048 at any width, and at d = 1024 from 64 columns
        if d > 256 and min(a, b) == 1 and (d >= 2048 or a * b >= 64):
            return factors.apply_p_one_triangular(q, i, X)
    return factors.apply_one(factors.adjoint(q), i, factors.apply_one(q, i, X))


def _pair(hy: Hyper, m_hat: Tensor, g: Tensor, hv) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(h, v, what decides an all-zero pair)``: whitening fits ``m̂`` (or ``g``), Newton
    ``(v, Hv)``; a step whose gradient (Newton: ``Hv``) is all zero carries no information."""
    if hv is not None:
        v, h = hv
        return h, v, h
    return (m_hat if hy.momentum_into_precond_update else g), None, g


def _fit(hy: Hyper, Q: list, state_L, h, v, draws: Draws, balance: bool, init, numel=None) -> list:
    """Balance (if due), the data-driven initial scale (if pending), one fit; Lipschitz state.
    ``numel``: per tensor, its length in a zero-padded stack (``padding``); None: the shape's."""
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
            numel=numel)  # fmt: skip
    return L


def _clip(Pm: Tensor, debias: Tensor, hy: Hyper, numel: Tensor | None = None) -> Tensor:
    """Per tensor of the stack: ``scale`` with ``u = scale · P m`` = ``P m̂`` clipped to RMS
    ``hy.clip_max_amp`` (1.1: kron-torch's, docs/maths.md §5.4) with ``clip="tensor"``, else
    ``P m̂`` as it is (``"global"`` clips the whole group afterwards: ``clip_global``); ``P`` is
    linear, so the debias folds into the scale. ``vector_norm`` along the contiguous last dim is
    fast and accumulates in double on the CPU (no overflow). ``numel``: the tensors' lengths in a
    zero-padded stack (``√n`` rounded from double, as the Python float of a plain stack is)."""
    if hy.clip != "tensor":
        return 1 / debias
    if numel is None:
        root = math.sqrt(math.prod(Pm.shape[1:]))
    else:
        root = numel.double().sqrt().to(debias.dtype)
    rms = torch.linalg.vector_norm(Pm.reshape(Pm.shape[0], -1), dim=1) / (root * debias)
    return torch.clamp(hy.clip_max_amp / (rms + 1e-12), max=1.0) / debias


def _debias(b1: float, steps: Tensor, like: Tensor) -> Tensor:
    """``1 − b1ᵗ`` per tensor; 1 before a tensor's first finite step (its momentum is still 0)."""
    real = torch.promote_types(like.real.dtype, torch.float32)
    return torch.where(steps > 0, 1 - torch.pow(b1, steps.to(real)), 1.0)


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
        debias = _debias(hy.b1, st["step"].reshape(1), Q[0])
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
        u = Pm.mul_(_per(_clip(Pm, debias, hy), Pm))
        out.append((u[0], torch.ones((), dtype=torch.bool, device=g.device)))
    return out


# ---------------------------------------------------------------------------- the grouped kernel


def stacked_step(G, M, steps, Q, L, init, hv, draws, *, hy: Hyper, pd: torch.dtype,
                 do_update: bool, balance: bool, keep: tuple, cached, numel=None):  # fmt: skip
    """The grouped maths on stacks, without host syncs (a pure function of its inputs; what
    ``Kron(compile=True)`` compiles): returns ``(M, steps, Q, L, init, u, ok, P_i kept)``.
    ``numel``: per tensor, its length in a zero-padded stack of vectors (``padding.Rows``)."""
    finite, nonzero = _stats(G)
    if hv is not None:
        hv_finite, nonzero = _stats(hv[1])
        finite = finite & hv_finite
    ok = finite
    M = _momentum(M, G, hy.b1, ok, _known(ok))
    steps = steps + ok
    debias = _debias(hy.b1, steps, M.new_empty(0, dtype=pd))
    m_p = M.to(pd)
    if do_update:
        pair = None if hv is None else (hv[0].to(pd), hv[1].to(pd))
        h, v, _ = _pair(hy, (m_p / _per(debias, m_p)).to(pd), G.to(pd), pair)
        fit_ok = ok & nonzero
        every = _known(fit_ok)
        if every:  # the CPU knows every pair is fit: update in place (L too), keep a copy
            work, L_work = Q, L
            Q, L = [q.clone() for q in Q], None if L is None else [x.clone() for x in L]
        else:  # unknown (an accelerator, compiled) or mixed: fit copies, then mask
            work = [q.clone() for q in Q]
            L_work = None if L is None else [x.clone() for x in L]
        fitted_L = _fit(hy, work, L_work, h, v, draws, balance, init, numel)
        L_work = None if L is None else fitted_L  # lipschitz="kron" keeps no L
        for w in work:  # a fit that overflowed (a 1e20 gradient once P has grown) keeps Q
            fit_ok = fit_ok & _stats(w)[0]
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
    ok = ok & _stats(Pm)[0]  # P m̂ can overflow where m̂ is finite (a 1e20 entry): skip it
    scale = torch.nan_to_num(_clip(Pm, debias, hy, numel)) * ok
    if not _known(ok):  # inf · 0 is NaN: zero the skipped tensors' updates outright
        Pm = torch.where(_per(ok, Pm), Pm, 0)
    return M, steps, Q, L, init, Pm.mul_(_per(scale, Pm)), ok, cached


def _stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per tensor of the stack: all finite, and not all zero, from its maximum and minimum (NaN
    and ±Inf reach one of them; the tensor is all zero iff both are 0). No temporary: fused
    ``torch.aminmax`` over a dim is many times slower on the CPU, and so is ``abs().amax()``'s
    copy of a large tensor (page faults); a small one's copy costs less than the dispatches it
    saves."""
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] == 0:
        none = torch.zeros(flat.shape[0], dtype=torch.bool, device=x.device)
        return ~none, none
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(flat.shape[0], -1)
    if flat.shape[1] <= 4096:
        top = flat.abs().amax(dim=1)  # NaN propagates
        return torch.isfinite(top), top != 0
    hi, lo = flat.amax(dim=1), flat.amin(dim=1)
    return torch.isfinite(hi) & torch.isfinite(lo), (hi != 0) | (lo != 0)


def chunks(items: Sequence[Item], cap: int = CHUNK_BYTES) -> list[list[Item]]:
    """Items grouped by ``Item.key`` (in first-seen order), each group split so a stack holds at
    most ``cap`` bytes of gradient and factors (or one tensor): stacking copies the factors, and a
    copy of a few 4096 x 4096 factors costs more than the products it batches. Vectors of
    different lengths are split by ``padding.split`` (bounded padding)."""
    groups: dict[tuple, list[Item]] = {}
    for it in items:
        groups.setdefault(it.key(), []).append(it)
    out = []
    for key, group in groups.items():
        if key[0] == "padded":
            per = group[0].grad.element_size() + group[0].state["Q"][0].element_size()
            parts = split([it.plan.numel for it in group], cap // per)
            out += [[group[i] for i in part] for part in parts]
            continue
        size, part = 0, []
        for it in group:
            nbytes = it.grad.nbytes + sum(q.nbytes for q in it.state["Q"])
            if part and size + nbytes > cap:
                out.append(part)
                size, part = 0, []
            part.append(it)
            size += nbytes
        out.append(part)
    return out


class CompiledSteps:
    """``stacked_step`` compiled once per stack structure (``Item.key``). Each structure gets its
    own copy of the function's code object, so dynamo caches it apart: with one shared code
    object a model with more than a few structures (a ResNet has dozens) hits dynamo's recompile
    limit of 8 and ``fullgraph=True`` turns that into an error."""

    def __init__(self, **compile_kw):
        self.kw, self.fns = compile_kw, {}

    def __call__(self, key: tuple):
        if key not in self.fns:
            f = stacked_step
            code = f.__code__.replace(co_name=f"stacked_step_{len(self.fns)}")
            copy = types.FunctionType(code, f.__globals__, code.co_name, f.__defaults__,
                                      f.__closure__)  # fmt: skip
            copy.__kwdefaults__ = f.__kwdefaults__
            self.fns[key] = torch.compile(copy, **self.kw)
        return self.fns[key]


def grouped_step(items: Sequence[Item], hy: Hyper, *, do_update: bool, prob: float | None,
                 balance: bool, cache: dict, step_fn=stacked_step) -> list:  # fmt: skip
    """The grouped kernel: one ``stacked_step`` per chunk of equal-structured tensors (vectors of
    several lengths zero-padded, ``padding``); results copied back into each tensor's state with
    ``torch._foreach_copy_``. ``cache``: per chunk of tensors, the ``P_i`` kept between calls."""
    out: dict[int, tuple[Tensor, Tensor]] = {}
    if do_update:  # kept P_i of any chunk holding a tensor fit now are stale (a chunk's
        ids = {id(it.p) for it in items}  # members change with missing gradients)
        for k in [k for k in cache if not ids.isdisjoint(k)]:
            del cache[k]
    for part in chunks(items):
        sts = [it.state for it in part]
        lay = layout([it.plan for it in part], part[0].grad.device)
        key, keep = tuple(id(it.p) for it in part), cached_dims(part[0].plan, prob)
        cached = cache.get(key)
        kept_all = cached is not None and all(c is not None for k, c in zip(keep, cached) if k)
        if do_update or not (kept_all and all(keep)) or hy.geometry.fits_p:
            Q0 = [lay.factor(list(f)) for f in zip(*(st["Q"] for st in sts))]
        else:  # every factor applied from its kept P_i: Q is not needed, not even stacked
            Q0 = [None] * len(keep)
        L0 = None if "L" not in sts[0] else [stack(list(f)) for f in zip(*(st["L"] for st in sts))]
        init = None if hy.init_scale is not None else torch.stack([st["initialised"] for st in sts])
        hv = None
        if part[0].hv is not None:
            hv = tuple(lay.data([it.hv[j] for it in part]) for j in (0, 1))
        draws = stack_draws([it.draws for it in part], lay) if do_update else None
        moms = [st["momentum_buffer"] for st in sts]
        M0 = lay.data(moms)
        compile_key = part[0].key() if lay.numel is None else (part[0].key(), lay.lengths)
        fn = step_fn(compile_key) if isinstance(step_fn, CompiledSteps) else step_fn
        M, steps, Q, L, init, U, ok, kept = fn(
            lay.data([it.grad for it in part]), M0, stack([st["step"] for st in sts]), Q0, L0,
            init, hv, draws, hy=hy, pd=sts[0]["Q"][0].dtype, do_update=do_update,
            balance=balance, keep=keep, cached=cached, numel=lay.numel,
        )  # fmt: skip
        cache[key] = kept
        lay.back(moms, M, M0)  # a stack of one is a view: updated in place already
        torch._foreach_copy_([st["step"] for st in sts], list(steps.unbind(0)))
        if do_update:
            # a stack of one updated in place is the state itself; anything else is copied back
            for i in range(len(Q0)):
                lay.back([st["Q"][i] for st in sts], Q[i], Q0[i])
            if L is not None:
                for i in range(len(L)):
                    if len(part) > 1 or L[i] is not L0[i]:
                        torch._foreach_copy_([st["L"][i] for st in sts], list(L[i].unbind(0)))
            if init is not None:
                torch._foreach_copy_([st["initialised"] for st in sts], list(init.unbind(0)))
        for it, u, k in zip(part, lay.rows(U), ok.unbind(0)):
            out[id(it.p)] = (u, k)
    return [out[id(it.p)] for it in items]
