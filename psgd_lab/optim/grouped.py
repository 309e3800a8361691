"""The grouped kernel's bookkeeping: which tensors share a stack, planned once per parameter set
and reused every step, and state kept *in* its stacks.

A ``GroupPlan`` is built the first time a group steps with a given set of parameters (and
settings, and update probability) and reused while that set repeats, so a step does no
per-parameter planning: no structure look-ups, no stacking keys, no layouts. Its ``Chunk``s keep
the stacked state: after a chunk's first step each parameter's ``momentum_buffer``, ``step``,
``Q`` (and ``L``, ``initialised``) is a *view* of the chunk's stack, so the next step uses the
stack as it is and writes nothing back (a checkpoint holds the same values; loading one, or a
parameter set that changes, gives state that is not a view of the stack, detected by identity,
and the stack is rebuilt from it). The stacks hold the state itself: no memory is added. Only
the gradients are stacked every step.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..structure import KronPlan
from .config import Hyper
from .kernels import CHUNK_BYTES, Item, cached_dims, stacked_step
from .padding import Rows, Same, layout, split, stack, stack_draws


@dataclass
class Chunk:
    """Tensors of one stack: their positions in the group's list, how they are stacked, which
    ``P_i`` they keep, and the stacked state (``name -> (stack, the state tensors that are
    views of it)``)."""

    members: list[int]
    lay: Same | Rows
    keep: tuple[bool, ...]
    key: tuple  # Item.key (the compiled function's cache key)
    ids: tuple[int, ...]  # id(p) of the members: the key of their kept P_i
    stacks: dict = field(default_factory=dict)

    def held(self, name, tensors: list[Tensor]) -> Tensor | None:
        """The stack whose views ``tensors`` are, or None (not stacked yet, or replaced)."""
        got = self.stacks.get(name)
        if got is None or any(a is not b for a, b in zip(tensors, got[1])):
            return None
        return got[0]

    def hold(self, name, tensors: list[Tensor], X: Tensor, views: list[Tensor], set_views) -> None:
        """From now on the stack ``X`` holds ``tensors``' values: its ``views`` go into the state
        (``set_views``), unless the stack is one tensor seen as a stack of one (a view of it)."""
        if len(tensors) == 1 and X._base is tensors[0]:
            views = tensors
        else:
            set_views(views)
        self.stacks[name] = (X, views)


def chunks(items: Sequence[Item], cap: int = CHUNK_BYTES) -> list[list[int]]:
    """Positions of ``items`` grouped by ``Item.key`` (in first-seen order), each group split so a
    stack holds at most ``cap`` bytes of gradient and factors (or one tensor): stacking copies
    the factors, and a copy of a few 4096 x 4096 factors costs more than the products it
    batches. Vectors of different lengths are split by ``padding.split`` (bounded padding)."""
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.key(), []).append(i)
    out = []
    for key, group in groups.items():
        if key[0] == "padded":
            first = items[group[0]]
            per = first.grad.element_size() + first.state["Q"][0].element_size()
            parts = split([items[i].plan.numel for i in group], cap // per)
            out += [[group[j] for j in part] for part in parts]
            continue
        size, part = 0, []
        for i in group:
            it = items[i]
            nbytes = it.grad.nbytes + sum(q.nbytes for q in it.state["Q"])
            if part and size + nbytes > cap:
                out.append(part)
                size, part = 0, []
            part.append(i)
            size += nbytes
        out.append(part)
    return out


class GroupPlan:
    """One group's parameters as the grouped kernel stacks them (see the module docstring)."""

    def __init__(self, items: Sequence[Item], prob: float | None):
        self.params = [it.p for it in items]
        self.states = [it.state for it in items]
        self.plans: list[KronPlan] = [it.plan for it in items]
        self.chunks = []
        for members in chunks(items):
            first = items[members[0]]
            lay = layout([self.plans[i] for i in members], first.grad.device)
            self.chunks.append(Chunk(members, lay, cached_dims(first.plan, prob), first.key(),
                                     tuple(id(self.params[i]) for i in members)))  # fmt: skip


def plan_key(params: Sequence[Tensor], gkey: tuple, prob, with_hv: bool) -> tuple:
    """What a ``GroupPlan`` depends on: the parameters (identity, shape, dtype), the group's
    structure settings, the update probability (which ``P_i`` are kept) and whether the step
    brings Newton pairs."""
    return (tuple((id(p), p.shape, p.dtype) for p in params), gkey, prob, with_hv)


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


def _setter(sts: list[dict], name, f=None):
    def put(views):
        for st, x in zip(sts, views):
            if f is None:
                st[name] = x
            else:
                st[name][f] = x

    return put


