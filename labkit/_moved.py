"""Old import paths of modules that moved into the layer subpackages (one release, then removed).

``import labkit.decode`` (or ``from labkit.info import entropy``) still works: it gives the module at its new path
(the same object, so patching either name patches both) and a DeprecationWarning naming the new path. Written
here because importlib has no alias mechanism: a meta-path finder whose loader puts the real module in
``sys.modules`` under the old name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

from labkit.core.errors import deprecated

MOVED: dict[str, str] = {
    "errors": "labkit.core.errors",
    "extras": "labkit.core.extras",
    "files": "labkit.core.files",
    "tokens": "labkit.core.tokens",
    "specs": "labkit.core.specs",
    "memory": "labkit.core.memory",
    "models": "labkit.model.models",
    "hooks": "labkit.model.hooks",
    "cache": "labkit.model.cache",
    "info": "labkit.measures.information",
    "attention": "labkit.measures.attention",
    "patterns": "labkit.measures.patterns",
    "lens": "labkit.measures.lens",
    "transfer_entropy": "labkit.measures.transfer_entropy",
    "trace": "labkit.records.trace",
    "beam_tree": "labkit.records.beam_tree",
    "render": "labkit.records.render",
    "results": "labkit.records.results",
    "figures": "labkit.records.figures",
    "imaging": "labkit.records.imaging",
    "activations": "labkit.why.activations",
    "attribution": "labkit.why.attribution",
    "logit_attribution": "labkit.why.logit_attribution",
    "kv": "labkit.decoding.kv",
    "decode": "labkit.decoding.loop",
    "beam": "labkit.decoding.beam",
    "experiments": "labkit.studies.experiments",
    "uncertainty": "labkit.measures.uncertainty",
    "teaching": "labkit.teach.teaching",
    "workshop": "labkit.teach.workshop",
    "kernelspec": "labkit.teach.kernelspec",
    "cli": "labkit.ui.cli",
    "magics": "labkit.ui.magics",
    "panels": "labkit.ui.panels",
}
"""Old name under ``labkit.`` → the module's path now."""


def new_name(old: str) -> str | None:
    """The new dotted path of an old one (``labkit.panels.lab`` → ``labkit.ui.panels.lab``), or None."""
    parts = old.split(".")
    if len(parts) < 2 or parts[0] != "labkit" or parts[1] not in MOVED:
        return None
    return ".".join([MOVED[parts[1]], *parts[2:]])


def warn(old: str, new: str) -> None:
    """The one DeprecationWarning of an old path, at the importing line."""
    deprecated(f"{old} moved to {new}; import it from there (the old path goes in the next release)")


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names and loads them as the modules at their new paths."""

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        if new_name(fullname) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return types.ModuleType(spec.name)  # a placeholder: exec_module swaps in the real module

    def exec_module(self, module: types.ModuleType) -> None:
        new = new_name(module.__name__)
        assert new is not None
        warn(module.__name__, new)
        sys.modules[module.__name__] = importlib.import_module(new)  # the import statement returns this one


def install() -> None:
    """Put the old-path finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())  # before PathFinder, which would load a second copy of a submodule
