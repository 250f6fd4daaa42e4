"""labkit: look inside causal language models while they generate.

>>> import labkit
>>> s = labkit.Session()                      # bundled SmolLM2-135M-Instruct, offline
>>> s.next_token("The capital of France is").top(3)
"""

import os

# Offline always: set before transformers / huggingface_hub are imported anywhere in labkit.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"

from labkit import errors, info, sampling
from labkit.results import Distribution, Score
from labkit.session import Generation, Session
from labkit.trace import Alternative, Step, Trace, TraceMeta

__all__ = [
    "Alternative",
    "Distribution",
    "Generation",
    "Score",
    "Session",
    "Step",
    "Trace",
    "TraceMeta",
    "__version__",
    "errors",
    "info",
    "sampling",
]


_LAZY = ("interventions", "panels", "speculative", "magics", "beam", "uncertainty")


def __getattr__(name: str) -> object:
    """``labkit.panels``, ``labkit.interventions``, ... imported on first use (widgets and plotly stay out of the
    command line's start-up)."""
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"labkit.{name}")
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")


def load_ipython_extension(ipython: object) -> None:
    """Register the ``%labkit`` / ``%%labkit`` magics (:mod:`labkit.magics`)."""
    from labkit.magics import load_ipython_extension as load

    load(ipython)
