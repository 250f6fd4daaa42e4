"""Which part of the image a vision-language model's tokens came from, and what its image tokens read as.

- :func:`grounding`: the attention each generated token puts on the image tokens (per step, layer and head; from
  ``capture=["attention"]``), as fractions of the query row (they sum to the mass on the image, ≤ 1), and maps of it
  over each image's feature grid (:meth:`Grounding.map`, drawn over the image by :meth:`Grounding.plot`).
- :func:`alignment`: the cosine similarity of each image token's vector where it enters the language model (the
  projector's output, site ``blocks.0.resid_pre``) with every row of the token embedding: which vocabulary items a
  patch is closest to; and :func:`image_lens`: the logit lens at the image positions, per layer.

Causal checks of a map: :class:`labkit.interventions.image.AblatePatches`, and :func:`image_effect` for its effect
on the next token (KL in bits, the token's probability before and after).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from labkit.core.errors import InvalidArgument
from labkit.model.vlm import ImagePositions


def _layout(trace: Any) -> ImagePositions:
    if not getattr(trace, "images", None):
        raise InvalidArgument("the trace's prompt holds no images: generate with images= on a vision-language model")
    return ImagePositions.from_dict(trace.images)


@dataclass
class Grounding:
    """Attention from generated tokens to a prompt's image tokens."""

    mass: torch.Tensor
    """Shape (n_steps, L, H, n): attention probability of step s's query row on image token k, in layer l, head h
    (fractions of the row; ``mass.sum(-1)`` is the share of the row on the images)."""
    layout: ImagePositions
    tokens: list[str]
    """The generated tokens' texts, one per step."""

    def _pick(self, step: int, layers: Sequence[int] | None, heads: Sequence[int] | None) -> torch.Tensor:
        n_steps, n_layers, n_heads, _ = self.mass.shape
        if isinstance(step, bool) or not isinstance(step, int) or not -n_steps <= step < n_steps:
            raise InvalidArgument(f"step must be an integer in [0, {n_steps}); got {step!r}")
        pick = self.mass[step]
        for dim, chosen, n, name in ((0, layers, n_layers, "layers"), (1, heads, n_heads, "heads")):
            if chosen is not None:
                bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n]
                if bad or not chosen:
                    raise InvalidArgument(f"{name} must be a non-empty list of integers in [0, {n}); got {chosen!r}")
                pick = pick.index_select(dim, torch.tensor([i % n for i in chosen]))
        return pick  # (L_sel, H_sel, n)

    def on_image(self, reduce: str = "mean") -> torch.Tensor:
        """Shape (n_steps,): each step's attention mass on all image tokens, the ``reduce`` ("mean" | "max") over
        layers and heads."""
        total = self.mass.sum(-1)  # (n_steps, L, H)
        if reduce not in ("mean", "max"):
            raise InvalidArgument(f"reduce must be 'mean' or 'max'; got {reduce!r}")
        return total.flatten(1).mean(1) if reduce == "mean" else total.flatten(1).amax(1)

    def map(self, step: int, image: int = 0, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
            reduce: str = "mean") -> torch.Tensor:
        """Shape (rows, cols) of image ``image``'s feature grid: step ``step``'s attention on each cell, the
        ``reduce`` ("mean" | "sum" | "max") over the chosen ``layers`` and ``heads`` (default all). Cell (r, c) of
        image i is the token at ``layout`` (i, r, c); a cell a family's layout does not fill stays NaN."""
        if reduce not in ("mean", "sum", "max"):
            raise InvalidArgument(f"reduce must be 'mean', 'sum' or 'max'; got {reduce!r}")
        one = self.layout.of_image(image)
        pick = self._pick(step, layers, heads).flatten(0, 1)  # (L_sel·H_sel, n)
        values = {"mean": pick.mean(0), "sum": pick.sum(0), "max": pick.amax(0)}[reduce]  # (n,)
        keep = self.layout.image == image
        rows, cols = self.layout.grids[image]
        grid = torch.full((rows, cols), float("nan"))
        grid[one.row, one.col] = values[keep].float()
        return grid

    def plot(self, step: int, picture: Any, image: int = 0, layers: Sequence[int] | None = None,
             heads: Sequence[int] | None = None, reduce: str = "mean") -> Any:
        """:meth:`map` drawn over ``picture`` (the PIL image the prompt was made with): a labelled figure with a
        colour bar in attention probability."""
        from labkit.records.figures import overlay

        grid = self.map(step, image, layers, heads, reduce)
        what = "all layers" if layers is None else f"layers {list(layers)}"
        return overlay(picture, grid, colorbar=f"attention probability ({reduce} over heads and layers)",
                       title=f"step {step % self.mass.shape[0]} {self.tokens[step]!r}: attention on image {image} "
                             f"({what})")


