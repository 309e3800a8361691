"""The grouped kernel equals the single-tensor reference; geometries are records; no host syncs.

One battery over every registered geometry (the seven built-in ones and ``EQ-full``, defined in
this file alone as one record) × both modes × dtypes, on a mixed group (a scalar, vectors, equal
matrices that stack, a merged conv weight, a tensor whose gradient is sometimes missing, one
with non-finite or all-zero gradients at some steps): 50 steps with update and apply-only steps,
parameters and every piece of state compared after each step.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from psgd_lab import Kron, factors, geometry, linalg
from psgd_lab.factors import is_dense
from psgd_lab.optim import kernels


def update_eq_full(Q, L, v, h, *, lr, lipschitz, beta_L, norm_bound, starts) -> None:
    """``dQ = E Q`` with a full (not triangular) ``E``, ``T1 = gram_i(Ph, Ph)``: a rule written
    with the public helpers, to show that a geometry is one record."""
    for i, q, T1, T2 in geometry.terms(Q, v, h, fits_p=False):
        s = geometry.step_size(T1, T2, L[i], q, lr, lipschitz, beta_L, norm_bound, starts[i])
        E = geometry.difference(T1, T2)
        q.sub_(s * (E @ q if is_dense(q) else E * q))


geometry.register(geometry.Geometry("EQ-full", update_eq_full, summary="dQ = E Q, E full"))
NAMES = list(geometry.REGISTRY)
# the scalar and the vectors of four lengths share one zero-padded stack (optim.padding)
SHAPES = [(), (7,), (7,), (5, 6), (5, 6), (5, 6), (4, 3, 2, 2), (9, 4), (33,), (40,), (130,)]
MISSING = (7, 9)  # (9, 4) and a vector lose their gradient at some steps
POISONED = (4, 8)  # a (5, 6) and a vector get NaN/Inf/zeros
PADDED = [i for i, s in enumerate(SHAPES) if len(s) <= 1]


def _poison(t: int, g: torch.Tensor) -> torch.Tensor:
    return [g * math.nan, g * math.inf, g * 0, g][t % 4]


def _run(kernel, geometry_name, mode, dtype, steps=50):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]
    weights = [torch.rand(s, generator=gen, dtype=dtype) + 0.5 for s in SHAPES]
    opt = Kron(ps, lr=1e-2, weight_decay=1e-2, geometry=geometry_name, mode=mode,
               kernel=kernel, precond_dtype=torch.float64 if dtype == torch.float64 else None,
               preconditioner_update_probability=lambda n: 1.0 if n < 20 else 0.3)  # fmt: skip
    history = []
    for t in range(steps):
        if mode == "newton":
            opt.zero_grad()
            opt.step(lambda: sum(((w * p) ** 2).sum() + (w * p).sin().sum() for w, p in
                                 zip(weights, ps)))  # fmt: skip
        else:
            for i, p in enumerate(ps):
                g = torch.randn(p.shape, generator=gen, dtype=dtype)
                p.grad = None if i in MISSING and t % 5 == 2 else g
            for i in POISONED:
                ps[i].grad = _poison(t, ps[i].grad) if t % 7 == 3 else ps[i].grad
            opt.step()
        history.append([p.detach().clone() for p in ps])
    return history, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["whiten", "newton"])
@pytest.mark.parametrize("name", NAMES)
def test_grouped_kernel_equals_the_single_tensor_reference(name, mode, dtype, one_thread):
    """Parameters after every one of 50 steps and the final state are bit-identical on one
    thread (measured: every case here), except the scalar and the vectors, which share a
    zero-padded stack: a sum over a padded row (the damping's mean, the RMS clip's norm) runs
    in another order than over the tensor alone (the CPU's vectorised reductions split a row by
    its length), so these agree to round-off, an ulp or so per step. Measured over this battery:
    parameters 1.2e-5 relative (float32) and 2.3e-14 (float64) at most, factors 7e-8 and 2e-16.
    With more threads a batched product may split its work differently from one matrix's
    product; there they agree to round-off (2e-6 relative in float32 was the largest seen with
    2 threads)."""
    single, opt_s = _run("single", name, mode, dtype)
    grouped, opt_g = _run("grouped", name, mode, dtype)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for t, (a, b) in enumerate(zip(single, grouped)):
        for i, (x, y) in enumerate(zip(a, b)):
            if i in PADDED:
                torch.testing.assert_close(y, x, **tol, msg=f"step {t}, parameter {i}")
            else:
                assert torch.equal(x, y), f"step {t}, parameter {i}: {(x - y).abs().max():.2e}"
    params = zip(opt_s.param_groups[0]["params"], opt_g.param_groups[0]["params"])
    for i, (p_s, p_g) in enumerate(params):
        s, g = opt_s.state[p_s], opt_g.state[p_g]
        same = torch.equal if i not in PADDED else lambda x, y: torch.allclose(x, y, **tol)
        assert torch.equal(s["step"], g["step"])
        # a Newton-mode gradient depends on the parameters, so its momentum follows their drift
        momentum_same = torch.equal if mode == "whiten" else same
        assert momentum_same(g["momentum_buffer"], s["momentum_buffer"])
        assert all(same(qg, qs) for qs, qg in zip(s["Q"], g["Q"]))
    # poisoned at steps 17 (Inf), 24 (NaN) and 45 (Inf); all-zero at 10 and 38 (fit skipped)
    assert opt_s.nonfinite_count == opt_g.nonfinite_count == (0 if mode == "newton" else 6)


def test_a_stack_whose_members_change_uses_no_stale_preconditioner(one_thread):
    """The kept ``P_i`` of a stack are keyed by its members; when a gradient goes missing the
    stack of the others is another key, and an update must drop every key holding a tensor it
    fits (before, an apply-only step reused ``P_i`` kept before the last update: 1e-4 off)."""

    def run(kernel):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(5, 6, generator=gen)) for _ in range(3)]
        opt = Kron(ps, kernel=kernel,
                   preconditioner_update_probability=lambda n: 1.0 if n < 20 else 0.3)  # fmt: skip
        for t in range(30):
            for i, p in enumerate(ps):
                p.grad = None if i == 2 and t % 5 == 2 else torch.randn(5, 6, generator=gen)
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in ps])

    assert torch.equal(run("single"), run("grouped"))


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_geometry_trains(name):
    """On a rotated, ill-conditioned quadratic (cond 1e3) every record trains, both modes."""
    from psgd_lab.problems import kron_quadratic

    loss_fn, X0 = kron_quadratic(n=6, cond=1e3)
    for mode in ("whiten", "newton"):
        X = torch.nn.Parameter(X0.float())
        opt = Kron([X], lr=0.05, geometry=name, mode=mode, preconditioner_update_probability=1.0)
        for _ in range(150):
            opt.zero_grad()
            if mode == "newton":
                opt.step(lambda X=X: loss_fn(X))
            else:
                loss_fn(X).backward()
                opt.step()
        assert loss_fn(X).item() < 0.05 * loss_fn(X0).item(), (name, mode)


def test_a_geometry_name_that_is_not_registered_is_refused_with_the_names():
    with pytest.raises(ValueError, match="'EQ', 'QEQ'.*'EQ-full'"):
        Kron([torch.nn.Parameter(torch.zeros(2))], geometry="nope")


class _HostReads(TorchDispatchMode):
    """Records every read of a tensor's value by the host (``item``, ``bool``, ``float``...:
    ``aten._local_scalar_dense``), the op that would wait for an accelerator."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            import traceback

            self.reads.append("".join(traceback.format_stack(limit=12)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("prob", [1.0, 0.3])
def test_a_default_step_reads_nothing_back_from_the_device(prob):
    """With the defaults (a constant update probability), a step never reads a tensor's value on
    the host, NaN gradients included: non-finite tensors are masked on the device. The reads
    allowed are CPU-only shortcuts, where a host read waits for no device: the skipped-step
    count (on an accelerator a non-blocking copy read a step later) and ``kernels._known``,
    which skips the masking work when every tensor is finite (on an accelerator it returns
    None without reading; ``tests/test_cuda.py`` runs this under CUDA's sync checker)."""
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(6, 5), (6, 5), (7,), ()]]
    opt = Kron(ps, preconditioner_update_probability=prob)
    for t in range(6):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen) * (math.nan if t == 3 else 1.0)
        with _HostReads() as mode:
            opt.step()
        unexpected = [r for r in mode.reads if "new_since_poll" not in r and "_known" not in r]
        assert not unexpected, unexpected[0]


