"""NextToken: type a prompt, see the raw next-token distribution (bars) and its entropy (bits)."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go


class NextToken(widgets.VBox):
    """``NextToken(session)``: a prompt box and the top-``k`` next tokens after it (no sampler, no intervention)."""

    def __init__(self, session: Any, prompt: str = "The capital of France is", k: int = 10,
                 chat: bool = False) -> None:
        self.session, self.k = session, k
        self.prompt = widgets.Text(value=prompt, description="prompt", continuous_update=False,
                                   layout=widgets.Layout(width="90%"))
        self.chat = widgets.Checkbox(value=chat, description="chat template")
        self.summary = widgets.Label("")
        self.error = widgets.Label("", style={"text_color": "#b00020"})
        self.chart = go.FigureWidget([go.Bar(x=[], y=[], orientation="h")],
                                     layout=go.Layout(height=300, margin=dict(l=110, r=10, t=10, b=30),
                                                      xaxis=dict(title="probability", range=[0, 1]),
                                                      yaxis=dict(autorange="reversed")))
        self.distribution = None
        self.prompt.observe(lambda _c: self.update(), names="value")
        self.chat.observe(lambda _c: self.update(), names="value")
        super().__init__([widgets.HBox([self.prompt, self.chat]), self.summary, self.error, self.chart])
        self.update()

    def update(self) -> None:
        """Recompute for the current prompt; an error is shown in the panel."""
        try:
            d = self.session.next_token(self.prompt.value, chat=self.chat.value)
        except Exception as exc:
            self.error.value = str(exc)
            return
        self.error.value = ""
        self.distribution = d
        top = d.top(self.k)
        with self.chart.batch_update():
            self.chart.data[0].x = [a.prob for a in top]
            self.chart.data[0].y = [repr(a.token) for a in top]
        self.summary.value = (f"entropy {d.entropy('bits'):.3f} bits, varentropy {d.varentropy('bits'):.3f} bits², "
                              f"top {top[0].token!r} p={top[0].prob:.3f}")
