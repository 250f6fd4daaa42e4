"""The Lab's feature strip: an SAE's top features for the hovered (or clicked) token; a clicked feature shows where
it fires over the run's text and offers steer and ablate buttons that regenerate with that edit — the why view's
counterpart for features."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import torch


class FeatureStrip(widgets.VBox):
    """``show_step(index, step)`` lists the step's top features (buttons); ``show_where(feature, tokens, acts)``
    colours the run's tokens by that feature's activation; ``on_edit(kind, feature, scale)`` ("steer" | "ablate")
    is called by the edit buttons."""

    def __init__(self, sae_name: str, on_pick: Callable[[int], None], on_edit: Callable[[str, int, float], None]
                 ) -> None:
        self.sae_name, self.on_pick, self.on_edit = sae_name, on_pick, on_edit
        self.title = widgets.HTML(f"<b>Features</b> of {html.escape(sae_name)}: hover or click a generated token")
        self.top = widgets.HBox([])
        self.top.add_class("labkit-features-top")
        self.where = widgets.HTML("")
        self.where.add_class("labkit-features-where")
        self.scale = widgets.FloatSlider(value=8.0, min=-20.0, max=20.0, step=0.5, description="steer by")
        self.steer = widgets.Button(description="steer and regenerate")
        self.ablate = widgets.Button(description="ablate and regenerate", button_style="warning")
        self.status = widgets.Label("")
        self.feature: int | None = None
        self.steer.on_click(lambda _b: self._edit("steer"))
        self.ablate.on_click(lambda _b: self._edit("ablate"))
        super().__init__([self.title, self.top, self.where, widgets.HBox([self.scale, self.steer, self.ablate]),
                          self.status])
        self.add_class("labkit-features")

    def show_step(self, index: int, step: Any) -> None:
        """Step ``index``'s top features (from its ``captures["features:<name>"]``) as buttons."""
        top = step.captures.get(f"features:{self.sae_name}", {"features": [], "activations": []})
        buttons = []
        for feature, value in zip(top["features"], top["activations"], strict=True):
            button = widgets.Button(description=f"{feature}: {value:.2f}", layout=widgets.Layout(width="auto"),
                                    tooltip=f"feature {feature}, activation {value:.3f}: click to see where it fires")
            button.on_click(lambda _b, f=feature: self.on_pick(f))
            buttons.append(button)
        self.top.children = buttons
        self.status.value = (f"step {index} {step.token!r}: {len(buttons)} active features among the top 10"
                             if buttons else f"step {index} {step.token!r}: no active feature")

    def show_where(self, feature: int, tokens: list[str], acts: torch.Tensor) -> None:
        """The run's ``tokens`` on a background as strong as feature ``feature``'s activation (``acts`` (T,)); the
        largest activation is full colour."""
        self.feature = feature
        peak = float(acts.max()) if acts.numel() and float(acts.max()) > 0 else 1.0
        spans = []
        for tok, a in zip(tokens, acts.tolist(), strict=True):
            shade = round(255 - 200 * max(0.0, a) / peak)
            spans.append(f'<span style="background:rgb(255,{shade},{shade})" title="{a:.3f}">{html.escape(tok)}'
                         "</span>")
        self.where.value = (f'<div style="font-family:monospace;white-space:pre-wrap;color:black;background:white">'
                            f'{"".join(spans)}</div><div style="font-size:11px;color:#666">feature {feature}: colour ∝ '
                            f"activation (max {peak:.3g}) over the run's text</div>")

    def _edit(self, kind: str) -> None:
        if self.feature is None:
            self.status.value = "click a feature first"
            return
        self.on_edit(kind, self.feature, float(self.scale.value))
