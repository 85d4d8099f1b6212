"""Sphinx configuration of the latentcell documentation (sphinx + myst-nb)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))  # import the source tree even without an install

# -- Tutorials ------------------------------------------------------------------------------
# Notebooks live (executed, with outputs) in ../tutorials. Sphinx only reads files inside
# docs/, so copy them into docs/notebooks/ (git-ignored) at every build.
NOTEBOOKS = HERE / "notebooks"
NOTEBOOKS.mkdir(exist_ok=True)
for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
    shutil.copy2(notebook, NOTEBOOKS / notebook.name)

# -- Project information ---------------------------------------------------------------------
import latentcell  # noqa: E402

project = "latentcell"
author = "latentcell developers"
copyright = f"{date.today():%Y}, {author}"
release = latentcell.__version__
version = release

# -- General configuration -------------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
]
if importlib.util.find_spec("sphinx_autodoc_typehints") is not None:
    extensions.append("sphinx_autodoc_typehints")

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
templates_path: list[str] = []

# MyST / myst-nb: notebooks are committed executed, never run at build time.
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"
nb_merge_streams = True

# autodoc / autosummary / napoleon (numpy docstrings)
autosummary_generate = False  # api.md renders members inline; no generated stub files
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": False}
autodoc_typehints = "description"
autodoc_mock_imports: list[str] = []
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
typehints_defaults = "braces"
always_document_param_types = False

# intersphinx: mappings would need the network to fetch inventories; builds must work offline.
# To link to other projects' docs, fill this in, e.g.
#   "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
#   "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
#   "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
intersphinx_disabled_reftypes = ["*"]

nitpicky = False
suppress_warnings = ["mystnb.unknown_mime_type"]

# -- HTML output -----------------------------------------------------------------------------
if importlib.util.find_spec("sphinx_book_theme") is not None:
    html_theme = "sphinx_book_theme"
    html_theme_options = {
        "repository_url": "https://github.com/latentcell/latentcell",
        "use_repository_button": False,
        "navigation_with_keys": False,
    }
else:
    html_theme = "alabaster"
html_title = "latentcell"
html_static_path: list[str] = []
