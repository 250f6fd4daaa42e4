"""Notebook panels (ipywidgets + anywidget; front-end code in the top-level ``widgets/`` folder, loaded offline).

``Lab(session)`` is the whole lab; the smaller panels work alone: ``NextToken(session)``, ``TokenStream(trace)``,
``AttentionView(session, prompt)``, ``SamplerControls(sampler)``, ``SpeculativeView(trace)``.
"""

from labkit.panels.attention_view import AttentionImage, AttentionView
from labkit.panels.charts import ProbabilityCharts
from labkit.panels.controls import SamplerControls
from labkit.panels.lab import Lab
from labkit.panels.next_token import NextToken
from labkit.panels.speculative_view import SpeculativeView
from labkit.panels.stream import TokenStream

__all__ = ["AttentionImage", "AttentionView", "Lab", "NextToken", "ProbabilityCharts", "SamplerControls",
           "SpeculativeView", "TokenStream"]
