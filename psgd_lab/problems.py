"""Problems with known answers for tests and notebooks.

- Kronecker-structured SPD Hessians (docs/maths.md §6): ``kron_problem``, ``hvp``, ``fit_error``;
- an ill-conditioned Kronecker quadratic: ``kron_quadratic``;
- a small real task: sklearn's bundled digits (``digits``) and an MLP for it (``mlp``);
- ready tasks for ``psgd_lab.experiment`` (factories ``f(seed, **params) -> Trial``):
  ``linear_regression`` (a second, in milliseconds), ``digits_mlp`` (test loss, test error
  or training-set loss as the metric), ``digits_cnn``, ``rosenbrock`` (the chained Rosenbrock
  function), ``rotated_regression`` (least squares whose ill-conditioned input covariance is not
  axis-aligned) and ``first_input_rnn`` (a tanh RNN that must remember its first input).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

# name -> list of (size, is_diagonal); () is the scalar
STRUCTURES = {
    "scalar": [],
    "diag": [(5, True)],
    "dense": [(5, False)],
    "kron(diag,diag)": [(3, True), (4, True)],
    "kron(diag,dense)": [(3, True), (4, False)],
    "kron(dense,diag)": [(3, False), (4, True)],
    "kron(dense,dense)": [(3, False), (4, False)],
    "kron(dense,dense,dense)": [(2, False), (3, False), (4, False)],
}


def random_spd(d: int, gen: torch.Generator, cond: float = 10.0, dtype=torch.float64, diag=False):
    """A random ``d x d`` SPD (Hermitian PD for complex dtypes) matrix with condition ``cond``."""
    ev = torch.logspace(0, math.log10(cond), d, dtype=torch.float64)
    ev = ev[torch.randperm(d, generator=gen)].to(dtype)
    if diag:
        return torch.diag(ev)
    A = torch.randn(d, d, generator=gen, dtype=dtype)
    U, _ = torch.linalg.qr(A)
    return U @ torch.diag(ev) @ U.mH


def kron_problem(structure: str, seed: int = 0, dtype=torch.float64):
    """``(shape, diag flags, H, factors)`` with ``H = H_1 ⊗ ... ⊗ H_k`` of the given structure."""
    gen = torch.Generator().manual_seed(seed)
    spec = STRUCTURES[structure]
    if not spec:
        return (), (), torch.tensor([[2.5]], dtype=dtype), [torch.tensor([[2.5]], dtype=dtype)]
    Hs = [random_spd(d, gen, dtype=dtype, diag=dg) for d, dg in spec]
    H = Hs[0]
    for Hi in Hs[1:]:
        H = torch.kron(H, Hi)
    return tuple(d for d, _ in spec), tuple(dg for _, dg in spec), H, Hs


def hvp(H: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``H v`` for a tensor ``v`` whose flattening indexes ``H``."""
    return (H @ v.reshape(-1)).reshape(v.shape)


def fit_error(P: torch.Tensor, H: torch.Tensor) -> float:
    """``‖P H − I‖_F / ‖I‖_F``."""
    n = H.shape[0]
    eye = torch.eye(n, dtype=H.dtype)
    return (torch.linalg.matrix_norm(P @ H - eye) / math.sqrt(n)).item()


def kron_quadratic(n: int = 16, cond: float = 1e4, seed: int = 0):
    """``(loss_fn, X0)``: ``f(X) = ½ tr(Xᵀ H_1 X H_2)`` on ``n x n`` matrices, Hessian
    ``H_1 ⊗ H_2`` with random eigenvectors and condition number ``cond`` (float64 maths)."""
    gen = torch.Generator().manual_seed(seed)
    root = math.sqrt(cond)
    H1, H2 = random_spd(n, gen, cond=root), random_spd(n, gen, cond=root)
    X0 = torch.randn(n, n, generator=gen, dtype=torch.float64)
    scale = 1.0 / cond  # eigenvalues of the Hessian in [1/cond, 1]

    def loss_fn(X: torch.Tensor) -> torch.Tensor:
        X = X.double()
        return 0.5 * scale * torch.sum(X * (H1 @ X @ H2))

    return loss_fn, X0