def grounding(trace: Any) -> Grounding:
    """The :class:`Grounding` of a generation made with ``images=`` and ``capture=["attention"]``: each step's
    captured attention row (softmax of the scores the model's own attention used) at the image positions."""
    layout = _layout(trace)
    if not trace.steps or "attention" not in trace.steps[0].captures:
        raise InvalidArgument("grounding needs the attention of each step: generate with capture=['attention']")
    index = layout.positions
    mass = torch.stack([step.captures["attention"].probs[..., index].float() for step in trace.steps])
    return Grounding(mass=mass, layout=layout, tokens=trace.tokens)


@dataclass
class Alignment:
    """Nearest vocabulary items of each image token's vector as the language model receives it."""

    cosine: torch.Tensor
    """Shape (n, k): the k largest cosine similarities of image token i with the token embeddings, descending."""
    token_ids: torch.Tensor
    """Shape (n, k): the vocabulary ids of those embeddings."""
    tokens: list[list[str]]
    layout: ImagePositions

    def to_pandas(self) -> Any:
        """One row per image token: image, row, col, its nearest tokens and their cosines."""
        import pandas as pd

        lay = self.layout
        return pd.DataFrame({"image": lay.image.tolist(), "row": lay.row.tolist(), "col": lay.col.tolist(),
                             "nearest": [t[0] for t in self.tokens], "cosine": self.cosine[:, 0].tolist(),
                             "top": self.tokens})


def alignment(session: Any, prompt: str, images: Any, k: int = 5) -> Alignment:
    """Cosine similarity (float32) of each image token's vector entering the language model (``blocks.0.resid_pre``
    at the image positions: the projector's output, as merged by the model) with every row of the input embedding
    matrix; the ``k`` nearest. Ids past the tokenizer's vocabulary (a VLM's own added tokens) are included."""
    made = session.vision.prompt(prompt, images) if session.vision is not None else None
    if made is None:
        raise InvalidArgument(f"alignment needs a vision-language model; {session.model_id!r} is a text model")
    acts = session.activations(prompt, ["blocks.0.resid_pre"], images=images)["blocks.0.resid_pre"]  # (T, d)
    vectors = torch.nn.functional.normalize(acts[made.layout.positions].float(), dim=-1)  # (n, d)
    table = torch.nn.functional.normalize(session.model.get_input_embeddings().weight.detach().float(), dim=-1)
    sims = vectors.to(table.device) @ table.T  # (n, V)
    top = sims.topk(min(k, sims.shape[1]), dim=-1)
    ids = top.indices.cpu()
    return Alignment(cosine=top.values.cpu(), token_ids=ids,
                     tokens=[[session.token_text(int(i)) for i in row] for row in ids], layout=made.layout)


def image_lens(session: Any, prompt: str, images: Any) -> tuple[torch.Tensor, ImagePositions]:
    """The logit lens at the image positions: ``(top1 (L, n) token ids, layout)`` -- at each layer's output, the
    vocabulary item each image token's residual stream reads as through the final norm and the unembedding."""
    if session.vision is None:
        raise InvalidArgument(f"image_lens needs a vision-language model; {session.model_id!r} is a text model")
    made = session.vision.prompt(prompt, images)
    sites = [f"blocks.{layer}.resid_post" for layer in range(session.info.n_layers)]
    acts = session.activations(prompt, sites, images=images)
    top = []
    with torch.no_grad():
        for site in sites:
            hidden = acts[site][made.layout.positions].to(session.device)  # (n, d)
            top.append(session.sites.logits(hidden).argmax(-1).cpu())  # (n,)
    return torch.stack(top), made.layout


@dataclass(frozen=True)
class ImageEffect:
    """What an intervention on an image prompt did to the next-token distribution."""

    token: str
    """The token followed (the unedited model's top prediction unless one was given)."""
    p_before: float
    p_after: float
    kl_bits: float
    """KL(edited ‖ unedited) of the whole next-token distribution, in bits."""

    @property
    def change(self) -> float:
        """p_after − p_before."""
        return self.p_after - self.p_before


def image_effect(session: Any, prompt: str, images: Any, *interventions: Any, token: str | int | None = None
                 ) -> ImageEffect:
    """The next token after ``prompt`` with ``images``, without and with ``interventions`` (e.g. AblatePatches):
    KL in bits and the probability of ``token`` (default: the unedited top token) before and after."""
    from labkit.core.tokens import token_id
    from labkit.measures.information import kl_divergence

    before = session.next_token(prompt, images=images).logprobs
    with session.intervene(*interventions):
        after = session.next_token(prompt, images=images).logprobs
    tid = int(before.argmax()) if token is None else token_id(session.tokenizer, token)
    return ImageEffect(token=session.token_text(tid), p_before=float(before[tid].exp()),
                       p_after=float(after[tid].exp()), kl_bits=float(kl_divergence(after, before, "bits")))
