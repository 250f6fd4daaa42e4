"""Static HTML of a Trace (``Trace._repr_html_``): coloured tokens for exports and viewers without widgets.
Not interactive; the live view is :class:`labkit.panels.TokenStream`."""

from __future__ import annotations

import html

from labkit.trace import Trace

MAX_SURPRISAL_BITS = 10.0


def _shade(surprisal_bits: float) -> str:
    t = max(0.0, min(1.0, surprisal_bits / MAX_SURPRISAL_BITS))
    g, b = round(255 - (255 - 39) * t), round(255 - (255 - 40) * t)
    return f"rgb({round(255 - (255 - 214) * t)},{g},{b})"


def trace_html(trace: Trace) -> str:
    """The prompt in grey, then each token on a background as red as its surprisal (0 to ≥ 10 bits); the title
    attribute lists p, entropy (bits) and the top alternatives."""
    spans = []
    for step in trace.steps:
        alts = ", ".join(f"{a.token!r} {a.prob:.3f}" for a in step.top[:5])
        title = f"p={step.prob:.3f} surprisal={step.surprisal_bits:.2f} bits H={step.entropy_bits:.2f} bits | {alts}"
        spans.append(f'<span style="background:{_shade(step.surprisal_bits)}" title="{html.escape(title)}">'
                     f"{html.escape(step.token)}</span>")
    return (f'<div style="font-family:monospace;white-space:pre-wrap;color:black;background:white">'
            f'<span style="color:#888">{html.escape(trace.prompt)}</span>{"".join(spans)}</div>'
            f'<div style="font-size:11px;color:#666">{len(trace)} tokens, stop: {html.escape(trace.stop_reason)}; '
            f"colour = surprisal, 0 to ≥ {MAX_SURPRISAL_BITS:g} bits</div>")
