"""``LRA`` and ``Dense``: PSGD with one preconditioner over all of a group's parameters, flattened
into one vector of ``n`` entries (docs/maths.md §9; the structures §7 and §8), as
``torch.optim`` optimisers.

They take ``Kron``'s arguments where those apply and keep its conventions: momentum ``b1`` with
bias correction, the update schedule and its deterministic decisions (``config.decide``),
whitening or Newton mode (``step(closure)``, the closure returning the loss without
``backward()``), the update clipped per tensor to RMS 1.1 (or ``clip="global"``/``None``),
decoupled weight decay on ``ndim >= 2``, a skipped step for a non-finite gradient or ``Hv``, an
all-zero gradient that leaves ``P`` untouched, seeded random streams and exact resume. So a user
switches structure by changing the class: ``Kron`` → ``LRA`` → ``Dense``.

What differs: one preconditioner couples every entry of the group, so a non-finite gradient
anywhere skips the whole group's step, and parameters whose ``.grad`` is ``None`` this step are
fitted as zeros and not moved. The preconditioner is ``LRAPreconditioner`` or
``DensePreconditioner`` (the primitives), driven through their public ``update``/``precondition``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from ..lra import LRAPreconditioner, check_schedule
from ..preconditioner import DensePreconditioner
from ..schedules import precond_update_prob_schedule
from . import newton
from .apply import apply_updates, clip_global
from .checkpoint import copy_to
from .config import CLIPS, MODES, NONFINITE, check_choice, check_number, check_step_settings, decide
from .kernels import _debias, _momentum
from .streams import LazyCount, stream_seed

FORMAT = 1
EXTRA = "psgd_lab_flat"


def _arguments(names: dict) -> dict:
    """A subclass constructor's arguments by name (its ``locals()`` on entry), for ``_Flat``:
    the shared settings by their own names, the structure's own ones into ``structure_kw``."""
    return {k: v for k, v in names.items() if k not in ("self", "__class__")}


