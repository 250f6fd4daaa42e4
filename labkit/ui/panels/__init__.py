"""Notebook panels (ipywidgets + anywidget; front-end code in the top-level ``widgets/`` folder, loaded offline).

``Lab(session)`` is the whole lab; the smaller panels work alone: ``NextToken(session)``, ``TokenStream(trace)``,
``AttentionView(session, prompt)``, ``SamplerControls(sampler)``, ``SpeculativeView(trace)``. Each is imported on
first use, so ``import labkit.ui.panels`` alone loads no widget library.
"""

from __future__ import annotations

import importlib
from typing import Any

from labkit.core.extras import require

require("lab", "the Lab panels", "anywidget", "ipywidgets", "IPython")  # looks them up; imports nothing

_WHERE = {
    "AttentionImage": "attention_view", "AttentionView": "attention_view", "Lab": "lab", "NextToken": "next_token",
    "ProbabilityCharts": "charts", "SamplerControls": "controls", "SpeculativeView": "speculative_view",
    "TokenStream": "stream",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'labkit.ui.panels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"labkit.ui.panels.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
