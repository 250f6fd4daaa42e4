"""SamplerControls: a sampler chooser and one slider per parameter. A slider assigns the sampler attribute at
once (validated by the sampler), so a slider moved during a run changes the next token, and each Step records
the values it used (``Step.sampler``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from labkit.core.errors import invalid_choice
from labkit.sampling import (
    Classic,
    ContrastiveDecoding,
    ContrastiveSearch,
    DoLa,
    Entropix,
    EntropyGuided,
    Greedy,
    Sampler,
)
from labkit.sampling.beam import BeamSearch

KINDS: dict[str, Callable[[], Sampler]] = {
    "greedy": Greedy,
    "classic": lambda: Classic(temperature=0.8),
    "entropy-guided": EntropyGuided.preset,
    "entropix": Entropix,
    "beam": BeamSearch,
    "contrastive": ContrastiveDecoding,
    "dola": DoLa,
    "contrastive-search": ContrastiveSearch,
}
"""The samplers the chooser offers, each with the settings it starts from."""

SLIDERS: dict[str, tuple[type, float, float, float]] = {
    # parameter: (slider type, min, max, step); entropies in bits, varentropies in bits²
    "temperature": (widgets.FloatSlider, 0.05, 2.0, 0.05),
    "top_k": (widgets.IntSlider, 0, 200, 1),
    "top_p": (widgets.FloatSlider, 0.05, 1.0, 0.01),
    "min_p": (widgets.FloatSlider, 0.0, 0.5, 0.01),
    "entropy_weight": (widgets.FloatSlider, 0.0, 1.0, 0.05),
    "min_entropy": (widgets.FloatSlider, 0.0, 8.0, 0.1),
    "low_ent": (widgets.FloatSlider, 0.0, 8.0, 0.05),
    "med_ent": (widgets.FloatSlider, 0.0, 8.0, 0.05),
    "high_ent": (widgets.FloatSlider, 0.0, 12.0, 0.05),
    "low_vent": (widgets.FloatSlider, 0.0, 8.0, 0.05),
    "high_vent": (widgets.FloatSlider, 0.0, 20.0, 0.1),
    "num_beams": (widgets.IntSlider, 1, 16, 1),  # beam settings are read when a search starts
    "length_penalty": (widgets.FloatSlider, -2.0, 3.0, 0.1),
    "entropy_coef": (widgets.FloatSlider, -3.0, 3.0, 0.1),  # λ per bit of step entropy
    "alpha": (widgets.FloatSlider, 0.01, 1.0, 0.01),  # contrastive decoding / DoLa plausibility threshold
    "beta": (widgets.FloatSlider, 0.0, 2.0, 0.05),
    "penalty_alpha": (widgets.FloatSlider, 0.0, 1.0, 0.05),
}
"""The parameters that get a slider, when the sampler has them."""


def kind_of(sampler: Sampler) -> str:
    """The sampler box's name for a sampler object (``greedy``, ``classic``, ...)."""
    for kind, make in KINDS.items():
        if type(make()) is type(sampler):
            return kind
    raise invalid_choice("sampler", type(sampler).__name__, [type(m()).__name__ for m in KINDS.values()])


class SamplerControls(widgets.VBox):
    """``SamplerControls(sampler)``: sliders bound to ``sampler``'s parameters; with ``choose=True`` a chooser
    replaces the sampler (``.sampler`` is always the current object). ``on_change(fn)`` calls ``fn(sampler)``
    after every change; a rejected value shows its error and leaves the sampler as it was."""

    def __init__(self, sampler: Sampler | None = None, choose: bool = True) -> None:
        self.sampler: Sampler = sampler if sampler is not None else KINDS["classic"]()
        self.kind = widgets.Dropdown(options=list(KINDS), value=kind_of(self.sampler), description="sampler",
                                     disabled=not choose)
        self.values = widgets.Label("")
        self.values.add_class("labkit-sampler-values")
        self.error = widgets.Label("", style={"text_color": "#b00020"})
        self.sliders: dict[str, widgets.ValueWidget] = {}
        self._box = widgets.VBox()
        self._listeners: list[Callable[[Sampler], None]] = []
        self.kind.observe(self._on_kind, names="value")
        super().__init__([self.kind, self._box, self.values, self.error])
        self.add_class("labkit-sampler")
        self._build()

    def on_change(self, fn: Callable[[Sampler], None]) -> None:
        """Call ``fn(sampler)`` whenever a new sampler kind is chosen."""
        self._listeners.append(fn)

    def _build(self) -> None:
        self.sliders = {}
        for name, (cls, lo, hi, step) in SLIDERS.items():
            if not hasattr(self.sampler, name):
                continue
            value = getattr(self.sampler, name)
            slider = cls(value=value, min=lo, max=max(hi, value), step=step, description=name,
                         continuous_update=False, style={"description_width": "110px"})
            slider.add_class(f"labkit-slider-{name}")
            slider.observe(lambda change, name=name: self._set(name, change), names="value")
            self.sliders[name] = slider
        self._box.children = list(self.sliders.values())
        self._changed()

    def _on_kind(self, change: dict[str, Any]) -> None:
        self.sampler = KINDS[change["new"]]()
        self._build()

    def _set(self, name: str, change: dict[str, Any]) -> None:
        try:
            setattr(self.sampler, name, change["new"])
        except Exception as exc:  # a rejected value: show it, keep the sampler's current value
            self.error.value = str(exc)
            return
        self._changed()

    def _changed(self) -> None:
        self.error.value = ""
        config = {k: v for k, v in self.sampler.config().items() if k in ("name", *SLIDERS)}
        self.values.value = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in config.items())
        for fn in self._listeners:
            fn(self.sampler)
