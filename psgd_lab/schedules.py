"""Preconditioner update-probability schedules (docs/maths.md §5).

``prob(n)`` is the probability of updating the preconditioner at step ``n`` (the number of
``step()`` calls before this one). ``Kron`` turns it into a deterministic decision with a counter:
the counter increments every step and the update happens when ``counter >= 1 / prob``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class UpdateProbSchedule:
    """``clamp(max_prob · exp(−decay · (n − flat_start)), min_prob, max_prob)``.

    Evaluated in float32 with the same operations as kron-torch's ``ProbScheduler`` and returned,
    like it, as a 0-dim float32 tensor, so ``Kron`` inverts it in float32 as kron-torch does:
    bit-identical probabilities and identical update decisions at every step. Picklable and safe
    for ``torch.load(weights_only=True)``.
    """

    def __init__(
        self,
        max_prob: float = 1.0,
        min_prob: float = 0.03,
        decay: float = 0.001,
        flat_start: float = 500,
    ):
        for name, value in (("max_prob", max_prob), ("min_prob", min_prob)):
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1]; got {value!r}")
        if min_prob > max_prob:
            raise ValueError(f"min_prob must be <= max_prob; got {min_prob!r} > {max_prob!r}")
        if not (decay >= 0 and math.isfinite(decay)):
            raise ValueError(f"decay must be a finite number >= 0; got {decay!r}")
        self.max_prob = float(max_prob)
        self.min_prob = float(min_prob)
        self.decay = float(decay)
        self.flat_start = float(flat_start)

    def __call__(self, n: int | float | Tensor) -> Tensor:
        f32 = torch.float32
        n = torch.as_tensor(n, dtype=f32, device="cpu")
        top = torch.tensor(self.max_prob, dtype=f32)
        prob = top * torch.exp(-torch.tensor(self.decay, dtype=f32) * (n - self.flat_start))
        return prob.clamp_(min=torch.tensor(self.min_prob, dtype=f32), max=top)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UpdateProbSchedule) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash(tuple(vars(self).values()))

    def __repr__(self) -> str:
        return (
            f"precond_update_prob_schedule(max_prob={self.max_prob}, min_prob={self.min_prob}, "
            f"decay={self.decay}, flat_start={self.flat_start:g})"
        )


def precond_update_prob_schedule(
    max_prob: float = 1.0, min_prob: float = 0.03, decay: float = 0.001, flat_start: float = 500
) -> UpdateProbSchedule:
    """kron-torch's default anneal: probability 1.0 for ``flat_start`` steps, then an exponential
    decay to ``min_prob`` (reached at step ``flat_start + ln(max_prob/min_prob)/decay`` ≈ 4007)."""
    return UpdateProbSchedule(max_prob, min_prob, decay, flat_start)


torch.serialization.add_safe_globals([UpdateProbSchedule])
