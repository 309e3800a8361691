"""psgd_lab.Kron: torch.optim conventions, Newton mode, every shape, errors, non-finite gradients,
exact resume, reproducibility, and convergence against AdamW."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from psgd_lab import GEOMETRIES, Kron
from psgd_lab.problems import digits, kron_quadratic, mlp

HERE = Path(__file__).resolve().parent


def _fit(opt, params, loss_fn, steps, newton=False):
    for _ in range(steps):
        if newton:
            opt.zero_grad()  # Newton mode adds the closure's gradient to .grad, as backward() does
            opt.step(loss_fn)
        else:
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
    with torch.no_grad():
        return loss_fn().item()


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lr": -1.0}, "lr must be"),
        ({"b1": 1.0}, "b1 must be"),
        ({"b1": -0.1}, "b1 must be"),
        ({"weight_decay": -1e-3}, "weight_decay must be"),
        ({"precond_lr": 0.0}, "precond_lr must be"),
        ({"preconditioner_update_probability": 0.0}, "preconditioner_update_probability"),
        ({"preconditioner_update_probability": 1.5}, "preconditioner_update_probability"),
        ({"memory_save_mode": "some_diag"}, "memory_save_mode must be one of"),
        ({"geometry": "XYZ"}, "geometry must be one of"),
        ({"mode": "adam"}, "mode must be one of 'whiten', 'newton'"),
        ({"hvp": "magic"}, "hvp must be one of"),
        ({"nonfinite": "ignore"}, "nonfinite must be one of"),
        ({"lipschitz": "max"}, "lipschitz must be one of"),
        ({"mu_dtype": torch.int32}, "mu_dtype must be None or a floating-point"),
        ({"precond_dtype": torch.int64}, "precond_dtype must be None or"),
        ({"precond_init_scale": 0.0}, "precond_init_scale must be"),
        ({"min_ndim_triangular": 1.5}, "min_ndim_triangular must be"),
        ({"merge_dims": "yes"}, "merge_dims must be True or False"),
        ({"damping": -1.0}, "damping must be"),
        ({"beta_L": 1.0}, "beta_L must be"),
        ({"max_skew": 0.0}, "max_skew must be"),
    ],
)
def test_invalid_hyperparameters_raise_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        Kron([torch.nn.Parameter(torch.zeros(3))], **kw)


def test_invalid_param_group_is_not_added():
    opt = Kron([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="geometry must be one of"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "geometry": "nope"})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="floating-point or complex"):
        Kron([torch.zeros(3, dtype=torch.long)])


def test_schedule_giving_a_bad_probability_is_named():
    x = torch.nn.Parameter(torch.zeros(3))
    opt = Kron([x], preconditioner_update_probability=lambda n: 0.0)
    x.grad = torch.ones(3)
    with pytest.raises(ValueError, match="the schedule gave 0.0 at step 0"):
        opt.step()


def test_sparse_gradient_raises():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = Kron(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_closure_must_return_the_loss():
    x = torch.nn.Parameter(torch.ones(3))
    opt = Kron([x])

    def closure():
        opt.zero_grad()
        (x**2).sum().backward()

    with pytest.raises(TypeError, match="must return the loss"):
        opt.step(closure)


def test_newton_mode_needs_a_closure_that_does_not_backward():
    x = torch.nn.Parameter(torch.ones(3))
    opt = Kron([x], mode="newton")
    with pytest.raises(RuntimeError, match="needs step\\(closure\\)"):
        opt.step()

    def closure():
        loss = (x**3).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="must not call backward"):
        opt.step(closure)
    with pytest.raises(TypeError, match="tensor that requires grad"):
        opt.step(lambda: 1.0)


def test_newton_mode_names_finite_differences_when_an_op_has_no_double_backward():
    # the CPU's fused attention (what psgd_lab.workloads.CharGPT uses) has no double backward
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8) / 3)
    x = torch.randn(2, 2, 16, 4)

    def closure():
        q = (x.reshape(-1, 8) @ w).reshape(2, 2, 16, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return y.square().mean()

    opt = Kron([w], lr=0.1, mode="newton", preconditioner_update_probability=1.0)
    with pytest.raises(RuntimeError, match="pass hvp='finite_difference'"):
        opt.step(closure)
    opt = Kron([w], lr=0.1, mode="newton", hvp="finite_difference",
               preconditioner_update_probability=1.0)  # fmt: skip
    before = w.detach().clone()
    opt.step(closure)
    assert torch.isfinite(w).all() and not torch.equal(w.detach(), before)


@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
def test_newton_mode_with_parameters_outside_the_loss_or_linear_in_it(hvp):
    """A parameter the loss does not use, and one it uses linearly, have H v = 0; autograd
    refuses such gradients as outputs of the double backward, so they must be left out of it."""
    w = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    unused, linear = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(3))
    opt = Kron([w, unused, linear], lr=0.1, mode="newton", hvp=hvp, seed=0)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))

    def closure():
        return ((x @ w).tanh() ** 2).mean() + linear.sum()

    first = closure().item()
    for _ in range(30):
        opt.zero_grad()
        opt.step(closure)
    assert torch.equal(unused, torch.ones(2, 2))  # zero gradient, zero step
    assert closure().item() < first  # the others train
    assert opt.nonfinite_count == 0 and torch.isfinite(w).all()


# ---------------------------------------------------------------------- torch.optim conventions


def test_param_groups_hyperparameters_per_group_and_add_param_group():
    a, b = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4, 4))
    opt = Kron(
        [
            {"params": [a]},
            {"params": [b], "lr": 0.0, "geometry": "QUAD", "memory_save_mode": "all_diag"},
        ],
        lr=0.1,
    )
    c = torch.nn.Parameter(torch.ones(3, 5))
    opt.add_param_group({"params": [c], "weight_decay": 0.5, "precond_lr": 0.2})
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    opt.step()
    assert not torch.equal(a, torch.ones(4, 4))
    assert torch.equal(b, torch.ones(4, 4))  # lr 0 in its group
    assert [q.dim() for q in opt.state[b]["Q"]] == [1, 1]  # all_diag in its group
    assert [q.dim() for q in opt.state[a]["Q"]] == [2, 2]
    assert opt.param_groups[2]["weight_decay"] == 0.5 and len(opt._counters) == 3


def test_lr_scheduler_zero_grad_clip_grad_norm_and_closure():
    model = mlp((5, 8, 2))
    opt = Kron(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    x, y = torch.randn(32, 5), torch.randn(32, 2)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        sched.step()
    assert isinstance(loss, torch.Tensor)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def _autocast_run(dtype):
    model = mlp((8, 16, 2)).to(dtype)
    opt = Kron(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long()
    losses = []
    for _ in range(60):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x.to(dtype)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


def test_autocast_with_bf16_parameters_trains_like_float32():
    model, opt, losses = _autocast_run(torch.bfloat16)
    p = next(iter(model.parameters()))
    assert p.dtype == torch.bfloat16
    assert opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
    assert opt.state[p]["Q"][0].dtype == torch.float32  # precond_dtype default
    f32 = _autocast_run(torch.float32)[2]
    assert losses[-1] < 0.5 * losses[0]
    assert losses[-1] == pytest.approx(f32[-1], rel=0.02)  # measured: 0.2389 vs 0.2388


def _mlp_training_step():
    """(model, opt, train_step): one Kron step on a small MLP, a function to compile."""
    model = mlp((6, 8, 1), seed=1)
    opt = Kron(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 6, generator=torch.Generator().manual_seed(0)), torch.ones(32, 1)

    def train_step():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return model, opt, train_step


def test_compiled_training_step_matches_eager():
    def run(compiled):
        train_step = _mlp_training_step()[2]
        fn = torch.compile(train_step) if compiled else train_step
        return [fn().item() for _ in range(8)]

    eager, compiled = run(False), run(True)
    assert compiled == pytest.approx(eager, rel=1e-4)


# ---------------------------------------------------------------------------- shapes


def test_every_shape_trains():
    ps = {
        "scalar": torch.nn.Parameter(torch.tensor(3.0)),
        "vector": torch.nn.Parameter(torch.randn(7)),
        "matrix": torch.nn.Parameter(torch.randn(5, 6)),
        "conv": torch.nn.Parameter(torch.randn(8, 3, 3, 3)),
        "16-dim": torch.nn.Parameter(torch.randn((2,) * 16)),
        "empty": torch.nn.Parameter(torch.randn(0, 4)),
        "no grad": torch.nn.Parameter(torch.randn(3, 3)),
    }
    opt = Kron(ps.values(), lr=0.01, merge_dims=False, preconditioner_update_probability=1.0)
    no_grad_before = ps["no grad"].detach().clone()

    def loss_fn():
        return sum((p**2).sum() for k, p in ps.items() if k != "no grad")

    before = {k: p.detach().clone() for k, p in ps.items()}
    start = loss_fn().item()
    end = _fit(opt, list(ps.values()), loss_fn, 50)
    assert end < 0.7 * start
    for k in ("scalar", "vector", "matrix", "conv", "16-dim"):
        assert (ps[k] - before[k]).abs().max() > 1e-3, k
    assert torch.equal(ps["no grad"], no_grad_before) and ps["no grad"] not in opt.state
    assert ps["empty"] not in opt.state
    assert len(opt.state[ps["16-dim"]]["Q"]) == 16
    assert all(torch.isfinite(p).all() for p in ps.values())


def test_describe_reports_structure_and_bytes_without_printing(capsys):
    emb = torch.nn.Parameter(torch.randn(5000, 16))
    conv = torch.nn.Parameter(torch.randn(32, 16, 3, 3))
    bias = torch.nn.Parameter(torch.randn(32))
    opt = Kron([emb, conv, bias], max_size_triangular=4096, mu_dtype=torch.bfloat16)
    info = opt.describe()
    assert info[0].diag == (True, False) and info[0].factor_shapes == ((5000,), (16, 16))
    assert info[1].factor_shape == (1536, 3)  # kron-torch merges (32, 16, 3, 3) so
    assert info[2].diag == (True,)
    for p in (emb, conv, bias):
        p.grad = torch.randn_like(p)
    opt.step()
    for p, row in zip((emb, conv, bias), info):
        st = opt.state[p]
        assert row.momentum_bytes == st["momentum_buffer"].nbytes
        assert row.precond_bytes == sum(q.nbytes for q in st["Q"])
    assert capsys.readouterr() == ("", "")


# ---------------------------------------------------------------------------- beyond kron-torch


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("mode", ["whiten", "newton"])
def test_every_geometry_and_mode_trains(geometry, mode):
    loss_fn, X0 = kron_quadratic(n=6, cond=100.0)
    X = torch.nn.Parameter(X0.float())
    opt = Kron([X], lr=0.05, geometry=geometry, mode=mode, preconditioner_update_probability=1.0)
    end = _fit(opt, [X], lambda: loss_fn(X), 150, newton=mode == "newton")
    assert end < 0.05 * loss_fn(X0).item()
    assert all(torch.isfinite(q).all() for q in opt.state[X]["Q"])


@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
def test_newton_mode_fits_the_inverse_hessian(hvp):
    """On ``f = ½ xᵀHx`` with ``H = H_1 ⊗ H_2`` (condition 1e3) ``P`` must approach ``H⁻¹``
    (linear convergence; undamped, since damping bounds the fit at ``(H + λI)⁻¹``)."""
    loss_fn, X0 = kron_quadratic(n=6, cond=1e3)
    X = torch.nn.Parameter(X0.clone())
    opt = Kron(
        [X],
        lr=0.0,
        mode="newton",
        hvp=hvp,
        precond_dtype=torch.float64,
        damping=0.0,
        precond_lr=0.5,
        preconditioner_update_probability=1.0,
    )
    for _ in range(800):
        opt.step(lambda: loss_fn(X))
    assert torch.equal(X, X0)  # lr 0: only the preconditioner moved
    Q = opt.state[X]["Q"]
    P = torch.kron(Q[0].T @ Q[0], Q[1].T @ Q[1])
    H = torch.autograd.functional.hessian(lambda z: loss_fn(z.reshape(6, 6)), X0.reshape(-1))
    err = torch.linalg.matrix_norm(P @ H - torch.eye(36, dtype=H.dtype)) / 6
    assert err < 1e-5  # measured: < 1e-6 after 800 updates, both hvp methods
    assert X.grad is not None  # Newton mode still leaves the gradient in .grad


def test_ema_lipschitz_damping_and_data_init_options():
    model = mlp((6, 8, 2))
    opt = Kron(model.parameters(), lr=1e-2, lipschitz="ema", damping=1e-6, precond_init_scale=None)
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    start = torch.nn.functional.mse_loss(model(x), y).item()
    end = _fit(opt, None, lambda: torch.nn.functional.mse_loss(model(x), y), 100)
    assert end < 0.7 * start
    assert all(st["initialised"] for st in opt.state.values())
    assert all((x > 0).all() for st in opt.state.values() for x in st["L"])


# ---------------------------------------------------------------------------- non-finite gradients


def _digits_run(poison_every=None, nonfinite="skip", steps=150):
    Xtr, ytr, _, _ = digits()
    model = mlp((64, 32, 10))
    opt = Kron(model.parameters(), lr=1e-3, nonfinite=nonfinite)
    for t in range(steps):
        i = (t * 128) % (len(ytr) - 128)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(Xtr[i : i + 128]), ytr[i : i + 128]).backward()
        if poison_every and t % poison_every == 5:
            p = next(iter(model.parameters()))
            p.grad[0, 0] = float("nan") if t % 2 else float("inf")
        opt.step()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(Xtr), ytr).item()
    return model, opt, loss


def test_nonfinite_gradients_are_skipped_counted_and_warned_once():
    _, _, clean = _digits_run()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, opt, poisoned = _digits_run(poison_every=10)
    msgs = [w for w in caught if "NaN/Inf" in str(w.message)]
    assert len(msgs) == 1
    assert opt.nonfinite_count == 15  # steps 5, 15, ..., 145
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for st in opt.state.values():
        assert torch.isfinite(st["momentum_buffer"]).all()
        assert all(torch.isfinite(q).all() for q in st["Q"])
    assert poisoned < 1.1 * clean + 0.01


def test_nonfinite_step_leaves_everything_untouched_and_raise_option():
    x = torch.nn.Parameter(torch.randn(4, 4))
    opt = Kron([x])
    x.grad = torch.randn(4, 4)
    opt.step()
    before = (x.detach().clone(), {k: _clone(v) for k, v in opt.state[x].items()})
    x.grad = torch.full((4, 4), float("nan"))
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        opt.step()
    assert torch.equal(x, before[0])
    for k, v in opt.state[x].items():
        assert _equal(v, before[1][k]), k
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        Kron([x], nonfinite="raise").step()


def _clone(v):
    if isinstance(v, list):
        return [t.clone() for t in v]
    return v.clone() if torch.is_tensor(v) else v


def _equal(a, b):
    if isinstance(a, list):
        return all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


# ---------------------------------------------------------------------------- reproducibility


def _short_run(seed=42, steps=20):
    model = mlp((6, 8, 3), seed=0)
    opt = Kron(model.parameters(), lr=1e-2, seed=seed)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_same_seed_same_trajectory_and_global_rng_untouched():
    torch.manual_seed(123)
    random.seed(123)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    a = _short_run()
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert torch.equal(a, _short_run())
    assert not torch.equal(a, _short_run(seed=1))


def test_exact_resume_in_a_new_process(tmp_path):
    """Run 40 steps; separately run 17, checkpoint with torch.save, and continue in a fresh
    process from ``torch.load(weights_only=True)``: parameters must be bit-identical."""
    job = str(HERE / "_train_job.py")
    full, resumed, ckpt = tmp_path / "full.pt", tmp_path / "resumed.pt", tmp_path / "ck.pt"
    run = [sys.executable, job]
    subprocess.run(run + [str(full), "40"], check=True)
    subprocess.run(run + [str(tmp_path / "x.pt"), "17", "--save-at", "17", str(ckpt)], check=True)
    assert not ckpt.exists()  # saved at the start of step 17, which a 17-step run never reaches
    subprocess.run(run + [str(tmp_path / "x.pt"), "30", "--save-at", "17", str(ckpt)], check=True)
    subprocess.run(run + [str(resumed), "40", "--resume", str(ckpt)], check=True)
    a, b = torch.load(full), torch.load(resumed)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    state = torch.load(ckpt, weights_only=True)["opt"]
    extra = state["psgd_lab"]
    assert extra["prob_step"] == 17 and extra["format"] == 2 and len(extra["draw_counts"]) == 6


def test_sigkill_after_a_checkpoint_then_resume_matches(tmp_path):
    """A job checkpointing every 5 steps is killed with SIGKILL at a random step; resuming from
    its last checkpoint in a new process ends bit-identical to the uninterrupted run."""
    import random as pyrandom
    import signal
    import time

    job = str(HERE / "_train_job.py")
    full, resumed, ckpt = tmp_path / "full.pt", tmp_path / "resumed.pt", tmp_path / "ck.pt"
    subprocess.run([sys.executable, job, str(full), "40"], check=True)
    kill_after = pyrandom.Random().randint(11, 30)  # a step after at least two checkpoints
    proc = subprocess.Popen(
        [sys.executable, job, str(tmp_path / "never.pt"), "40", "--every", "5", str(ckpt), "0.2"]
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["t"] >= kill_after // 5 * 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (tmp_path / "never.pt").exists()
    saved_at = torch.load(ckpt, weights_only=True)["t"]
    assert 10 <= saved_at < 40
    subprocess.run([sys.executable, job, str(resumed), "40", "--resume", str(ckpt)], check=True)
    a, b = torch.load(full), torch.load(resumed)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), saved_at


def test_state_dict_holds_everything_and_round_trips_dtypes():
    p = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.bfloat16))
    opt = Kron([p], mu_dtype=torch.float32, precond_dtype=torch.float64)
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "momentum_buffer", "Q"}  # no L: kron; a fixed scale
    assert {"prob_step", "update_counters", "rng", "draw_counts"} <= set(sd["psgd_lab"])
    opt2 = Kron([p], mu_dtype=torch.float32, precond_dtype=torch.float64)
    opt2.load_state_dict(sd)
    st = opt2.state[p]
    assert st["momentum_buffer"].dtype == torch.float32  # torch alone would cast to bf16
    assert st["Q"][0].dtype == torch.float64
    assert opt2._rng.random() == opt._rng.random()


def test_loading_a_different_layout_fails_clearly():
    a = torch.nn.Parameter(torch.randn(4, 5))
    opt = Kron([a])
    a.grad = torch.randn(4, 5)
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="parameter 0 has shape \\(4, 5\\) saved, \\(5, 4\\) here"):
        Kron([torch.nn.Parameter(torch.randn(5, 4))]).load_state_dict(sd)
    with pytest.raises(ValueError, match="1 parameter groups saved, 2 here"):
        two_groups = [{"params": [a]}, {"params": [torch.nn.Parameter(torch.randn(3))]}]
        Kron(two_groups).load_state_dict(sd)
    with pytest.raises(ValueError, match="not saved by psgd_lab.Kron"):
        Kron([a]).load_state_dict(torch.optim.AdamW([a]).state_dict())
    b = torch.nn.Parameter(torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="checkpoint momentum is torch.float32"):
        Kron([b]).load_state_dict(sd)


# ---------------------------------------------------------------------------- convergence


def test_beats_adamw_on_an_ill_conditioned_quadratic():
    """Condition number 1e4 with rotated eigenvectors, 300 steps, best of an lr grid each.

    Newton mode fits ``P`` to ``H⁻¹`` (docs/maths.md §6), so its step is a damped Newton step.
    Measured: Kron ~1.6e-8, AdamW's best ~7e-5 (lr 1.0); initial loss 9.5.
    """
    loss_fn, X0 = kron_quadratic(n=16, cond=1e4)

    def best(make, grid, newton=False):
        out = []
        for lr in grid:
            X = torch.nn.Parameter(X0.float())
            out.append(_fit(make([X], lr), [X], lambda X=X: loss_fn(X), 300, newton=newton))
        return min(v for v in out if math.isfinite(v))

    adamw = best(
        lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.0), [0.01, 0.1, 0.3, 1.0, 3.0]
    )
    kron = best(lambda p, lr: Kron(p, lr=lr, mode="newton"), [0.3, 1.0], newton=True)
    assert kron < 1e-2 * adamw, (kron, adamw)


def test_matches_adamw_on_digits():
    """sklearn's digits, MLP 64-64-10, 400 steps of batch 128, best lr of a small grid each
    (Kron's grid about 3x below AdamW's, its documented advice). Test accuracy within 1.5 points."""
    Xtr, ytr, Xte, yte = digits()

    def acc(make, lr):
        model = mlp((64, 64, 10), seed=0)
        opt = make(model.parameters(), lr)
        g = torch.Generator().manual_seed(0)
        for _ in range(400):
            i = torch.randint(0, len(ytr), (128,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(Xtr[i]), ytr[i]).backward()
            opt.step()
        with torch.no_grad():
            return (model(Xte).argmax(1) == yte).float().mean().item()

    adamw = max(acc(lambda p, lr: torch.optim.AdamW(p, lr=lr), lr) for lr in (1e-3, 3e-3, 1e-2))
    kron = max(acc(lambda p, lr: Kron(p, lr=lr), lr) for lr in (3e-4, 1e-3, 3e-3))
    assert kron > adamw - 0.015, (kron, adamw)
    assert kron > 0.95


# ---------------------------------------------------------------------------- the P cache


SHAPES = [(), (7,), (5, 6), (1, 9), (8, 3, 3, 3), (2, 3, 4, 5, 2), (300, 4), (12, 12)]


@pytest.mark.parametrize("geometry", ["EQ", "QUAD", "PRO4P"])
@pytest.mark.parametrize("memory_save_mode", [None, "one_diag"])
def test_cached_p_path_equals_the_plain_path(geometry, memory_save_mode):
    """Applying cached ``P_i`` and applying ``Qᴴ(Q m̂)`` are the same maths: 30 steps agree to
    float32 round-off on every shape (a schedule with both update and apply-only steps)."""

    def run(cache):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
        opt = Kron(ps, lr=1e-2, geometry=geometry, memory_save_mode=memory_save_mode,
                   preconditioner_update_probability=lambda n: 1.0 if n < 10 else 0.3,
                   precond_cache=cache)  # fmt: skip
        for _ in range(30):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return ps, opt

    fast, opt = run(True)
    plain, _ = run(False)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # after step 10 the probability is 0.3: a dense factor is cached while 0.3 · d² <= numel;
    # the scalar and the vector share a zero-padded stack, each holding a row of its width
    expected, width = 0, max(p.numel() for p in fast if p.dim() <= 1)
    for p in fast:
        for q in opt.state[p]["Q"]:
            if p.dim() <= 1 and geometry != "PRO4P":
                expected += width * q.element_size()
            elif geometry != "PRO4P" and (q.dim() < 2 or 0.3 * q.shape[0] ** 2 <= p.numel()):
                expected += q.nbytes
    assert sum(r.cache_bytes for r in opt.describe()) == expected
    if geometry != "PRO4P" and memory_save_mode is None:  # the dense 300x300 factor of (300, 4)
        row = opt.describe()[6]
        assert row.cache_bytes == 4 * 4 * 4 and row.factor_shapes == ((300, 300), (4, 4))


# ---------------------------------------------------------------------------- review fixes


@pytest.mark.parametrize("shape, decayed", [((4,), False), ((3, 4), True), ((2, 2, 3), True)])
def test_one_step_is_clipped_momentum_plus_weight_decay_on_ndim_ge_2(shape, decayed):
    """``b1 = 0`` and no preconditioner update on the first step (prob 0.5): ``P = I``, so
    ``u = g · min(1, 1.1/rms(g)) + wd·θ`` (``θ`` only for ``ndim >= 2``), ``θ <- θ − lr·u``."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(shape, generator=g)
    grad = 3 * torch.randn(shape, generator=g)
    x = torch.nn.Parameter(theta.clone())
    opt = Kron([x], lr=0.1, b1=0.0, weight_decay=0.5, preconditioner_update_probability=0.5)
    x.grad = grad.clone()
    opt.step()
    u = grad * min(1.0, 1.1 / (grad.square().mean().sqrt().item() + 1e-12))
    if decayed:
        u = u + 0.5 * theta
    torch.testing.assert_close(x.detach(), theta - 0.1 * u)


