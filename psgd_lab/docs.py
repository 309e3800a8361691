"""``psgd-lab docs``: build the documentation site offline and check its internal links.

``build`` runs Sphinx on ``docs/`` (``docs/conf.py``: MyST-NB renders the notebooks from their
stored outputs, autodoc the API, MathJax from the ``sphinx-mathjax-offline`` package) into
``docs/_build/html`` with warnings as errors. ``check_site`` then reads every built HTML file and
returns what is broken: a relative ``href``/``src`` whose file does not exist, a ``#fragment``
that names no ``id`` in its target page, and any resource a page would load from another host
(a script, stylesheet, image or frame with an absolute URL), since the site must work offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "docs"
OUT = SOURCE / "_build" / "html"

# attributes that name a link target or a loaded resource, per tag
_LOADS = {"script": "src", "img": "src", "iframe": "src", "source": "src", "video": "src"}
_SKIP_SCHEMES = ("mailto:", "javascript:", "data:", "tel:")


class _Page(HTMLParser):
    """The ids of one HTML page and the (attribute, value, tag, rel) of its links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute value, what it is)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v for k, v in attrs if v is not None}
        for key in ("id", "name") if tag == "a" else ("id",):
            if key in a:
                self.ids.add(a[key])
        if tag == "a" and "href" in a:
            self.links.append((tag, a["href"], "link"))
        elif tag == "link" and "href" in a:
            rel = a.get("rel", "").lower()
            loads = any(r in rel for r in ("stylesheet", "icon", "preload", "modulepreload"))
            self.links.append((tag, a["href"], "resource" if loads else "link"))
        elif tag in _LOADS and _LOADS[tag] in a:
            self.links.append((tag, a[_LOADS[tag]], "resource"))


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8", errors="replace"))
    return page


def check_site(html_dir: Path = OUT) -> tuple[int, list[str]]:
    """Check every ``*.html`` under ``html_dir``; return (links checked, problems)."""
    html_dir = Path(html_dir).resolve()
    pages = {p.resolve(): _parse(p) for p in sorted(html_dir.rglob("*.html"))}
    problems: list[str] = []
    checked = 0
    for path, page in pages.items():
        where = path.relative_to(html_dir)
        for tag, value, kind in page.links:
            value = value.strip()
            if not value or value.startswith(_SKIP_SCHEMES):
                continue
            parts = urlsplit(value)
            if parts.scheme or value.startswith("//"):
                if kind == "resource":
                    problems.append(f"{where}: <{tag}> loads {value} from another host")
                continue  # a link to another site is the reader's choice, not a load
            checked += 1
            target = path if not parts.path else (path.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                problems.append(f"{where}: <{tag}> {value}: no such file")
                continue
            if html_dir not in target.parents:
                problems.append(f"{where}: <{tag}> {value}: points outside the site")
                continue
            if parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    problems.append(f"{where}: <{tag}> {value}: no id {parts.fragment!r} there")
    return checked, problems


def build(out: Path = OUT, fresh: bool = True, quiet: bool = True) -> int:
    """Run Sphinx (warnings are errors, ``--keep-going`` lists them all); its exit status.

    ``fresh`` empties a previous build in ``out`` and re-reads every source (``-E``), so no stale
    page stays and a warning in an unchanged page is not hidden by Sphinx's saved environment."""
    if fresh and (Path(out) / ".buildinfo").exists():  # a previous Sphinx build: no stale pages
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-j", "1"]
    cmd += (["-E"] if fresh else []) + (["-q"] if quiet else [])
    cmd += [str(SOURCE), str(out)]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    return subprocess.run(cmd, env=env, cwd=ROOT).returncode


def main(out: Path = OUT, fresh: bool = True, check: bool = True) -> int:
    """Build, then check the links; print what was done; 0 when both pass."""
    start = time.perf_counter()
    status = build(out, fresh)
    seconds = time.perf_counter() - start
    if status:
        print(f"docs: sphinx failed (exit {status}) after {seconds:.0f} s", file=sys.stderr)
        return status
    pages = sum(1 for _ in Path(out).rglob("*.html"))
    print(f"docs: built {pages} HTML pages into {out} in {seconds:.0f} s")
    if not check:
        return 0
    checked, problems = check_site(out)
    for problem in problems:
        print(f"docs: broken: {problem}", file=sys.stderr)
    print(f"docs: {checked} internal links checked, {len(problems)} problems")
    return 1 if problems else 0
