"""``KronPreconditioner``: one Kronecker-factored preconditioner a researcher can drive by hand.

It holds the factors ``Q``, the Lipschitz estimates ``L`` and a private random generator; the
maths lives in ``structure``, ``factors``, ``geometry`` and ``pairs``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import factors
from . import geometry as geo
from .pairs import Draws, draw
from .structure import diag_dims, make_plan, merged_shape


def check_tensor(name: str, x: object) -> Tensor:
    """A floating or complex tensor, or a ``TypeError`` naming the argument."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"{name} must have a floating-point or complex dtype; got {x.dtype}")
    return x


def check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number; got {value!r}")
    return float(value)


class KronPreconditioner:
    """``P = QᴴQ`` with ``Q = Q_1 ⊗ ... ⊗ Q_k`` for tensors of ``shape``.

    Args:
        shape: the shape of the tensors it preconditions (``()`` for a scalar).
        geometry: the update rule, one of ``psgd_lab.GEOMETRIES``.
        init_scale: ``Q = init_scale · I`` (squared for ``PRO4P``/``QUAD4P``); ``None`` picks the
            data-driven scale of docs/maths.md §4 at the first ``update``.
        max_size_triangular, min_ndim_triangular, memory_save_mode, max_skew: which dims get
            diagonal factors (docs/maths.md §4, ``psgd_lab.structure.diag_dims``).
        merge_dims: precondition ``ndim > 2`` tensors as kron-torch's merged 2-D shape; ``"flat"``:
            as one vector of ``numel`` entries (with ``diag=(False,)``: ``DensePreconditioner``).
        lipschitz: ``"kron"`` (``L = ℓ``), ``"ema"`` (``L <- max(β L + (1-β) ℓ, ℓ)``) or ``None``
            (the default): ``"ema"`` for whitening updates (``v`` drawn), whose per-sample
            ``L = ℓ`` biases the fixed point (docs/maths.md §3), and ``"kron"`` for updates
            given ``v`` (Newton pairs are exact: ``L = ℓ`` converges linearly to round-off, the
            EMA's smaller steps do not).
        beta_L: the EMA factor for ``lipschitz="ema"``.
        damping: noise added to ``h`` before fitting; bounds ``P ≤ I/damping``. 0 disables it.
        dtype, device: of the factors.
        seed: seeds the private generator used for ``v`` draws and random norm bounds.
        diag: one flag per dim of ``factor_shape`` (True: diagonal factor), overriding the rules.
    """

    def __init__(
        self,
        shape: Sequence[int],
        geometry: str = "EQ",
        init_scale: float | None = 1.0,
        max_size_triangular: float = 8192,
        min_ndim_triangular: int = 2,
        memory_save_mode: str | None = None,
        max_skew: float = math.inf,
        merge_dims: bool | str = False,
        lipschitz: str | None = None,
        beta_L: float = 0.9,
        damping: float = 1e-9,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int | None = None,
        diag: Sequence[bool] | None = None,
    ):
        geo.check_geometry(geometry)
        if lipschitz is not None:
            geo.check_lipschitz(lipschitz)
        if not (isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype.is_complex)):
            raise TypeError(f"dtype must be a floating-point or complex torch.dtype; got {dtype}")
        if init_scale is not None:
            check_positive("init_scale", init_scale)
        if not 0 <= beta_L < 1:
            raise ValueError(f"beta_L must be in [0, 1); got {beta_L!r}")
        if damping < 0:
            raise ValueError(f"damping must be >= 0; got {damping!r}")
        self.shape = tuple(int(d) for d in shape)
        if merge_dims == "flat":
            self.factor_shape = (math.prod(self.shape),)
        else:
            self.factor_shape = merged_shape(self.shape) if merge_dims else self.shape
        if diag is None:
            diag = diag_dims(
                self.factor_shape,
                max_size_triangular,
                min_ndim_triangular,
                memory_save_mode,
                max_skew,
            )
        elif len(diag) != len(self.factor_shape):
            raise ValueError(
                f"diag must have one flag per dim of {self.factor_shape}; got {tuple(diag)}"
            )
        self.diag = tuple(bool(x) for x in diag)
        self.plan = make_plan(self.factor_shape, self.diag)
        self.geometry = geometry
        self.lipschitz = lipschitz
        self.beta_L = beta_L
        self.damping = float(damping)
        self.dtype = dtype
        self.init_scale = init_scale
        self.generator = torch.Generator(device=device or "cpu")
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        scale = 1.0 if init_scale is None else init_scale
        self.Q = factors.init_factors(self.plan, scale, dtype, device, self.fits_p)
        self.L = [torch.zeros((), dtype=_real_dtype(dtype), device=device) for _ in self.Q]
        self._initialised = init_scale is not None
        self.num_updates = 0

    # ------------------------------------------------------------------ structure
    @property
    def device(self) -> torch.device:
        return self.Q[0].device

    @property
    def diag_dims(self) -> tuple[int, ...]:
        """Indices (into ``factor_shape``) of the dims with diagonal factors."""
        return tuple(i for i, d in enumerate(self.diag) if d)

    @property
    def dense_dims(self) -> tuple[int, ...]:
        """Indices (into ``factor_shape``) of the dims with dense factors."""
        return tuple(i for i, d in enumerate(self.diag) if not d)

    @property
    def fits_p(self) -> bool:
        """True when the factors are factors of ``P`` itself (``PRO4P``, ``QUAD4P``)."""
        return geo.get(self.geometry).fits_p

    # ------------------------------------------------------------------ maths
    def _check(self, name: str, x: Tensor) -> Tensor:
        check_tensor(name, x)
        if tuple(x.shape) != self.shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}, but this preconditioner is for shape "
                f"{self.shape}"
            )
        return x.reshape(self.factor_shape).to(self.dtype)

    @torch.no_grad()  # the fit is not differentiated: a pair out of a graph is fitted as data
    def update(self, h: Tensor, v: Tensor | None = None, lr: float = 0.1) -> None:
        """One fitting step on the pair ``(v, h)``.

        ``v=None`` is whitening (``h`` is a gradient): ``v`` is integrated out where the geometry
        allows and drawn where it does not (``EQ``). With ``v`` given, ``h`` should be ``H v``
        (Newton) or a gradient independent of ``v`` (whitening with an explicit ``v``).
        """
        check_positive("lr", lr)
        h = self._check("h", h).unsqueeze(0)
        if v is not None:
            v = self._check("v", v).unsqueeze(0)
        record = geo.get(self.geometry)
        lipschitz = self.lipschitz or ("ema" if v is None else "kron")
        norm_bound = geo.default_norm_bound(lipschitz)
        draws = draw(
            self.plan,
            record.starts(self.plan, norm_bound),
            probe=v is None and record.needs_v,
            noise=self.damping > 0,
            dtype=self.dtype,
            device=self.device,
            generator=self.generator,
        )
        draws = Draws.stack([draws])
        Q = [q.unsqueeze(0) for q in self.Q]  # views: the rule updates self.Q in place
        if not self._initialised:
            s = factors.data_scale(h, v, self.damping, len(Q), self.fits_p)
            for q in Q:
                q.mul_(s.reshape((1,) * q.dim()).to(q.dtype))
            self._initialised = True
        geo.fit(
            record,
            Q,
            [x.unsqueeze(0) for x in self.L],
            h,
            v,
            draws,
            lr=lr,
            lipschitz=lipschitz,
            beta_L=self.beta_L,
            norm_bound=norm_bound,
            damping=self.damping,
        )
        self.num_updates += 1

    def precondition(self, g: Tensor) -> Tensor:
        """``P g``, same shape as ``g`` (its dtype is kept)."""
        x = self._check("g", g).unsqueeze(0)
        out = factors.apply_p([q.unsqueeze(0) for q in self.Q], x, self.fits_p)
        return out.reshape(self.shape).to(g.dtype)

    def balance(self) -> None:
        """Rescale the factors to a common magnitude; ``P`` is unchanged."""
        factors.balance([q.unsqueeze(0) for q in self.Q])

    def factor_matrices(self) -> list[Tensor]:
        """Dense ``P_i`` for each factor (``P = P_1 ⊗ ... ⊗ P_k``)."""
        return [factors.factor_p(q, self.fits_p) for q in self.Q]

    def matrix(self) -> Tensor:
        """Dense ``P`` (``numel x numel``) for small shapes; ``ValueError`` past 4096."""
        n = math.prod(self.factor_shape)
        if n > factors.MAX_MATRIX_SIZE:
            raise ValueError(
                f"matrix() materialises a {n} x {n} matrix; it is limited to numel <= "
                f"{factors.MAX_MATRIX_SIZE}. Use precondition(g) or factor_matrices() instead"
            )
        return factors.kron_matrix(self.factor_matrices())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "Q": [q.clone() for q in self.Q],
            "L": [x.clone() for x in self.L],
            "generator": self.generator.get_state(),
            "initialised": self._initialised,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        shapes = [tuple(q.shape) for q in state["Q"]]
        if shapes != [tuple(q.shape) for q in self.Q]:
            raise ValueError(
                f"state has factor shapes {shapes}, expected {[tuple(q.shape) for q in self.Q]}"
            )
        for q, s in zip(self.Q, state["Q"]):
            q.copy_(s)
        for x, s in zip(self.L, state["L"]):
            x.copy_(s)
        self.generator.set_state(state["generator"].cpu())  # map_location may have moved it
        self._initialised = bool(state["initialised"])
        self.num_updates = int(state["num_updates"])

    def __repr__(self) -> str:
        kinds = ", ".join("diag" if d else "dense" for d in self.diag) or "scalar"
        return (
            f"KronPreconditioner(shape={self.shape}, factors=[{kinds}], "
            f"geometry={self.geometry!r}, dtype={self.dtype})"
        )


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    real = torch.empty((), dtype=dtype).real.dtype
    return torch.promote_types(real, torch.float32)


class DensePreconditioner(KronPreconditioner):
    """One dense ``Q`` (``n x n``) over tensors of ``shape`` flattened to ``n = numel``, with every
    geometry: ``KronPreconditioner`` with a single dense factor (the same rules, not a copy).

    Args: as ``KronPreconditioner`` (``shape``, ``geometry``, ``init_scale``, ``lipschitz``,
    ``beta_L``, ``damping``, ``dtype``, ``device``, ``seed``); an int ``shape`` means ``(n,)``.
    Memory is ``n²`` entries: meant for ``n`` up to a few thousand.
    """

    def __init__(self, shape: int | Sequence[int], geometry: str = "EQ", **kw):
        for key in ("diag", "merge_dims", "memory_save_mode", "max_skew"):
            if key in kw:
                raise TypeError(
                    f"DensePreconditioner fixes {key}; use KronPreconditioner to set it"
                )
        shape = (shape,) if isinstance(shape, int) else shape
        super().__init__(shape, geometry, merge_dims="flat", diag=(False,), **kw)

    def __repr__(self) -> str:
        return (
            f"DensePreconditioner(n={self.factor_shape[0]}, geometry={self.geometry!r}, "
            f"dtype={self.dtype})"
        )
