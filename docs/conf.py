"""Sphinx configuration of the psgd_lab documentation site (`psgd-lab docs` builds it).

Offline by construction: MathJax comes from the PyPI package ``sphinx-mathjax-offline`` (copied
into ``_static/mathjax``), notebooks are rendered from their stored outputs (never executed), and
no page loads anything from another host (``psgd_lab.docs.check_site`` fails the build if one
does).
"""

from __future__ import annotations

import filecmp
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import psgd_lab  # noqa: E402

project = "psgd_lab"
author = "the psgd_lab authors"
copyright = "psgd_lab authors, MIT licence"
release = version = psgd_lab.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # the docstrings' "Args:" sections (Google style)
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",
]

# --- the notebooks: every notebooks/*.ipynb, mirrored into docs/notebooks/ (gitignored) -------
# Sphinx reads sources only below its source directory; a copy (refreshed only when a notebook
# changed, so incremental builds stay incremental) keeps the docs' URLs short and picks up new
# notebooks by glob.
_MIRROR = DOCS / "notebooks"


def _mirror_notebooks() -> None:
    _MIRROR.mkdir(exist_ok=True)
    sources = {p.name: p for p in sorted((ROOT / "notebooks").glob("*.ipynb"))}
    for stale in _MIRROR.glob("*.ipynb"):
        if stale.name not in sources:
            stale.unlink()
    for name, src in sources.items():
        dst = _MIRROR / name
        if not dst.exists() or not filecmp.cmp(src, dst, shallow=False):
            shutil.copy2(src, dst)


_mirror_notebooks()

nb_execution_mode = "off"  # rendered from the outputs stored in each notebook, never re-run
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "substitution"]
# The template notebook (another notebook may be its model until it exists), found by glob.
_templates = sorted(p.stem for p in _MIRROR.glob("99_*.ipynb"))
myst_substitutions = {
    "template_link": (
        f"the template [{_templates[0]}](notebooks/{_templates[0]}.ipynb) is written to be copied;"
        if _templates
        else "(a template notebook, `notebooks/99_template.ipynb`, is planned);"
    )
}
myst_heading_anchors = 3
# Notebook headings are written for Jupyter (a notebook may start at "##"), not for a site's
# table of contents; and notebooks are documents of their own, not in a toctree by name.
suppress_warnings = ["myst.header"]

exclude_patterns = ["_build", "notebooks/.ipynb_checkpoints", "**/.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

# --- API reference -------------------------------------------------------------------------------
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autosummary_generate = True
templates_path = ["_templates"]
autosummary_imported_members = False
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_mock_imports: list[str] = []
add_module_names = False

# --- HTML ----------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"psgd_lab {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
html_copy_source = False
html_last_updated_fmt = None
