"""Kron under torch.distributed DDP (issue 8, first part): 2 gloo processes on this CPU.

DDP averages the gradients across ranks; Kron's own randomness (the ``v`` draws, the balancing
decisions) comes from generators seeded by ``seed``, the same on every rank, and the update
schedule is deterministic, so every rank computes the same step from the same averaged gradient:
no broadcast is needed and the ranks stay bit-identical.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from psgd_lab import Kron
from psgd_lab.problems import mlp

STEPS, GLOBAL_BATCH = 50, 32


def _batch(t: int):
    g = torch.Generator().manual_seed(t)
    x = torch.randn(GLOBAL_BATCH, 8, generator=g)
    return x, torch.sin(x[:, :4]) + 0.1 * x[:, 4:]


def _train(model, opt, rank=0, world=1):
    for t in range(STEPS):
        x, y = _batch(t)
        n = GLOBAL_BATCH // world
        x, y = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(mlp((8, 16, 4), seed=0))
        opt = Kron(model.parameters(), lr=1e-2, preconditioner_update_probability=0.5)
        _train(model, opt, rank, world)
        state = [opt.state[p]["Q"] for p in model.parameters()]
        torch.save({"params": [p.detach() for p in model.parameters()], "Q": state},
                   f"{out}/rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_stay_identical_and_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    assert all(torch.equal(a, b) for qa, qb in zip(r0["Q"], r1["Q"]) for a, b in zip(qa, qb))
    # one process on the same global batches: DDP's averaged gradient equals the global-batch
    # gradient up to the all-reduce's float32 summation order; measured 5.7e-8 relative after 50
    # steps, bounded here at 1e-4
    model = mlp((8, 16, 4), seed=0)
    opt = Kron(model.parameters(), lr=1e-2, preconditioner_update_probability=0.5)
    _train(model, opt)
    for a, b in zip(r0["params"], model.parameters()):
        assert ((a - b.detach()).norm() / b.detach().norm()).item() < 1e-4
