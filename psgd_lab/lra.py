"""Low-rank-approximation (LRA) preconditioners: ``Q = (I + U Vᵀ) diag(d)``, ``P = QᵀQ``.

``U`` and ``V`` are ``n x r``, ``d`` is a vector of ``n``; nothing ``n x n`` is ever formed. Every
product with ``Q``, ``Qᵀ`` or their inverses costs ``O(n r)`` plus an ``r x r`` solve with
``K = I + VᵀU`` (Woodbury). The maths is docs/maths.md §7: the Lie group ``{(I + U Vᵀ) D}``, the
fitting gradient ``a aᵀ - b bᵀ`` with ``a = Q h`` and ``b = Q⁻ᵀ v`` projected on each part, the
multiplicative updates of ``d``, ``U`` and ``V`` each normalised by its own Lipschitz estimate, and
the balancing of ``U`` and ``V``.

The functions work on one pair of column blocks ``(v, h)`` of shape ``(n, k)`` (``k`` samples fit
at once) and change the state in place; ``LRAPreconditioner`` wraps them with a seeded generator,
validation and checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

UV_SCHEDULES = ("alternate", "random", "both")


@dataclass
class LRAState:
    """The fitted state: ``U, V`` (``n x r``), ``d`` (``n``), and the Lipschitz estimates
    ``L = [L_U, L_V, L_d]`` (0-dim, at least float32)."""

    U: Tensor
    V: Tensor
    d: Tensor
    L: list[Tensor] = field(default_factory=list)


def init_state(n: int, rank: int, scale: float, dtype, device, generator) -> LRAState:
    """``d = scale``; ``U`` and ``V`` small random (Frobenius norm ``sqrt(0.1)`` each, so ``Q``
    starts within about 0.1 of ``scale · I`` and the low-rank part can grow in every direction)."""
    U = torch.randn(n, rank, dtype=dtype, device=device, generator=generator)
    V = torch.randn(n, rank, dtype=dtype, device=device, generator=generator)
    if rank:
        U.mul_(math.sqrt(0.1) / U.norm())
        V.mul_(math.sqrt(0.1) / V.norm())
    d = torch.full((n,), float(scale), dtype=dtype, device=device)
    real = torch.promote_types(dtype, torch.float32)
    L = [torch.zeros((), dtype=real, device=device) for _ in range(3)]
    return LRAState(U, V, d, L)


def _col(x: Tensor) -> Tensor:
    return x.unsqueeze(-1) if x.dim() == 1 else x


def _solve(K: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
    """``K⁻¹ x`` (or ``K⁻ᵀ x``) for the small ``r x r`` ``K``, in at least float32."""
    work = torch.promote_types(K.dtype, torch.float32)
    A = K.mT if transpose else K
    return torch.linalg.solve(A.to(work), x.to(work)).to(x.dtype)


def apply_q(s: LRAState, x: Tensor) -> Tensor:
    """``Q x = (I + U Vᵀ)(d ∘ x)``."""
    y = s.d.unsqueeze(-1) * _col(x)
    return (y + s.U @ (s.V.mT @ y)).reshape(x.shape)


def apply_p(s: LRAState, x: Tensor) -> Tensor:
    """``P x = d ∘ (I + V Uᵀ)(I + U Vᵀ)(d ∘ x)``; ``O(n r)``."""
    a = _col(apply_q(s, x))
    return (s.d.unsqueeze(-1) * (a + s.V @ (s.U.mT @ a))).reshape(x.shape)


def inverse_pair(s: LRAState, v: Tensor, K: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(Q⁻ᵀ v, P⁻¹ v)`` by Woodbury with ``K = I + VᵀU``:
    ``(I + V Uᵀ)⁻¹ = I - V K⁻ᵀ Uᵀ`` and ``(I + U Vᵀ)⁻¹ = I - U K⁻¹ Vᵀ``."""
    K = _gram_k(s) if K is None else K
    x = _col(v) / s.d.unsqueeze(-1)
    b = x - s.V @ _solve(K, s.U.mT @ x, transpose=True)
    w = (b - s.U @ _solve(K, s.V.mT @ b)) / s.d.unsqueeze(-1)
    return b.reshape(v.shape), w.reshape(v.shape)


def _gram_k(s: LRAState) -> Tensor:
    K = s.V.mT @ s.U
    K.diagonal().add_(1)
    return K


