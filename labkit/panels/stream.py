"""TokenStream: generated tokens coloured by surprisal, entropy or speculative origin (an anywidget view whose
front end is ``widgets/token_stream.js``). Hover a token for its alternatives; click to select; click an
alternative to ask for a branch (the ``branch`` trait; :class:`labkit.panels.Lab` acts on it)."""

from __future__ import annotations

import time
from typing import Any

import anywidget
import traitlets

from labkit.errors import invalid_choice
from labkit.panels._assets import asset
from labkit.trace import Step, Trace

COLOR_BY = ("surprisal", "entropy", "origin")


def step_view(step: Step) -> dict[str, Any]:
    """What the front end needs of one Step: token text and id, p, surprisal ``s`` and entropy ``h`` (bits),
    varentropy ``v`` (bits²), the top alternatives ``[text, id, p]`` and the speculative origin (or "")."""
    return {"id": step.token_id, "token": step.token, "p": step.prob, "s": step.surprisal_bits,
            "h": step.entropy_bits, "v": step.varentropy_bits, "top": [list(a) for a in step.top],
            "origin": step.speculative.get("origin", "")}


class Throttle:
    """True at most once per ``interval_s`` seconds: the panels batch UI messages with it."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = float("-inf")

    def due(self) -> bool:
        now = time.perf_counter()
        if now - self._last >= self.interval_s:
            self._last = now
            return True
        return False


class TokenStream(anywidget.AnyWidget):
    """Coloured tokens of one Trace (``TokenStream(trace)``), or of a generation as it runs (``push`` each Step;
    messages are batched to at most one per ``interval_s``; ``flush`` sends the rest)."""

    _esm = asset("token_stream.js")
    _css = asset("token_stream.css")
    steps = traitlets.List(traitlets.Dict()).tag(sync=True)
    prompt = traitlets.Unicode("").tag(sync=True)
    color_by = traitlets.Unicode("surprisal").tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)
    """Index of the selected step (clicked in the view), −1 for none."""
    branch = traitlets.Dict().tag(sync=True)
    """Set by the view when an alternative is clicked: ``{"step": i, "token_id": id, "n": clicks so far}``."""

    def __init__(self, trace: Trace | None = None, color_by: str = "surprisal", interval_s: float = 0.1) -> None:
        super().__init__(color_by=color_by)
        self._pending: list[dict[str, Any]] = []
        self._throttle = Throttle(interval_s)
        if trace is not None:
            self.show(trace)

    @traitlets.validate("color_by")
    def _check_color_by(self, proposal: Any) -> str:
        if proposal["value"] not in COLOR_BY:
            raise invalid_choice("color_by", proposal["value"], COLOR_BY)
        return proposal["value"]

    def show(self, trace: Trace) -> None:
        """Show every step of ``trace`` (replacing what is shown)."""
        self._pending = []
        self.selected = -1
        self.prompt = trace.prompt
        self.steps = [step_view(s) for s in trace.steps]

    def clear(self, prompt: str = "") -> None:
        self._pending = []
        self.selected = -1
        self.prompt = prompt
        self.steps = []

    def push(self, step: Step) -> None:
        """Add one step; sent to the front end with the others of its batch."""
        self._pending.append(step_view(step))
        if self._throttle.due():
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.steps = [*self.steps, *self._pending]
            self._pending = []
