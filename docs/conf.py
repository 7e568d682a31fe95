"""Sphinx configuration of pertscale's documentation site.

Set up as the scverse cookiecutter template sets up its sites: myst-nb
(Markdown pages and executed notebooks), autosummary for the API reference
and the book theme; numpydoc reads the docstrings. Nothing here reaches the
network: intersphinx is off, and the theme's assets are its own.

Build, with warnings as errors, from the repository root::

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))  # the checkout's code, also when pertscale is not installed

# -- Project -----------------------------------------------------------------

project = "pertscale"
author = "pertscale developers"
copyright = f"{date.today().year}, {author}"  # noqa: A001 - Sphinx's name
try:
    release = version("pertscale")
except PackageNotFoundError:  # pragma: no cover - a checkout that is not installed
    release = "0+unknown"
version = release  # noqa: F811 - Sphinx reads the module-level `version`

# -- Extensions --------------------------------------------------------------

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "sphinx.ext.mathjax",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]
default_role = "literal"
# fenced blocks without a language (plans, tables of numbers) are shown as text, not guessed at
highlight_language = "text"
nitpicky = False

# -- API reference (autosummary + numpydoc) ------------------------------------

autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the numpydoc sections say the types, with shapes and units
numpydoc_show_class_members = False  # autosummary's class template lists them
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False  # no intersphinx, so nothing to link types to
# numpydoc's validation is off: ruff's D rules (pyproject.toml) are the docstring style the project enforces
numpydoc_validation_checks: set[str] = set()

# -- MyST and notebooks --------------------------------------------------------

myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "amsmath", "html_image"]
myst_heading_anchors = 3
# The tutorials run at build time; a cell that raises fails the build.
# "cache" reruns a notebook only when its code changed (jupyter-cache in the build directory);
# CI builds in a fresh clone, so every notebook runs there. `-D nb_execution_mode=force` reruns all.
nb_execution_mode = "cache"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
nb_output_stderr = "show"
# The pages that read the real screens run where the data are (../shared/data beside the repository, or
# $PERTSCALE_DATA, as the tests find them); elsewhere (Read the Docs, a clone without the data) they are
# shown with their code and without outputs. The pages on simulated data run everywhere.
DATA_DIR = Path(os.environ.get("PERTSCALE_DATA", ROOT.parent / "shared" / "data"))
NEEDS_DATA = ["tutorials/papalexi.md", "how-to/scanpy.md"]
nb_execution_excludepatterns: list[str] = []
if not (DATA_DIR / "papalexi2021_eccite.h5ad").exists():
    nb_execution_excludepatterns = NEEDS_DATA
    print(f"pertscale docs: {DATA_DIR} has no papalexi2021_eccite.h5ad; not executing {', '.join(NEEDS_DATA)}")

# -- Intersphinx: off (the build must work without network) --------------------

intersphinx_mapping: dict = {}

# -- HTML --------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "pertscale"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "use_download_button": True,
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_show_sourcelink = True
html_last_updated_fmt = None