def test_failed_step_consumes_no_schedule_state():
    x = torch.nn.Parameter(torch.ones(3, 3))
    opt = Kron([x], mode="newton")
    rng = opt._rng.getstate()
    for _ in range(3):
        with pytest.raises(RuntimeError):
            opt.step()
    opt2 = Kron([x], nonfinite="raise")
    x.grad = torch.full((3, 3), float("nan"))
    with pytest.raises(FloatingPointError):
        opt2.step()
    for o in (opt, opt2):
        assert o._prob_step == 0 and o._counters == [0] and o._rng.getstate() == rng
    assert len(opt2.state) == 0


def test_all_parameters_skipped_step_changes_nothing():
    ps = [torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(2))]
    opt = Kron(ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in ps]
    for p in ps:
        p.grad = torch.full_like(p, float("inf"))
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ps, before))
    assert opt.nonfinite_count == 2 and all(opt.state[p]["step"] == 1 for p in ps)


def test_data_init_survives_a_zero_first_gradient():
    """LoRA-like: A's gradient is exactly 0 while B = 0. The data-driven scale must stay finite."""
    x = torch.nn.Parameter(torch.randn(4, 5))
    opt = Kron([x], precond_init_scale=None, preconditioner_update_probability=1.0)
    x.grad = torch.zeros(4, 5)
    opt.step()
    x.grad = torch.randn(4, 5)
    opt.step()
    assert torch.isfinite(x).all()
    assert all(torch.isfinite(q).all() for q in opt.state[x]["Q"])


