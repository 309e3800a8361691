"""All-diagonal vectors of different lengths in one stack (biases, norm weights, scalars).

A model's many 1-D tensors come in a few lengths (GPT-2: ``d``, ``3d``, ``4d``), and stacking
only equal structures makes each length a stack of its own, each paying the step's ~60 small ops.
Their preconditioner is one diagonal factor (a scalar's: one number, the same maths as a vector
of length 1), and every line of its maths is elementwise except a few per-tensor reductions: so
they can share one zero-padded ``(B, D)`` stack, ``D`` the longest length (``Rows``).

What keeps the padding inert (docs/maths.md §5):

- the data (gradient, momentum, ``v``, damping noise, ``Hv``) is 0 there, so every sum over a
  row (``‖P m‖``, ``gram_i``) is the real tensor's, and every mean divides by the real length
  (the ``numel`` the kernel passes to ``geometry.fit``, ``factors.data_scale``, the RMS clip);
- a factor's padding repeats its own entries (``q[j mod n]``), never 0: ``Q⁻ᴴ v`` stays 0 there,
  and any term of the fit there (``T1`` = 0, ``T2`` = ``|q_j v|²``, ``c`` or ``c|q_j|²``) is at
  most the real entry ``j``'s, so the diagonal norm bound (a maximum over the row) is the real
  tensor's;
- ``numel/d_i``, the integrated-out ``E[gram_i(v, v)]``, is 1 for any 1-D tensor, padded or not.

Reductions over a padded row add zeros in another order than over the tensor alone, so the
result agrees with the single-tensor reference to round-off rather than bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..pairs import Draws
from ..structure import KronPlan

# A stack padded to at most this many elements costs about what one op's dispatch does: below
# it, merging lengths always pays; above, the padding is kept under the real elements.
PAD_FREE = 8192


def paddable(plan: KronPlan) -> bool:
    """A vector or scalar whose one factor is diagonal."""
    return len(plan.shape) <= 1 and all(plan.diag)


def split(lengths: list[int], cap: int) -> list[list[int]]:
    """Positions (into ``lengths``) of each padded stack: shortest first, a stack grows while its
    padded size stays under ``max(2 x its real elements, PAD_FREE)`` and ``cap`` elements."""
    out: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        n = lengths[i]
        padded = (len(out[-1]) + 1) * n if out else 0
        if out and padded <= min(max(2 * (real + n), PAD_FREE), max(cap, n)):
            out[-1].append(i)
            real += n
        else:
            out.append([i])
            real = n
    return out


class Rows:
    """Where ``B`` vectors of the given lengths sit in a ``(B, D)`` stack, as gather indices
    built once per chunk (``Rows.of`` keeps them)."""

    _made: dict[tuple, Rows] = {}

    def __init__(self, lengths: tuple[int, ...], device: torch.device):
        self.lengths, self.width = lengths, max(lengths)
        n = torch.tensor(lengths)[:, None]
        start = torch.cumsum(n, 0) - n
        col = torch.arange(self.width)[None, :]
        inside = col < n
        total = sum(lengths)
        flat = torch.arange(len(lengths) * self.width).reshape(len(lengths), -1)
        self.zeros = torch.where(inside, start + col, total).reshape(-1).to(device)
        self.repeat = (start + col % n).reshape(-1).to(device)
        self.real = flat[inside].to(device)
        self.numel = n.reshape(-1).to(device)
        rows = torch.arange(len(lengths))[:, None] * self.width
        self.repad = (rows + col % n).reshape(-1).to(device)  # q[j mod n] within each row

    @classmethod
    def of(cls, lengths: tuple[int, ...], device: torch.device) -> Rows:
        key = (lengths, str(device))
        if key not in cls._made:
            if len(cls._made) > 256:
                cls._made.clear()
            cls._made[key] = cls(lengths, device)
        return cls._made[key]

    def data(self, xs: list[Tensor]) -> Tensor:
        """``(B, D)``: each tensor flattened, then zeros."""
        flat = torch.cat([x if x.dim() == 1 else x.reshape(-1) for x in xs] + [xs[0].new_zeros(1)])
        return flat[self.zeros].reshape(len(xs), self.width)

    def factor(self, xs: list[Tensor]) -> Tensor:
        """``(B, D)``: each diagonal factor, then its own entries again (``q[j mod n]``)."""
        return torch.cat([x.reshape(-1) for x in xs])[self.repeat].reshape(len(xs), self.width)

    def rows(self, X: Tensor) -> list[Tensor]:
        """Each tensor's entries of the stack ``X``, flat."""
        return list(X.reshape(-1)[self.real].split(self.lengths))

    def views(self, X: Tensor, like: list[Tensor]) -> list[Tensor]:
        """Each tensor's entries of the stack ``X`` as views, in the shapes of ``like``."""
        return [x[:n].view(t.shape) for x, n, t in zip(X.unbind(0), self.lengths, like)]

    def refresh(self, Q: Tensor) -> Tensor:
        """The stacked diagonal factors ``Q`` with their padding repeating their own entries
        again (``factor``'s layout; a fit moves the padding on its own)."""
        return Q.reshape(-1)[self.repad].reshape(Q.shape)


class Same:
    """Tensors of one plan, stacked as they are (``Rows``' counterpart; a stack of one is a view
    of the state, updated in place)."""

    numel = None

    def __init__(self, fshape: tuple[int, ...]):
        self.fshape = fshape

    def data(self, xs: list[Tensor]) -> Tensor:
        return stack([x.reshape(self.fshape) for x in xs])

    def factor(self, xs: list[Tensor]) -> Tensor:
        return stack(xs)

    def rows(self, X: Tensor) -> list[Tensor]:
        return list(X.unbind(0))

    def views(self, X: Tensor, like: list[Tensor]) -> list[Tensor]:
        return [x.view(t.shape) for x, t in zip(X.unbind(0), like)]

    def refresh(self, Q: Tensor) -> Tensor:
        return Q


def stack(xs: list[Tensor]) -> Tensor:
    """``torch.stack``, or a view for a stack of one (no copy)."""
    return xs[0].unsqueeze(0) if len(xs) == 1 else torch.stack(xs)


def layout(plans: list[KronPlan], device: torch.device) -> Same | Rows:
    """How a chunk of tensors is stacked: as they are when their plans are equal, else padded."""
    if all(p == plans[0] for p in plans):
        return Same(plans[0].shape)
    return Rows.of(tuple(p.numel for p in plans), device)


def stack_draws(draws: list[Draws], lay: Same | Rows) -> Draws:
    """One ``Draws`` for the chunk: stacked, or padded with zeros (a diagonal factor's norm bound
    draws no start)."""
    if isinstance(lay, Same):
        return Draws.stack(draws)

    def pad(xs: list) -> Tensor | None:
        return None if xs[0] is None else lay.data(xs)

    return Draws(v=pad([d.v for d in draws]), noise=pad([d.noise for d in draws]), starts=[None])