def balance(s: LRAState, strength: float = 0.1) -> None:
    """Move ``U`` and ``V`` towards ``UᵀU = VᵀV`` keeping ``U Vᵀ`` (to fourth order in the step).

    First ``U / ρ, V ρ`` with ``ρ⁴ = tr UᵀU / tr VᵀV`` (exact: ``U Vᵀ`` unchanged); then, with
    the traceless symmetric ``E = strength · (UᵀU - VᵀV) / (tr UᵀU + tr VᵀV)``,
    ``U <- U (I - E + E²/2)`` and ``V <- V (I + E + E²/2)``: since
    ``(I - E + E²/2)(I + E + E²/2) = I + E⁴/4``, ``U Vᵀ`` moves by ``O(|E|⁴)`` while the imbalance
    shrinks by about ``2·strength`` of itself."""
    U, V = s.U, s.V
    if U.shape[-1] == 0:
        return
    UtU, VtV = U.mT @ U, V.mT @ V
    tu, tv = UtU.diagonal().sum(), VtV.diagonal().sum()
    tiny = torch.finfo(U.dtype).tiny
    rho = ((tu + tiny) / (tv + tiny)).pow(0.25)
    rho2 = rho * rho
    E = strength * (UtU / rho2 - VtV * rho2) / (tu / rho2 + tv * rho2 + tiny)
    E2 = 0.5 * (E @ E)
    U.div_(rho)
    V.mul_(rho)
    U.sub_(U @ (E - E2))
    V.add_(V @ (E + E2))


def _ema(L: Tensor, ell: Tensor, beta: float) -> Tensor:
    """``L <- max(β L + (1-β) ℓ, ℓ)`` in place; returns ``L``."""
    ell = ell.to(L.dtype)
    return L.copy_(torch.maximum(beta * L + (1 - beta) * ell, ell))


def update(
    s: LRAState,
    v: Tensor,
    h: Tensor,
    *,
    lr: float,
    beta_L: float = 0.9,
    part: str = "U",
    balance_strength: float = 0.1,
) -> None:
    """One fitting step of ``E[hᵀ P h + vᵀ P⁻¹ v]`` on the pair ``(v, h)`` (vectors of ``n`` or
    ``(n, k)`` blocks): balance ``U``/``V``, the multiplicative step on ``d``, then one on ``part``
    (``"U"``, ``"V"`` or ``"UV"``: both from the same ``a, b``). No host sync."""
    v, h = _col(v).to(s.d.dtype), _col(h).to(s.d.dtype)
    if balance_strength:
        balance(s, balance_strength)
    U, V, d = s.U, s.V, s.d.unsqueeze(-1)
    Lu, Lv, Ld = s.L
    a = _col(apply_q(s, h))  # Q h
    Ph = d * (a + V @ (U.mT @ a))
    K = _gram_k(s)
    b, w = inverse_pair(s, v, K)  # Q⁻ᵀ v, P⁻¹ v
    # d: the gradient on the diagonal part is diag(a aᵀ - b bᵀ) seen through D, i.e. the rows of
    # Ph ∘ h - v ∘ P⁻¹v; its step is bounded by the largest entry of each term
    Phh, vw = (Ph * h).sum(-1), (v * w).sum(-1)
    _ema(Ld, Phh.abs().amax() + vw.abs().amax(), beta_L)
    s.d.sub_((lr / Ld).to(d.dtype) * (Phh - vw) * s.d)
    if U.shape[-1] == 0:
        return
    if "U" in part:  # (I - μ G Vᵀ)(I + U Vᵀ) = I + (U - μ G K) Vᵀ with G = (a aᵀ - b bᵀ) V
        aV, bV = a.mT @ V, b.mT @ V
        ell = a.norm() * (aV @ V.mT).norm() + b.norm() * (bV @ V.mT).norm()
        _ema(Lu, ell, beta_L)
        step_u = (a @ (aV @ K) - b @ (bV @ K)) * (lr / Lu).to(U.dtype)
    if "V" in part:  # (I - μ U Gᵀ)(I + U Vᵀ) = I + U (V - μ (I + V Uᵀ) G)ᵀ with G = (a aᵀ - b bᵀ) U
        aU, bU = a.mT @ U, b.mT @ U
        ell = a.norm() * (U @ aU.mT).norm() + b.norm() * (U @ bU.mT).norm()
        _ema(Lv, ell, beta_L)
        step_v = ((a + V @ aU.mT) @ aU - (b + V @ bU.mT) @ bU) * (lr / Lv).to(V.dtype)
    if "U" in part:
        U.sub_(step_u)
    if "V" in part:
        V.sub_(step_v)


