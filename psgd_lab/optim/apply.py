"""Applying a step's updates: the clip over a whole group, and ``θ ← θ·(1 − lr·wd·ok) − lr·u``
for every parameter with ``torch._foreach`` ops (shared by ``Kron``'s placements and by ``LRA``
and ``Dense``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def clip_global(us: list[Tensor], max_amp: float) -> None:
    """Scale every update of the list, in place, so their RMS over all entries is at most
    ``max_amp`` (the reference's ``grad_clip_max_amp``); no host sync."""
    if not us or max_amp == math.inf:
        return
    sq = torch.stack([torch.linalg.vector_norm(u.reshape(-1), dtype=torch.float64) for u in us])
    rms = (sq.square().sum() / sum(u.numel() for u in us)).sqrt()
    scale = torch.clamp(max_amp / (rms + 1e-12), max=1.0)
    torch._foreach_mul_(us, [scale.to(u.real.dtype) for u in us])


def clamp_entries(us: list[Tensor], max_entry: float) -> list[Tensor]:
    """Every entry of every update limited to ``[-max_entry, max_entry]`` (a complex entry:
    its modulus), the reference's element-wise ``grad_clip_max_amps[1]``; ``inf``: unchanged."""
    if max_entry == math.inf or not us:
        return us
    if any(u.is_complex() for u in us):  # mixed lists too: the modulus form covers real entries
        return [u * torch.clamp(max_entry / u.abs().clamp(min=1e-30), max=1.0) for u in us]
    return torch._foreach_clamp_max(torch._foreach_clamp_min(us, -max_entry), max_entry)


def apply_updates(targets: list[Tensor], us: list[Tensor], oks: list[Tensor], ndims: list[int],
                  lr: float, weight_decay: float,
                  max_entry: float = math.inf) -> None:  # fmt: skip
    """``θ ← θ·(1 − lr·wd·ok) − lr·u`` for every target (weight decay only where the parameter
    has ``ndim ≥ 2``), with ``torch._foreach`` ops: one call each for the whole list, ``u``'s
    entries first limited to ``±max_entry`` (``clamp_entries``). A skipped tensor (``ok``
    False, ``u = 0``) is left exactly as it was."""
    if not targets:
        return
    us = clamp_entries(us, max_entry)
    decay = [i for i, n in enumerate(ndims) if n >= 2] if weight_decay != 0 else []
    if decay:
        # one op for the list, not three per tensor; in float64 (where the device has it), so a
        # float64 parameter decays by exactly 1 − lr·wd
        wide = torch.float32 if targets[0].device.type == "mps" else torch.float64
        ok = torch.stack([oks[i] for i in decay]).to(wide)
        keep = (1 - lr * weight_decay * ok).unbind(0)
        torch._foreach_mul_([targets[i] for i in decay], list(keep))
    us = [u if u.shape == t.shape else u.reshape(t.shape) for u, t in zip(us, targets)]
    torch._foreach_add_(targets, us, alpha=-lr)