def test_complex_parameters_train_with_a_complex_preconditioner():
    target = torch.randn(4, 3, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    z = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.complex64))
    opt = Kron([z], lr=0.05, preconditioner_update_probability=1.0)
    for _ in range(200):
        opt.zero_grad()
        (z - target).abs().square().sum().backward()
        opt.step()
    assert opt.state[z]["Q"][0].dtype == torch.complex64
    assert (z - target).abs().max() < 0.1
    with pytest.raises(ValueError, match="would drop the imaginary part"):
        bad = Kron([z], precond_dtype=torch.float32)
        z.grad = torch.ones_like(z)
        bad.step()


def test_failed_load_leaves_the_optimiser_unchanged():
    a = torch.nn.Parameter(torch.randn(4, 5))
    src = Kron([a], lr=0.1)
    a.grad = torch.randn(4, 5)
    src.step()
    sd = src.state_dict()
    b = torch.nn.Parameter(torch.randn(4, 5, dtype=torch.float64))
    dst = Kron([b], lr=0.5, weight_decay=0.1)
    b.grad = torch.randn(4, 5, dtype=torch.float64)
    dst.step()
    before = dst.state_dict()
    with pytest.raises(ValueError, match="checkpoint momentum is torch.float32"):
        dst.load_state_dict(sd)
    after = dst.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert torch.equal(after["state"][0]["momentum_buffer"], before["state"][0]["momentum_buffer"])
    assert after["psgd_lab"]["prob_step"] == before["psgd_lab"]["prob_step"]


