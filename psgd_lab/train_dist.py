"""Train an MLP with ``Kron`` under ``torch.distributed``: launch it with torchrun.

    torchrun --standalone --nproc-per-node 2 -m psgd_lab.train_dist --wrap ddp --distributed shard
    torchrun --standalone --nproc-per-node 2 -m psgd_lab.train_dist --compare

Every rank sees its own slice of each global batch (a fixed synthetic regression stream); the
model is wrapped in DDP or sharded with FSDP2 (``fully_shard``). ``--compare`` trains twice in
the same processes, ``distributed=None`` then ``"shard"``, and prints the wall-time ratios of the
two from this one run and whether the parameters agree. ``--save DIR`` / ``--resume DIR`` write
and read one checkpoint file that loads under any world size (the model's full state dict from
``torch.distributed.checkpoint.state_dict``; ``Kron``'s whole state dict). Rank 0 prints; the
backend is gloo on CPUs and NCCL on CUDA devices.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from . import Kron


def _model(width: int, depth: int, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Linear(32, width), torch.nn.Tanh()]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 8))


def _batch(t: int, size: int, rank: int, world: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(t)
    x = torch.randn(size, 32, generator=g)
    y = torch.sin(x[:, :8]) + 0.1 * x[:, 8:16] * x[:, 16:24]
    n = size // world
    return x[rank * n : (rank + 1) * n].to(device), y[rank * n : (rank + 1) * n].to(device)


def _wrap(model: torch.nn.Module, how: str, device) -> torch.nn.Module:
    model = model.to(device)
    if how == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _state_bytes(opt: Kron) -> int:
    """Bytes of momentum and factors this rank keeps."""
    return sum(
        t.nbytes
        for st in opt.state.values()
        for v in st.values()
        for t in (v if isinstance(v, list) else [v])
        if isinstance(t, torch.Tensor)
    )


def train(args, distributed: str | None, device, log=print) -> dict:
    """One run; returns its losses, step times (ms), the parameters and this rank's state bytes."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _wrap(_model(args.width, args.depth), args.wrap, device)
    opt = Kron(
        model.parameters(),
        lr=args.lr,
        preconditioner_update_probability=args.prob,
        distributed=distributed,
        dtensor=args.dtensor,
    )
    start = 0
    if args.resume:
        start = _load(args.resume, model, opt)
        log(f"resumed from {args.resume} at step {start}")
    losses, step_ms, opt_ms = [], [], []
    for t in range(start, args.steps):
        x, y = _batch(t, args.batch, rank, world, device)
        t0 = _clock(device)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        t1 = _clock(device)
        opt.step()
        t2 = _clock(device)
        losses.append(loss.detach())
        step_ms.append(1e3 * (t2 - t0))
        opt_ms.append(1e3 * (t2 - t1))
    if args.save:
        _save(args.save, model, opt, args.steps)
        log(f"saved to {args.save} at step {args.steps}")
    losses = [x.item() for x in losses]  # one host sync, at the end
    params = [
        p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
        for p in model.parameters()
    ]
    out = {
        "losses": losses,
        "step_ms": step_ms,
        "opt_ms": opt_ms,
        "params": params,
        "state_bytes": _state_bytes(opt),
    }
    del model, opt
    gc.collect()
    return out


def _clock(device: torch.device) -> float:
    """``perf_counter`` after the device's queued work (a sync on accelerators, for timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _save(path: str, model, opt: Kron, step: int) -> None:
    """One file, loadable under any world size: the model's full state dict (gathered by
    ``torch.distributed.checkpoint.state_dict``) and ``Kron``'s whole state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=whole)  # collectives: every rank
    optim_sd = opt.state_dict()  # a collective under distributed="shard"
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
        torch.save(
            {"model": model_sd, "optim": optim_sd, "step": step}, os.path.join(path, "ckpt.pt")
        )
    dist.barrier()


def _load(path: str, model, opt: Kron) -> int:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    saved = torch.load(os.path.join(path, "ckpt.pt"), map_location="cpu")
    set_model_state_dict(model, saved["model"], options=StateDictOptions(full_state_dict=True))
    opt.load_state_dict(saved["optim"])
    return int(saved["step"])


def _max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wrap", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--distributed", choices=["none", "shard"], default="none")
    ap.add_argument("--compare", action="store_true", help="time 'none' against 'shard'")
    ap.add_argument(
        "--dtensor",
        choices=["full", "local"],
        default="full",
        help="FSDP2 parameters: whole (exact) or each rank's shard on its own",
    )
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64, help="global batch")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the timings")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--prob", type=float, default=1.0, help="preconditioner update probability")
    ap.add_argument("--save", help="write a checkpoint here at the end")
    ap.add_argument("--resume", help="resume from this checkpoint")
    ap.add_argument("--json", help="rank 0 writes the measured figures here")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    device = device or torch.device("cpu")
    if cuda:  # object collectives and FSDP2's default mesh use the current device
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    log(
        f"{world} ranks, {args.wrap}, MLP 32-{args.width}x{args.depth}-8, global batch "
        f"{args.batch}, update probability {args.prob}, {torch.get_num_threads()} thread(s)/rank"
    )
    runs = ["none", "shard"] if args.compare else [args.distributed]
    results = {}
    for name in runs:
        r = train(args, None if name == "none" else name, device, log)
        w = args.warmup
        med = {
            k: _max_over_ranks(statistics.median(r[k][w:] or r[k])) for k in ("step_ms", "opt_ms")
        }
        state = torch.tensor([r["state_bytes"]], dtype=torch.float64)
        dist.all_reduce(state, op=dist.ReduceOp.MAX)
        results[name] = {
            **med,
            "final_loss": r["losses"][-1],
            "max_state_mb": state.item() / 2**20,
            "params": r["params"],
        }
        log(
            f"distributed={name!r}: final loss {r['losses'][-1]:.4f}, median step "
            f"{med['step_ms']:.1f} ms (optimizer {med['opt_ms']:.1f} ms), optimiser state "
            f"{state.item() / 2**20:.2f} MB on the busiest rank"
        )
    report = {k: {kk: vv for kk, vv in v.items() if kk != "params"} for k, v in results.items()}
    if args.compare:
        a, b = results["none"], results["shard"]
        same = all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
        report["ratio_step"] = b["step_ms"] / a["step_ms"]
        report["ratio_optimizer"] = b["opt_ms"] / a["opt_ms"]
        report["ratio_state"] = b["max_state_mb"] / a["max_state_mb"]
        report["bit_identical"] = same
        log(
            f"shard / none, one run: step {report['ratio_step']:.2f}x, optimizer step "
            f"{report['ratio_optimizer']:.2f}x, state on the busiest rank "
            f"{report['ratio_state']:.2f}x; parameters bit-identical: {same}"
        )
    if args.json and rank == 0:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "world": world, **report}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    # End without interpreter finalisation: under load, gloo's worker threads can still be
    # tearing down then, and about 1 launch in 8 died with SIGABRT ("terminate called without an
    # active exception") after all its work and output were done (see pytorch PR 179291).
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