def test_the_default_schedule_is_read_without_a_device_sync():
    """The default schedule returns a CPU float32 tensor (kron-torch's arithmetic); reading it is
    the only other host read, and it never touches the parameters' device."""
    ps = [torch.nn.Parameter(torch.randn(4, 3))]
    opt = Kron(ps)
    ps[0].grad = torch.ones(4, 3)
    with _HostReads() as mode:
        opt.step()
    other = [
        r for r in mode.reads if not any(k in r for k in ("new_since_poll", "_known", "_decide"))
    ]
    assert not other and any("_decide" in r for r in mode.reads)


@pytest.mark.slow
@pytest.mark.parametrize("shapes", [[(6, 5), (6, 5), (7,)], [(300, 270)]], ids=["small", "blocks"])
def test_compiled_grouped_kernel_matches_eager(shapes):
    """``Kron(compile=True)`` compiles the grouped kernel with ``fullgraph=True`` (a graph break
    inside the maths would raise) and gives the eager result to float32 round-off; ``blocks``:
    factors past 256, whose products are written into blocks of their results."""

    def run(compile_):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = Kron(ps, lr=1e-2, compile=compile_,
                   preconditioner_update_probability=lambda n: 1.0 if n < 3 else 0.5)  # fmt: skip
        for _ in range(6):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in ps])

    torch._dynamo.reset()
    torch.testing.assert_close(run(True), run(False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_structure", [True, False])
def test_compiled_kernel_survives_many_structures(per_structure):
    """A model with more structures than dynamo's recompile limit (8): each structure compiles
    apart (``CompiledSteps``); one shared compiled function fails with ``fullgraph=True`` there.
    The eager backend keeps this fast: the graphs are traced, not code-generated."""
    from psgd_lab.optim.grouped import CompiledSteps, stacked_step

    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3 + i, 4, generator=gen)) for i in range(10)]
    opt = Kron(ps, lr=1e-2, compile=True, preconditioner_update_probability=1.0)
    kw = dict(backend="eager", fullgraph=True, dynamic=False)
    opt._step_fn = CompiledSteps(**kw) if per_structure else torch.compile(stacked_step, **kw)
    torch._dynamo.reset()

    def steps():
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()

    if per_structure:
        steps()
        assert len(opt._step_fn.fns) == 10
    else:  # the failure CompiledSteps exists for
        with pytest.raises(Exception) as err:
            steps()
        assert type(err.value).__name__ == "FailOnRecompileLimitHit"