def digits(seed: int = 0, test_fraction: float = 0.25):
    """sklearn's bundled 8x8 digits (1797 images, no download): standardised float32
    ``(X_train, y_train, X_test, y_test)``, split at random by ``seed``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    mean, std = X[train].mean(0), X[train].std(0).clamp(min=1e-3)
    X = (X - mean) / std
    return X[train], y[train], X[test], y[test]


def mlp(sizes=(64, 64, 10), seed: int = 0) -> torch.nn.Module:
    """A tanh MLP with the given layer sizes, initialised from ``seed`` (global RNG untouched)."""
    layers: list[torch.nn.Module] = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(torch.nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


# ---------------------------------------------------------------------------- experiment tasks


def linear_regression(
    seed: int, n: int = 512, d: int = 16, batch: int = 32, cond: float = 100.0, noise: float = 0.1
):
    """Least squares with a known answer, as an ``experiment.Trial``.

    ``y = X w* + noise · ε`` with ``n`` fixed rows whose feature scales make the covariance
    ``Σ = diag(s²)`` of condition ``cond`` (data from generator 0, the same for every seed);
    ``nn.Linear(d, 1, bias=False)`` initialised from ``seed``; minibatches of ``batch`` rows drawn
    from ``(seed, step)``; loss ½ mean squared error; metric the excess risk
    ``(w − w*)ᵀ Σ (w − w*)``, 0 at the population optimum.
    """
    from .experiment import Trial, batch_generator

    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, -0.5 * math.log10(cond), d)
    X = torch.randn(n, d, generator=gen) * scales
    w_star = torch.randn(d, generator=gen)
    y = X @ w_star + noise * torch.randn(n, generator=gen)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = torch.nn.Linear(d, 1, bias=False)

    def rows(step: int):
        idx = torch.randint(0, n, (batch,), generator=batch_generator(seed, step))
        return X[idx], y[idx]

    def loss(m, b):
        return 0.5 * F.mse_loss(m(b[0]).squeeze(-1), b[1])

    def excess_risk(m) -> float:
        return float(((m.weight[0] - w_star) ** 2 * scales**2).sum())

    return Trial(model, rows, loss, excess_risk)


@functools.lru_cache(maxsize=4)
def _digits(split_seed: int):
    return digits(split_seed)  # read-only tensors, shared by the runs of one process


DIGITS_METRICS = ("test_loss", "test", "test_error", "train_loss", "train")


def digits_mlp(
    seed: int,
    sizes=(64, 32, 10),
    batch: int = 64,
    split_seed: int = 0,
    metric: str = "test_loss",
    dtype: str = "float32",
):
    """sklearn's digits with a tanh MLP, as an ``experiment.Trial``: the split from
    ``split_seed`` (the same for every seed), the MLP initialised from ``seed``, minibatches of
    ``batch`` training images drawn from ``(seed, step)``; loss cross-entropy. ``metric``:
    ``"test_loss"`` (or ``"test"``) the test cross-entropy (nats), ``"test_error"`` the test
    error rate (%, one image of the 449 is 0.22 points), ``"train"`` the whole training set's
    cross-entropy (how well an optimiser optimises) in the model's dtype, or ``"train_loss"`` the
    same computed in float64 from the logits, so that it keeps resolving a fitted float32 model's
    progress below float32's ~1e-7 floor. ``dtype``: ``"float32"`` or ``"float64"`` (data and
    model)."""
    from .experiment import Trial
    from .runs import cross_entropy_loss, minibatches

    if metric not in DIGITS_METRICS:
        raise ValueError(
            f"metric must be one of {', '.join(map(repr, DIGITS_METRICS))}; got {metric!r}"
        )
    X_train, y_train, X_test, y_test = _digits(split_seed)
    dt = _dtype(dtype)
    X_train, X_test = X_train.to(dt), X_test.to(dt)
    model = mlp(tuple(sizes), seed).to(dt)

    images = minibatches(X_train, y_train, batch, seed)
    loss = cross_entropy_loss

    def evaluate(m) -> float:
        if metric in ("test_loss", "test"):
            return F.cross_entropy(m(X_test), y_test).item()
        if metric == "test_error":
            return 100 * (m(X_test).argmax(1) != y_test).double().mean().item()
        if metric == "train":
            return F.cross_entropy(m(X_train), y_train).item()
        return F.cross_entropy(m(X_train).double(), y_train).item()

    return Trial(model, images, loss, evaluate)


def cnn(channels=(8, 16), seed: int = 0) -> torch.nn.Module:
    """A small tanh conv net for 8x8 one-channel images: a 3x3 convolution to ``channels[0]``
    maps (padding 1), a stride-2 3x3 convolution to ``channels[1]`` maps of 4x4, and a linear
    read-out to 10 classes; initialised from ``seed`` (global RNG untouched)."""
    a, b = channels
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, a, 3, padding=1),
            torch.nn.Tanh(),
            torch.nn.Conv2d(a, b, 3, stride=2, padding=1),
            torch.nn.Tanh(),
            torch.nn.Flatten(),
            torch.nn.Linear(b * 4 * 4, 10),
        )


def digits_cnn(seed: int, channels=(8, 16), batch: int = 64, split_seed: int = 0):
    """sklearn's digits as 1x8x8 images with a small conv net (``cnn``), as an
    ``experiment.Trial``: the split from ``split_seed`` (the same for every seed), the net
    initialised from ``seed``, minibatches of ``batch`` training images drawn from
    ``(seed, step)``; loss cross-entropy; metric the test cross-entropy (nats). Its parameters
    are 4-D convolution kernels, 2-D and 1-D tensors, so Kron meets each kind of shape."""
    from .experiment import Trial
    from .runs import cross_entropy_loss, minibatches

    X_train, y_train, X_test, y_test = _digits(split_seed)
    X_train, X_test = X_train.reshape(-1, 1, 8, 8), X_test.reshape(-1, 1, 8, 8)
    model = cnn(tuple(channels), seed)

    images = minibatches(X_train, y_train, batch, seed)
    loss = cross_entropy_loss

    def test_loss(m) -> float:
        return F.cross_entropy(m(X_test), y_test).item()

    return Trial(model, images, loss, test_loss)


def _dtype(name: str) -> torch.dtype:
    if name not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64'; got {name!r}")
    return getattr(torch, name)


class _Point(torch.nn.Module):
    """A bare parameter tensor as a module (the optimisation variable of a test function)."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x = torch.nn.Parameter(x)


