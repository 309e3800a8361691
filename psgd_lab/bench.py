"""Side-by-side step time, state bytes and FLOPs of AdamW, kron-torch, heavyball and psgd_lab.

Every optimiser gets the same parameter set and the same precomputed gradients; steps are timed
round-robin (one step of each optimiser in turn) in one process, so the machine's noise falls on
all of them alike. Ratios are taken within the run: to AdamW and to kron-torch at the same update
probability. ``run`` is the API; ``psgd-lab bench`` prints its markdown table and writes JSON.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

Shapes = list[tuple[int, ...]]


def gpt2_layout(
    d: int = 768, layers: int = 12, vocab: int = 50257, positions: int = 1024
) -> Shapes:
    """GPT-2's parameter tensors (small: d = 768, 12 layers, 148 tensors) at width ``d``."""
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
             (4 * d, d), (d,)]  # fmt: skip
    return [(vocab, d), (positions, d)] + block * layers + [(d,), (d,)]


def _bn(c: int) -> Shapes:
    return [(c,), (c,)]


def resnet_layout(width: int = 64, blocks=(2, 2, 2, 2), bottleneck: bool = False) -> Shapes:
    """A torchvision ResNet's parameter tensors at base width ``width`` (64 in the real nets):
    ResNet-18 is ``blocks=(2, 2, 2, 2)`` (62 tensors), ResNet-50 ``(3, 4, 6, 3)`` with
    ``bottleneck=True`` (161 tensors)."""
    out = [(width, 3, 7, 7), *_bn(width)]
    expansion = 4 if bottleneck else 1
    inplanes = width
    for stage, n in enumerate(blocks):
        planes = width * 2**stage
        for b in range(n):
            if bottleneck:
                out += [(planes, inplanes, 1, 1), *_bn(planes), (planes, planes, 3, 3),
                        *_bn(planes), (planes * 4, planes, 1, 1), *_bn(planes * 4)]  # fmt: skip
            else:
                out += [(planes, inplanes, 3, 3), *_bn(planes), (planes, planes, 3, 3),
                        *_bn(planes)]  # fmt: skip
            if b == 0 and (stage > 0 or inplanes != planes * expansion):
                out += [(planes * expansion, inplanes, 1, 1), *_bn(planes * expansion)]
            inplanes = planes * expansion
    return out + [(1000, inplanes), (1000,)]


def vit_layout(d: int = 384, layers: int = 12, patch: int = 16, tokens: int = 197) -> Shapes:
    """A ViT's parameter tensors (ViT-S/16: d = 384, 12 layers, 152 tensors) at width ``d``."""
    block = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,),
             (d, 4 * d), (d,)]  # fmt: skip
    head = [(d, 3, patch, patch), (d,), (1, 1, d), (1, tokens, d)]
    return head + block * layers + [(d,), (d,), (1000, d), (1000,)]


PARAM_SETS: dict[str, Shapes] = {
    "mlp": [(1024, 1024), (1024,)] * 3,
    "transformer": [(4096, 256)]
    + [(256, 768), (256, 256), (256, 1024), (1024, 256), (256,), (256,)] * 4,
    "conv": [(64, 3, 3, 3), (128, 64, 3, 3), (256, 128, 3, 3), (10, 4096)],
    # real models' layouts at widths this CPU can time
    "gpt2-d16": gpt2_layout(16),  # 148 tensors, compute negligible: per-tensor overhead
    "gpt2-d128": gpt2_layout(128),
    "resnet18-w16": resnet_layout(16),
    "resnet50-w16": resnet_layout(16, (3, 4, 6, 3), bottleneck=True),
    "vit-s-d192": vit_layout(192),
}
PROBS = (1.0, 0.03)


@dataclass
class Result:
    """One optimiser configuration on one parameter set."""

    params: str
    optimizer: str
    prob: float | None  # preconditioner update probability (None: not a PSGD optimiser)
    times_ms: list[float] = field(default_factory=list)
    state_bytes: int = 0
    cache_bytes: int = 0
    flops: float = 0.0
    note: str = ""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else math.nan

    @property
    def spread_ms(self) -> float:
        """Half the interquartile range."""
        if len(self.times_ms) < 4:
            return math.nan
        q = statistics.quantiles(self.times_ms, n=4)
        return (q[2] - q[0]) / 2


