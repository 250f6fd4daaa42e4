"""Optional features and the pip extras that bring their packages (``pip install 'labkit[lab]'``).

``pip install -e .`` is the headless engine. A feature that needs an extra calls :func:`require` before importing
its packages, so that using it without them raises one :class:`~labkit.core.errors.MissingExtra` naming the extra,
instead of a ``ModuleNotFoundError`` from deep inside. ``pyproject.toml``'s ``[project.optional-dependencies]`` is
the list of what each extra installs; :data:`EXTRAS` names the modules labkit imports from them (the packaging test
checks the two agree).
"""

from __future__ import annotations

import importlib.util

from labkit.core.errors import MissingExtra

#: extra -> the top-level modules labkit imports from its packages
EXTRAS: dict[str, tuple[str, ...]] = {
    "lab": ("anywidget", "ipywidgets", "IPython", "jupyter_client", "jupyterlab", "nbconvert"),
    "quant": ("bitsandbytes",),
    "gpu": ("xformers",),
    "ray": ("ray",),
    "workshop": ("jupyterhub", "configurable_http_proxy"),
    "docs": ("sphinx", "furo", "myst_nb"),
}


def missing(*modules: str) -> list[str]:
    """The modules of ``modules`` that cannot be imported here (not installed, or blocked in ``sys.modules``)."""
    absent = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module with no spec
            found = False
        if not found:
            absent.append(name)
    return absent


def require(extra: str, feature: str, *modules: str) -> None:
    """Raise :class:`~labkit.core.errors.MissingExtra` when any of ``modules`` (default: all of the extra's) is missing.

    ``feature`` names what the user tried, e.g. ``"the Lab panels"``.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {sorted(EXTRAS)}")
    absent = missing(*(modules or EXTRAS[extra]))
    if absent:
        what = ", ".join(absent)
        verb = "is" if len(absent) == 1 else "are"
        raise MissingExtra(f"{feature} needs the {extra!r} extra ({what} {verb} not installed): "
                           f"pip install 'labkit[{extra}]'")
