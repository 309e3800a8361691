"""Test-session set-up shared by tests/ and the nbval run over notebooks/."""

import os
import tempfile

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers on two cores: one thread each, or OpenMP spin-waits oversubscribe the
    # machine (a 1 s test took 120 s). Set before torch loads; notebook kernels inherit it.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_configure(config):
    # nbval re-executes the notebooks, which save their figures: send them to a scratch folder
    # (the kernels inherit the environment) so a test run never rewrites the committed figures/
    if getattr(config.option, "nbval", False) and "PSGD_LAB_FIGURES" not in os.environ:
        os.environ["PSGD_LAB_FIGURES"] = tempfile.mkdtemp(prefix="psgd_lab_nbval_figures_")


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (where bit-identity between a batched and a
    per-matrix computation is claimed: more threads may split a product's work otherwise)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