def test_load_keeps_saved_values_not_only_dtypes():
    p = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.bfloat16))
    opt = Kron([p], precond_dtype=torch.float64, mu_dtype=torch.float32)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    sd = opt.state_dict()
    opt2 = Kron([p], precond_dtype=torch.float64, mu_dtype=torch.float32)
    opt2.load_state_dict(sd)
    for key in ("momentum_buffer",):
        assert torch.equal(opt2.state[p][key], opt.state[p][key])
    assert all(torch.equal(a, b) for a, b in zip(opt2.state[p]["Q"], opt.state[p]["Q"]))
    opt2.state[p]["Q"][0].add_(1.0)  # the loaded state is a copy, not the checkpoint's tensors
    assert not torch.equal(sd["state"][0]["Q"][0], opt2.state[p]["Q"][0])


# ---------------------------------------------------------------------------- drop-in bugs


def test_closure_runs_first_so_gradients_it_makes_are_used():
    """The torch.optim / LBFGS convention: ``zero_grad(set_to_none=True)`` outside, then
    ``step(closure)`` with ``zero_grad()`` and ``backward()`` inside. The closure must run
    before the step looks for gradients (it used to look first, find none, and skip all)."""
    model = mlp((5, 8, 2))
    before = [p.detach().clone() for p in model.parameters()]
    opt = Kron(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 5), torch.randn(16, 2)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.zero_grad(set_to_none=True)
    opt.step(closure)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_complex_parameter_with_a_real_momentum_dtype_is_refused():
    z = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="mu_dtype=torch.float32 would drop the imaginary part"):
        Kron([z], mu_dtype=torch.float32)
    Kron([z], mu_dtype=torch.complex128)  # a complex momentum dtype is fine


