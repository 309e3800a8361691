"""``Kron``: PSGD Kron as a ``torch.optim.Optimizer`` (MATH.md §5), a drop-in for kron-torch's.

The optimiser is the only place that knows about ``param_groups`` and ``state``; one step reads:

1. decide, per group, whether to update the preconditioner (``schedules``, a counter);
2. Newton mode only: ``Hv`` from the closure (``pairs``);
3. per parameter: momentum ``m`` and ``m̂ = m / (1 − b1ᵗ)``; the pair ``(v, h)``; one fitting
   step of the group's ``geometry`` on ``Q`` (``geometry.update``); ``u = P m̂``
   (``factors.apply_p``); RMS clip at 1.1; weight decay on ``ndim ≥ 2``; ``θ ← θ − lr·u``.

Defaults reproduce kron-torch 0.3.3 step for step (EQ, kron-torch normalisation, the same
schedule, the same balancing decisions). Keyword-only arguments go beyond it.
"""

from __future__ import annotations

import math
import random
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor

from . import distributed as dist_
from . import factors
from . import geometry as geo
from .pairs import (
    HVP_METHODS,
    damp,
    hvp_autograd,
    hvp_finite_difference,
    kron_torch_damp,
    randn_like,
)
from .schedules import UpdateProbSchedule, precond_update_prob_schedule
from .structure import KronPlan, check_memory_save_mode, diag_dims, make_plan, merged_shape

MODES = ("whiten", "newton")
NONFINITE = ("skip", "raise")
STATE_FORMAT = 1
_EXTRA = "psgd_lab"  # the key of the optimiser-wide state in state_dict()


@dataclass(frozen=True)
class ParamInfo:
    """What ``Kron`` keeps for one parameter (see ``Kron.describe``)."""

    group: int
    index: int
    shape: tuple[int, ...]
    factor_shape: tuple[int, ...]
    diag: tuple[bool, ...]
    factor_shapes: tuple[tuple[int, ...], ...]
    momentum_bytes: int
    precond_bytes: int
    cache_bytes: int  # the cached P_i (0 with precond_cache=False or for PRO4P/QUAD4P)
    owner: int = 0  # the rank that keeps this parameter's state (distributed="shard")