def make_params(
    shapes: Sequence[tuple[int, ...]], seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[list[Tensor], list]:
    """Parameters and one fixed gradient each (scaled like a real gradient, ~1e-3)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device)) for s in shapes]
    grads = [(torch.randn(s, generator=g) * 1e-3).to(device) for s in shapes]
    return params, grads


def _sync(device) -> None:
    """Wait for the device (timing an asynchronous accelerator needs it; the CPU does not)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(n: int = 1024, repeats: int = 5, device="cpu") -> float:
    """This machine's measured dense float32 matmul throughput (GFLOP/s), the physical limit."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _tensor_bytes(obj) -> int:
    if isinstance(obj, Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def optimizers(fast: bool = True, compiled: bool = False) -> dict[str, Callable]:
    """name -> factory(params, prob) for every optimiser installed here (None if absent)."""
    from .optim import Kron

    out: dict[str, Callable | None] = {
        "AdamW": lambda ps, prob: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "kron-torch": None,
        "heavyball PSGDKron": None,
        "psgd_lab": lambda ps, prob: Kron(ps, preconditioner_update_probability=prob),
        # the fastest setting that keeps dense factors: the largest dim of each tensor diagonal
        "psgd_lab one_diag": lambda ps, prob: Kron(
            ps, preconditioner_update_probability=prob, memory_save_mode="one_diag"
        ),
    }
    if compiled:  # the grouped kernel compiled with torch.compile (one graph per structure)
        out["psgd_lab compiled"] = lambda ps, prob: Kron(
            ps, preconditioner_update_probability=prob, compile=True
        )
    if not fast:
        del out["psgd_lab one_diag"]
    if _available("kron_torch"):
        from kron_torch import Kron as KT

        out["kron-torch"] = lambda ps, prob: KT(ps, preconditioner_update_probability=prob)
    if _available("heavyball"):
        import heavyball

        out["heavyball PSGDKron"] = lambda ps, prob: heavyball.PSGDKron(
            ps, preconditioner_update_probability=prob
        )
    return out


def _count_flops(step: Callable[[], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def run(
    sets: dict[str, list[tuple[int, ...]]] | None = None,
    probs: Sequence[float] = PROBS,
    repeats: int = 9,
    warmup: int = 2,
    progress: bool = True,
    only: Sequence[str] | None = None,
    device: str = "cpu",
    compiled: bool = False,
) -> dict:
    """Time every installed optimiser (or those named in ``only``) on every parameter set;
    return a JSON-able dict (``table`` renders it)."""
    from tqdm import tqdm

    sets = sets or PARAM_SETS
    factories = optimizers(compiled=compiled)
    if only is not None:
        unknown = set(only) - set(factories)
        if unknown:
            raise ValueError(f"unknown optimizer(s) {sorted(unknown)}; known: {list(factories)}")
        factories = {k: v for k, v in factories.items() if k in only}
    results: list[Result] = []
    skipped = [name for name, f in factories.items() if f is None]
    total = sum(len(probs) for _ in sets) * (repeats + warmup)
    bar = tqdm(total=total, desc="bench", unit="round", disable=not progress, file=sys.stderr)
    for set_name, shapes in sets.items():
        for prob in probs:
            runners = []
            for name, factory in factories.items():
                if factory is None or (name == "AdamW" and prob != probs[0]):
                    continue
                params, grads = make_params(shapes, device=device)
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                res = Result(set_name, name, None if name == "AdamW" else prob)
                try:
                    opt = factory(params, prob)
                except Exception as exc:  # an optimiser that cannot be built here is reported
                    res.note = f"failed: {type(exc).__name__}: {exc}"[:200]
                    results.append(res)
                    continue
                runners.append((res, opt, list(zip(params, grads))))
            for r in range(warmup + repeats):
                for res, opt, pairs in runners:
                    if res.note:
                        continue
                    for p, g in pairs:  # some optimisers (heavyball) consume .grad
                        p.grad = g
                    try:
                        with contextlib.redirect_stdout(io.StringIO()):  # kron-torch prints
                            _sync(device)
                            t = time.perf_counter()
                            opt.step()
                            _sync(device)
                            dt = time.perf_counter() - t
                    except Exception as exc:
                        res.note = f"failed: {type(exc).__name__}: {exc}"[:200]
                        continue
                    if r >= warmup:
                        res.times_ms.append(dt * 1e3)
                bar.update(1)
            for res, opt, pairs in runners:
                if res.note:
                    results.append(res)
                    continue
                for p, g in pairs:
                    p.grad = g
                res.state_bytes = _state_bytes(opt)
                res.cache_bytes = _cache_bytes(opt)
                with contextlib.redirect_stdout(io.StringIO()):
                    try:
                        res.flops = _count_flops(opt.step)  # one more step
                    except Exception as exc:
                        res.note = f"flops not counted: {type(exc).__name__}"
                results.append(res)
    bar.close()
    return {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "processor": platform.machine(),
            "device": str(device),
            "matmul_gflops": matmul_gflops(device=device),
        },
        "repeats": repeats,
        "skipped": skipped,
        "results": [
            asdict(r) | {"median_ms": r.median_ms, "spread_ms": r.spread_ms} for r in results
        ],
    }


def _state_bytes(opt) -> int:
    return sum(_tensor_bytes(s) for s in opt.state.values())


def _cache_bytes(opt) -> int:
    cache = getattr(opt, "_cache", None)
    return sum(_tensor_bytes(v) for v in cache.values()) if cache else 0


def table(report: dict) -> str:
    """Markdown table: median and spread, ratios to AdamW and to kron-torch, bytes, FLOPs."""
    rows = report["results"]
    peak = report["machine"]["matmul_gflops"]
    by = {(r["params"], r["optimizer"], r["prob"]): r for r in rows}
    lines = [
        "| params | optimizer | update prob | median ms (± IQR/2) | × AdamW | × kron-torch | "
        "state MB | cache MB | GFLOP/step | % of matmul peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["note"].startswith("failed"):
            note = r["note"] if len(r["note"]) <= 70 else r["note"][:69] + "…"
            lines.append(
                f"| {r['params']} | {r['optimizer']} | {_p(r['prob'])} | {note} | | | | | | |"
            )
            continue
        adam = by.get((r["params"], "AdamW", None))
        kt = by.get((r["params"], "kron-torch", r["prob"]))
        med = r["median_ms"]
        x_adam = med / adam["median_ms"] if adam else math.nan
        x_kt = med / kt["median_ms"] if kt and not kt["note"].startswith("failed") else math.nan
        gflop = r["flops"] / 1e9
        frac = gflop / (med / 1e3) / peak * 100 if med > 0 else math.nan
        fl = ("-", "-") if r["note"] else (f"{gflop:.2f}", f"{frac:.0f}")  # note: not counted
        lines.append(
            f"| {r['params']} | {r['optimizer']} | {_p(r['prob'])} | {med:.1f} ± "
            f"{r['spread_ms']:.1f} | {x_adam:.1f} | {_x(x_kt)} | {r['state_bytes'] / 2**20:.1f} | "
            f"{r['cache_bytes'] / 2**20:.1f} | {fl[0]} | {fl[1]} |"
        )
    m = report["machine"]
    lines += [""]
    lines.append(
        f"torch {m['torch']}, {m['threads']} threads, {m['processor']}; measured matmul peak "
        f"{m['matmul_gflops']:.0f} GFLOP/s; {report['repeats']} timed steps each, round-robin."
    )
    for name in report["skipped"]:
        lines.append(f"{name}: not installed, skipped (pip install -e '.[compare]').")
    return "\n".join(lines)


def _p(prob) -> str:
    return "-" if prob is None else f"{prob:g}"


def _x(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}"


def _command(args) -> str:
    """The ``psgd-lab bench`` command line that reproduces ``args``."""
    parts = ["psgd-lab bench"]
    if args.shapes:
        parts.append(f"--shapes {args.shapes}")
    elif args.sets:
        parts.append("--sets " + " ".join(args.sets))
    parts.append("--probs " + " ".join(f"{p:g}" for p in args.probs))
    parts.append(f"--repeats {args.repeats} --warmup {args.warmup}")
    if args.only:
        parts.append("--only " + " ".join(repr(o) for o in args.only))
    if args.device != "cpu":
        parts.append(f"--device {args.device}")
    if args.compiled:
        parts.append("--compiled")
    if args.json:
        parts.append(f"--json {args.json}")
    return " ".join(parts)


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``"1024x1024,1024,64x3x3x3"`` -> ``[(1024, 1024), (1024,), (64, 3, 3, 3)]``."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(tuple(int(d) for d in part.lower().split("x")))
        except ValueError:
            raise ValueError(f"--shapes must look like '1024x1024,1024'; got {part!r}") from None
    if not out:
        raise ValueError("--shapes named no shapes")
    return out


def main(args) -> int:
    sets = {k: PARAM_SETS[k] for k in args.sets} if args.sets else dict(PARAM_SETS)
    if args.shapes:
        sets = {"custom": parse_shapes(args.shapes)}
    report = run(sets, probs=args.probs, repeats=args.repeats, warmup=args.warmup, only=args.only,
                 device=args.device, compiled=args.compiled)  # fmt: skip
    report["command"] = _command(args)
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0