def test_float16_factors_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="precond_dtype=torch.float16 is not supported.*bfloat16"):
        Kron([torch.nn.Parameter(torch.zeros(3, 3))], precond_dtype=torch.float16)


def test_float16_parameters_train():
    """fp16 parameters (momentum in fp16, factors in float32): the clip's norm is taken on the
    float32 ``P m``, so it neither overflows past 65504 nor underflows."""
    x = torch.nn.Parameter(torch.ones(16, 16, dtype=torch.float16))
    opt = Kron([x], lr=0.01, preconditioner_update_probability=1.0)
    for _ in range(30):
        x.grad = torch.full_like(x, 300.0)  # ||g||² = 2.3e7, past fp16's largest 65504
        opt.step()
    assert opt.state[x]["momentum_buffer"].dtype == torch.float16
    assert torch.isfinite(x).all() and x.float().max() < 0.9


def test_newton_mode_fits_h_inverse_not_a_damped_one():
    """Newton mode's default (``damping=None``) adds no damping: its pairs are exact, and
    kron-torch's whitening damping ``sqrt(eps)·mean|Hv|·v`` would fit ``(H + δ̄I)⁻¹`` instead,
    far off on the small eigenvalues. Cond 1e6, 4000 updates: measured fit error 0.015 and still
    falling (with the old default it stalls at 0.16-0.18)."""
    loss_fn, X0 = kron_quadratic(n=6, cond=1e6)
    X = torch.nn.Parameter(X0.clone())
    opt = Kron([X], lr=0.0, mode="newton", precond_dtype=torch.float64, precond_lr=0.5,
               preconditioner_update_probability=1.0)  # fmt: skip
    for _ in range(4000):
        opt.zero_grad()
        opt.step(lambda: loss_fn(X))
    Q = opt.state[X]["Q"]
    P = torch.kron(Q[0].T @ Q[0], Q[1].T @ Q[1])
    H = torch.autograd.functional.hessian(lambda z: loss_fn(z.reshape(6, 6)), X0.reshape(-1))
    err = (torch.linalg.matrix_norm(P @ H - torch.eye(36, dtype=H.dtype)) / 6).item()
    assert err < 0.05, err


