"""SpeculativeView: a speculative run's tokens coloured by origin (accepted draft, resampled after a rejection,
bonus, plain target draw) with its SpeculativeStats."""

from __future__ import annotations

import ipywidgets as widgets

from labkit.core.errors import InvalidArgument
from labkit.records.trace import Trace
from labkit.speculative import SpeculativeStats
from labkit.ui.panels.stream import TokenStream


class SpeculativeView(widgets.VBox):
    """``SpeculativeView(trace)`` for a trace made with ``speculative=``; ``stats`` are its SpeculativeStats."""

    def __init__(self, trace: Trace) -> None:
        if not trace.meta.speculative:
            raise InvalidArgument("trace was not generated speculatively (generate(..., speculative=Draft)); "
                                  "use TokenStream(trace) instead")
        self.stats = SpeculativeStats.of(trace)
        self.stream = TokenStream(trace, color_by="origin")
        self.summary = widgets.Label(str(self.stats))
        super().__init__([self.summary, self.stream])