def _steps_and_their_ema(opt, params, grads, steps=3):
    """``steps`` steps on the fixed ``grads``; the EMA of them each momentum buffer must hold."""
    want = [torch.zeros_like(p) for p in params]
    for _ in range(steps):
        for p, g, w in zip(params, grads, want):
            p.grad = g.clone()
            w.lerp_(g, 1 - opt.param_groups[0]["b1"])
        opt.step()
    return want


@pytest.mark.parametrize("prob", [1.0, 1e-6])  # 1e-6: P is never updated, Q stays at its init
def test_applying_p_leaves_the_momentum_as_it_is(prob):
    """``P m̂`` scales fresh products in place (``factors.scale_axis``), never the momentum
    buffer itself: after steps on fixed gradients each buffer is the plain EMA of them, for an
    embedding-like weight (diagonal rows, dense columns), an all-dense matrix, an all-diagonal
    one (``memory_save_mode="all_diag"``) and a vector, stacked in pairs, updating ``P`` on
    every step or only applying it (at 1e-6 the update counter never reaches its threshold in
    three steps, so every step applies the initial ``Q``)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(9000, 16), (9000, 16), (30, 20), (30, 20), (50,)], [(40, 12), (40, 12)]
    groups = [[torch.nn.Parameter(torch.randn(s, generator=gen)) for s in g] for g in shapes]
    params = groups[0] + groups[1]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    opt = Kron([{"params": groups[0], "memory_save_mode": None},
                {"params": groups[1], "memory_save_mode": "all_diag"}],
               preconditioner_update_probability=prob, max_size_triangular=8192,
               lr=0.01)  # fmt: skip
    want = _steps_and_their_ema(opt, params, grads)
    kinds = [tuple(q.dim() == 2 for q in opt.state[p]["Q"]) for p in params]  # dense?
    assert kinds[0] == (False, True) and kinds[2] == (True, True) and kinds[5] == (False, False)
    for p, w in zip(params, want):
        assert torch.equal(opt.state[p]["momentum_buffer"], w)


@pytest.mark.parametrize(
    "dtype, geometry",
    [(torch.float64, "EQ"), (torch.bfloat16, "EQ"), (torch.complex64, "EQ"),
     (torch.float32, "PRO4P"), (torch.float32, "QUAD4P")],
)  # fmt: skip
def test_applying_p_leaves_the_momentum_as_it_is_in_every_dtype_and_form(dtype, geometry):
    """The same ownership on the other paths of ``P m̂``: float64 (copied, not written in place
    by BLAS), bf16, complex stacks, and factors of ``P`` itself (``fits_p``: ``P X = Q X``).
    Every buffer is the EMA of its fixed gradients (bf16: within one bf16 rounding per step)."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(9000, 16), (9000, 16), (30, 20), (30, 20), (50,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
    if dtype.is_complex:
        grads = [g + 1j * torch.randn(g.shape, generator=gen) for g in grads]
    opt = Kron(params, preconditioner_update_probability=1.0, max_size_triangular=8192,
               lr=0.01, geometry=geometry)  # fmt: skip
    want = _steps_and_their_ema(opt, params, grads)
    for p, w in zip(params, want):
        m = opt.state[p]["momentum_buffer"]
        if dtype == torch.bfloat16:
            torch.testing.assert_close(m.float(), w.float(), rtol=2**-6, atol=2**-6)
        else:
            assert torch.equal(m, w)