class _Flat(torch.optim.Optimizer):
    """The shared optimiser; subclasses say how to build the group's preconditioner."""

    structure = ""

    def __init__(self, params: Iterable, lr: float, b1: float, weight_decay: float,
                 preconditioner_update_probability, momentum_into_precond_update: bool,
                 precond_lr: float, precond_init_scale: float | None, mu_dtype, precond_dtype,
                 *, mode: str, hvp: str, damping: float, beta_L: float, clip: str | None,
                 clip_max_amp: float, seed: int, nonfinite: str, process_group,
                 clip_max_entry: float = math.inf,
                 **structure_kw):  # fmt: skip
        from ..pairs import HVP_METHODS

        if preconditioner_update_probability is None:
            preconditioner_update_probability = precond_update_prob_schedule()
        check_choice("mode", mode, MODES)
        check_choice("hvp", hvp, HVP_METHODS)
        check_choice("nonfinite", nonfinite, NONFINITE)
        check_choice("clip", clip, CLIPS)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int; got {seed!r}")
        defaults = dict(
            lr=lr, b1=b1, weight_decay=weight_decay,
            preconditioner_update_probability=preconditioner_update_probability,
            momentum_into_precond_update=momentum_into_precond_update, precond_lr=precond_lr,
            precond_init_scale=precond_init_scale, mu_dtype=mu_dtype, precond_dtype=precond_dtype,
            damping=damping, beta_L=beta_L, clip=clip, clip_max_amp=clip_max_amp,
            clip_max_entry=clip_max_entry, **structure_kw,
        )  # fmt: skip
        _check_group(defaults)
        self.mode, self.hvp, self.seed, self.nonfinite = mode, hvp, seed, nonfinite
        self.process_group = process_group
        self._pre: dict[int, object] = {}  # group index -> its preconditioner
        self._counters: list[int] = []
        super().__init__(params, defaults)
        self._prob_step = 0
        self._nonfinite = LazyCount()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group)
            _layout(group)
            self._check_structure(group)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        self._counters.append(0)

    # ------------------------------------------------------------------ subclass hooks
    def _check_structure(self, group: dict) -> None:  # validated once, when the group is added
        self._make(group, 2, torch.float32, "cpu", 0)

    def _make(self, group: dict, n: int, dtype, device, seed: int):
        raise NotImplementedError

    @property
    def nonfinite_count(self) -> int:
        """Group-steps skipped for a non-finite gradient or ``Hv`` (reading it syncs)."""
        return self._nonfinite.value()

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One step; ``closure`` as for ``Kron.step`` (whitening: runs first and calls
        ``backward()``; Newton: returns the loss without calling it)."""
        loss = None if self.mode == "newton" else newton.call_closure(closure)
        decisions = [decide(g["preconditioner_update_probability"], self._prob_step, c)
                     for g, c in zip(self.param_groups, self._counters)]  # fmt: skip
        hvs: dict = {}
        if self.mode == "newton":
            params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
            probes = {}
            for gi, (group, (do, _, _)) in enumerate(zip(self.param_groups, decisions)):
                if do:
                    probes.update(self._probes(gi, group))
            loss, hvs = newton.pairs(self, closure, params, probes)
        self._counters = [c for _, c, _ in decisions]
        self._prob_step += 1
        for gi, (group, (do, _, _)) in enumerate(zip(self.param_groups, decisions)):
            self._step_group(gi, group, do, hvs)
        return loss

    def _probes(self, gi: int, group: dict) -> dict:
        """Newton mode's ``v`` for the group's parameters: one standard normal vector of ``n``
        from the group's stream for this update, split per parameter."""
        st = self._group_state(gi, group)
        gen = torch.Generator(device=st["momentum_buffer"].device)
        gen.manual_seed(stream_seed(self.seed, 2 * gi + 1, int(st["updates"])))
        v = torch.randn(st["momentum_buffer"].shape, generator=gen, device=gen.device,
                        dtype=self._pre[gi].dtype)  # fmt: skip
        return {
            p: x.reshape(p.shape).to(p.dtype) for p, x in zip(group["params"], _split(v, group))
        }

    def _group_state(self, gi: int, group: dict) -> dict:
        """The group's state (kept under its first parameter, so ``torch.optim``'s checkpoint
        machinery carries it): momentum over ``n``, the finite step count, the number of
        preconditioner updates, and the preconditioner's own state."""
        st = self.state[group["params"][0]]
        if gi in self._pre and st:  # every step after the first: nothing to build
            return st
        dtype, device, mu = _layout(group)
        n = sum(p.numel() for p in group["params"])
        if gi not in self._pre:
            pd = group["precond_dtype"] or torch.promote_types(dtype, torch.float32)
            self._pre[gi] = self._make(group, n, pd, device, stream_seed(self.seed, 2 * gi, -1))
            if "preconditioner" in st:
                self._pre[gi].load_state_dict(st.pop("preconditioner"))
        if not st:
            st["momentum_buffer"] = torch.zeros(n, dtype=mu, device=device)
            st["step"] = torch.zeros((), dtype=torch.int64, device=device)
            st["updates"] = 0
        return st

    def _step_group(self, gi: int, group: dict, do: bool, hvs: dict) -> None:
        params = group["params"]
        present = [p.grad is not None for p in params]
        if not any(present):
            return
        st = self._group_state(gi, group)
        pre, M = self._pre[gi], st["momentum_buffer"]
        G = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                       for p in params]).to(M.dtype)  # fmt: skip
        pair = None
        if self.mode == "newton" and do:
            pair = [torch.cat([hvs[p][j].reshape(-1) for p in params]) for j in (0, 1)]
        ok = torch.isfinite(G).all()
        if pair is not None:
            ok = ok & torch.isfinite(pair[1]).all()
        if self.nonfinite == "raise" and not bool(ok):
            raise FloatingPointError(f"{type(self).__name__}: non-finite gradient or Hv")
        self._nonfinite.add(~ok.reshape(1))
        b1, moving = group["b1"], ok
        if not all(present):  # absent parameters keep their momentum: a mask per entry
            moving = ok & torch.cat([torch.full((p.numel(),), x, device=M.device)
                                     for p, x in zip(params, present)])  # fmt: skip
        _momentum(M, G, b1, moving, None)  # Kron's update, M seen as a stack of n scalars
        st["step"].add_(ok.to(torch.int64))
        m_hat = (M / _debias(b1, st["step"], M.dtype)).to(pre.dtype)
        if do:
            if self.mode == "newton":
                h, v, info = pair[1].to(pre.dtype), pair[0].to(pre.dtype), pair[1]
            else:
                h = m_hat if group["momentum_into_precond_update"] else G.to(pre.dtype)
                v, info = None, G
            self._fit(gi, st, pre, h, v, ok & (info != 0).any(), group["precond_lr"])
        u = pre.precondition(m_hat)
        ok = ok & torch.isfinite(u).all()  # P m̂ can overflow where m̂ is finite
        u = torch.where(ok, u, 0)  # a skipped step moves nothing (inf · 0 would be NaN)
        us = [x.reshape(p.shape) for x, p in zip(_split(u, group), params)]
        if group["clip"] == "tensor":  # per tensor, as Kron: RMS at most clip_max_amp
            rms = torch.stack(torch._foreach_norm(us)).double() / torch.tensor(
                [math.sqrt(x.numel()) for x in us], dtype=torch.float64, device=u.device
            )
            scale = torch.clamp(group["clip_max_amp"] / (rms + 1e-12), max=1.0).to(u.dtype)
            torch._foreach_mul_(us, list(scale.unbind(0)))
        elif group["clip"] == "global":
            clip_global(us, group["clip_max_amp"])
        live = [(p, x) for p, x, here in zip(params, us, present) if here]
        apply_updates([p for p, _ in live], [x.to(p.dtype) for p, x in live], [ok] * len(live),
                      [p.dim() for p, _ in live], group["lr"], group["weight_decay"],
                      group.get("clip_max_entry", math.inf))  # fmt: skip

    def _fit(self, gi: int, st: dict, pre, h: Tensor, v, fit_ok: Tensor, lr: float) -> None:
        """One preconditioner update on a fresh stream, kept only where ``fit_ok`` (a finite,
        not all-zero pair) holds and the updated state is finite (a pair of ~1e30 overflows the
        fit in float32: ``P`` then stays as it was). On the CPU that is read for free; elsewhere
        it is selected on the device (no host sync)."""
        count = st["updates"]
        st["updates"] = count + 1
        pre.generator.manual_seed(stream_seed(self.seed, 2 * gi, count))
        if hasattr(pre, "coins"):
            pre.coins.manual_seed(stream_seed(self.seed, 2 * gi, count) ^ 1)
        on_cpu = fit_ok.device.type == "cpu"
        if on_cpu and not bool(fit_ok):
            return
        tensors = _tensors(pre)
        saved = [t.clone() for t in tensors]
        pre.update(h, v, lr=lr)
        good = fit_ok & torch.stack([torch.isfinite(t).all() for t in tensors]).all()
        if on_cpu:
            if not bool(good):
                torch._foreach_copy_(tensors, saved)
            return
        for t, old in zip(tensors, saved):
            t.copy_(torch.where(good, t, old))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        sd = super().state_dict()
        first = 0  # torch numbers the parameters across the groups, in order
        for gi, group in enumerate(self.param_groups):
            if gi in self._pre:
                pre = self._pre[gi].state_dict()
                sd["state"][first] = {**sd["state"][first], "preconditioner": pre}
            first += len(group["params"])
        sd[EXTRA] = {
            "format": FORMAT, "structure": self.structure, "prob_step": self._prob_step,
            "update_counters": list(self._counters), "nonfinite_count": self.nonfinite_count,
            "seed": self.seed, "layout": [[tuple(p.shape) for p in g["params"]]
                                          for g in self.param_groups],
        }  # fmt: skip
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        extra = state_dict.get(EXTRA)
        name = type(self).__name__
        if extra is None or extra.get("structure") != self.structure:
            saved = "another optimiser" if extra is None else f"{extra.get('structure')!r}"
            raise ValueError(f"this state dict was saved by {saved}, not psgd_lab.{name}")
        layout = [[tuple(p.shape) for p in g["params"]] for g in self.param_groups]
        if [[tuple(s) for s in g] for g in extra["layout"]] != layout:
            raise ValueError(f"the state dict was saved for a different parameter layout "
                             f"({extra['layout']}, here {layout})")  # fmt: skip
        super().load_state_dict({k: v for k, v in state_dict.items() if k != EXTRA})
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for k, st in state_dict["state"].items():  # torch cast floating state to the
            p = params[ids.index(k)]  # parameter's dtype: take the saved tensors themselves
            self.state[p] = copy_to(st, p.device)
        self._pre.clear()
        for gi, group in enumerate(self.param_groups):
            if self.state[group["params"][0]]:
                self._group_state(gi, group)
        self._prob_step = int(extra["prob_step"])
        self._counters = [int(c) for c in extra["update_counters"]]
        self._nonfinite.set(int(extra["nonfinite_count"]))
        self.seed = int(extra["seed"])


