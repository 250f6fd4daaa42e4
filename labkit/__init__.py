"""labkit: look inside causal language models while they generate.

>>> import labkit
>>> s = labkit.Session()                      # bundled SmolLM2-135M-Instruct, offline
>>> s.next_token("The capital of France is").top(3)
"""

import os

# Offline always: set before transformers / huggingface_hub are imported anywhere in labkit.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"

from labkit import _moved, sampling
from labkit.core import errors
from labkit.decoding.settings import GenerationSettings
from labkit.records.results import Distribution, Score
from labkit.records.trace import Alternative, Step, Trace, TraceMeta
from labkit.session import Generation, Session

__all__ = [
    "Alternative",
    "Distribution",
    "Generation",
    "GenerationSettings",
    "Score",
    "Session",
    "Step",
    "Trace",
    "TraceMeta",
    "__version__",
    "errors",
    "sampling",
]

_moved.install()

_LAZY = ("interventions", "speculative", "core", "model", "measures", "records", "why", "decoding", "studies",
         "teach", "ui")


def __getattr__(name: str) -> object:
    """Subpackages imported on first use (widgets and plotly stay out of the command line's start-up); the old
    module names (``labkit.info``, ``labkit.panels``...) with a DeprecationWarning (:mod:`labkit._moved`)."""
    import importlib

    if name in _LAZY:
        return importlib.import_module(f"labkit.{name}")
    if name in _moved.MOVED:
        _moved.warn(f"labkit.{name}", _moved.MOVED[name])
        return importlib.import_module(_moved.MOVED[name])
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")


def load_ipython_extension(ipython: object) -> None:
    """Register the ``%labkit`` / ``%%labkit`` magics (:mod:`labkit.ui.magics`)."""
    from labkit.ui.magics import load_ipython_extension as load

    load(ipython)
