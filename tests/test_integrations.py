"""Kron under the training stacks people use: PyTorch Lightning (automatic optimisation passes a
closure; checkpoint and resume), Hugging Face's ``Trainer`` (``optimizers=(Kron(...), None)``),
``torch.amp`` autocast with a ``GradScaler``, and gradient accumulation. Each trains a small model
and ends where a hand-written loop over the same batches ends, within the tolerance stated.

The ``integrations`` extra installs Lightning and transformers (``pip install -e
".[integrations]"``); without them those tests skip.
"""

from __future__ import annotations

import pytest
import torch

from psgd_lab import Kron
from psgd_lab.problems import mlp

STEPS, BATCH = 12, 16


def _data(n=STEPS * BATCH, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g)
    y = torch.tanh(X @ torch.randn(6, 2, generator=g))
    return X, y


def _kron(params):
    return Kron(params, lr=3e-3, weight_decay=1e-2, preconditioner_update_probability=0.5)


def _hand_loop(steps=STEPS, micro=1):
    """The reference: ``zero_grad``, ``backward`` (over ``micro`` micro-batches), ``step``."""
    X, y = _data()
    model = mlp((6, 16, 2), seed=0)
    opt = _kron(model.parameters())
    for t in range(steps):
        xb, yb = X[t * BATCH : (t + 1) * BATCH], y[t * BATCH : (t + 1) * BATCH]
        opt.zero_grad()
        for xm, ym in zip(xb.chunk(micro), yb.chunk(micro)):
            (torch.nn.functional.mse_loss(model(xm), ym) / micro).backward()
        opt.step()
    return model, opt


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_gradient_accumulation_over_micro_batches_equals_the_full_batch():
    """4 micro-batches of 4 with the loss divided by 4 give the full batch's gradient up to the
    order of the sums: measured 1e-7 relative on the parameters after 12 steps."""
    full, _ = _hand_loop(micro=1)
    acc, _ = _hand_loop(micro=4)
    torch.testing.assert_close(_flat(acc), _flat(full), rtol=1e-5, atol=1e-6)


def test_autocast_with_a_grad_scaler_matches_autocast_alone():
    """``GradScaler`` multiplies the loss by a power of two and divides the gradients by it
    before ``step`` (exact in float32), and skips a step with inf gradients: with finite ones
    the run equals the unscaled one (measured: bit-identical)."""

    def run(scaled):
        X, y = _data()
        model = mlp((6, 16, 2), seed=0)
        opt = _kron(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled)
        for t in range(STEPS):
            xb, yb = X[t * BATCH : (t + 1) * BATCH], y[t * BATCH : (t + 1) * BATCH]
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(model(xb).float(), yb)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return _flat(model)

    torch.testing.assert_close(run(True), run(False), rtol=1e-6, atol=1e-7)


class _LitModel:
    """Built lazily so that the module imports without Lightning installed."""

    @staticmethod
    def make():
        import lightning as L

        class Lit(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = mlp((6, 16, 2), seed=0)

            def training_step(self, batch, _):
                xb, yb = batch
                return torch.nn.functional.mse_loss(self.net(xb), yb)

            def configure_optimizers(self):
                return _kron(self.net.parameters())

        return Lit()


def _loader(batches=STEPS):
    X, y = _data(batches * BATCH)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y), batch_size=BATCH, shuffle=False
    )


def _trainer(tmp_path, steps, **kw):
    import lightning as L

    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, **kw)  # fmt: skip


def test_lightning_trainer_matches_the_hand_written_loop(tmp_path):
    """Lightning's automatic optimisation calls ``optimizer.step(closure)`` with ``zero_grad``
    and ``backward`` inside the closure; Kron runs it first, so no step is lost (the first one
    was, before). Measured: bit-identical to the hand-written loop."""
    pytest.importorskip("lightning")
    lit = _LitModel.make()
    _trainer(tmp_path, STEPS, enable_checkpointing=False).fit(lit, _loader())
    hand, _ = _hand_loop()
    torch.testing.assert_close(_flat(lit.net), _flat(hand), rtol=1e-6, atol=1e-7)


def test_lightning_checkpoint_resumes_exactly(tmp_path):
    """Two epochs of 6 batches: fit the first and save a Lightning checkpoint (Kron's
    ``state_dict`` inside); a new Trainer resuming from it for the second ends bit-identical to
    12 straight steps. (Epoch boundaries: Lightning does not fast-forward a plain DataLoader
    resumed mid-epoch.)"""
    pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint

    straight = _LitModel.make()
    _trainer(tmp_path / "a", STEPS, enable_checkpointing=False).fit(straight, _loader(6))
    first = _LitModel.make()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=6, save_top_k=-1)
    _trainer(tmp_path / "b", 6, callbacks=[ckpt]).fit(first, _loader(6))
    path = next((tmp_path / "ck").glob("*.ckpt"))
    resumed = _LitModel.make()
    _trainer(tmp_path / "c", STEPS, enable_checkpointing=False).fit(
        resumed, _loader(6), ckpt_path=path
    )
    assert torch.equal(_flat(resumed.net), _flat(straight.net))


def test_hugging_face_trainer_matches_the_hand_written_loop(tmp_path):
    """``transformers.Trainer(optimizers=(Kron(...), None))`` with a constant schedule, no
    gradient clipping and the batches in order: it steps like the hand-written loop (measured
    bit-identical)."""
    transformers = pytest.importorskip("transformers")
    X, y = _data()

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return len(X)

        def __getitem__(self, i):
            return {"x": X[i], "labels": y[i]}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp((6, 16, 2), seed=0)

        def forward(self, x, labels):
            return {"loss": torch.nn.functional.mse_loss(self.net(x), labels)}

    class InOrder(transformers.Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    model = Net()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH,
        lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = InOrder(model=model, args=args, train_dataset=Pairs(),
                      optimizers=(_kron(model.parameters()), None))  # fmt: skip
    trainer.train()
    hand, _ = _hand_loop()
    torch.testing.assert_close(_flat(model.net), _flat(hand), rtol=1e-6, atol=1e-7)