def dense_q(s: LRAState) -> Tensor:
    """Dense ``Q`` (``n x n``), for tests and small problems."""
    n = s.d.shape[0]
    eye = torch.eye(n, dtype=s.d.dtype, device=s.d.device)
    return (eye + s.U @ s.V.mT) * s.d


def data_scale(h: Tensor, v: Tensor | None, damping: float) -> Tensor:
    """The scale ``d`` starts at when ``init_scale=None``: ``P = d² I`` matching the first pair,
    whitening ``(mean h⁴ + damping⁴)^(-1/8)``, Newton times ``(mean v²)^(1/4)``
    (docs/maths.md §4)."""
    damping = max(damping, 1e-30)
    s = (h.double().pow(4).mean() + damping**4).pow(-0.125)
    if v is not None:
        s = s * v.double().square().mean().pow(0.25)
    return s


def part_for(schedule: str, count: int, generator: torch.Generator | None) -> str:
    """Which of ``U``/``V`` an update changes: ``"alternate"`` (U on even updates, V on odd),
    ``"random"`` (a fair coin from ``generator``, the reference's choice), ``"both"``."""
    if schedule == "both":
        return "UV"
    if schedule == "alternate":
        return "U" if count % 2 == 0 else "V"
    coin = torch.rand((), generator=generator, device=generator.device if generator else None)
    return "U" if float(coin) < 0.5 else "V"


def check_schedule(schedule: str) -> None:
    if schedule not in UV_SCHEDULES:
        raise ValueError(f"uv_schedule must be one of {UV_SCHEDULES}; got {schedule!r}")


def numel(shape: int | Sequence[int]) -> int:
    return int(shape) if isinstance(shape, int) else math.prod(int(x) for x in shape)


