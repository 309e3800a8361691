"""Every "§" citation in the code, the tests and the notebooks names a section that exists.

The grammar, from how the project writes them:

- ``§N`` or ``§N.M`` (``§5``, ``§5.4``) cites the section whose heading starts with that number
  (``## 5. The ...``, ``### 5.4 Preconditioning ...``) in ``docs/maths.md``, the maths of record;
- a range ``§6–8`` cites each of 6, 7 and 8;
- a citation right after another Markdown file's path (``notebooks/README.md §6``) cites that
  file's sections instead, and a bare one inside a Markdown file other than ``docs/maths.md``
  cites that file's own sections when the file numbers its headings (``notebooks/README.md``
  says "as §2 says").

Scanned: every ``*.py`` and ``*.md`` under ``psgd_lab/``, ``tests/`` and ``notebooks/`` (this
file's deliberate wrong examples aside), and every notebook cell's source.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MATHS = ROOT / "docs" / "maths.md"
SCANNED = ("psgd_lab", "tests", "notebooks")

# an optional Markdown path right before the mark, then the number and an optional range end
CITATION = re.compile(r"(?:([\w./-]+\.md)\s+)?§\s?(\d+(?:\.\d+)*)(?:\s?–\s?(\d+)\b)?")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", re.M)


def sections(markdown: str) -> set[str]:
    """The section numbers a Markdown text's headings start with (``"5"``, ``"5.4"``)."""
    return set(HEADING.findall(markdown))


def citations(text: str) -> list[tuple[str | None, str]]:
    """(cited Markdown path or None, section number) for every citation in ``text``."""
    found = []
    for m in CITATION.finditer(text):
        path, first, last = m.group(1), m.group(2).rstrip("."), m.group(3)
        found.append((path, first))
        if last:  # §6–8: every section of the range
            found += [(path, str(n)) for n in range(int(first.split(".")[0]) + 1, int(last) + 1)]
    return found


def _texts() -> list[tuple[Path, str]]:
    texts = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*")):
            if ".ipynb_checkpoints" in path.parts or "results" in path.relative_to(ROOT).parts:
                continue
            if path == Path(__file__).resolve():  # this file's examples of wrong citations
                continue
            if path.suffix in (".py", ".md"):
                texts.append((path, path.read_text(encoding="utf-8")))
            elif path.suffix == ".ipynb":
                cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
                texts.append((path, "\n".join("".join(c["source"]) for c in cells)))
    return texts


def unresolved(path: Path, text: str) -> list[str]:
    """The citations in ``text`` (read from ``path``) that name no existing section."""
    maths = sections(MATHS.read_text(encoding="utf-8"))
    own = sections(text) if path.suffix == ".md" and path != MATHS else set()
    bad = []
    for cited, number in citations(text):
        if cited:
            target = (ROOT / cited) if (ROOT / cited).exists() else path.parent / cited
            if not target.exists():
                bad.append(f"{path.relative_to(ROOT)}: {cited} §{number}: no file {cited}")
                continue
            known = maths if target.resolve() == MATHS else sections(target.read_text())
        else:
            known = own or maths
        if number not in known:
            where = cited or ("its own headings" if own else "docs/maths.md")
            bad.append(f"{path.relative_to(ROOT)}: §{number} is not a section of {where}")
    return bad


def test_every_citation_names_an_existing_section():
    texts = _texts()
    assert sum(len(citations(t)) for _, t in texts) > 50, "the scan found the citations"
    problems = [p for path, text in texts for p in unresolved(path, text)]
    assert problems == []


def test_the_grammar_reads_what_the_project_writes():
    text = "(docs/maths.md §5.4), §6–8, docs/maths.md §4. and notebooks/README.md §6"
    assert citations(text) == [
        ("docs/maths.md", "5.4"),
        (None, "6"),
        (None, "7"),
        (None, "8"),
        ("docs/maths.md", "4"),
        ("notebooks/README.md", "6"),
    ]
    assert citations(r"re.sub(r'§\s*[\d.]+', ...)") == []  # a regex is not a citation


def test_a_wrong_citation_is_reported(tmp_path):
    fake = ROOT / "psgd_lab" / "fake.py"  # never written: only its name is used
    assert unresolved(fake, "see docs/maths.md §5.9 and §42") == [
        "psgd_lab/fake.py: §5.9 is not a section of docs/maths.md",
        "psgd_lab/fake.py: §42 is not a section of docs/maths.md",
    ]
    assert unresolved(fake, "notebooks/README.md §9") == [
        "psgd_lab/fake.py: §9 is not a section of notebooks/README.md"
    ]
    assert unresolved(fake, "docs/nothing.md §1")[0].endswith("no file docs/nothing.md")
