"""A small training job run in its own process by tests/test_optim.py (exact resume).

    python _train_job.py OUT STEPS [--resume CKPT] [--save-at N CKPT] [--every K CKPT [SLEEP]]

Trains a model with every kind of parameter shape on a fixed data stream with ``psgd_lab.Kron``
and a fast-annealing schedule (so the update counter, the balancing RNG and the ``v`` generator
all matter: with seed 39 balancing happens at steps 13 and 24), a second group of bf16
parameters with float32 momentum and float64 factors (dtypes torch would cast on load), and
writes the final parameters to ``OUT``.
"""

from __future__ import annotations

import os
import sys
import time

import torch

import psgd_lab


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3)  # 4-D weight, merged to 2-D
        self.lin = torch.nn.Linear(16, 3)
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.gain = torch.nn.Parameter(torch.ones(3, 3, dtype=torch.bfloat16))

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.scale * self.lin(h) @ self.gain.float()


def batch(t: int):
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(16, 2, 4, 4, generator=g)
    return x, (x.sum((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()


def make():
    torch.manual_seed(0)
    model = Model()
    main = [p for name, p in model.named_parameters() if name != "gain"]
    groups = [
        {"params": main},
        {"params": [model.gain], "mu_dtype": torch.float32, "precond_dtype": torch.float64},
    ]
    opt = psgd_lab.Kron(
        groups,
        lr=3e-3,
        weight_decay=1e-2,
        preconditioner_update_probability=psgd_lab.precond_update_prob_schedule(
            flat_start=25, decay=0.05, min_prob=0.2
        ),
        seed=39,
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.9)
    return model, opt, sched


def main(argv):
    out, steps = argv[0], int(argv[1])
    model, opt, sched = make()
    start = 0
    save_at = None
    if "--resume" in argv:
        ck = torch.load(argv[argv.index("--resume") + 1], weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start = ck["t"]
    every, pause = None, 0.0
    if "--save-at" in argv:
        i = argv.index("--save-at")
        save_at, ckpt = int(argv[i + 1]), argv[i + 2]
    if "--every" in argv:  # checkpoint every K steps, atomically, pausing between steps
        i = argv.index("--every")
        every, ckpt = int(argv[i + 1]), argv[i + 2]
        pause = float(argv[i + 3]) if len(argv) > i + 3 else 0.0
    for t in range(start, steps):
        if t == save_at or (every and t > start and t % every == 0):
            state = {"model": model.state_dict(), "opt": opt.state_dict(),
                     "sched": sched.state_dict(), "t": t}  # fmt: skip
            torch.save(state, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
        time.sleep(pause)
        x, y = batch(t)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    torch.save([p.detach() for p in model.parameters()], out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
