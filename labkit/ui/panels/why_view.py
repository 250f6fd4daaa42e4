"""WhyView: why a generated token came out — its attribution over the context as a coloured token strip (method
selectable), the direct logit attribution by layer (bars) and by head (image), and the top heads as buttons that
ablate that head and regenerate. The :class:`labkit.ui.panels.lab.Lab` shows one and fills it when a token is
clicked."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from labkit.records.trace import Trace
from labkit.why.attribution import attribute, methods
from labkit.why.logit_attribution import decompose

TOP_HEADS = 3


def explain(session: Any, trace: Trace, index: int, method: str, locked: bool = True) -> tuple[Any, Any]:
    """(Attribution, LogitAttribution) of step ``index`` of ``trace``. ``locked=False`` is for the thread that
    already holds the Session (a Lab run between two steps): the same computations without taking its lock."""
    if locked:
        return session.attribute_step(trace, index, method=method), session.logit_attribution_step(trace, index)
    ids, token = session.step_context(trace, index)
    return (attribute(session.sites, ids, token, method=method, token_text=session.token_text,
                      tokenizer=session.tokenizer),
            decompose(session.sites, ids, token, token_text=session.token_text))


class WhyView(widgets.VBox):
    """The "why" view of one step: ``show(attribution, logit_attribution)`` draws it; ``method`` picks the gradient
    or attention method; ``on_ablate(layer, head)`` is called by a top head's button."""

    def __init__(self, on_ablate: Callable[[int, int], None] | None = None) -> None:
        # input × gradient by default: one backward pass, so the view follows clicks at once (IG: 64 passes)
        self.method = widgets.ToggleButtons(options=list(methods()), value="input_x_gradient", description="why by")
        self.title = widgets.HTML("<b>Why this token?</b> Click a generated token.")
        self.status = widgets.Label("")
        self.status.add_class("labkit-why-status")
        self.strip = widgets.HTML("")
        self.strip.add_class("labkit-why-strip")
        self.layers = widgets.Image(format="png", layout=widgets.Layout(max_width="520px"))
        self.layers.add_class("labkit-why-layers")
        self.heads = widgets.Image(format="png", layout=widgets.Layout(max_width="420px"))
        self.heads.add_class("labkit-why-heads")
        self.top = widgets.HBox([])
        self.on_ablate = on_ablate
        self.attribution: Any = None
        self.logit_attribution: Any = None
        super().__init__([self.title, self.method, self.status, self.strip, widgets.HBox([self.layers, self.heads]),
                          self.top])
        self.add_class("labkit-why")

    def waiting(self, index: int, token: str) -> None:
        """Say that step ``index``'s explanation is being computed."""
        self.status.value = f"computing why step {index} ({token!r}) came out…"

    def show(self, index: int, attribution: Any, logit_attribution: Any) -> None:
        """Show step ``index``'s attribution strip, logit attribution bars and image, and the top heads."""
        self.attribution, self.logit_attribution = attribution, logit_attribution
        a, la = attribution, logit_attribution
        extra = f"; IG completeness error {a.completeness_error:.1%}" if a.completeness_error is not None else ""
        self.title.value = (f"<b>Why step {index}: {a.target!r}?</b> {a.method} of {a.label}{extra}; direct logit "
                            f"attribution {la.total:+.2f} logit units")
        buttons = []
        for layer, head, value in la.top_heads(TOP_HEADS):
            button = widgets.Button(description=f"ablate {layer}:{head} ({value:+.2f})",
                                    tooltip="zero-ablate this head and regenerate")
            button.add_class("labkit-why-ablate")
            button.on_click(lambda _b, layer=layer, head=head: self._ablate(layer, head))
            buttons.append(button)
        self.top.children = [widgets.Label("top heads:"), *buttons]
        self.strip.value = a.html()
        self.layers.value = la.layer_image().png()
        self.heads.value = la.image().png()
        self.status.value = ""

    def failed(self, exc: Exception) -> None:
        """Show the error that stopped the explanation (the panel stays usable)."""
        self.status.value = f"{type(exc).__name__}: {exc}"

    def _ablate(self, layer: int, head: int) -> None:
        if self.on_ablate is not None:
            self.on_ablate(layer, head)