@pytest.mark.parametrize("shape, cols", [((1024, 3), 3), ((2048,), 1), ((5, 1100), 5),
                                         ((1024, 65), None), ((512, 2), None)])  # fmt: skip
def test_large_triangular_factors_with_few_columns_apply_p_in_one_pass(shape, cols, monkeypatch):
    """The optimiser's ``P X`` along a large EQ factor (d ≥ 1024) with at most 64 columns takes
    ``triu_p_mm`` (``factors.one_pass``), along the first or the last axis, and agrees with the
    two passes; wider or smaller products keep the old paths."""
    g = torch.Generator().manual_seed(len(shape))
    i = 0 if shape[0] >= 512 else len(shape) - 1
    d = shape[i]
    q = (torch.eye(d) + torch.randn(2, d, d, generator=g).triu() / d**0.5).contiguous()
    X = torch.randn(2, *shape, generator=g)
    calls = []
    real = linalg.triu_p_mm
    monkeypatch.setattr(factors, "triu_p_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = kernels._apply_p_one(q, i, X, triangular=True)
    assert bool(calls) == (cols is not None)
    want = factors.apply_one(q.mH, i, factors.apply_one(q, i, X))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_the_one_pass_rule_keeps_out_what_it_cannot_take():
    """``factors.one_pass``: from d = 1024 and at most 64 columns, in float32/64 and complex;
    not bf16 (its sum over blocks would round in bf16), not a factor autograd records (under
    ``no_grad`` it is taken), not past 64 columns nor below d = 1024."""
    q = torch.eye(1024)
    assert factors.one_pass(q, 64) and factors.one_pass(q.double(), 1)
    assert factors.one_pass(q.to(torch.complex64), 3)
    assert not factors.one_pass(q, 65) and not factors.one_pass(torch.eye(1023), 1)
    assert not factors.one_pass(q.bfloat16(), 1)
    qg = q.clone().requires_grad_()
    assert not factors.one_pass(qg, 1)
    with torch.no_grad():
        assert factors.one_pass(qg, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_one_pass_tensors_agree_between_the_kernels(dtype):
    """Tensors whose ``P X`` takes ``triu_p_mm`` (a (1024, 3) pair stacked, a (3, 1024) alone)
    step alike under the grouped kernel and the single-tensor reference, over 40 steps with
    ``P`` updated on a third of them, real and complex (to round-off: the stack of two runs its
    products batched)."""

    def run(kernel):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype))
              for s in [(1024, 3), (1024, 3), (3, 1024)]]  # fmt: skip
        opt = Kron(ps, lr=1e-2, kernel=kernel, preconditioner_update_probability=0.3)
        for _ in range(40):
            for p in ps:
                g = torch.randn(p.shape, generator=gen)
                p.grad = (g + 1j * torch.randn(p.shape, generator=gen)).to(dtype) if \
                    dtype.is_complex else g  # fmt: skip
            opt.step()
        return [p.detach() for p in ps]

    for a, b in zip(run("grouped"), run("single")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