def rosenbrock_value(x: torch.Tensor) -> torch.Tensor:
    """The chained Rosenbrock function over the flattened ``x``:
    ``sum_i 100 (x_{i+1} − x_i²)² + (1 − x_i)²``; minimum 0 at all ones."""
    x = x.reshape(-1)
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def rosenbrock(seed: int, shape=(2,), dtype: str = "float64"):
    """The chained Rosenbrock function on a parameter of ``shape`` from the classic start (−1.2 at
    even flat positions, 1 at odd ones), as an ``experiment.Trial``; loss and metric the
    function's value. Deterministic: the start is the same for every seed, so a seed changes
    only what the optimiser draws (pass ``experiment.SEED`` as Kron's ``seed``)."""
    from .experiment import Trial

    shape = tuple(int(d) for d in shape)
    x = torch.ones(math.prod(shape), dtype=_dtype(dtype))
    x[0::2] = -1.2
    model = _Point(x.reshape(shape))

    def loss(m, batch):
        return rosenbrock_value(m.x)

    def value(m) -> float:
        return rosenbrock_value(m.x).item()

    return Trial(model, lambda step: None, loss, value)


def rotated_regression(
    seed: int,
    out: int = 4,
    d: int = 16,
    cond: float = 1e3,
    batch: int = 32,
    n: int | None = None,
    noise: float = 0.1,
    init_std: float = 0.0,
    dtype: str = "float64",
):
    """Multi-output least squares ``y = W* x + noise · ε`` whose input covariance
    ``Σ = U diag(λ) Uᵀ`` (``λ`` log-spaced from 1 to ``1/cond``) has a random basis ``U``, so a
    diagonal preconditioner cannot undo it and a dense ``d x d`` factor can; as an
    ``experiment.Trial``.

    ``U`` and ``W*`` (shape ``out x d``) come from generator 0, the same for every seed. ``n=None``
    streams: every step draws ``batch`` fresh inputs from ``(seed, step)``, and the metric is the
    excess risk ``½ tr(E Σ Eᵀ)`` with ``E = W − W*``. An integer ``n`` fixes ``n`` samples (drawn
    from generator 0), each step takes ``batch`` of them (indices from ``(seed, step)``) and the
    metric is ``½ tr(E Σ̂ Eᵀ)`` with the sample covariance ``Σ̂ = XᵀX/n``: with ``noise=0`` that
    is the loss on all ``n`` samples. ``nn.Linear(d, out, bias=False)`` with weights zero
    (``init_std=0``) or normal with ``init_std`` from ``seed``; loss ½ mean squared error summed
    over outputs.
    """
    from .experiment import Trial, batch_generator

    dt = _dtype(dtype)
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    lam = torch.logspace(0, -math.log10(cond), d, dtype=torch.float64)
    root = U @ torch.diag(lam.sqrt())  # x = root z, z ~ N(0, I): covariance U diag(lam) Uᵀ
    w_star = torch.randn(out, d, generator=gen, dtype=torch.float64)
    if n is None:
        cov = U @ torch.diag(lam) @ U.T
    else:
        X_all = torch.randn(n, d, generator=gen, dtype=torch.float64) @ root.T
        Y_all = X_all @ w_star.T + noise * torch.randn(n, out, generator=gen, dtype=torch.float64)
        cov = X_all.T @ X_all / n
        X_all, Y_all = X_all.to(dt), Y_all.to(dt)
    root, w_star, cov = root.to(dt), w_star.to(dt), cov.to(dt)
    model = torch.nn.Linear(d, out, bias=False).to(dt)
    with torch.no_grad():
        if init_std > 0:
            g = torch.Generator().manual_seed(seed)
            model.weight.copy_(init_std * torch.randn(out, d, generator=g, dtype=dt))
        else:
            model.weight.zero_()

    def rows(step: int):
        g = batch_generator(seed, step)
        if n is None:
            X = torch.randn(batch, d, generator=g, dtype=dt) @ root.T
            return X, X @ w_star.T + noise * torch.randn(batch, out, generator=g, dtype=dt)
        idx = torch.randint(0, n, (batch,), generator=g)
        return X_all[idx], Y_all[idx]

    def loss(m, b):
        return 0.5 * (m(b[0]) - b[1]).square().sum(1).mean()

    def excess(m) -> float:
        E = m.weight - w_star
        return float(0.5 * torch.trace(E @ cov @ E.T))

    return Trial(model, rows, loss, excess)