def test_newton_mode_adds_its_gradient_to_accumulated_ones():
    """Gradient accumulation: micro-batch A by ``backward()``, micro-batch B as the closure;
    the step uses ``g_A + g_B`` (it used to overwrite ``.grad`` with ``g_B``)."""
    w = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    xa, xb = torch.randn(8, 4), torch.randn(8, 4)

    def loss(x):
        return (x @ w).tanh().square().mean()

    (ga,) = torch.autograd.grad(loss(xa), [w])
    (gb,) = torch.autograd.grad(loss(xb), [w])
    opt = Kron([w], lr=0.0, mode="newton")
    loss(xa).backward()
    opt.step(lambda: loss(xb))
    torch.testing.assert_close(w.grad, ga + gb)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], 0.1 * (ga + gb))


def test_checkpoints_hold_no_generator_state():
    """Draws come from per-parameter streams (seed, index, update count): a checkpoint holds
    only counts, so ``torch.load(..., map_location=...)`` onto any device cannot hand a moved
    generator state to ``Generator.set_state`` (which wants a CPU byte tensor and failed)."""
    import io

    x = torch.nn.Parameter(torch.randn(4, 4))
    opt = Kron([x])
    x.grad = torch.randn(4, 4)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, map_location="cpu", weights_only=True)
    assert "generators" not in sd["psgd_lab"] and sd["psgd_lab"]["draw_counts"] == [1]
    Kron([x]).load_state_dict(sd)


