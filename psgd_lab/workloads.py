"""Workloads a reader recognises, sized for a 2-core CPU: a character-level GPT on a fixed, hashed
text corpus, and MNIST-1D with an MLP and a 1-D CNN.

Each ``*_task`` is a factory ``f(seed, **params) -> experiment.Trial`` (wrap it in
``experiment.Task`` to run studies): the data is the same for every seed, the model is initialised
from ``seed`` and the batches are drawn from ``(seed, step)``, so seeds are paired across
optimisers. Nothing is downloaded:

- **The corpus** is the source of ``torch.optim`` (``CORPUS_FILES``, ~0.5 MB of Python with its
  English docstrings) read from the installed torch, the pinned dependency every psgd_lab
  installation has; ``corpus()`` checks the bytes' SHA-256 against ``CORPUS_SHA256`` (torch
  2.13.0) and refuses other bytes with the hash it found, so a reader's machine trains on the
  bytes these results were made with or says why not. Byte-level: 128 symbols (ASCII; any other
  byte maps to 127). The last ``VAL_FRACTION`` of it is the validation text.
- **MNIST-1D** (Greydanus 2020; the ``mnist1d`` package, ``pip install -e ".[compare]"``) is
  generated locally from the package's templates with its published default arguments (4,000
  training and 1,000 test sequences of length 40, seed 42); ``mnist1d()`` checks the SHA-256 of
  the data rounded to 4 decimals (``MNIST1D_SHA256``), which absorbs last-bit differences in the
  package's SciPy interpolation between machines.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CORPUS_FILES = (
    "adadelta.py", "adagrad.py", "adam.py", "adamax.py", "adamw.py", "asgd.py", "lbfgs.py",
    "lr_scheduler.py", "nadam.py", "optimizer.py", "radam.py", "rmsprop.py", "rprop.py",
    "sgd.py", "sparse_adam.py", "swa_utils.py",
)  # fmt: skip
CORPUS_SHA256 = "aba0bf919a4146dc06f7e67cbd8fba660905ee15defcdb327f025abb53c49be3"
VAL_FRACTION = 0.1
MNIST1D_SHA256 = "3df8f2a2022406ff165c2cb73a7a519f184b9b7b8261cadc7825157f263d9e5b"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=1)
def corpus() -> bytes:
    """The character-level corpus: ``CORPUS_FILES`` of the installed ``torch.optim``, joined in
    that order, checked against ``CORPUS_SHA256``."""
    folder = Path(torch.optim.__file__).parent
    missing = [f for f in CORPUS_FILES if not (folder / f).exists()]
    if missing:
        raise ValueError(f"torch {torch.__version__} lacks corpus files {missing} in {folder}")
    data = b"".join((folder / f).read_bytes() for f in CORPUS_FILES)
    if _sha(data) != CORPUS_SHA256:
        raise ValueError(
            f"the corpus read from torch {torch.__version__} ({folder}) has SHA-256 {_sha(data)}, "
            f"not {CORPUS_SHA256} (torch 2.13.0's): these are other bytes, so results would not "
            "be comparable; install torch==2.13.0"
        )
    return data


@functools.lru_cache(maxsize=1)
def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.frombuffer(bytearray(corpus()), dtype=torch.uint8).long().clamp_(max=127)
    split = int(len(ids) * (1 - VAL_FRACTION))
    return ids[:split], ids[split:]


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """A GPT-2-style decoder (pre-LayerNorm blocks, learned positions, untied head) over 128
    byte symbols."""

    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        if d % heads:
            raise ValueError(f"d must be a multiple of heads; got d={d}, heads={heads}")
        self.tok, self.pos = nn.Embedding(128, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 128)
        self.context = context

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def char_gpt_task(
    seed: int,
    d: int = 64,
    layers: int = 2,
    heads: int = 4,
    context: int = 64,
    batch: int = 16,
    val_windows: int = 64,
):
    """Next-byte prediction on ``corpus()`` with ``CharGPT``: ``batch`` random windows of
    ``context + 1`` bytes of the training text per step (from ``(seed, step)``); metric the mean
    validation cross-entropy (nats per byte) over ``val_windows`` fixed, evenly spaced windows
    of the validation text (the same for every seed)."""
    from .experiment import Trial, batch_generator

    train, val = _tokens()
    torch.manual_seed(seed)
    model = CharGPT(d, layers, heads, context)
    starts = torch.linspace(0, len(val) - context - 1, val_windows).long()
    val_batch = torch.stack([val[s : s + context + 1] for s in starts.tolist()])

    def windows(step: int) -> torch.Tensor:
        gen = batch_generator(seed, step)
        s = torch.randint(0, len(train) - context - 1, (batch,), generator=gen)
        return torch.stack([train[i : i + context + 1] for i in s.tolist()])

    def loss(m, w):
        logits = m(w[:, :-1])
        return F.cross_entropy(logits.reshape(-1, 128), w[:, 1:].reshape(-1))

    def val_loss(m) -> float:
        return loss(m, val_batch).item()

    return Trial(model, windows, loss, val_loss)


@functools.lru_cache(maxsize=1)
def mnist1d() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST-1D with the package's default arguments: ``(x_train, y_train, x_test, y_test)``,
    float32 sequences of length 40 and int64 labels, checked against ``MNIST1D_SHA256``."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            'MNIST-1D needs the mnist1d package: pip install -e ".[compare]"'
        ) from exc
    state = np.random.get_state()  # the package seeds NumPy's global generator
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
    arrays = [np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")]
    rounded = b"".join(np.round(a * 1e4).astype(np.int64).tobytes() for a in arrays)
    if _sha(rounded) != MNIST1D_SHA256:
        raise ValueError(
            f"MNIST-1D generated here has SHA-256 {_sha(rounded)} (data rounded to 4 decimals), "
            f"not {MNIST1D_SHA256}: another mnist1d version or NumPy generator made other data"
        )
    x, y, xt, yt = arrays
    return (torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64),
            torch.tensor(xt, dtype=torch.float32), torch.tensor(yt, dtype=torch.int64))  # fmt: skip


def _mnist1d_model(kind: str, width: int) -> nn.Module:
    if kind == "mlp":  # the MNIST-1D paper's MLP: two hidden layers
        return nn.Sequential(nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, 10))  # fmt: skip
    if kind == "cnn":  # three strided 1-D convolutions, then a linear read-out
        c = width
        return nn.Sequential(
            nn.Unflatten(1, (1, 40)),
            nn.Conv1d(1, c, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(c * 5, 10),
        )  # fmt: skip
    raise ValueError(f"kind must be 'mlp' or 'cnn'; got {kind!r}")


def mnist1d_task(seed: int, kind: str = "mlp", width: int = 100, batch: int = 100,
                 metric: str = "loss"):  # fmt: skip
    """MNIST-1D classification with an MLP (``kind="mlp"``, ``width`` hidden units) or a 1-D
    CNN (``"cnn"``, ``width`` channels); minibatches of ``batch`` from ``(seed, step)``; metric
    the test cross-entropy (``"loss"``) or the test error rate (``"error"``, 1 − accuracy)."""
    from .experiment import Trial
    from .runs import cross_entropy_loss, minibatches

    if metric not in ("loss", "error"):
        raise ValueError(f"metric must be 'loss' or 'error'; got {metric!r}")
    x, y, xt, yt = mnist1d()
    torch.manual_seed(seed)
    model = _mnist1d_model(kind, width)

    rows = minibatches(x, y, batch, seed)
    loss = cross_entropy_loss

    def evaluate(m) -> float:
        logits = m(xt)
        if metric == "loss":
            return F.cross_entropy(logits, yt).item()
        return (logits.argmax(-1) != yt).float().mean().item()

    return Trial(model, rows, loss, evaluate)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "CORPUS_FILES",
    "CORPUS_SHA256",
    "CharGPT",
    "MNIST1D_SHA256",
    "char_gpt_task",
    "corpus",
    "mnist1d",
    "mnist1d_task",
    "parameter_count",
]