class Kron(torch.optim.Optimizer):
    """PSGD Kron (X.-L. Li): momentum preconditioned by a Kronecker-factored ``P = QᴴQ``.

    The positional arguments are kron-torch's, with its defaults:

    Args:
        params: parameters or parameter groups; every argument below except ``mode``, ``hvp``,
            ``seed`` and ``nonfinite`` may be set per group.
        lr: learning rate (about 3x smaller than Adam's works well).
        b1: momentum factor, in [0, 1).
        weight_decay: decoupled weight decay, applied to parameters with ``ndim >= 2`` only.
        preconditioner_update_probability: a float in (0, 1], a callable ``n -> prob`` (``n``
            counts ``step()`` calls), or ``None`` for ``precond_update_prob_schedule()``.
        max_size_triangular, min_ndim_triangular, memory_save_mode: which dims get diagonal
            factors (MATH.md §4).
        momentum_into_precond_update: fit ``P`` on the debiased momentum (True) or the gradient.
        precond_lr: the preconditioner's step size.
        precond_init_scale: ``Q = scale · I`` at start; ``None`` picks the data-driven scale of
            MATH.md §4 at the first preconditioner update.
        merge_dims: precondition ``ndim > 2`` tensors as kron-torch's 2-D merged shape.
        mu_dtype: dtype of the momentum (default: the parameter's).
        precond_dtype: dtype of ``Q`` and of the preconditioning maths (default float32).

    Keyword-only, beyond kron-torch (defaults keep its behaviour):

    Args:
        geometry: the Lie-group update rule, one of ``psgd_lab.GEOMETRIES``.
        mode: ``"whiten"`` fits ``P`` to the gradients (kron-torch); ``"newton"`` fits it to
            Hessian-vector products: ``step(closure)`` is required, and the closure must return
            the loss without calling ``backward()`` (the optimiser differentiates it). Under an
            initialised process group the gradient and ``Hv`` are averaged over
            ``process_group`` (DDP's hooks do not see the optimiser's own differentiation).
        hvp: Newton mode's ``Hv``: ``"autograd"`` (exact; one double backward, about 2x a
            backward, only on steps that update ``P``) or ``"finite_difference"`` (one extra
            forward and backward at ``θ + δv``, ``δ = sqrt(eps)``; no second derivatives).
        max_skew: a dim of size ``d`` becomes diagonal when ``d² > max_skew · numel``.
        damping: ``None`` adds kron-torch's ``sqrt(eps_f32)·mean|h|·v`` to ``h``; a float ``λ``
            adds independent noise ``(λ + eps|h|)·n`` instead (the newer reference). Bounds
            ``P`` from above by about ``1/λ``.
        lipschitz: step normalisation: ``"kron"`` (``L = ℓ``, kron-torch) or ``"ema"``.
        beta_L: the EMA factor of ``lipschitz="ema"``.
        seed: seeds the optimiser's own generators (``v`` draws and balancing); the global RNG is
            never touched. ``42`` reproduces kron-torch's balancing decisions.
        precond_cache: keep ``P_i = Q_iᴴQ_i`` between preconditioner updates, so applying ``P``
            costs two matrix products per dense factor instead of four; it doubles the
            preconditioner's memory (``describe()`` reports it). Not saved in ``state_dict()``:
            recomputed from ``Q``. ``False`` applies ``Qᴴ(Q m̂)`` directly.
        nonfinite: ``"skip"`` leaves a parameter, its momentum and its preconditioner untouched
            on a step whose gradient (or ``Hv``) has a NaN/Inf, counts it and warns once;
            ``"raise"`` raises ``FloatingPointError``. The check costs one host sync per step.
        distributed: ``None``: every rank runs the whole step (DDP averages the gradients, the
            shared ``seed`` and the deterministic schedule keep the ranks identical).
            ``"shard"``: each parameter gets one owner rank, balanced by cost, that keeps its
            momentum and ``Q`` and computes its update; the new values are broadcast from the
            owners. Equal to the ``None`` run up to the gradients' round-off; needs an
            initialised process group; ``state_dict()`` becomes a collective that gathers the
            whole state (a checkpoint loads into any world size, or one process).
        process_group: the group of ``distributed="shard"`` and of Newton mode's averaging
            (default: the world).
        dtensor: how FSDP2 parameters (DTensors) are preconditioned. ``"full"``: whole, as in
            one process: the gradient is gathered (``full_tensor()``), momentum and ``Q`` are
            kept for the full tensor (on every rank, or on its owner with ``"shard"``) and each
            rank applies its shard of the update. ``"local"``: each rank's shard is a tensor of
            its own (its own ``Q``, momentum and clip), no communication and 1/world of the
            state, but a block-diagonal preconditioner that depends on the world size, and a
            per-rank ``state_dict()`` (save one file per rank).
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
        seed: int = 42,
        nonfinite: str = "skip",
        precond_cache: bool = True,
        distributed: str | None = None,
        process_group=None,
        dtensor: str = "full",
    ):
        if preconditioner_update_probability is None:
            preconditioner_update_probability = precond_update_prob_schedule()
        _check_choice("mode", mode, MODES)
        _check_choice("hvp", hvp, HVP_METHODS)
        _check_choice("nonfinite", nonfinite, NONFINITE)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int; got {seed!r}")
        if not isinstance(precond_cache, bool):
            raise ValueError(f"precond_cache must be True or False; got {precond_cache!r}")
        _check_choice("distributed", distributed, dist_.DISTRIBUTED)
        _check_choice("dtensor", dtensor, dist_.DTENSOR)
        if distributed == "shard" and dtensor == "local":
            raise ValueError(
                "dtensor='local' already keeps each rank's shards on that rank; it does not "
                "combine with distributed='shard' (use one or the other)"
            )
        if distributed is not None:
            dist_.require_process_group(distributed)
        defaults = dict(
            lr=lr,
            b1=b1,
            weight_decay=weight_decay,
            preconditioner_update_probability=preconditioner_update_probability,
            max_size_triangular=max_size_triangular,
            min_ndim_triangular=min_ndim_triangular,
            memory_save_mode=memory_save_mode,
            momentum_into_precond_update=momentum_into_precond_update,
            precond_lr=precond_lr,
            precond_init_scale=precond_init_scale,
            merge_dims=merge_dims,
            mu_dtype=mu_dtype,
            precond_dtype=precond_dtype,
            geometry=geometry,
            max_skew=max_skew,
            damping=damping,
            lipschitz=lipschitz,
            beta_L=beta_L,
        )
        _check_group(defaults)
        self._group_keys = tuple(defaults)  # Kron's per-group settings
        self.mode = mode
        self.hvp = hvp
        self.seed = seed
        self.nonfinite = nonfinite
        self.precond_cache = precond_cache
        self.distributed = distributed
        self.process_group = process_group
        self.dtensor = dtensor
        self._owner: dict[Tensor, int] = {}  # p -> owner rank (distributed="shard")
        self._layout_checked = False
        self._has_dtensor: bool | None = None  # FSDP2 parameters among ours (None: not looked)
        self._cache: dict[Tensor, list[Tensor]] = {}  # p -> P_i factors (not in state_dict)
        self._counters: list[int] = []
        super().__init__(params, defaults)
        self._prob_step = 0  # step() calls so far: the schedule's n
        self._rng = random.Random(seed)  # balancing decisions, as kron-torch's Random(42)
        self._generators: dict[str, torch.Generator] = {}  # v draws, one per device
        self._generator_states: dict[str, Tensor] = {}  # loaded, applied when first used
        self.nonfinite_count = 0  # parameter-steps skipped for a non-finite gradient
        self._warned_nonfinite = False
        self._plans: dict[int, tuple[tuple, KronPlan]] = {}

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group)
            for p in group["params"]:
                if not (p.is_floating_point() or p.is_complex()):
                    raise ValueError(
                        f"Kron optimises floating-point or complex tensors; got {p.dtype}"
                    )
        except ValueError:
            self.param_groups.pop()
            raise
        self._counters.append(0)
        self._layout_checked = False  # compared again across ranks at the next step
        self._has_dtensor = None

    # ------------------------------------------------------------------ structure
    def _shape(self, p: Tensor) -> tuple[int, ...]:
        """The shape Kron preconditions: ``p``'s, or its local shard's with ``dtensor="local"``."""
        if self.dtensor == "local" and dist_.is_dtensor(p):
            return tuple(p.to_local().shape)
        return tuple(p.shape)

    def _structure(self, p: Tensor, group: dict) -> KronPlan:
        """The contraction plan of ``p`` under ``group``'s settings (cached per parameter); its
        ``shape`` is the factor shape (kron-torch's merged shape with ``merge_dims``)."""
        shape = self._shape(p)
        key = (
            shape,
            group["merge_dims"],
            group["max_size_triangular"],
            group["min_ndim_triangular"],
            group["memory_save_mode"],
            group["max_skew"],
        )
        cached = self._plans.get(id(p))
        if cached is not None and cached[0] == key:
            return cached[1]
        fshape = merged_shape(shape) if group["merge_dims"] and len(shape) > 2 else shape
        diag = diag_dims(
            fshape,
            group["max_size_triangular"],
            group["min_ndim_triangular"],
            group["memory_save_mode"],
            group["max_skew"],
        )
        plan = make_plan(fshape, diag)
        self._plans[id(p)] = (key, plan)
        return plan

    def describe(self) -> list[ParamInfo]:
        """Per parameter: its factor shapes, which dims are diagonal, and the bytes of momentum
        and preconditioner (what kron-torch prints on its first step). Valid before any step."""
        out = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                plan = self._structure(p, group)
                mu = group["mu_dtype"] or p.dtype
                pd = _precond_dtype(group, p)
                shapes = tuple(tuple(s) for s in plan.factor_shapes())
                out.append(
                    ParamInfo(
                        group=gi,
                        index=pi,
                        shape=tuple(p.shape),
                        factor_shape=plan.shape,
                        diag=plan.diag,
                        factor_shapes=shapes,
                        momentum_bytes=p.numel() * _itemsize(mu),
                        precond_bytes=sum(math.prod(s) for s in shapes) * _itemsize(pd),
                        cache_bytes=sum(x.nbytes for x in self._cache.get(p, ()) if x is not None),
                        owner=self._owners().get(p, 0),
                    )
                )
        return out

    # ------------------------------------------------------------------ distributed
    def _owners(self) -> dict[Tensor, int]:
        """``p -> owner rank`` under ``distributed="shard"`` (every rank computes the same
        assignment from the same costs); empty otherwise. Parameters keep their owner: a group
        added later is placed on the ranks' current loads."""
        if self.distributed != "shard":
            return self._owner
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        new = [(p, g) for p, g in params if p not in self._owner]
        if new:
            size = dist_.rank_and_size(self.process_group)[1]
            load = [0.0] * size
            for p, g in params:
                if p in self._owner:
                    load[self._owner[p]] += dist_.step_cost(self._structure(p, g))
            costs = [dist_.step_cost(self._structure(p, g)) for p, g in new]
            owners = dist_.assign_owners(costs, size, load)
            self._owner.update({p: r for (p, _), r in zip(new, owners)})
        return self._owner

    def _collective(self) -> bool:
        """Whether ``step()`` communicates: ``"shard"``, FSDP2 parameters, or Newton mode's
        averaging under a process group."""
        if self._has_dtensor is None:
            params = (p for g in self.param_groups for p in g["params"])
            self._has_dtensor = any(dist_.is_dtensor(p) for p in params)
        if self.distributed is not None or self._has_dtensor:
            return True
        return self.mode == "newton" and dist_.rank_and_size(self.process_group)[1] > 1

    def _device(self) -> torch.device:
        """Where small bookkeeping tensors live: the first parameter's (local) device, so that a
        collective over them works with any backend (NCCL refuses CPU tensors)."""
        for g in self.param_groups:
            for p in g["params"]:
                return p.device
        return torch.device("cpu")

    def _check_layout(self) -> None:
        """Once (again after ``add_param_group`` and ``load_state_dict``) when ``step()``
        communicates: every rank has the same parameters, settings, seed and schedule state, or
        every rank raises the same ``ValueError`` (instead of a hang in a collective)."""
        if self._layout_checked or not self._collective():
            return
        groups = [
            {
                "params": [(tuple(p.shape), str(p.dtype), p.requires_grad) for p in g["params"]],
                **{k: _fingerprint(g.get(k)) for k in self._group_keys},  # not torch's or yours
            }
            for g in self.param_groups
        ]
        settings = {
            "seed": self.seed,
            "mode": self.mode,
            "hvp": self.hvp,
            "nonfinite": self.nonfinite,
            "distributed": self.distributed,
            "dtensor": self.dtensor,
            "step() calls": self._prob_step,
            "update counters": self._counters,
        }
        dist_.check_same_layout({"param_groups": groups, **settings}, self.process_group)
        self._layout_checked = True

    def _agree(self, items: list, finite: Tensor | None = None) -> None:
        """When ``step()`` communicates: the ranks step the same parameters with the same update
        decisions (and, given ``finite``, the same finiteness), or all raise the same
        ``RuntimeError`` (one small all-reduce; a mismatch would otherwise hang in the next
        collective or silently desynchronise the ranks)."""
        pos = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        n, dev = len(pos), self._device()
        codes = torch.zeros(n, dtype=torch.int32, device=dev)
        if items:
            idx = torch.tensor([pos[p] for p, *_ in items], device=dev)
            do = torch.tensor([it[2] for it in items], dtype=torch.int32, device=dev)
            ok = 1 if finite is None else finite.to(device=dev, dtype=torch.int32)
            codes[idx] = 1 + ok + 2 * do
        both = torch.cat([codes, -codes])
        dist_.all_max(both, self.process_group)
        bad = (both[:n] != -both[n:]).nonzero().flatten().tolist()
        if bad:
            where = [
                (gi, pi) for gi, g in enumerate(self.param_groups) for pi in range(len(g["params"]))
            ]
            raise RuntimeError(
                f"the ranks disagree at step {self._prob_step} on parameter(s) (group, index) "
                f"{[where[i] for i in bad]}: on some rank it has no gradient, a non-finite one, "
                "or another preconditioner-update decision. With distributed='shard' (and Newton "
                "mode under a process group) every rank must step the same parameters, as DDP "
                "and FSDP2 ensure"
            )

    def _skip_draws(self, p: Tensor, group: dict, plan: KronPlan, newton: bool) -> None:
        """Draw what the owner's ``_fit`` draws for ``p``, and drop it: the generator stays in
        step with the owner's, so the sharded run equals the replicated one. The owner draws
        ``v`` (whitening), the damping noise (a float ``damping``), then what the rule's norm
        bound draws (``geometry.draws``); a draw's consumption depends only on its shape."""
        pd, gen = _precond_dtype(group, p), self._gen(p.device)
        shapes = [plan.shape] * ((not newton) + (group["damping"] is not None))
        shapes += geo.draws(plan, group["lipschitz"])
        for shape in shapes:
            torch.randn(shape, dtype=pd, device=p.device, generator=gen)

    # ------------------------------------------------------------------ randomness
    def _gen(self, device: torch.device) -> torch.Generator:
        """The generator of ``device``, seeded with ``seed`` offset by the device *type* (not its
        index), so data-parallel ranks on ``cuda:0`` and ``cuda:1`` draw the same ``v``."""
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = self._generators[key] = torch.Generator(device=device)
            saved = self._generator_states.pop(key, None)
            if saved is None:  # a checkpoint from another rank: its one generator of this type
                same = [k for k in self._generator_states if k.split(":")[0] == device.type]
                saved = self._generator_states.pop(same[0]) if len(same) == 1 else None
            if saved is not None:
                gen.set_state(saved)
            else:
                kind = device.type
                gen.manual_seed(
                    self.seed if kind == "cpu" else self.seed + zlib.crc32(kind.encode())
                )
        return gen

    # ------------------------------------------------------------------ the step
    @torch.compiler.disable  # a compiled training step calls it eagerly (see README)
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One optimisation step. ``closure`` re-evaluates the model and returns the loss (it
        must call ``backward()`` in whitening mode, and must not in Newton mode).

        Under ``torch.compile`` the step runs eagerly: opt_einsum's contraction planning and the
        host-side schedule do not trace, and the CPU compiler gains nothing on these small matrix
        products (issue 6 measures it)."""
        self._check_layout()  # before the closure: Newton mode all-reduces inside it
        n = self._prob_step
        decisions = [self._decide(gi, group, n) for gi, group in enumerate(self.param_groups)]
        items = [
            (p, group, do, prob)
            for group, (do, _, prob) in zip(self.param_groups, decisions)
            for p in group["params"]
            if p.numel() > 0 and (p.requires_grad if self.mode == "newton" else p.grad is not None)
        ]
        if self.mode == "newton":
            loss, hvs = self._newton(closure, items)
        else:
            loss = _call_closure(closure)
            hvs = {}
        items = [it for it in items if it[0].grad is not None]
        for p, *_ in items:
            if p.grad.is_sparse:
                raise RuntimeError("Kron does not support sparse gradients; use dense gradients")
        if self._collective():  # before any collective that depends on which params step
            self._agree(items)
        grads = [self._grad(p) for p, *_ in items]  # FSDP2: gathered (a collective) or local
        finite = self._finite(items, grads, [hvs.get(p) for p, *_ in items])
        # nothing raised: commit the schedule's state (a failed step() leaves it untouched)
        self._counters = [counter for _, counter, _ in decisions]
        self._prob_step += 1
        balance = self._rng.random() < 0.01  # drawn every step, as kron-torch does

        owners = self._owners()
        rank = dist_.rank_and_size(self.process_group)[0] if owners else 0
        replicated, sharded = [], []  # distributed="shard": what travels from the owners
        for (p, group, do_update, prob), grad, ok in zip(items, grads, finite):
            if not ok or grad.numel() == 0:  # (an empty local shard)
                continue
            plan = self._structure(p, group)
            owner = owners.get(p, rank)
            update = None
            if owner == rank:
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, group, plan, state)
                state["step"] += 1
                update = self._step_param(
                    p, grad, group, plan, state, do_update, prob, balance, hvs.get(p)
                )
            elif do_update:
                self._skip_draws(p, group, plan, newton=p in hvs)
            if not dist_.is_dtensor(p) or self.dtensor == "local":
                if update is not None:
                    _apply_update(_local(p), p.dim(), group, *update)
                if owners:
                    replicated.append((p, owner))
            elif owners:
                sharded.append((p, group, owner, update))
            else:  # every rank has the whole update: apply its own shard
                Pm, scale = update
                _apply_shard(p, group, Pm, scale)
        if owners:
            self._exchange(replicated, sharded, rank)
        return loss

    def _grad(self, p: Tensor) -> Tensor:
        """The gradient Kron uses: ``p.grad``, gathered or local for a DTensor."""
        if dist_.is_dtensor(p.grad):
            return p.grad.to_local() if self.dtensor == "local" else p.grad.full_tensor()
        return p.grad

    def _exchange(self, replicated: list, sharded: list, rank: int) -> None:
        """``distributed="shard"``: every rank gets the owners' results by broadcasts over
        ``process_group``. Replicated parameters travel whole, in buckets; for a DTensor the
        owner sends the whole update ``P m`` and its clip scale, one parameter at a time (one
        full-size buffer at once), and each rank cuts its own shard locally (any device mesh)."""
        dist_.broadcast_from_owners(
            [p for p, _ in replicated], [r for _, r in replicated], self.process_group
        )
        for p, group, owner, update in sharded:
            if update is None:
                dev = p.to_local().device
                Pm = torch.empty(p.shape, dtype=_precond_dtype(group, p), device=dev)
                scale = torch.empty(1, dtype=Pm.real.dtype, device=dev)
            else:
                Pm, scale = update[0].reshape(p.shape), update[1].reshape(1)
            dist_.broadcast_from_owners([Pm, scale], [owner, owner], self.process_group)
            _apply_shard(p, group, Pm, scale.reshape(()))

    def _decide(self, gi: int, group: dict, n: int) -> tuple[bool, int, float]:
        """The group's deterministic update decision, its next counter and ``prob(n)``: update when
        ``counter + 1 >= 1/prob(n)`` (MATH.md §5). kron-torch's arithmetic: a callable gets ``n``
        as a float32 tensor, and a tensor probability is inverted in its own dtype."""
        prob = group["preconditioner_update_probability"]
        if callable(prob):
            prob = prob(torch.tensor(n, dtype=torch.float32))
        value = float(prob)
        if not 0 < value <= 1:
            raise ValueError(
                f"preconditioner_update_probability must be in (0, 1]; the schedule gave "
                f"{value!r} at step {n}"
            )
        inverse = float(1 / prob) if isinstance(prob, Tensor) else 1 / value
        counter = self._counters[gi] + 1
        return (True, 0, value) if counter >= inverse else (False, counter, value)

    def _init_state(self, p: Tensor, group: dict, plan: KronPlan, state: dict) -> None:
        scale = group["precond_init_scale"]
        state["step"] = 0
        mu = group["mu_dtype"] or p.dtype  # the whole tensor's, also for an FSDP2 shard
        state["momentum_buffer"] = torch.zeros(self._shape(p), dtype=mu, device=p.device)
        state["Q"] = factors.init_factors(
            plan,
            1.0 if scale is None else scale,
            _precond_dtype(group, p),
            p.device,
            group["geometry"] in geo.FITS_P,
        )
        state["initialised"] = scale is not None

    def _step_param(self, p, grad, group, plan, state, do_update, prob, balance, hv):
        """Momentum, one preconditioner update if ``do_update``, and ``(P m, scale)``: the step
        is ``θ ← θ − lr·scale·P m`` (``_apply_update``). ``grad`` is the whole gradient."""
        b1 = group["b1"]
        fshape = plan.shape
        pd = state["Q"][0].dtype
        m = state["momentum_buffer"]
        m.lerp_(grad.to(m.dtype), 1 - b1)  # MATH.md §5.1: m <- b1·m + (1 − b1)·g, one pass
        debias = 1 - b1 ** state["step"]
        m_view = m.to(dtype=pd).reshape(fshape)  # a view when the dtypes agree
        Q = state["Q"]
        if do_update:
            if balance and len(fshape) > 1:
                factors.balance(Q)
            if hv is None:
                m_hat = m_view / debias
                h = m_hat if group["momentum_into_precond_update"] else grad.to(pd).reshape(fshape)
                self._fit(group, plan, state, None, h)
            else:
                v, h = hv
                self._fit(group, plan, state, v.to(pd).reshape(fshape), h.to(pd).reshape(fshape))
        # MATH.md §5.4-5: u = P m̂ clipped to RMS 1.1, plus weight decay, θ <- θ − lr·u. P is
        # linear, so P m̂ = (P m)/debias: the debias and the clip fold into one scale, and the
        # step is one fused pass over θ (no host sync: the scale stays a tensor).
        Pm = self._precondition(p, group, plan, Q, m_view, prob, changed=do_update)
        rms = torch.linalg.vector_norm(Pm) / (math.sqrt(max(Pm.numel(), 1)) * debias)
        scale = torch.clamp(1.1 / (rms + 1e-12), max=1.0) / debias
        return Pm, scale.to(Pm.real.dtype)

    def _precondition(self, p, group, plan, Q, m_hat, prob: float, changed: bool) -> Tensor:
        """``u = P m̂`` along every axis: from the cached ``P_i`` where it pays, else ``Q_iᴴ Q_i``.

        Caching ``P_i`` costs one ``d_i³`` product after each update of ``Q`` and saves one
        ``d_i · numel`` product on every step, so a dense factor is cached while
        ``prob · d_i² ≤ numel`` (``prob``: this step's update probability). ``PRO4P``/``QUAD4P``
        factors are factors of ``P`` already.
        """
        fits_p = group["geometry"] in geo.FITS_P
        if fits_p or not self.precond_cache:
            return factors.apply_p(Q, m_hat, plan, fits_p)
        P = self._cache.setdefault(p, [None] * len(Q))
        if changed:
            P[:] = [None] * len(Q)
        numel = max(plan.numel, 1)
        first, twice = [], []
        for i, q in enumerate(Q):
            if q.dim() < 2 or prob * q.shape[0] ** 2 <= numel:
                if P[i] is None:
                    P[i] = factors.factor_p_compact(q, group["geometry"] in geo.TRIANGULAR)
                first.append(P[i])
            else:
                P[i] = None
                first.append(q)
                twice.append(i)
        u = factors.apply_q(first, m_hat, plan)
        for i in twice:
            u = factors.apply_one(Q[i].mH, i, u, plan)
        return u

    def _fit(self, group: dict, plan: KronPlan, state: dict, v: Tensor | None, h: Tensor) -> None:
        """One step of the group's geometry on ``Q``; ``v is None`` means whitening."""
        gen = self._gen(h.device)
        Q = state["Q"]
        # L carries over between updates only for the EMA; kron-torch's L = ℓ is scratch
        L = state.get("L")
        if L is None:
            real = torch.promote_types(Q[0].real.dtype, torch.float32)
            L = [torch.zeros((), dtype=real, device=h.device) for _ in Q]
            if group["lipschitz"] == "ema":
                state["L"] = L
        if v is None:  # whitening: v ~ N(0, I), integrated out by rules that allow it
            v = randn_like(h, gen)
            v_rule = v if group["geometry"] in geo.NEEDS_V else None
            newton = False
        else:
            v_rule, newton = v, True
        if not state["initialised"]:  # MATH.md §4: data-driven scale from the clean pair
            damping = 1e-9 if group["damping"] is None else group["damping"]
            fits_p = group["geometry"] in geo.FITS_P
            factors.scale_to_data(Q, h, v if newton else None, damping, fits_p)
            state["initialised"] = True
        if group["damping"] is None:  # kron-torch: h + sqrt(eps_f32)·mean|h|·v, v shared
            h = kron_torch_damp(h, v)
        else:
            h = damp(h, group["damping"], gen)
        # a pair that overflows (e.g. gradients of 1e30) gets step 0 inside the rule: Q stays finite
        geo.update(
            group["geometry"],
            Q,
            L,
            v_rule,
            h,
            plan,
            lr=group["precond_lr"],
            lipschitz=group["lipschitz"],
            beta_L=group["beta_L"],
            generator=gen,
        )

    # ------------------------------------------------------------------ non-finite gradients
    def _finite(self, items: list, grads: list[Tensor], hvs: list) -> list[bool]:
        """One flag per item: its gradient (and its ``(v, Hv)`` pair, if any) is finite. One
        host sync for all (after the ranks' agreement check when ``step()`` communicates)."""
        flags = []
        for g, hv in zip(grads, hvs):  # NaN propagates through min/max; ±inf shows: one pass
            if g.is_complex() or g.numel() == 0:  # (aminmax refuses an empty local shard)
                f = torch.isfinite(g).all()
            else:
                f = torch.isfinite(torch.stack(torch.aminmax(g.reshape(-1)))).all()
            if hv is not None:
                f = f & torch.isfinite(hv[1]).all()
            flags.append(f)
        dev = flags[0].device if flags else self._device()
        finite = torch.ones(0, dtype=torch.bool, device=dev)
        if flags:
            finite = torch.stack([f.to(dev) for f in flags])
        if self.dtensor == "local" and any(dist_.is_dtensor(p) for p, *_ in items):
            # each rank checks its own shard: skip a parameter on every rank if any shard is bad
            finite = dist_.all_min(finite.to(torch.uint8), self.process_group).bool()
        if self._collective():
            self._agree(items, finite)
        finite = finite.tolist()
        bad = len(finite) - sum(finite)
        if bad:
            if self.nonfinite == "raise":
                names = [i for i, ok in enumerate(finite) if not ok]
                raise FloatingPointError(
                    f"non-finite gradient (NaN/Inf) for parameter(s) at positions {names} of this "
                    f"step; pass nonfinite='skip' to skip such steps instead"
                )
            self.nonfinite_count += bad
            if not self._warned_nonfinite:
                warnings.warn(
                    "Kron: a gradient had NaN/Inf values; that parameter's step was skipped "
                    "(parameter, momentum and preconditioner untouched). Further skips are "
                    "counted in optimizer.nonfinite_count without warning.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned_nonfinite = True
        return finite

    # ------------------------------------------------------------------ Newton mode
    def _newton(self, closure: Callable | None, items: list) -> tuple[Tensor, dict]:
        """Loss, gradients (into ``p.grad``) and ``{p: (v, Hv)}`` for parameters whose group
        updates ``P`` this step."""
        if closure is None:
            raise RuntimeError(
                "Kron(mode='newton') needs step(closure): a closure that evaluates the model and "
                "returns the loss (without calling backward())"
            )
        params = [p for p, *_ in items]
        if any(dist_.is_dtensor(p) for p in params):
            raise NotImplementedError(
                "Kron(mode='newton') does not support FSDP2 (DTensor) parameters: FSDP2 "
                "reduces gradients in backward() hooks, which the optimiser's own "
                "autograd.grad/Hessian-vector products bypass. Use mode='whiten', or DDP"
            )
        upd = [p for p, _, do, _ in items if do]
        with torch.enable_grad():
            loss = _call_closure(closure)
            if not isinstance(loss, Tensor) or not loss.requires_grad:
                raise TypeError(
                    "in Newton mode the closure must return the loss as a tensor that requires "
                    f"grad; got {type(loss).__name__}"
                )
            try:
                grads = torch.autograd.grad(
                    loss, params, create_graph=bool(upd) and self.hvp == "autograd",
                    allow_unused=True,
                )  # fmt: skip
            except RuntimeError as e:
                if "second time" not in str(e):
                    raise
                raise RuntimeError(
                    "Kron(mode='newton') differentiates the closure's loss itself: the closure "
                    f"must not call backward() ({e})"
                ) from e
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            hvs = {}
            if upd:
                vs = [randn_like(p, self._gen(p.device)) for p in upd]
                by_p = dict(zip(params, grads))
                if self.hvp == "autograd":
                    hv = hvp_autograd([by_p[p] for p in upd], upd, vs)
                else:

                    def grad_fn():
                        out = torch.autograd.grad(_call_closure(closure), upd, allow_unused=True)
                        return [torch.zeros_like(p) if g is None else g for p, g in zip(upd, out)]

                    hv = hvp_finite_difference(grad_fn, upd, vs, [by_p[p].detach() for p in upd])
                hvs = {p: (v, x.detach()) for p, v, x in zip(upd, vs, hv)}
        grads = [g.detach() for g in grads]
        # data parallel: DDP's hooks do not see autograd.grad, so average g and Hv here (the
        # ranks drew the same v from the shared seed, so the mean Hv is the mean loss's)
        dist_.average([*grads, *(x for _, x in hvs.values())], self.process_group)
        for p, g in zip(params, grads):
            p.grad = g
        return loss.detach(), hvs

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The whole state, also under ``distributed="shard"`` (then a collective: every rank
        must call it; the owners' states are gathered to the CPU of every rank)."""
        sd = super().state_dict()
        if self.distributed == "shard":
            mine = {k: _copy_to(v, "cpu") for k, v in sd["state"].items() if v}
            merged = {}
            for part in dist_.gather_objects(mine, self.process_group):
                merged.update(part)
            sd["state"] = dict(sorted(merged.items()))
        sd[_EXTRA] = {
            "format": STATE_FORMAT,
            "prob_step": self._prob_step,
            "update_counters": list(self._counters),
            "rng": self._rng.getstate(),
            "generators": {
                **self._generator_states,
                **{k: g.get_state() for k, g in self._generators.items()},
            },
            "nonfinite_count": self.nonfinite_count,
            "layout": self._layout(),
            "seed": self.seed,
            "shard_of": self._shard_of(),
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        extra = state_dict.get(_EXTRA)
        if extra is None:
            raise ValueError(
                "this state dict was not saved by psgd_lab.Kron (no 'psgd_lab' entry); "
                "a kron-torch state dict cannot be resumed exactly"
            )
        if extra.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown psgd_lab.Kron state format {extra.get('format')!r}")
        saved_of, here_of = extra.get("shard_of"), self._shard_of()
        if saved_of != here_of:
            raise ValueError(
                f"this checkpoint holds {_shard_text(saved_of)}, and this optimiser needs "
                f"{_shard_text(here_of)}: with dtensor='local' each rank saves and loads its own "
                "file, under the same world size"
            )
        here = self._layout()
        saved = [[tuple(s) for s in g] for g in extra["layout"]]
        if saved != here:
            raise ValueError(
                "the state dict was saved for a different parameter layout: "
                f"{_layout_diff(saved, here)}"
            )
        saved_groups = state_dict["param_groups"]
        ids = list(chain.from_iterable(g["params"] for g in saved_groups))
        owners = [(p, sg) for sg, g in zip(saved_groups, self.param_groups) for p in g["params"]]
        by_id = dict(zip(ids, owners))
        for k, st in state_dict["state"].items():  # every check before anything changes
            p, saved_group = by_id[k]
            self._check_loaded(p, saved_group, st)
        sd = {k: v for k, v in state_dict.items() if k != _EXTRA}
        super().load_state_dict(sd)
        # torch casts floating state to the parameter's dtype, which rounds a float32 Q of a
        # bf16 parameter: take the saved tensors themselves (copied, moved to the device)
        owners = self._owners()
        rank = dist_.rank_and_size(self.process_group)[0] if owners else 0
        for k, st in state_dict["state"].items():
            p = by_id[k][0]
            if owners.get(p, rank) == rank:  # distributed="shard": keep the owned share
                self.state[p] = {key: _copy_to(v, p.device) for key, v in st.items()}
            else:
                self.state.pop(p, None)
        self._prob_step = int(extra["prob_step"])
        self._counters = [int(c) for c in extra["update_counters"]]
        self._rng.setstate(_as_rng_state(extra["rng"]))
        self._generators = {}
        self._generator_states = dict(extra["generators"])
        self._cache.clear()
        self._layout_checked = False  # the loaded schedule state is compared at the next step
        self.nonfinite_count = int(extra["nonfinite_count"])
        self.seed = int(extra["seed"])

    def _layout(self) -> list[list[tuple[int, ...]]]:
        """Each group's parameter shapes (whole shapes for FSDP2 parameters)."""
        return [[tuple(p.shape) for p in g["params"]] for g in self.param_groups]

    def _shard_of(self) -> list[int] | None:
        """``[rank, world]`` when the state is this rank's own (``dtensor="local"`` with FSDP2
        parameters), else ``None`` (the state is whole)."""
        self._collective()  # looks for DTensors once
        if self.dtensor == "local" and self._has_dtensor:
            return list(dist_.rank_and_size(self.process_group))
        return None

    def _check_loaded(self, p: Tensor, group: dict, st: dict) -> None:
        """A checkpoint's state for ``p`` under the saved ``group`` settings, or ``ValueError``."""
        mu = group["mu_dtype"] or p.dtype
        mom, shape = st["momentum_buffer"], self._shape(p)
        if tuple(mom.shape) != shape:
            raise ValueError(
                f"checkpoint momentum has shape {tuple(mom.shape)} but this parameter needs "
                f"{shape}" + (" (its local shard)" if shape != tuple(p.shape) else "")
            )
        if mom.dtype != mu:
            raise ValueError(
                f"checkpoint momentum is {mom.dtype} but this parameter ({p.dtype}, "
                f"mu_dtype={group['mu_dtype']}) needs {mu}: load it into parameters "
                "of the dtype it was saved with"
            )
        pd = _precond_dtype(group, p)
        plan = self._structure(p, group)
        shapes = [tuple(q.shape) for q in st["Q"]]
        if shapes != [tuple(s) for s in plan.factor_shapes()] or any(
            q.dtype != pd for q in st["Q"]
        ):
            raise ValueError(
                f"checkpoint factors {shapes} ({st['Q'][0].dtype}) do not match this parameter's "
                f"structure {plan.factor_shapes()} ({pd})"
            )


# ---------------------------------------------------------------------------- helpers


def _fingerprint(value):
    """A hyperparameter as every rank can compare it (no memory addresses; NaN equals NaN)."""
    if isinstance(value, UpdateProbSchedule):
        return repr(value)
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if callable(value):
        return f"callable {getattr(value, '__qualname__', type(value).__name__)}"
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def _apply_shard(p: Tensor, group: dict, Pm: Tensor, scale: Tensor) -> None:
    """``_apply_update`` on this rank's shard of the DTensor ``p``, cut from the whole ``P m``."""
    local = dist_.local_part(Pm.reshape(p.shape), p)
    _apply_update(p.to_local(), p.dim(), group, local, scale)


def _shard_text(shard_of) -> str:
    if shard_of is None:
        return "the whole state"
    return f"rank {shard_of[0]} of {shard_of[1]}'s shards"


def _local(p: Tensor) -> Tensor:
    """This rank's part of ``p`` to update in place: its shard for a DTensor, else ``p``."""
    return p.to_local() if dist_.is_dtensor(p) else p


def _apply_update(target: Tensor, ndim: int, group: dict, Pm: Tensor, scale: Tensor) -> None:
    """``θ ← (1 − lr·wd)·θ − lr·scale·P m`` in place (weight decay only for ``ndim ≥ 2``);
    ``target`` is the parameter, or this rank's shard of it."""
    if group["weight_decay"] != 0 and ndim >= 2:
        target.mul_(1 - group["lr"] * group["weight_decay"])
    target.addcmul_(Pm.reshape(target.shape), scale, value=-group["lr"])


def _call_closure(closure: Callable | None):
    if closure is None:
        return None
    with torch.enable_grad():
        loss = closure()
    if loss is None:
        raise TypeError("the closure passed to Kron.step must return the loss; it returned None")
    return loss


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(
            f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}"
        )


def _number(name: str, value, lo: float, hi: float, lo_open=False, hi_open=False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}; got {value!r}")


def _check_group(g: dict) -> None:
    """Validate one group's hyperparameters; ``ValueError`` naming the argument."""
    _number("lr", g["lr"], 0, math.inf)
    _number("b1", g["b1"], 0, 1, hi_open=True)
    _number("weight_decay", g["weight_decay"], 0, math.inf)
    prob = g["preconditioner_update_probability"]
    if not callable(prob):
        _number("preconditioner_update_probability", prob, 0, 1, lo_open=True)
    _number("max_size_triangular", g["max_size_triangular"], 0, math.inf)
    mnt = g["min_ndim_triangular"]
    if isinstance(mnt, bool) or not isinstance(mnt, int) or mnt < 0:
        raise ValueError(f"min_ndim_triangular must be an int >= 0; got {mnt!r}")
    check_memory_save_mode(g["memory_save_mode"])
    for name in ("momentum_into_precond_update", "merge_dims"):
        if not isinstance(g[name], bool):
            raise ValueError(f"{name} must be True or False; got {g[name]!r}")
    _number("precond_lr", g["precond_lr"], 0, math.inf, lo_open=True)
    if g["precond_init_scale"] is not None:
        scale = g["precond_init_scale"]
        _number("precond_init_scale", scale, 0, math.inf, lo_open=True, hi_open=True)
    kinds = {"mu_dtype": "floating-point", "precond_dtype": "floating-point or complex"}
    for name, kind in kinds.items():
        dt = g[name]
        ok = dt is None or (
            isinstance(dt, torch.dtype)
            and (dt.is_floating_point or (dt.is_complex and name == "precond_dtype"))
        )
        if not ok:
            raise ValueError(f"{name} must be None or a {kind} torch.dtype; got {dt!r}")
    geo.check_geometry(g["geometry"])
    _number("max_skew", g["max_skew"], 0, math.inf, lo_open=True)
    if g["damping"] is not None:
        _number("damping", g["damping"], 0, math.inf, hi_open=True)
    geo.check_lipschitz(g["lipschitz"])
    _number("beta_L", g["beta_L"], 0, 1, hi_open=True)


def _precond_dtype(group: dict, p: Tensor) -> torch.dtype:
    """float32 by default; the matching complex dtype for complex parameters."""
    pd = group["precond_dtype"]
    if pd is None:
        return torch.promote_types(torch.complex64, p.dtype) if p.is_complex() else torch.float32
    if p.is_complex() and not pd.is_complex:
        raise ValueError(
            f"precond_dtype={pd} would drop the imaginary part of a {p.dtype} parameter; "
            "use a complex precond_dtype (or None)"
        )
    return pd


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _copy_to(value, device):
    """A copy of a state value with its tensors on ``device`` and their dtypes kept."""
    if isinstance(value, Tensor):
        return value.to(device=device, copy=True)
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _copy_to(v, device) for k, v in value.items()}
    return value


def _as_rng_state(state):
    """``random.Random.setstate`` wants tuples; a checkpoint round trip may give lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _layout_diff(saved: list, here: list) -> str:
    if len(saved) != len(here):
        return f"{len(saved)} parameter groups saved, {len(here)} here"
    for gi, (a, b) in enumerate(zip(saved, here)):
        if len(a) != len(b):
            return f"group {gi} has {len(a)} parameters saved, {len(b)} here"
        for pi, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f"group {gi} parameter {pi} has shape {x} saved, {y} here"
    return "unknown difference"


__all__ = ["Kron", "ParamInfo", "UpdateProbSchedule", "precond_update_prob_schedule"]