def _tensors(pre) -> list[Tensor]:
    """The preconditioner's fitted tensors (what an update changes)."""
    if isinstance(pre, LRAPreconditioner):
        return [pre.state.U, pre.state.V, pre.state.d, *pre.state.L]
    return [*pre.Q, *pre.L]


def _split(x: Tensor, group: dict) -> list[Tensor]:
    return list(x.split([p.numel() for p in group["params"]]))


def _layout(group: dict) -> tuple[torch.dtype, torch.device, torch.dtype]:
    """The group's common dtype, device and momentum dtype, or ``ValueError``/``TypeError``."""
    params = group["params"]
    if any(not p.is_floating_point() for p in params):
        raise TypeError("LRA and Dense optimise real floating-point parameters only")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(
            f"a group's parameters must share one device; got {sorted(map(str, devices))}"
        )
    dtype = params[0].dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype, params[0].device, group["mu_dtype"] or dtype


def _check_group(g: dict) -> None:
    check_step_settings(g)
    check_number("damping", g["damping"], 0, math.inf, hi_open=True)
    for name in ("mu_dtype", "precond_dtype"):
        dt = g[name]
        if dt is not None and not (isinstance(dt, torch.dtype) and dt.is_floating_point):
            raise ValueError(
                f"{name} must be None or a real floating-point torch.dtype; got {dt!r}"
            )


