"""``Kron``: PSGD Kron as a ``torch.optim.Optimizer`` (docs/maths.md §5), a drop-in for
kron-torch's.

``step`` reads: the closure (first, as torch.optim does) → the update decisions → the random
draws and, in Newton mode, the ``(v, Hv)`` pairs → one kernel per group (``kernels``) → the
results applied where they belong (``placement``). Defaults reproduce kron-torch 0.3.3 step for
step (EQ, kron-torch normalisation, the same schedule and balancing decisions).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .. import distributed as dist_
from .. import factors
from ..schedules import precond_update_prob_schedule
from ..structure import KronPlan
from . import checkpoint, memory, newton, placement
from .apply import clip_global
from .compiling import eager_under_compile
from .config import (
    Hyper,
    check_group,
    check_options,
    check_param,
    decide,
    mu_dtype,
    precond_dtype,  # fmt: skip
)
from .grouped import CompiledSteps, GroupPlan, plan_key, run
from .kernels import Item, single_step, stacked_step
from .memory import ParamInfo
from .streams import LazyCount, Streams, draw_all


class Kron(torch.optim.Optimizer):
    """PSGD Kron (X.-L. Li): momentum preconditioned by a Kronecker-factored ``P = QᴴQ``.

    The positional arguments are kron-torch's, with its defaults (``lr`` about 3x smaller than
    Adam's; ``weight_decay`` decoupled, on ``ndim >= 2`` only; ``preconditioner_update_probability``
    a float, a callable ``n -> prob`` or ``None`` for ``precond_update_prob_schedule()``;
    ``max_size_triangular``, ``min_ndim_triangular``, ``memory_save_mode``, ``merge_dims``: which
    dims get diagonal factors (docs/maths.md §4); ``precond_init_scale=None``: the data-driven
    scale).

    Keyword-only, beyond kron-torch (defaults keep its behaviour; docs/guide/kron.md has the table):

    Args:
        geometry: the Lie-group rule, a name registered in ``psgd_lab.geometry.REGISTRY``.
        mode: ``"whiten"`` (kron-torch) or ``"newton"``: fit ``P`` to Hessian-vector products;
            then ``step(closure)`` is required and the closure returns the loss without calling
            ``backward()``: the optimiser adds its gradient to ``.grad`` and computes ``Hv``.
        hvp: Newton's ``Hv``: ``"autograd"`` (exact) or ``"finite_difference"``.
        max_skew: a dim of size ``d`` becomes diagonal when ``d² > max_skew · numel``.
        damping: ``None``: kron-torch's relative ``sqrt(eps)·mean|h|·v`` in whitening, none in
            Newton mode (its pairs are exact); a float ``λ``: noise ``(λ + eps|h|)·n``.
        lipschitz, beta_L: step normalisation, ``"kron"`` (``L = ℓ``) or the ``"ema"``.
        precond_budget: a multiple of each parameter's bytes its factors may take; the largest
            dense dims become diagonal until they fit (``describe()`` reports which).
        clip, clip_max_amp: the update ``P m̂`` is clipped to RMS ``clip_max_amp`` per tensor
            (``"tensor"``, kron-torch's, with 1.1), over the whole group (``"global"``, the
            reference's ``grad_clip_max_amp``), or not at all (``None``).
        clip_max_entry: then every entry of the update is limited to ``±clip_max_entry`` (the
            reference's element-wise ``grad_clip_max_amps[1]``; ``inf``, the default: no limit).
        seed: seeds the per-parameter random streams and the balancing decisions (42 gives
            kron-torch's); the global RNG is never touched.
        nonfinite: ``"skip"`` leaves a parameter with a NaN/Inf gradient (or ``Hv``), its momentum
            and ``Q`` untouched, masked on the device (no host sync), counted lazily in
            ``nonfinite_count``; ``"raise"`` raises ``FloatingPointError`` (one sync per step).
        precond_cache: keep ``P_i = Q_iᴴQ_i`` between updates where it pays (not checkpointed).
        kernel: ``"grouped"`` stacks tensors of equal structure (the fast path) or ``"single"``,
            the plain per-tensor reference; the same maths, tested equal.
        compile: compile the grouped kernel with ``torch.compile`` (one graph per structure).
        distributed, process_group, dtensor: see ``placement`` and the README (``"shard"``:
            one owner rank per parameter; FSDP2 ``"full"`` or ``"local"``).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.0003,
        b1: float = 0.9,
        weight_decay: float = 0.0,
        preconditioner_update_probability: float | Callable | None = None,
        max_size_triangular: int = 8192,
        min_ndim_triangular: int = 2,
        memory_save_mode: str | None = None,
        momentum_into_precond_update: bool = True,
        precond_lr: float = 0.1,
        precond_init_scale: float | None = 1.0,
        merge_dims: bool = True,
        mu_dtype: torch.dtype | None = None,
        precond_dtype: torch.dtype | None = None,
        *,
        geometry: str = "EQ",
        mode: str = "whiten",
        hvp: str = "autograd",
        max_skew: float = math.inf,
        damping: float | None = None,
        lipschitz: str = "kron",
        beta_L: float = 0.9,
        precond_budget: float | None = None,
        clip: str | None = "tensor",
        clip_max_amp: float = 1.1,
        clip_max_entry: float = math.inf,
        seed: int = 42,
        nonfinite: str = "skip",
        precond_cache: bool = True,
        kernel: str = "grouped",
        compile: bool = False,
        distributed: str | None = None,
        process_group=None,
        dtensor: str = "full",
    ):
        if preconditioner_update_probability is None:
            preconditioner_update_probability = precond_update_prob_schedule()
        check_options(mode=mode, hvp=hvp, nonfinite=nonfinite, kernel=kernel, seed=seed,
                      precond_cache=precond_cache, compile=compile, distributed=distributed,
                      dtensor=dtensor)  # fmt: skip
        defaults = dict(
            lr=lr, b1=b1, weight_decay=weight_decay,
            preconditioner_update_probability=preconditioner_update_probability,
            max_size_triangular=max_size_triangular, min_ndim_triangular=min_ndim_triangular,
            memory_save_mode=memory_save_mode,
            momentum_into_precond_update=momentum_into_precond_update, precond_lr=precond_lr,
            precond_init_scale=precond_init_scale, merge_dims=merge_dims, mu_dtype=mu_dtype,
            precond_dtype=precond_dtype, geometry=geometry, max_skew=max_skew, damping=damping,
            lipschitz=lipschitz, beta_L=beta_L, precond_budget=precond_budget, clip=clip,
            clip_max_amp=clip_max_amp, clip_max_entry=clip_max_entry,
        )  # fmt: skip
        check_group(defaults)
        self._group_keys = tuple(defaults)  # Kron's per-group settings
        self.mode, self.hvp, self.seed, self.nonfinite = mode, hvp, seed, nonfinite
        self.precond_cache, self.kernel, self.compile = precond_cache, kernel, compile
        self.distributed, self.process_group, self.dtensor = distributed, process_group, dtensor
        self._owner: dict[Tensor, int] = {}  # p -> owner rank (distributed="shard")
        self._layout_checked, self._has_dtensor = False, None
        self._cache: dict = {}  # P_i kept between steps (not in state_dict)
        self._counters: list[int] = []
        self._draw_counts: list[int] = []  # per parameter: preconditioner updates drawn for
        self._plans: dict[int, tuple[tuple, KronPlan, tuple]] = {}
        self._group_plans: dict[int, tuple] = {}  # the latest GroupPlan per group
        self._draw_spec: dict[int, tuple] = {}  # id(p) -> (plan, geometry, starts, dtype, device)
        self._warned: set[str] = set()
        super().__init__(params, defaults)
        self._prob_step = 0  # step() calls so far: the schedule's n
        self._rng = random.Random(seed)  # balancing decisions, as kron-torch's Random(42)
        self._streams = Streams(seed)
        self._nonfinite = LazyCount()
        self._step_fn = stacked_step
        if compile:
            self._step_fn = CompiledSteps(fullgraph=True, dynamic=False)

    # ------------------------------------------------------------------ groups and structure
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_group(group)
            for p in group["params"]:
                check_param(p, group)
        except ValueError:
            self.param_groups.pop()
            raise
        self._counters.append(0)
        self._group_plans.clear()
        self._draw_counts += [0] * len(group["params"])
        self._layout_checked, self._has_dtensor = False, None  # compared again at the next step
        memory.warn(self, len(self.param_groups) - 1)

    def _shape(self, p: Tensor) -> tuple[int, ...]:
        """The shape Kron preconditions: ``p``'s, or its local shard's with ``dtensor="local"``."""
        if self.dtensor == "local" and dist_.is_dtensor(p):
            return tuple(p.to_local().shape)
        return tuple(p.shape)

    def _precond_dtype(self, group: dict, p: Tensor) -> torch.dtype:
        return precond_dtype(group, p)

    def _structure(self, p: Tensor, group: dict, budget_dims: bool = False):
        return memory.structure(self, p, group, budget_dims)

    def _plans_now(self, todo: list) -> dict:
        """``p -> plan`` for this step's parameters (each group's settings read once)."""
        keys = {gi: memory.group_key(self.param_groups[gi]) for gi in {t[1] for t in todo}}
        return {p: memory.structure(self, p, self.param_groups[gi], gkey=keys[gi])
                for p, gi, *_ in todo}  # fmt: skip

    def describe(self) -> list[ParamInfo]:
        """Per parameter: its factor shapes, which dims are diagonal (and which ``precond_budget``
        made so), and the bytes of momentum, factors and cache. Valid before any step."""
        return memory.describe(self)

    def _owners(self) -> dict[Tensor, int]:
        return placement.owners(self)

    @property
    def nonfinite_count(self) -> int:
        """Parameter-steps skipped for a non-finite gradient (reading it syncs the device)."""
        return self._nonfinite.value()

    @nonfinite_count.setter
    def nonfinite_count(self, n: int) -> None:
        self._nonfinite.set(n)

    # ------------------------------------------------------------------ the step
    @eager_under_compile  # a compiled training step calls it eagerly (compile=True compiles
    @torch.no_grad()  # the grouped kernel itself)
    def step(self, closure: Callable | None = None):
        """One optimisation step. ``closure`` re-evaluates the model and returns the loss; in
        whitening mode it calls ``backward()`` (and usually ``zero_grad()``) and runs first, so
        the step sees the gradients it made; in Newton mode it must not call ``backward()``."""
        placement.check_layout(self)  # before the closure: Newton mode all-reduces inside it
        loss = None if self.mode == "newton" else newton.call_closure(closure)
        decisions = [self._decide(gi, g) for gi, g in enumerate(self.param_groups)]
        todo = self._todo(decisions)
        counts = list(self._draw_counts)
        plans = self._plans_now([t for t in todo if t[2]])  # the updating ones' (for the draws)
        draws = self._draw(todo, counts, plans)
        hvs: dict = {}
        if self.mode == "newton":
            probes = {p: d.v.reshape(p.shape).to(p.dtype) for p, d in draws.items()}
            loss, hvs = newton.pairs(self, closure, [t[0] for t in todo], probes)
        finite = placement.screen(self, todo, hvs)
        grads = {p: self._grad(p) for p, *_ in todo}  # FSDP2: a collective, in order on all ranks
        self._counters = [counter for _, counter, _ in decisions]  # nothing raised: commit
        self._prob_step += 1
        self._draw_counts = counts
        balance = self._rng.random() < 0.01  # drawn every step, as kron-torch does
        self._run(todo, plans, grads, draws, hvs, finite, balance)
        if self._nonfinite.new_since_poll() and "nonfinite" not in self._warned:
            self._warned.add("nonfinite")
            warnings.warn(
                "Kron: a gradient had NaN/Inf values; that parameter's step was skipped "
                "(parameter, momentum and preconditioner untouched). Further skips are counted "
                "in optimizer.nonfinite_count without warning.",
                RuntimeWarning,
                stacklevel=2,
            )
        return loss

    def _decide(self, gi: int, group: dict) -> tuple[bool, int, float]:
        """The group's update decision, its next counter and ``prob(n)`` (``config.decide``)."""
        prob = group["preconditioner_update_probability"]
        return decide(prob, self._prob_step, self._counters[gi])

    def _todo(self, decisions: list) -> list[tuple[Tensor, int, bool, float]]:
        """``(p, group index, do_update, prob)`` of every parameter that steps now."""
        out = []
        for gi, (group, (do, _, prob)) in enumerate(zip(self.param_groups, decisions)):
            for p in group["params"]:
                ready = p.requires_grad if self.mode == "newton" else p.grad is not None
                if p.numel() > 0 and ready:
                    if p.grad is not None and p.grad.is_sparse:
                        raise RuntimeError("Kron does not support sparse gradients")
                    out.append((p, gi, do, prob))
        return out

    def _index(self, p: Tensor) -> int:
        if getattr(self, "_pos_of", None) is None or len(self._pos_of) != len(self._draw_counts):
            flat = (q for g in self.param_groups for q in g["params"])
            self._pos_of = {id(q): i for i, q in enumerate(flat)}
        return self._pos_of[id(p)]

    def _draw(self, todo: list, counts: list[int], plans: dict) -> dict:
        """Each updating parameter's draws from its own stream (``streams.draw_all``)."""
        return draw_all(self, todo, counts, plans)

    def _grad_device(self, p: Tensor) -> torch.device:
        return p.to_local().device if dist_.is_dtensor(p) else p.device

    def _grad(self, p: Tensor) -> Tensor:
        """The gradient Kron uses: ``p.grad``, gathered or local for a DTensor."""
        if dist_.is_dtensor(p.grad):
            return p.grad.to_local() if self.dtensor == "local" else p.grad.full_tensor()
        return p.grad

    def _init_state(self, p: Tensor, group: dict, plan: KronPlan) -> dict:
        dev, scale = self._grad_device(p), group["precond_init_scale"]
        fits_p = Hyper.of(group, False).geometry.fits_p
        st = {
            "step": torch.zeros((), dtype=torch.int64, device=dev),
            "momentum_buffer": torch.zeros(self._shape(p), dtype=mu_dtype(group, p), device=dev),
            "Q": factors.init_factors(
                plan, 1.0 if scale is None else scale, precond_dtype(group, p), dev, fits_p
            ),  # fmt: skip
        }
        if group["lipschitz"] == "ema":
            real = torch.promote_types(st["Q"][0].real.dtype, torch.float32)
            st["L"] = [torch.zeros((), dtype=real, device=dev) for _ in st["Q"]]
        if scale is None:
            st["initialised"] = torch.zeros((), dtype=torch.bool, device=dev)
        return st

    def _run(self, todo, plans, grads, draws, hvs, finite, balance) -> None:
        """One kernel per group over the parameters this rank owns; results to the placement."""
        own = self._owners()
        rank = dist_.rank_and_size(self.process_group)[0] if own else 0
        stepped, owned = [], {}
        for gi, group in enumerate(self.param_groups):
            mine = [t for t in todo if t[1] == gi and grads[t[0]].numel() > 0]
            if finite is not None:
                skipped = [t for t in mine if not finite[t[0]]]
                mine = [t for t in mine if finite[t[0]]]
                self._nonfinite.add(torch.ones(len(skipped), dtype=torch.bool))
            stepped += [(p, group) for p, *_ in mine]
            ps = [p for p, *_ in mine if own.get(p, rank) == rank] if own else [t[0] for t in mine]
            if not ps:
                continue
            do, prob = mine[0][2], mine[0][3]
            hy = Hyper.of(group, self.mode == "newton")
            results = self._kernel(gi, group, ps, plans, grads, draws, hvs, hy, do, prob, balance)
            if hy.clip == "global":
                if own or self.dtensor == "local" and self._has_dtensor:
                    raise ValueError(
                        "clip='global' needs the whole group's update on every rank; it does "
                        "not combine with distributed='shard' or dtensor='local'"
                    )
                clip_global([u for u, _ in results], hy.clip_max_amp)
            if finite is None:
                self._nonfinite.add(~torch.stack([ok for _, ok in results]))
            done = [(p, u, ok) for p, (u, ok) in zip(ps, results)]
            if own:
                owned.update({p: (u, ok) for p, u, ok in done if placement.whole(self, p)})
                done = [d for d in done if not placement.whole(self, d[0])]
            placement.apply(self, group, done)
        if own:
            placement.exchange(self, owned, stepped, rank)

    def _kernel(self, gi, group, ps, plans, grads, draws, hvs, hy, do, prob, balance) -> list:
        """``(u, ok)`` of each of ``ps``: the reference kernel, or the grouped one on the group's
        plan (kept while the same parameters step, ``grouped.GroupPlan``)."""
        cache = self._cache if self.precond_cache else {}
        prob = prob if self.precond_cache else None
        with_hv = ps[0] in hvs  # Newton mode's update steps
        key = None
        if self.kernel == "grouped":
            key = plan_key(ps, memory.group_key(group), prob, with_hv)
            got = self._group_plans.get(gi)
            if got is not None and got[0] == key and got[2] is self.state:
                hv = [hvs[p] for p in ps] if with_hv else None
                return run(got[1], [grads[p] for p in ps], [draws.get(p) for p in ps], hv, hy,
                           do_update=do, balance=balance, cache=cache,
                           step_fn=self._step_fn)  # fmt: skip
        if any(p not in plans for p in ps):
            plans = {**plans, **self._plans_now([(q, gi) for q in ps])}
        items = []
        for p in ps:
            if len(self.state[p]) == 0:
                self.state[p].update(self._init_state(p, group, plans[p]))
            items.append(Item(p, grads[p], self.state[p], plans[p], draws.get(p), hvs.get(p)))
        if key is None:
            return single_step(items, hy, do_update=do, prob=prob, balance=balance, cache=cache)
        plan = GroupPlan(items, prob)
        self._group_plans[gi] = (key, plan, self.state)
        hv = [it.hv for it in items] if with_hv else None
        return run(
            plan,
            [it.grad for it in items],
            [it.draws for it in items],
            hv,
            hy,
            do_update=do,
            balance=balance,
            cache=cache,
            step_fn=self._step_fn,
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The whole state, also under ``distributed="shard"`` (then a collective: every rank
        must call it; the owners' states are gathered to the CPU of every rank)."""
        return checkpoint.state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        checkpoint.load_state_dict(self, state_dict, super().load_state_dict)