class LRAPreconditioner:
    """``P = QᵀQ`` with ``Q = (I + U Vᵀ) diag(d)`` over tensors of ``shape`` (flattened to ``n``).

    The same contract as ``KronPreconditioner``: ``update(h, v=None, lr=...)`` (whitening when
    ``v`` is None: ``h`` is a gradient and ``v`` is drawn; Newton with ``h = H v``),
    ``precondition(g)``, ``matrix()`` for small ``n``, ``state_dict()``/``load_state_dict()``.

    Args:
        shape: an int ``n`` or the shape of the tensors it preconditions.
        rank: ``r`` of ``U`` and ``V`` (0: a diagonal preconditioner).
        init_scale: ``d = init_scale``; ``None`` takes the data scale at the first update.
        lipschitz: only ``"ema"`` (``L <- max(β L + (1-β) ℓ, ℓ)``, per part ``U``, ``V``, ``d``).
        beta_L: the EMA factor.
        damping: noise ``damping · v`` added to ``h`` (whitening) or ``damping · ε`` (Newton),
            which bounds ``P ≤ I/damping``; 0 disables it.
        uv_schedule: which of ``U``/``V`` each update changes: ``"alternate"`` (default),
            ``"random"`` (the reference's coin) or ``"both"``.
        balance_strength: how far each update moves ``U``/``V`` towards ``UᵀU = VᵀV`` (0: never).
        dtype, device: of ``U``, ``V`` and ``d`` (real dtypes).
        seed: seeds the private generator (initial ``U``, ``V``; whitening probes; coins).
    """

    def __init__(
        self,
        shape: int | Sequence[int],
        rank: int = 10,
        init_scale: float | None = 1.0,
        lipschitz: str = "ema",
        beta_L: float = 0.9,
        damping: float = 1e-9,
        uv_schedule: str = "alternate",
        balance_strength: float = 0.1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int | None = None,
    ):
        from .preconditioner import check_positive

        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a real floating-point torch.dtype; got {dtype}")
        n = numel(shape)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < max(n, 1):
            raise ValueError(f"rank must be an int in [0, n) with n = {n}; got {rank!r}")
        if init_scale is not None:
            check_positive("init_scale", init_scale)
        if lipschitz != "ema":
            raise ValueError(f"LRA supports lipschitz='ema' only; got {lipschitz!r}")
        if not 0 <= beta_L < 1:
            raise ValueError(f"beta_L must be in [0, 1); got {beta_L!r}")
        if damping < 0:
            raise ValueError(f"damping must be >= 0; got {damping!r}")
        if not 0 <= balance_strength <= 0.5:
            raise ValueError(f"balance_strength must be in [0, 0.5]; got {balance_strength!r}")
        check_schedule(uv_schedule)
        self.shape = (n,) if isinstance(shape, int) else tuple(int(x) for x in shape)
        self.n, self.rank = n, rank
        self.init_scale, self.beta_L, self.damping = init_scale, beta_L, float(damping)
        self.uv_schedule, self.balance_strength = uv_schedule, balance_strength
        self.dtype = dtype
        self.generator = torch.Generator(device=device or "cpu")
        self.coins = torch.Generator()  # U/V coins on the CPU: no device sync
        if seed is not None:
            self.generator.manual_seed(seed)
            self.coins.manual_seed(seed + 1)
        else:
            self.coins.manual_seed(int(self.generator.seed()) + 1)
        scale = 1.0 if init_scale is None else init_scale
        self.state = init_state(n, rank, scale, dtype, device, self.generator)
        self._initialised = init_scale is not None
        self.num_updates = 0

    @property
    def device(self) -> torch.device:
        return self.state.d.device

    @property
    def U(self) -> Tensor:
        return self.state.U

    @property
    def V(self) -> Tensor:
        return self.state.V

    @property
    def d(self) -> Tensor:
        return self.state.d

    def _check(self, name: str, x: Tensor) -> Tensor:
        from .preconditioner import check_tensor

        check_tensor(name, x)
        if x.is_complex():
            raise TypeError(f"{name} must be real; LRA preconditioners are real")
        if x.numel() != self.n:
            raise ValueError(
                f"{name} has {x.numel()} elements (shape {tuple(x.shape)}), but this "
                f"preconditioner is for n = {self.n} (shape {self.shape})"
            )
        return x.reshape(self.n).to(self.dtype)

    @torch.no_grad()  # the fit is not differentiated: a pair out of a graph is fitted as data
    def update(self, h: Tensor, v: Tensor | None = None, lr: float = 0.1) -> None:
        """One fitting step on ``(v, h)``; ``v=None`` is whitening (``h`` a gradient)."""
        from .preconditioner import check_positive

        check_positive("lr", lr)
        h = self._check("h", h)
        if v is not None:
            v = self._check("v", v)
        if not self._initialised:
            self.state.d.fill_(float(data_scale(h, v, self.damping)))
            self._initialised = True
        if v is None:  # whitening: a fresh probe, and the damping along it
            v = torch.randn(self.n, dtype=self.dtype, device=self.device, generator=self.generator)
            h = h + self.damping * v if self.damping else h
        elif self.damping:
            noise = torch.randn(self.n, dtype=self.dtype, device=self.device,
                                generator=self.generator)  # fmt: skip
            h = h + self.damping * noise
        part = part_for(self.uv_schedule, self.num_updates, self.coins)
        update(self.state, v, h, lr=lr, beta_L=self.beta_L, part=part,
               balance_strength=self.balance_strength)  # fmt: skip
        self.num_updates += 1

    def precondition(self, g: Tensor) -> Tensor:
        """``P g``, same shape and dtype as ``g``."""
        return apply_p(self.state, self._check("g", g)).reshape(g.shape).to(g.dtype)

    def matrix(self) -> Tensor:
        """Dense ``P`` (``n x n``) for ``n <= 4096``."""
        from .factors import MAX_MATRIX_SIZE

        if self.n > MAX_MATRIX_SIZE:
            raise ValueError(
                f"matrix() materialises a {self.n} x {self.n} matrix; it is limited to n <= "
                f"{MAX_MATRIX_SIZE}. Use precondition(g) instead"
            )
        Q = dense_q(self.state)
        return Q.mT @ Q

    def state_dict(self) -> dict:
        s = self.state
        return {
            "U": s.U.clone(), "V": s.V.clone(), "d": s.d.clone(),
            "L": [x.clone() for x in s.L],
            "generator": self.generator.get_state(), "coins": self.coins.get_state(),
            "initialised": self._initialised, "num_updates": self.num_updates,
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        s = self.state
        for name in ("U", "V", "d"):
            if tuple(state[name].shape) != tuple(getattr(s, name).shape):
                raise ValueError(
                    f"state's {name} has shape {tuple(state[name].shape)}, expected "
                    f"{tuple(getattr(s, name).shape)}"
                )
            getattr(s, name).copy_(state[name])
        for x, y in zip(s.L, state["L"]):
            x.copy_(y)
        self.generator.set_state(state["generator"].cpu())
        self.coins.set_state(state["coins"].cpu())
        self._initialised = bool(state["initialised"])
        self.num_updates = int(state["num_updates"])

    def __repr__(self) -> str:
        return f"LRAPreconditioner(n={self.n}, rank={self.rank}, dtype={self.dtype})"
