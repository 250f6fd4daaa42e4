"""SamplerControls: a sampler chooser and one slider per parameter. A slider assigns the sampler attribute at
once (validated by the sampler), so a slider moved during a run changes the next token, and each Step records
the values it used (``Step.sampler``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from labkit.core.errors import InvalidArgument
from labkit.sampling.params import Param, Tunable
from labkit.sampling.registry import SAMPLERS, name_of

START: dict[str, Callable[[], Tunable]] = {"classic": lambda: SAMPLERS["classic"](temperature=0.8)}
"""Where the chooser starts a kind from, when not from its defaults (classic: temperature 0.8, a readable story)."""


def kinds() -> list[str]:
    """The sampler box's choices: every registered sampler (:func:`labkit.sampling.registry.register` adds one),
    beam search included, in the registry's order."""
    return list(SAMPLERS)


def make(kind: str) -> Tunable:
    """A new sampler of registered ``kind``, with the settings the chooser starts from."""
    return START[kind]() if kind in START else SAMPLERS[kind]()


def kind_of(sampler: Tunable) -> str:
    """The sampler box's name for a sampler object: its registry name, or its class's ``name`` when the class is
    not registered (the box then offers it as it is)."""
    try:
        return name_of(sampler)
    except InvalidArgument:
        return sampler.name


def slider_for(name: str, value: Any, param: Param) -> widgets.ValueWidget:
    """The slider of one declared parameter (its range from ``param.slider``, widened to hold ``value``)."""
    lo, hi, step = param.slider or (0, 1, 1)
    cls = widgets.IntSlider if param.kind is int else widgets.FloatSlider
    slider = cls(value=value, min=min(lo, value), max=max(hi, value), step=step, description=name,
                 continuous_update=False, style={"description_width": "110px"},
                 layout=widgets.Layout(width="100%", min_width="260px"))
    slider.add_class(f"labkit-slider-{name}")
    return slider


class SamplerControls(widgets.VBox):
    """``SamplerControls(sampler)``: sliders bound to ``sampler``'s parameters; with ``choose=True`` a chooser
    replaces the sampler (``.sampler`` is always the current object). ``on_change(fn)`` calls ``fn(sampler)``
    after every change; a rejected value shows its error and leaves the sampler as it was."""

    def __init__(self, sampler: Tunable | None = None, choose: bool = True) -> None:
        self.sampler: Tunable = sampler if sampler is not None else make("classic")
        own = kind_of(self.sampler)
        self._given = {own: self.sampler} if own not in SAMPLERS else {}  # an unregistered sampler, offered as is
        self.kind = widgets.Dropdown(options=[*kinds(), *self._given], value=own, description="sampler",
                                     disabled=not choose)
        self.values = widgets.Label("")
        self.values.add_class("labkit-sampler-values")
        self.error = widgets.Label("", style={"text_color": "#b00020"})
        self.sliders: dict[str, widgets.ValueWidget] = {}
        self._box = widgets.VBox()
        self._listeners: list[Callable[[Tunable], None]] = []
        self.kind.observe(self._on_kind, names="value")
        super().__init__([self.kind, self._box, self.values, self.error])
        self.add_class("labkit-sampler")
        self._build()

    def on_change(self, fn: Callable[[Tunable], None]) -> None:
        """Call ``fn(sampler)`` whenever a new sampler kind is chosen."""
        self._listeners.append(fn)

    def _build(self) -> None:
        self.sliders = {}
        for name, param in type(self.sampler).params.items():
            if param.slider is None:
                continue
            slider = slider_for(name, getattr(self.sampler, name), param)
            slider.observe(lambda change, name=name: self._set(name, change), names="value")
            self.sliders[name] = slider
        self._box.children = list(self.sliders.values())
        self._changed()

    def _on_kind(self, change: dict[str, Any]) -> None:
        kind = change["new"]
        self.sampler = self._given[kind] if kind in self._given else make(kind)
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
        config = {k: v for k, v in self.sampler.config().items() if k == "name" or k in self.sliders}
        self.values.value = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in config.items())
        for fn in self._listeners:
            fn(self.sampler)
