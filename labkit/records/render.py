"""Static HTML of a Trace (``Trace._repr_html_``): coloured tokens for exports and viewers without widgets, and the
colour scales the live :class:`labkit.ui.panels.stream.TokenStream` view uses too (sent to its front end), so both
agree.
No widget, plotly or anywidget import: the core renders without the UI package."""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Scale:
    """A white-to-colour scale: ``value / max`` clipped to [0, 1] mixes white towards ``rgb``."""

    key: str
    """The step field it colours in the front end's step dicts (``s``: surprisal, ``h``: entropy)."""
    max: float
    unit: str
    label: str
    rgb: tuple[int, int, int]

    def shade(self, value: float) -> str:
        """The CSS colour of ``value`` on this scale (white at 0, the scale's colour at ``max`` and above)."""
        t = max(0.0, min(1.0, value / self.max))
        r, g, b = (round(255 - (255 - c) * t) for c in self.rgb)
        return f"rgb({r}, {g}, {b})"


#: The colour scales of a token strip, by measure name (surprisal and entropy, bits).
SCALES = {
    "surprisal": Scale("s", 10.0, "bits", "surprisal −log₂ p", (214, 39, 40)),
    "entropy": Scale("h", 8.0, "bits", "entropy H", (31, 119, 180)),
}


def scales_for_front_end() -> dict[str, dict[str, Any]]:
    """:data:`SCALES` as JSON-ready dicts (the TokenStream view's ``scales`` trait)."""
    return {name: asdict(scale) for name, scale in SCALES.items()}


def trace_html(trace: Any) -> str:
    """The prompt in grey, then each token on a background as red as its surprisal (0 to ≥ 10 bits); the title
    attribute lists p, entropy (bits) and the top alternatives."""
    scale = SCALES["surprisal"]
    spans = []
    for step in trace.steps:
        alts = ", ".join(f"{a.token!r} {a.prob:.3f}" for a in step.top[:5])
        title = f"p={step.prob:.3f} surprisal={step.surprisal_bits:.2f} bits H={step.entropy_bits:.2f} bits | {alts}"
        spans.append(f'<span style="background:{scale.shade(step.surprisal_bits)}" title="{html.escape(title)}">'
                     f"{html.escape(step.token)}</span>")
    return (f'<div style="font-family:monospace;white-space:pre-wrap;color:black;background:white">'
            f'<span style="color:#888">{html.escape(trace.prompt)}</span>{"".join(spans)}</div>'
            f'<div style="font-size:11px;color:#666">{len(trace)} tokens, stop: {html.escape(trace.stop_reason)}; '
            f"colour = surprisal, 0 to ≥ {scale.max:g} {scale.unit}</div>")
