"""Live probability charts (plotly FigureWidgets): the top-k of one step as bars, entropy and varentropy over the
steps as lines. Probabilities are the model's raw ones (before interventions and the sampler, as in ``Step.top``);
entropy in bits, varentropy in bits²."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from labkit.records.trace import Step


class ProbabilityCharts:
    """``bars``: the top alternatives of one step; ``lines``: entropy and varentropy per step."""

    def __init__(self, height: int = 260) -> None:
        self.bars = go.FigureWidget(
            [go.Bar(x=[], y=[], orientation="h", marker_color="#1f77b4", name="p")],
            layout=go.Layout(height=height, margin=dict(l=110, r=10, t=30, b=30), title="top alternatives",
                             xaxis=dict(title="model probability", range=[0, 1]), yaxis=dict(autorange="reversed")))
        self.lines = go.FigureWidget(
            [go.Scatter(x=[], y=[], mode="lines+markers", name="entropy (bits)"),
             go.Scatter(x=[], y=[], mode="lines+markers", name="varentropy (bits²)")],
            layout=go.Layout(height=height, margin=dict(l=40, r=10, t=30, b=30), title="entropy and varentropy",
                             xaxis=dict(title="step"), legend=dict(orientation="h", y=-0.25)))

    def show_step(self, step: Step | None, index: int | None = None) -> None:
        """Bars of ``step``'s top alternatives (the chosen token highlighted); empty for None."""
        with self.bars.batch_update():
            bar = self.bars.data[0]
            if step is None:
                bar.x, bar.y = [], []
                self.bars.layout.title = "top alternatives"
                return
            bar.x = [a.prob for a in step.top]
            bar.y = [repr(a.token) for a in step.top]
            bar.marker.color = ["#d62728" if a.token_id == step.token_id else "#1f77b4" for a in step.top]
            title = f"step {step.index if index is None else index}: chose {step.token!r}"
            if step.interventions:  # the bars are the model's own; say why the choice may not be among them
                title += " · edited by " + ", ".join(step.interventions)
            self.bars.layout.title = title

    def show_series(self, steps: Sequence[Step]) -> None:
        """Entropy and varentropy of every step so far."""
        x = list(range(len(steps)))
        with self.lines.batch_update():
            self.lines.data[0].x, self.lines.data[0].y = x, [s.entropy_bits for s in steps]
            self.lines.data[1].x, self.lines.data[1].y = x, [s.varentropy_bits for s in steps]
