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
        self._gens: dict[str, torch.Generator] = {}

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
        gen = self._gens.get(str(device))
        if gen is None:
            gen = self._gens[str(device)] = torch.Generator(device=device)
        gen.manual_seed(stream_seed(self.seed, index, count))
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
