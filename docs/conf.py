"""Sphinx configuration of labkit's documentation site (``make docs``; ``make test`` builds it with ``-W``).

Offline by construction: no intersphinx (it would fetch inventories), notebooks rendered by myst-nb from their
stored outputs (``nb_execution_mode = "off"``). The teaching notebooks live in ``notebooks/``; they are copied into
``docs/notebooks/`` (git-ignored) at each build, because Sphinx reads only files under its source folder.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import labkit  # noqa: E402

project = "labkit"
author = "the labkit developers"
copyright = "2026, the labkit developers"
release = version = labkit.__version__

extensions = ["sphinx.ext.autodoc", "myst_nb"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "jupyter_execute"]
html_theme = "furo"
html_title = f"labkit {release}"
html_static_path = ["_static"]
templates_path: list[str] = []

# -- notebooks: rendered from their stored outputs, never executed here ------------------------------------
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
suppress_warnings = ["mystnb.unknown_mime_type"]  # ipywidgets views: their state is stripped from the notebooks


def _copy_notebooks() -> None:
    """``notebooks/*.ipynb`` -> ``docs/notebooks/`` (only files that changed, so incremental builds stay fast)."""
    target = DOCS / "notebooks"
    target.mkdir(exist_ok=True)
    sources = sorted((ROOT / "notebooks").glob("*.ipynb"))
    for stale in set(target.glob("*.ipynb")) - {target / p.name for p in sources}:
        stale.unlink()
    for src in sources:
        dst = target / src.name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)


# -- API reference ------------------------------------------------------------------------------------------
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True, "ignore-module-all": True}

# Types from other libraries are not cross-referenced (intersphinx would need the network); labkit's own names are,
# and a broken one fails the build (``-n -W`` in make docs / make test). Private bases shown by show-inheritance
# (``labkit.x._Base``) have no page of their own.
nitpicky = True
_EXTERNAL = ("torch", "transformers", "numpy", "np", "pandas", "pd", "plotly", "go", "PIL", "matplotlib", "ipywidgets",
             "anywidget", "IPython", "traitlets", "collections", "typing", "pathlib", "os", "enum", "abc", "threading",
             "subprocess", "datetime", "dataclasses", "ray", "safetensors", "captum", "tqdm", "click", "pwd",
             "jupyterhub", "t")
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(_EXTERNAL)})(\..*)?"),
    (r"py:.*", r"labkit(\.\w+)*\._\w+"),
    (r"py:class", r"Figure"),  # matplotlib's, as labkit.records.figures imports it
]


# -- the API pages: one per module, written at each build from the package tree -------------------------------

def _modules() -> list[str]:
    """Every public module of labkit (``labkit.x`` and ``labkit.x.y``; names starting with ``_`` left out)."""
    import pkgutil

    names = ["labkit"]
    for info in pkgutil.walk_packages(labkit.__path__, "labkit."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def _defined_in(name: str) -> str | None:
    """The labkit module whose source assigns the module-level constant ``name`` (``NAME = ...``)."""
    import re

    pattern = re.compile(rf"^{re.escape(name)}\s*(:[^=]+)?=", re.M)
    for module in _modules():
        path = ROOT / (module.replace(".", "/") + ".py")
        path = path if path.exists() else path.with_suffix("") / "__init__.py"
        if pattern.search(path.read_text()):
            return module
    return None


def _api_page(module: str) -> str:
    """The reST of one module's page: its docstring and members, then the names it re-exports (``__all__``)."""
    import importlib

    mod = importlib.import_module(module)
    lines = [module, "=" * len(module), "", f".. automodule:: {module}", ""]
    exported = [n for n in getattr(mod, "__all__", []) if not n.startswith("_")]
    elsewhere = []
    for name in exported:
        obj = getattr(mod, name)
        home = getattr(obj, "__module__", module) if not isinstance(obj, type(mod)) else obj.__name__
        if isinstance(obj, type(mod)):
            elsewhere.append(f"- :py:mod:`{name} <{home}>`")
        elif home != module and hasattr(obj, "__qualname__"):
            elsewhere.append(f"- :py:obj:`{name} <{home}.{obj.__qualname__}>`")
        elif (origin := _defined_in(name)) not in (None, module):
            elsewhere.append(f"- :py:data:`{name} <{origin}.{name}>`")
    if module == "labkit":
        lines += [".. data:: __version__", "", "   labkit's version (also in every Trace's ``meta``).", ""]
    if elsewhere:
        lines += ["Also exported here (documented where they are defined):", "", *elsewhere, ""]
    return "\n".join(lines)


def _write_api_pages() -> None:
    """Write the pages that changed (an unchanged page keeps its time stamp, so rebuilds stay incremental)."""
    api = DOCS / "api"
    pages = {api / f"{module}.rst": _api_page(module) for module in _modules()}
    for stale in set(api.glob("labkit*.rst")) - set(pages):
        stale.unlink()
    for path, text in pages.items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


autodoc_type_aliases = {"Token": "labkit.interventions.token.Token"}


# -- a public name without a docstring is a build warning (an error under -W) ---------------------------------

def _require_docstring(app, what, name, obj, options, lines) -> None:
    """Warn for a documented public module, class, function, method or property whose docstring is empty."""
    from sphinx.util import logging

    target = getattr(obj, "fget", obj)  # a property: its getter
    own = getattr(target, "__module__", None) or getattr(target, "__name__", "")
    public = own.startswith("labkit") and not name.split(".")[-1].startswith("_")
    if public and what in ("module", "class", "function", "method", "property", "exception") and not any(
            s.strip() for s in lines):
        logging.getLogger("labkit.docs").warning("%s %s has no docstring", what, name, type="labkit",
                                                 subtype="docstring")


def _write_sources(app) -> None:
    """Before Sphinx looks for its sources: the notebook copies and the API pages (importing conf.py writes nothing)."""
    _copy_notebooks()
    _write_api_pages()


def setup(app) -> None:
    app.connect("builder-inited", _write_sources)
    app.connect("autodoc-process-docstring", _require_docstring)
