"""Sphinx configuration of the API reference (autodoc + napoleon, Google-style docstrings).

Build: ``python -m sphinx -W -b html docs/api docs/api/_build`` (the test suite builds it with -W too).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import accumopt  # noqa: E402

project = "accumopt"
author = "the accumopt authors"
copyright = "2026, the accumopt authors"
release = accumopt.__version__
version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}
exclude_patterns = ["_build"]
html_theme = "alabaster"  # ships with Sphinx: nothing to install, no network
