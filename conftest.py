"""Test-session set-up shared by tests/ and the nbval run over notebooks/."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers on two cores: one thread each, or OpenMP spin-waits oversubscribe the
    # machine (a 1 s test took 120 s). Set before torch loads; notebook kernels inherit it.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