class LRA(_Flat):
    """PSGD with a low-rank-approximation preconditioner ``Q = (I + U Vᵀ) diag(d)`` over all of a
    group's parameters (docs/maths.md §7): memory ``O(n r)``, an update ``O(n r²)``.

    Arguments as ``Kron`` (same defaults) where they apply, except
    ``momentum_into_precond_update=False``: ``P`` is fitted on the raw gradient, as the
    reference's ``LRAWhiten`` does (fitting it on the momentum gave a higher final loss on 5 of 5
    paired seeds on both training tasks of notebook 10). Plus ``rank`` (``r``; 0: diagonal),
    ``uv_schedule`` (which of ``U``/``V`` an update changes: ``"alternate"``, ``"random"``
    (the reference's coin) or ``"both"``) and ``balance_strength``. ``damping`` is the noise
    ``λ·v`` added to the fitted ``h`` (bounds ``P ≤ I/λ``); the step normalisation is the EMA
    Lipschitz estimate with ``beta_L``.
    """

    structure = "lra"

    def __init__(self, params: Iterable, lr: float = 0.0003, b1: float = 0.9,
                 weight_decay: float = 0.0,
                 preconditioner_update_probability: float | Callable | None = None,
                 momentum_into_precond_update: bool = False, precond_lr: float = 0.1,
                 precond_init_scale: float | None = None, mu_dtype=None, precond_dtype=None, *,
                 rank: int = 10, uv_schedule: str = "alternate", balance_strength: float = 0.1,
                 mode: str = "whiten", hvp: str = "autograd", damping: float = 1e-9,
                 beta_L: float = 0.9, clip: str | None = "tensor", clip_max_amp: float = 1.1,
                 clip_max_entry: float = math.inf, seed: int = 42, nonfinite: str = "skip",
                 process_group=None):  # fmt: skip
        check_schedule(uv_schedule)
        super().__init__(**_arguments(locals()))

    def _check_structure(self, group: dict) -> None:
        n, rank = sum(p.numel() for p in group["params"]), group["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < max(n, 1):
            raise ValueError(f"rank must be an int in [0, n) with n = {n}; got {rank!r}")
        self._make(group, rank + 1, torch.float32, "cpu", 0)  # validates the other settings

    def _make(self, group: dict, n: int, dtype, device, seed: int):
        return LRAPreconditioner(
            n, rank=group["rank"], init_scale=group["precond_init_scale"],
            beta_L=group["beta_L"], damping=group["damping"], uv_schedule=group["uv_schedule"],
            balance_strength=group["balance_strength"], dtype=dtype, device=device, seed=seed,
        )  # fmt: skip


class Dense(_Flat):
    """PSGD with one dense ``Q`` (``n x n``) over all of a group's parameters (docs/maths.md §8),
    every update rule (``geometry``): memory ``n²``, meant for ``n`` up to a few thousand.

    Arguments as ``Kron`` where they apply. Defaults that differ from ``Kron``'s, because there
    is no kron-torch behaviour to keep here: ``geometry="Q0.5EQ1.5"`` and ``lipschitz="ema"``
    (the reference's ``DenseNewton``; the EMA normalisation fits the whitening target without
    the bias of kron-torch's per-sample one, docs/maths.md §3), and ``damping=1e-9``.
    """

    structure = "dense"

    def __init__(self, params: Iterable, lr: float = 0.0003, b1: float = 0.9,
                 weight_decay: float = 0.0,
                 preconditioner_update_probability: float | Callable | None = None,
                 momentum_into_precond_update: bool = True, precond_lr: float = 0.1,
                 precond_init_scale: float | None = None, mu_dtype=None, precond_dtype=None, *,
                 geometry: str = "Q0.5EQ1.5", lipschitz: str = "ema", mode: str = "whiten",
                 hvp: str = "autograd", damping: float = 1e-9, beta_L: float = 0.9,
                 clip: str | None = "tensor", clip_max_amp: float = 1.1,
                 clip_max_entry: float = math.inf, seed: int = 42, nonfinite: str = "skip",
                 process_group=None):  # fmt: skip
        super().__init__(**_arguments(locals()))

    def _make(self, group: dict, n: int, dtype, device, seed: int):
        return DensePreconditioner(
            n, group["geometry"], init_scale=group["precond_init_scale"],
            lipschitz=group["lipschitz"], beta_L=group["beta_L"], damping=group["damping"],
            dtype=dtype, device=device, seed=seed,
        )  # fmt: skip
