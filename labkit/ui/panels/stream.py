"""TokenStream: generated tokens coloured by surprisal, entropy or speculative origin (an anywidget view whose
front end is ``widgets/token_stream.js``). Hover a token for its alternatives; click to select; click an
alternative to ask for a branch (the ``branch`` trait; :class:`labkit.ui.panels.lab.Lab` acts on it)."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import anywidget
import traitlets

from labkit.core.errors import invalid_choice
from labkit.records.render import scales_for_front_end
from labkit.records.trace import Step, Trace
from labkit.ui.panels._assets import asset

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
        """True at most once per ``interval_s`` (then the clock restarts)."""
        now = time.perf_counter()
        if now - self._last >= self.interval_s:
            self._last = now
            return True
        return False


class TokenStream(anywidget.AnyWidget):
    """Coloured tokens of one Trace (``TokenStream(trace)``), or of a generation as it runs (``push`` each Step;
    messages are batched to at most one per ``interval_s``; ``flush`` sends the rest).

    The shown steps are ``steps`` + ``tail`` (``shown`` in Python): new steps go to ``tail``, which moves into
    ``steps`` once it holds ``COMMIT`` steps. A batch message carries only the tail (fewer than ``COMMIT`` steps);
    one message in every ``COMMIT`` steps carries the whole history (traitlets sync a list whole)."""

    COMMIT: ClassVar[int] = 64

    _esm = asset("token_stream.js")
    _css = asset("token_stream.css")
    steps = traitlets.List(traitlets.Dict()).tag(sync=True)
    tail = traitlets.List(traitlets.Dict()).tag(sync=True)
    prompt = traitlets.Unicode("").tag(sync=True)
    color_by = traitlets.Unicode("surprisal").tag(sync=True)
    scales = traitlets.Dict(scales_for_front_end()).tag(sync=True)
    """The colour scales (:data:`labkit.records.render.SCALES`), read by the front end."""
    selected = traitlets.Int(-1).tag(sync=True)
    """Index of the selected step (clicked in the view), −1 for none."""
    hovered = traitlets.Int(-1).tag(sync=True)
    """Index of the step under the pointer in the view (the last one hovered), −1 before any."""
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

    @property
    def shown(self) -> list[dict[str, Any]]:
        """Every step the front end has been sent (``step_view`` dicts)."""
        return [*self.steps, *self.tail]

    def show(self, trace: Trace) -> None:
        """Show every step of ``trace`` (replacing what is shown)."""
        self._replace(trace.prompt, [step_view(s) for s in trace.steps])

    def clear(self, prompt: str = "") -> None:
        """Show ``prompt`` and no tokens."""
        self._replace(prompt, [])

    def _replace(self, prompt: str, steps: list[dict[str, Any]]) -> None:
        self._pending = []
        with self.hold_sync():  # one message
            self.selected = -1
            self.prompt = prompt
            self.steps, self.tail = steps, []

    def push(self, step: Step) -> None:
        """Add one step; sent to the front end with the others of its batch."""
        self._pending.append(step_view(step))
        if self._throttle.due():
            self.flush()

    def flush(self) -> None:
        """Send the steps added since the last flush to the front end."""
        if not self._pending:
            return
        tail, self._pending = [*self.tail, *self._pending], []
        with self.hold_sync():
            if len(tail) >= self.COMMIT:
                self.steps, self.tail = [*self.steps, *tail], []
            else:
                self.tail = tail
