"""psgd-lab bench: a table with ratios to AdamW and to kron-torch, JSON out, clear errors."""

from __future__ import annotations

import json

import pytest

from psgd_lab import bench, cli


def test_run_and_table_on_a_tiny_set():
    report = bench.run(
        {"tiny": [(16, 8), (8,)]}, probs=(1.0, 0.5), repeats=3, warmup=1, progress=False,
        only=["AdamW", "psgd_lab"],
    )  # fmt: skip
    rows = {(r["optimizer"], r["prob"]): r for r in report["results"]}
    assert set(rows) == {("AdamW", None), ("psgd_lab", 1.0), ("psgd_lab", 0.5)}
    for r in rows.values():
        assert len(r["times_ms"]) == 3 and r["median_ms"] > 0 and r["state_bytes"] > 0
    # psgd_lab's state: momentum 16x8 + 8, Q 16x16 + 8x8 + 8 (float32), as kron-torch's, and a
    # step counter per parameter (int64, on the device: skipped steps need no host sync)
    assert rows[("psgd_lab", 1.0)]["state_bytes"] == 4 * (128 + 8 + 256 + 64 + 8) + 2 * 8
    assert rows[("psgd_lab", 1.0)]["flops"] > rows[("psgd_lab", 0.5)]["flops"] > 0
    text = bench.table(report)
    assert "| tiny | psgd_lab | 1 |" in text and "× AdamW" in text and "GFLOP/s" in text
    json.dumps(report)


def test_cli_writes_json_and_names_bad_shapes(tmp_path, capsys):
    out = tmp_path / "b.json"
    args = "bench --shapes 8x4,4 --repeats 2 --warmup 0 --probs 1.0 --only AdamW psgd_lab --json"
    code = cli.main([*args.split(), str(out)])
    assert code == 0 and json.loads(out.read_text())["results"]
    assert "| custom | psgd_lab |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--shapes must look like"):
        bench.parse_shapes("8xq")
    with pytest.raises(ValueError, match="unknown optimizer"):
        bench.run({"t": [(2,)]}, only=["Adam"], progress=False)
