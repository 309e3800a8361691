"""The rivals' workloads: offline data checked by hash, paired seeds, and models that learn."""

import math

import pytest
import torch

from psgd_lab import experiment as ex
from psgd_lab import workloads


def test_corpus_is_the_hashed_torch_optim_source():
    data = workloads.corpus()
    assert len(data) == 436630 and max(data) < 128  # ASCII Python source
    assert b"class Adam(Optimizer)" in data
    train, val = workloads._tokens()
    assert len(train) + len(val) == len(data) and len(val) == math.ceil(0.1 * len(data))


def test_other_corpus_bytes_are_refused_with_their_hash(monkeypatch):
    workloads.corpus.cache_clear()
    monkeypatch.setattr(workloads, "CORPUS_FILES", workloads.CORPUS_FILES[:-1])
    try:
        with pytest.raises(ValueError, match="has SHA-256 [0-9a-f]{64}, not aba0bf91"):
            workloads.corpus()
        monkeypatch.setattr(workloads, "CORPUS_FILES", ("no_such_file.py",))
        with pytest.raises(ValueError, match="lacks corpus files"):
            workloads.corpus()
    finally:
        workloads.corpus.cache_clear()


def test_char_gpt_learns_and_pairs_seeds():
    trial = workloads.char_gpt_task(0, d=32, layers=1, heads=2, context=32, batch=8)
    n = workloads.parameter_count(trial.model)
    # tok + head, pos, 12 d² per block, its biases (9d) and norms (4d), the final norm, head bias
    assert n == 2 * 128 * 32 + 32 * 32 + 12 * 32 * 32 + 9 * 32 + 4 * 32 + 2 * 32 + 128
    start = trial.metric(trial.model)
    assert abs(start - math.log(128)) < 0.5  # uniform-ish at initialisation
    opt = torch.optim.AdamW(trial.model.parameters(), lr=3e-3)
    for step in range(60):
        opt.zero_grad()
        trial.loss(trial.model, trial.batch(step)).backward()
        opt.step()
    assert trial.metric(trial.model) < start - 1.0  # it learns byte statistics quickly
    other = workloads.char_gpt_task(0, d=32, layers=1, heads=2, context=32, batch=8)
    assert torch.equal(other.batch(7), trial.batch(7))  # same seed, same batches
    third = workloads.char_gpt_task(1, d=32, layers=1, heads=2, context=32, batch=8)
    assert not torch.equal(third.batch(7), trial.batch(7))
    assert not torch.equal(third.model.head.weight, other.model.head.weight)


def test_default_char_gpt_has_a_few_hundred_thousand_parameters():
    model = workloads.CharGPT(d=96, layers=3, heads=4, context=64)
    assert 300_000 < workloads.parameter_count(model) < 400_000
    with pytest.raises(ValueError, match="multiple of heads"):
        workloads.CharGPT(d=30, heads=4)


def test_mnist1d_is_generated_offline_and_checked():
    pytest.importorskip("mnist1d")
    x, y, xt, yt = workloads.mnist1d()
    assert x.shape == (4000, 40) and xt.shape == (1000, 40) and x.dtype == torch.float32
    assert sorted(y.unique().tolist()) == list(range(10)) and len(yt) == 1000


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_mnist1d_tasks_train_through_the_harness(kind, tmp_path):
    pytest.importorskip("mnist1d")
    task = ex.Task(f"mnist1d-{kind}", workloads.mnist1d_task, {"kind": kind, "width": 32,
                                                                "metric": "error"})  # fmt: skip
    result = ex.study(task, [ex.Config("adamw", "AdamW")], seeds=[0], steps=150, lrs=[1e-2],
                      max_extensions=0, cache_dir=False, progress=False)  # fmt: skip
    frame = result.to_frame()
    first, last = frame.metric.iloc[0], frame.metric.iloc[-1]
    assert first > 0.8 and last < first - 0.2  # chance is 0.9 error; it learns
    with pytest.raises(ValueError, match="metric must be"):
        workloads.mnist1d_task(0, metric="accuracy")


def test_muon_gets_the_hidden_weights_and_adamw_the_rest():
    pytest.importorskip("pytorch_optimizer")
    from psgd_lab import rivals

    gpt = workloads.CharGPT(d=32, layers=2, heads=2, context=16)
    hidden, rest = rivals.hidden_weights(gpt)
    names = {id(p): n for n, p in gpt.named_parameters()}
    assert sorted(names[id(p)] for p in hidden) == sorted(
        f"blocks.{i}.{w}.weight" for i in (0, 1) for w in ("qkv", "proj", "mlp.0", "mlp.2")
    )  # not tok/pos (embeddings), not head, no bias or gain
    assert len(hidden) + len(rest) == len(list(gpt.parameters()))
    cnn = workloads._mnist1d_model("cnn", 8)
    hidden, _ = rivals.hidden_weights(cnn)
    assert [p.ndim for p in hidden] == [3, 3, 3]  # the kernels, not the linear read-out
    opt = ex.Config("muon", "psgd_lab.rivals.MuonWithAdamW").build(gpt, 0.02, seed=0)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    assert opt.param_groups[1]["lr"] == pytest.approx(0.02 * 3e-4 / 2e-2)


def test_rivals_train_a_workload_through_the_harness():
    pytest.importorskip("pytorch_optimizer")
    task = ex.Task("gpt-tiny", workloads.char_gpt_task,
                   {"d": 32, "layers": 1, "heads": 2, "context": 32, "batch": 8})  # fmt: skip
    configs = [ex.Config("muon", "psgd_lab.rivals.MuonWithAdamW", lrs=[0.02]),  # its default
               ex.Config("soap", "pytorch_optimizer.SOAP"),
               ex.Config("kron", "Kron", {"seed": ex.SEED})]  # fmt: skip
    result = ex.study(task, configs, seeds=[0], steps=40, lrs=[3e-3], max_extensions=0,
                      cache_dir=False, progress=False)  # fmt: skip
    for c in configs:
        assert result.final(c.name)[0] < math.log(128) - 0.4, c.name  # all learn (4.85 → ~4.2)
