"""The documentation site as a reader sees it: headless Chromium opens four pages of the built site.

Builds the site with ``psgd-lab docs`` unless ``docs/_build/html`` exists (the README's test
command builds it first), serves it on 127.0.0.1 and opens the home page, a notebook, the maths
page and the API reference in Debian's Chromium (``/usr/bin/chromium``, driven by Playwright; the
machine has no network, and any request that would leave it is blocked and fails the test). Each
page must load with no console error, every image must have loaded (``naturalWidth > 0``), and
the maths page must hold MathJax's typeset output with no TeX error. Screenshots go to
``docs/_build/screenshots/``.
"""

from __future__ import annotations

import fcntl
import functools
import http.server
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "docs" / "_build" / "html"
SHOTS = ROOT / "docs" / "_build" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="no /usr/bin/chromium: `apt-get install -y chromium` (.ci/run installs it)",
    ),
]


def _notebook_page() -> str:
    pages = sorted((HTML / "notebooks").glob("*.html"))
    preferred = [p for p in pages if p.name.startswith("01_")]
    assert pages, "the site has no rendered notebook"
    return f"notebooks/{(preferred or pages)[0].name}"


@pytest.fixture(scope="module")
def site():
    sphinx = pytest.importorskip("sphinx", reason="the docs extra: pip install -e '.[docs]'")
    del sphinx
    HTML.parent.mkdir(parents=True, exist_ok=True)
    with open(HTML.parent / ".build.lock", "w") as lock:  # one build when xdist runs two workers
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (HTML / "index.html").exists():
            done = subprocess.run([sys.executable, "-m", "psgd_lab.cli", "docs"], cwd=ROOT)
            assert done.returncode == 0, "psgd-lab docs failed"
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_address[1]}/"
        server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest's output to the test's own
        pass


@pytest.fixture(scope="module")
def browser():
    """A persistent Chromium context in a fresh profile (``--user-data-dir``, which Playwright
    sets itself for a persistent context)."""
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="the docs extra: pip install -e '.[docs]'"
    )
    profile = tempfile.mkdtemp(prefix="psgd-lab-chromium-")
    with playwright.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


def _open(context, url: str, shot: str):
    """Open ``url``; return (page, console errors, requests that tried to leave the machine)."""
    errors: list[str] = []
    outside: list[str] = []
    base = url.split("/", 3)[:3]
    page = context.new_page()

    def route(r):
        if r.request.url.split("/", 3)[:3] == base or r.request.url.startswith("data:"):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    response = page.goto(url, wait_until="load")
    assert response is not None and response.ok, f"{url}: HTTP {response and response.status}"
    # images below the fold may be lazy: load them all, then wait until each has finished
    page.evaluate("document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function(
        "Array.from(document.images).every(i => i.complete)", timeout=20_000, polling=200
    )
    page.wait_for_load_state("networkidle")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / shot), full_page=False)
    return page, errors, outside


def _broken_images(page) -> list[str]:
    return page.evaluate(
        "Array.from(document.images).filter(i => !(i.naturalWidth > 0)).map(i => i.src)"
    )


@pytest.mark.parametrize(
    "name, path, min_images",
    [
        ("home", "index.html", 1),
        ("notebook", None, 1),
        ("api-index", "api.html", 0),
        ("api", "_api/psgd_lab.html", 0),
    ],
)
def test_page_renders(site, browser, name, path, min_images):
    page, errors, outside = _open(browser, site + (path or _notebook_page()), f"{name}.png")
    assert errors == [], f"console errors on {name}: {errors}"
    assert outside == [], f"{name} tried to load from another host: {outside}"
    images = page.evaluate("document.images.length")
    assert images >= min_images
    assert _broken_images(page) == []
    assert page.locator("h1").count() >= 1
    if name == "notebook":  # a second screenshot at the notebook's first figure
        page.locator("img").first.scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "notebook-figure.png"), full_page=False)
    if name == "api":  # the reference lists the optimisers from their docstrings
        text = page.inner_text("article")
        assert all(n in text for n in ("Kron", "LRA", "Dense", "KronPreconditioner"))
    page.close()


def test_maths_page_typesets_its_equations(site, browser):
    page, errors, outside = _open(browser, site + "maths.html", "maths.png")
    page.wait_for_selector("mjx-container", timeout=20_000)
    # MathJax typesets asynchronously: wait until every $$ block has its output
    page.wait_for_function(
        "document.querySelectorAll('div.math').length > 0 && "
        "document.querySelectorAll('div.math mjx-container').length "
        "== document.querySelectorAll('div.math').length",
        timeout=20_000,
        polling=200,
    )
    typeset = page.evaluate("document.querySelectorAll('mjx-container').length")
    tex_errors = page.evaluate("document.querySelectorAll('mjx-merror').length")
    assert typeset >= 8, f"only {typeset} typeset equations"
    assert tex_errors == 0, "MathJax reported a TeX error"
    # the fonts are MathJax's own, served from the site: a glyph has a non-zero width
    width = page.evaluate("document.querySelector('mjx-container').getBoundingClientRect().width")
    assert width > 10
    page.locator("div.math mjx-container").first.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "maths-equation.png"), full_page=False)
    assert errors == [], f"console errors on the maths page: {errors}"
    assert outside == [], f"the maths page tried to load from another host: {outside}"
    page.close()