def _state(ch: Chunk, name: str, sts: list[dict], f: int | None = None, padded=False) -> Tensor:
    """The chunk's stack of state ``name`` (factor ``f``): the one held, or a new one (zero-padded
    rows with ``padded``, see ``padding``; else one entry per tensor) that holds it from now on."""
    xs = [st[name] for st in sts] if f is None else [st[name][f] for st in sts]
    X = ch.held((name, f), xs)
    if X is None:
        if padded:
            X = ch.lay.factor(xs) if name in ("Q",) else ch.lay.data(xs)
            views = ch.lay.views(X, xs)
        else:
            X = stack(xs)
            views = [x.view(t.shape) for x, t in zip(X.unbind(0), xs)]
        ch.hold((name, f), xs, X, views, _setter(sts, name, f))
    return X


def _put(X: Tensor, new: Tensor) -> None:
    """The held stack ``X`` takes the values ``new`` (nothing to do when the kernel updated
    ``X`` in place)."""
    if new is not X:
        X.copy_(new)


def run(plan: GroupPlan, grads: list[Tensor], draws: list, hvs: list | None, hy: Hyper, *,
        do_update: bool, balance: bool, cache: dict, step_fn=stacked_step) -> list:  # fmt: skip
    """One ``stacked_step`` per chunk of ``plan``; ``grads``, ``draws`` (update steps) and
    ``hvs`` (Newton) in the plan's order. Returns ``(u, ok)`` per tensor, in that order.
    ``cache``: per chunk, the ``P_i`` kept between calls (keyed by the members' ids)."""
    out: list = [None] * len(plan.params)
    if do_update:  # kept P_i of any chunk holding a tensor fit now are stale (a chunk's
        ids = {id(p) for p in plan.params}  # members change with missing gradients)
        for k in [k for k in cache if not ids.isdisjoint(k)]:
            del cache[k]
    for ch in plan.chunks:
        idx, lay = ch.members, ch.lay
        sts = [plan.states[i] for i in idx]
        pd = sts[0]["Q"][0].dtype
        cached = cache.get(ch.ids)
        kept_all = cached is not None and all(c is not None for k, c in zip(ch.keep, cached) if k)
        need_q = do_update or not (kept_all and all(ch.keep)) or hy.geometry.fits_p
        nf = len(sts[0]["Q"])
        Qs = [_state(ch, "Q", sts, f, padded=True) for f in range(nf)]
        Q0 = [lay.refresh(q) for q in Qs] if need_q else [None] * nf
        L0 = None
        if "L" in sts[0]:
            L0 = [_state(ch, "L", sts, f) for f in range(len(sts[0]["L"]))]
        init = None if hy.init_scale is not None else _state(ch, "initialised", sts)
        hv = None
        if hvs is not None:
            hv = tuple(lay.data([hvs[i][j] for i in idx]) for j in (0, 1))
        dr = stack_draws([draws[i] for i in idx], lay) if do_update else None
        M0 = _state(ch, "momentum_buffer", sts, padded=True)
        steps0 = _state(ch, "step", sts)
        compile_key = ch.key if lay.numel is None else (ch.key, lay.lengths)
        fn = step_fn(compile_key) if isinstance(step_fn, CompiledSteps) else step_fn
        M, steps, Q, L, init1, U, ok, kept = fn(
            lay.data([grads[i] for i in idx]), M0, steps0, Q0, L0, init, hv, dr, hy=hy, pd=pd,
            do_update=do_update, balance=balance, keep=ch.keep, cached=cached, numel=lay.numel,
        )  # fmt: skip
        cache[ch.ids] = kept
        _put(M0, M)
        _put(steps0, steps)
        if do_update:
            for X, new in zip(Qs, Q):
                _put(X, new)
            for X, new in zip(L0 or (), L or ()):
                _put(X, new)
            if init is not None:
                _put(init, init1)
        for i, u, k in zip(idx, lay.rows(U), ok.unbind(0)):
            out[i] = (u, k)
    return out


def grouped_step(items: Sequence[Item], hy: Hyper, *, do_update: bool, prob: float | None,
                 balance: bool, cache: dict, step_fn=stacked_step, plan=None) -> list:  # fmt: skip
    """The grouped kernel on ``items`` (as ``kernels.single_step``): ``plan``, a ``GroupPlan`` of
    these items if the caller keeps one, else one planned now."""
    plan = plan or GroupPlan(items, prob)
    hvs = None if items[0].hv is None else [it.hv for it in items]
    return run(plan, [it.grad for it in items], [it.draws for it in items], hvs, hy,
               do_update=do_update, balance=balance, cache=cache, step_fn=step_fn)  # fmt: skip


__all__ = ["CompiledSteps", "GroupPlan", "Rows", "grouped_step", "plan_key", "run"]