class FirstInputRNN(torch.nn.Module):
    """A tanh ``torch.nn.RNN(1, hidden)`` without biases and a linear read-out of the last hidden
    state."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.rnn = torch.nn.RNN(1, hidden, batch_first=True, bias=False)
        self.head = torch.nn.Linear(hidden, 1, bias=False)

    def forward(self, x):
        h, _ = self.rnn(x)
        return self.head(h[:, -1])


def first_input_rnn(
    seed: int, hidden: int = 16, length: int = 20, batch: int = 64, n_val: int = 512,
    dtype: str = "float64",
):  # fmt: skip
    """A memory task as an ``experiment.Trial``: ``FirstInputRNN(hidden)`` reads ``length``
    Gaussian inputs and must output the **first**; the model is initialised from ``seed``,
    each step draws ``batch`` fresh sequences from ``(seed, step)``; loss and metric the mean
    squared error, the metric on ``n_val`` held-out sequences (generator 99, the same for every
    seed), where predicting 0 scores their mean square, about 1."""
    from .experiment import Trial, batch_generator

    dt = _dtype(dtype)
    X_val = torch.randn(n_val, length, 1, generator=torch.Generator().manual_seed(99)).to(dt)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = FirstInputRNN(hidden).to(dt)

    def sequences(step: int):
        return torch.randn(batch, length, 1, generator=batch_generator(seed, step), dtype=dt)

    def loss(m, x):
        return F.mse_loss(m(x), x[:, 0])

    def val(m) -> float:
        return F.mse_loss(m(X_val), X_val[:, 0]).item()

    return Trial(model, sequences, loss, val)
