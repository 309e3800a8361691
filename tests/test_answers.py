"""Every number a notebook's answer states is printed by that notebook (or is a setting in its
code): ``psgd_lab.notebook.unprinted_numbers``, checked on the stored outputs of every notebook."""

import re
from pathlib import Path

import nbformat
import pytest

from psgd_lab.notebook import unprinted_numbers

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_number_in_the_answer_is_printed(path):
    assert unprinted_numbers(path) == []


def _notebook(tmp_path, answer, output, source="x = 1"):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(source)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=output)]
    nb.cells = [cell, nbformat.v4.new_markdown_cell(answer)]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, str(path))
    return path


def test_the_checker_matches_rounded_numbers_and_flags_the_rest(tmp_path):
    answer = "## Answer\nKron 0.031 [0.02, 0.052], 57% of peak, 3.8× faster, 1,024 rows, 7e-14."
    printed = "median 0.03104 [0.0203, 0.0516]; share 0.5721; ratio 3.79; 1024 rows; err 6.8e-14"
    assert unprinted_numbers(_notebook(tmp_path, answer, printed)) == []
    assert unprinted_numbers(_notebook(tmp_path, answer, printed.replace("3.79", "3.74"))) == [
        "3.8"
    ]
    wrong = printed.replace("0.03104", "0.0326").replace("0.5721", "0.5551")
    assert unprinted_numbers(_notebook(tmp_path, answer, wrong)) == ["0.031", "57%"]


def test_settings_in_code_small_counts_and_code_spans_are_not_results(tmp_path):
    answer = "## Answer\n5 seeds at lr 3e-3 (`lr=0.5`), §5.4 of the maths, see 08_geometries."
    assert unprinted_numbers(_notebook(tmp_path, answer, "", source="lr = 3e-3")) == []
    assert unprinted_numbers(_notebook(tmp_path, answer, "", source="lr = 3e-2")) == ["3e-3"]
    assert unprinted_numbers(_notebook(tmp_path, "no answer", "")) == [
        "<no cell starting with '## Answer'>"
    ]


def _summaries() -> dict[str, str]:
    """docs/findings.md's one-paragraph summary per notebook: ``**NN.** ...`` up to a blank line."""
    text = (NOTEBOOKS[0].parent.parent / "docs" / "findings.md").read_text()
    found = re.findall(r"^\*\*(\d\d)\.\*\*(.*?)(?=\n\s*\n|\Z)", text, flags=re.M | re.S)
    return {number: body for number, body in found}


def test_every_notebook_has_a_summary():
    numbers = {p.name[:2] for p in NOTEBOOKS}
    assert numbers <= set(_summaries())


@pytest.mark.parametrize("number", sorted(_summaries()))
def test_every_number_in_a_summary_is_printed_by_its_notebook(number):
    (path,) = [p for p in NOTEBOOKS if p.name.startswith(number)]
    assert unprinted_numbers(path, text=_summaries()[number]) == []


def test_every_number_in_the_readme_rivals_table_is_printed_by_notebook_12():
    """The README's summary of notebook 12 (its Rivals section: the table and the verdicts under
    it) quotes only numbers that notebook prints."""
    root = NOTEBOOKS[0].parent.parent
    readme = (root / "README.md").read_text()
    found = re.search(r"^## Rivals\n(.*?)(?=^## )", readme, flags=re.M | re.S)
    assert found, "README.md has no '## Rivals' section followed by another section"
    (path,) = [p for p in NOTEBOOKS if p.name.startswith("12_")]
    assert unprinted_numbers(path, text=found.group(1)) == []