def test_a_frozen_or_skipped_parameter_does_not_shift_the_others_draws():
    """With one stream per parameter, a parameter that has no gradient at some steps leaves the
    other parameters' trajectories exactly as they are without it."""

    def run(freeze):
        g = torch.Generator().manual_seed(0)
        a, b = (
            torch.nn.Parameter(torch.randn(5, 4, generator=g)),
            torch.nn.Parameter(torch.zeros(3, 3)),
        )
        opt = Kron([b, a], preconditioner_update_probability=1.0)
        for t in range(10):
            a.grad = torch.randn(5, 4, generator=g)
            b.grad = None if freeze and t % 2 else torch.ones(3, 3)
            opt.step()
        return a.detach().clone()

    assert torch.equal(run(True), run(False))


def test_zero_gradients_leave_q_untouched_and_training_recovers_like_fresh():
    """1,000 steps of all-zero gradients (a frozen layer, an unrouted expert) carry no
    information about P: Q stays as it was (it used to grow toward 1e10), and 1,500 normal steps
    afterwards reach what a fresh optimiser reaches. Measured on a 24x16 quadratic: final loss
    ratio to the fresh run 1.0 (before: 244 -> 219, no progress)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(24, 24, generator=g) / 5
    B = torch.randn(16, 16, generator=g) / 4
    A, B = A @ A.T + 0.1 * torch.eye(24), B @ B.T + 0.1 * torch.eye(16)

    def loss_fn(X):
        return 0.5 * (X * (A @ X @ B)).sum()

    def run(zero_steps):
        X = torch.nn.Parameter(torch.randn(24, 16, generator=torch.Generator().manual_seed(1)))
        opt = Kron([X], lr=3e-3)
        q0 = [q.clone() for q in (opt.state[X].get("Q") or [])]
        for t in range(zero_steps + 1500):
            opt.zero_grad()
            if t < zero_steps:
                X.grad = torch.zeros_like(X)
            else:
                loss_fn(X).backward()
            opt.step()
            if t == zero_steps - 1:
                q0 = [q.clone() for q in opt.state[X]["Q"]]
                assert all(torch.equal(q, torch.eye(q.shape[0])) for q in q0)
        return loss_fn(X).item()

    fresh, after = run(0), run(1000)
    assert after < 1.5 * fresh + 1e-3, (after, fresh)


def test_memory_warning_names_the_parameter_and_the_budget_bounds_it():
    """kron-torch's defaults give a 1x1 conv ``(128, 64, 1, 1)`` (merged to ``(8192, 1)``) an
    8192 x 8192 factor: 256 MiB for 32 KiB of weights. Kron warns once, naming it;
    ``precond_budget=4`` makes the largest dims diagonal until the factors fit in 4x."""
    conv = torch.nn.Parameter(torch.randn(128, 64, 1, 1) * 0.01)
    bias = torch.nn.Parameter(torch.zeros(128))
    with pytest.warns(UserWarning, match=r"parameter 0 of group 0, shape \(128, 64, 1, 1\).*"
                      r"256\.0 MiB.*8192x.*precond_budget=4"):  # fmt: skip
        Kron([conv, bias])
    opt = Kron([conv, bias], precond_budget=4)
    info = opt.describe()[0]
    assert info.budget_diag == (0,) and info.diag == (True, True)
    assert info.precond_bytes <= 4 * conv.numel() * 4
    conv.grad, bias.grad = torch.randn_like(conv), torch.randn_like(bias)
    opt.step()
    assert torch.isfinite(conv).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Kron([torch.nn.Parameter(torch.randn(64, 64))])  # an ordinary weight: no warning


def test_importing_psgd_lab_does_not_import_torchdynamo():
    """``Kron.step`` is kept out of a compiled graph without ``torch.compiler.disable`` at import
    time, which would import TorchDynamo (~2 s) in every process that imports psgd_lab."""
    code = "import sys, psgd_lab; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_compiled_training_step_runs_kron_step_eagerly():
    """Under ``torch.compile`` the step is skipped by TorchDynamo: no op of the preconditioner
    update enters a graph (the only graphs are the model's forward and backward)."""
    import torch._dynamo

    model, opt, train_step = _mlp_training_step()
    explained = torch._dynamo.explain(train_step)()
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes]
    assert not any("linalg" in op or "triu" in op for op in ops), ops
    assert opt.state[next(iter(model.parameters()))]["step"] >= 1  # it did run


@pytest.mark.parametrize("name", ["Kron", "LRA", "Dense"])
def test_clip_max_entry_limits_every_entry_of_the_step(name):
    """``clip_max_entry=c``: no entry of a step moves by more than ``lr · c`` (the reference's
    element-wise ``grad_clip_max_amps[1]``), also for a 1e20 gradient entry; ``c <= 0`` is
    refused."""
    import psgd_lab

    cls = getattr(psgd_lab, name)
    x = torch.nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)))
    opt = cls([x], lr=0.1, clip=None, clip_max_entry=0.05)
    for t in range(5):
        before = x.detach().clone()
        x.grad = torch.randn(6, 5, generator=torch.Generator().manual_seed(t + 1))
        x.grad[0, 0] = 1e20 if t == 3 else x.grad[0, 0]
        opt.step()
        # float32: θ ~ 2 rounds a difference of 0.005 to ~2e-7
        assert (x.detach() - before).abs().max().item() <= 0.1 * 0.05 + 1e-6
        assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="clip_max_entry"):
        cls([x], clip_max_entry=0.0)
