"""``psgd-lab reproduce`` runs notebooks, reports figures, and names the failing cell."""

from __future__ import annotations

import nbformat
import pytest

from psgd_lab import cli
from psgd_lab.notebook import stored_timings


def _notebook(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)
    return path


def test_reproduce_reports_figures_and_names_the_failing_cell(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PSGD_LAB_FIGURES", str(tmp_path / "figs"))
    good = _notebook(
        tmp_path / "good.ipynb",
        "import os, pathlib",
        "d = pathlib.Path(os.environ['PSGD_LAB_FIGURES']); d.mkdir(exist_ok=True)\n"
        "(d / 'fig.png').write_bytes(b'x')",
    )
    bad = _notebook(tmp_path / "bad.ipynb", "x = 1", "raise RuntimeError('boom')")
    assert cli.main(["reproduce", str(good), str(bad)]) == 1
    out, err = capsys.readouterr()
    assert "| good.ipynb |" in out and "fig.png" in out
    assert "FAILED bad.ipynb: cell 1 failed" in err and "boom" in err
    # outputs are stored, so nbval can compare them
    assert nbformat.read(good, as_version=4).cells[1].execution_count == 2
    assert "for 2 notebooks (read committed results)" in out


def test_reproduce_full_makes_the_kernels_recompute(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PSGD_LAB_FIGURES", str(tmp_path / "figs"))
    monkeypatch.setenv("PSGD_LAB_RECOMPUTE", "0")  # recorded, so the --full run is undone after
    probe = _notebook(
        tmp_path / "probe.ipynb",
        "from psgd_lab.cache import recompute",
        "assert recompute(), 'the kernel did not see PSGD_LAB_RECOMPUTE=1'",
    )
    assert cli.main(["reproduce", str(probe)]) == 1  # without --full the cache is read
    assert cli.main(["reproduce", "--full", str(probe)]) == 0
    assert "(recomputed every study run)" in capsys.readouterr().out


def test_reproduce_retime_makes_the_kernels_measure_again(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PSGD_LAB_FIGURES", str(tmp_path / "figs"))
    monkeypatch.setenv("PSGD_LAB_RETIME", "0")
    stored = tmp_path / "timings.json"
    probe = _notebook(
        tmp_path / "probe.ipynb",
        "from psgd_lab.notebook import stored_timings",
        f"t = stored_timings({str(stored)!r}, {{'ms': 2.0}})\nassert t['ms'] == 2.0, t",
    )
    stored.write_text('{"ms": 1.0}')
    assert cli.main(["reproduce", str(probe)]) == 1  # the stored 1.0 is read
    assert cli.main(["reproduce", "--retime", str(probe)]) == 0
    assert cli.main(["reproduce", str(probe)]) == 0  # and was rewritten
    capsys.readouterr()


def test_stored_timings_are_read_not_remeasured(tmp_path, monkeypatch):
    monkeypatch.delenv("PSGD_LAB_RETIME", raising=False)
    path = tmp_path / "results" / "timings.json"
    first = stored_timings(path, {"ms": 1.25, "table": {"a": 3.0}})
    assert first["ms"] == 1.25 and first["table"] == {"a": 3.0}
    assert set(first["_meta"]) == {"torch", "threads", "cpu_capability", "machine"}
    assert stored_timings(path, {"ms": 9.0, "table": {"a": 1.0}}) == first  # read back
    monkeypatch.setenv("PSGD_LAB_RETIME", "1")
    assert stored_timings(path, {"ms": 9.0})["ms"] == 9.0
    monkeypatch.delenv("PSGD_LAB_RETIME")
    assert stored_timings(path, {"ms": 5.0})["ms"] == 9.0


def test_info(capsys):
    assert cli.main(["info"]) == 0
    assert "geometries: EQ, QEQ" in capsys.readouterr().out


def test_unknown_command():
    with pytest.raises(SystemExit):
        cli.main(["benchmark-everything"])
