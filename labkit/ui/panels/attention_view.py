"""Attention images (PNG from :mod:`labkit.records.imaging` in an ``ipywidgets.Image``): one head with layer and head
sliders, or all heads of a layer as a grid, with the head's pattern label."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import torch

from labkit.measures.attention import AttentionRow
from labkit.records import imaging


def grow(prompt_probs: torch.Tensor, rows: list[AttentionRow]) -> torch.Tensor:
    """The causal attention matrix of prompt + generated tokens, shape (L, H, N, N) with N = T + n − 1.

    ``prompt_probs`` (L, H, T, T): the prompt's full maps; ``rows``: the n captured rows of a generation (step i's
    query is the token at position T − 1 + i, its keys positions 0..T − 1 + i; step 0's row repeats the prompt's
    last row)."""
    n_layers, n_heads, t, _ = prompt_probs.shape
    size = t + max(len(rows) - 1, 0)
    out = prompt_probs.new_zeros((n_layers, n_heads, size, size))
    out[:, :, :t, :t] = prompt_probs
    for i, row in enumerate(rows[1:], start=1):
        probs = row.probs  # (L, H, T + i)
        out[:, :, t - 1 + i, : probs.shape[-1]] = probs
    return out


class AttentionImage(widgets.VBox):
    """Layer and head sliders, an all-heads toggle, the image, and the head's pattern label."""

    def __init__(self, n_layers: int, n_heads: int, size: int = 420) -> None:
        self.size = size
        wide = widgets.Layout(width="260px")
        self.layer = widgets.IntSlider(value=n_layers - 1, min=0, max=n_layers - 1, description="layer", layout=wide)
        self.head = widgets.IntSlider(value=0, min=0, max=n_heads - 1, description="head", layout=wide)
        self.grid = widgets.Checkbox(value=False, description="all heads of the layer")
        self.image = widgets.Image(format="png", layout=widgets.Layout(max_width=f"{size + 200}px"))
        self.label = widgets.Label("")
        self._probs: torch.Tensor | None = None  # (L, H, N, N)
        self._tokens: list[str] = []
        self._prompt: torch.Tensor | None = None  # (L, H, T, T): the maps the pattern labels are computed from
        for w in (self.layer, self.head, self.grid):
            w.observe(lambda _change: self.render(), names="value")
        super().__init__([self.layer, self.head, self.grid, self.label, self.image],
                         layout=widgets.Layout(min_width=f"{size + 200}px"))
        self.add_class("labkit-attention")

    def set_maps(self, probs: torch.Tensor, tokens: list[str], prompt: bool = False) -> None:
        """Show ``probs`` (L, H, N, N) with one token text per position. ``prompt=True``: these are a prompt's full
        maps, from which the heads' pattern labels are computed (one head at a time, when shown)."""
        self._probs, self._tokens = probs, tokens
        if prompt:
            self._prompt = probs
        self.render()

    def render(self) -> None:
        """Draw the chosen layer and head (or the layer's grid of heads) as a PNG."""
        if self._probs is None:
            return
        layer, head = self.layer.value, self.head.value
        if self.grid.value:
            img = imaging.head_grid(self._probs[layer].float(), cell_size=max(100, self.size // 3),
                                    title=f"layer {layer}: every head (rows attend to columns)")
        else:
            n = self._probs.shape[-1]
            labels = self._tokens[:n] if len(self._tokens) >= n else None
            img = imaging.heatmap(self._probs[layer, head].float(), labels=labels, size=self.size,
                                  title=f"layer {layer} head {head}")
        self.image.value = imaging.to_png(img)
        text = f"layer {layer}, head {head}: {self._probs.shape[-1]} positions"
        if self._prompt is not None:
            text += f"; pattern in the prompt: {imaging.classify(self._prompt[layer, head].float()).label}"
        self.label.value = text


class AttentionView(AttentionImage):
    """``AttentionView(session, prompt)``: the prompt's full attention maps, one head or a layer's grid, with
    pattern labels."""

    def __init__(self, session: Any, prompt: str, chat: bool = False, size: int = 420) -> None:
        maps = session.attention(prompt, chat=chat)
        super().__init__(maps.n_layers, maps.n_heads, size=size)
        self.maps = maps
        self.set_maps(maps.probs, maps.tokens, prompt=True)
