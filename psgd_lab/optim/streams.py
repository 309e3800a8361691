"""Randomness and counting without host syncs: one random stream per parameter, and the lazily
read count of skipped (non-finite) parameter-steps.

A parameter's draws at its ``c``-th preconditioner update come from a generator seeded with
``stream_seed(seed, index, c)`` (``index``: its position across the parameter groups). So a
skipped, frozen or differently-placed parameter never shifts another's draws, a rank that owns a
parameter draws exactly what a single process would, and a checkpoint needs only the counts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..pairs import Draws, draw
from ..structure import KronPlan

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def stream_seed(seed: int, index: int, count: int) -> int:
    """A 63-bit seed for parameter ``index``'s ``count``-th update (SplitMix64 chained, so
    neighbouring indices and counts give unrelated streams)."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK) ^ index) ^ count) >> 1


def randn(*args, **kwargs) -> Tensor:
    """``torch.randn``; a module attribute so a test can route the draws elsewhere (the
    kron-torch comparison draws them from the global RNG, as kron-torch does)."""
    return torch.randn(*args, **kwargs)


class Streams:
    """Reseeded generators, one per device, that give each parameter-update its own stream."""

    def __init__(self, seed: int):
        self.seed = seed
        self._gens: dict = {}  # device -> its generator
        self._inner: dict[tuple[int, int], int] = {}  # (seed, index) -> the chain's first links

    def draws(
        self,
        index: int,
        count: int,
        plan: KronPlan,
        starts: list,
        *,
        probe: bool,
        noise: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Draws:
        """Parameter ``index``'s draws for its ``count``-th preconditioner update."""
        gen = self._gens.get(device)
        if gen is None:
            gen = self._gens[device] = torch.Generator(device=device)
        inner = self._inner.get((self.seed, index))
        if inner is None:  # stream_seed's first two links depend on the parameter only
            inner = self._inner[self.seed, index] = _splitmix64(
                _splitmix64(self.seed & _MASK) ^ index
            )
        gen.manual_seed(_splitmix64(inner ^ count) >> 1)  # = stream_seed(seed, index, count)
        return draw(plan, starts, probe=probe, noise=noise, dtype=dtype, device=device,
                    generator=gen, randn=randn)  # fmt: skip


class LazyCount:
    """A count kept on the devices (added to without host syncs) and read on demand.

    ``new_since_poll()`` tells, without waiting, whether the count grew: on the CPU it reads the
    count; on an accelerator it reads a copy started (non-blocking, into pinned memory) at the
    previous poll once that copy has landed, so a skip is reported a step or two late, never by
    stalling the device.
    """

    def __init__(self):
        self._counts: dict[torch.device, Tensor] = {}
        self._base = 0  # loaded from a checkpoint
        self._copies: dict[torch.device, tuple[Tensor, object]] = {}
        self._reported = 0

    def add(self, bad: Tensor) -> None:
        dev = bad.device
        n = bad.sum(dtype=torch.int64)
        if dev in self._counts:
            self._counts[dev].add_(n)
        else:
            self._counts[dev] = n.clone()

    def value(self) -> int:
        """The count (one host sync per device)."""
        return self._base + sum(int(t) for t in self._counts.values())

    def set(self, n: int) -> None:
        self._counts, self._copies, self._base, self._reported = {}, {}, int(n), int(n)

    def new_since_poll(self) -> bool:
        seen = self._base
        for dev, t in self._counts.items():
            if dev.type == "cpu":
                seen += int(t)
                continue
            landed = self._copies.get(dev)
            if landed is not None and landed[1].query():
                seen += int(landed[0])
            host = torch.empty((), dtype=torch.int64, pin_memory=True)
            host.copy_(t, non_blocking=True)
            event = torch.Event(device=dev)
            event.record()
            self._copies[dev] = (host, event)
        grew, self._reported = seen > self._reported, max(seen, self._reported)
        return grew


def draw_all(opt, todo: list, counts: list[int], plans: dict) -> dict:
    """``Kron``'s draws this step: each updating parameter's from its own stream (every parameter
    in Newton mode, whose ``v`` every rank needs; only the owned ones in whitening). ``todo``:
    ``(p, group index, do_update, prob)``; ``counts`` (advanced here): updates drawn per
    parameter; ``plans``: ``p -> KronPlan`` of the updating ones. What a parameter's draws need
    besides its plan (random starts, dtype, device) is kept in ``opt._draw_spec``."""
    from .. import distributed as dist_
    from .config import Hyper, precond_dtype

    own, rank = opt._owners(), dist_.rank_and_size(opt.process_group)[0]
    out, hypers, newton = {}, {}, opt.mode == "newton"
    for p, gi, do, _ in todo:
        if not do:
            continue
        i = opt._index(p)
        if newton or own.get(p, rank) == rank:
            if gi not in hypers:
                hypers[gi] = Hyper.of(group := opt.param_groups[gi], newton)
                noise = not isinstance(hypers[gi].damping, str) and hypers[gi].damping > 0
                hypers[gi] = (hypers[gi], group, noise)
            hy, group, noise = hypers[gi]
            plan, spec = plans[p], opt._draw_spec.get(id(p))
            if spec is None or spec[:3] != (plan, hy.geometry, hy.norm_bound):
                spec = (plan, hy.geometry, hy.norm_bound, hy.geometry.starts(plan, hy.norm_bound),
                        precond_dtype(group, p), opt._grad_device(p))  # fmt: skip
                opt._draw_spec[id(p)] = spec
            out[p] = opt._streams.draws(i, counts[i], plan, spec[3], probe=True, noise=noise,
                                         dtype=spec[4], device=spec[5])  # fmt: skip
        counts[i] += 1
    return out
