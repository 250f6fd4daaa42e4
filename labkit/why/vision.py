"""Which part of the image a vision-language model's tokens came from, and what its image tokens read as.

- :func:`grounding`: the attention each generated token puts on the image tokens (per step, layer and head; from
  ``capture=["attention"]``), as fractions of the query row (they sum to the mass on the image, ≤ 1), and maps of it
  over each image's feature grid (:meth:`Grounding.map`, drawn over the image by :meth:`Grounding.plot`).
- :func:`attribute_image`: gradient attribution (saliency, input × gradient, integrated gradients with its
  completeness error) of a prediction to every token of an image prompt -- the image tokens' vectors where they enter
  the language model -- or to the pixels (families whose processor gives (images, 3, H, W) pixels).
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
from labkit.model.vlm import ImagePositions, attached, display_tokens


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
            reduce: str = "mean", view: int = 0) -> torch.Tensor:
        """Shape (rows, cols) of image ``image``'s feature grid: step ``step``'s attention on each cell, the
        ``reduce`` ("mean" | "sum" | "max") over the chosen ``layers`` and ``heads`` (default all). Cell (r, c) of
        image i is the token at ``layout`` (i, r, c); a cell a family's layout does not fill stays NaN. ``view`` 1:
        an Idefics3 image's global thumbnail."""
        if reduce not in ("mean", "sum", "max"):
            raise InvalidArgument(f"reduce must be 'mean', 'sum' or 'max'; got {reduce!r}")
        one = self.layout.of_image(image, view)
        pick = self._pick(step, layers, heads).flatten(0, 1)  # (L_sel·H_sel, n)
        values = {"mean": pick.mean(0), "sum": pick.sum(0), "max": pick.amax(0)}[reduce]  # (n,)
        keep = self.layout.mask(image, view)
        rows, cols = self.layout.grid_of(image, view)
        grid = torch.full((rows, cols), float("nan"))
        grid[one.row, one.col] = values[keep].float()
        return grid

    def plot(self, step: int, picture: Any, image: int = 0, layers: Sequence[int] | None = None,
             heads: Sequence[int] | None = None, reduce: str = "mean") -> Any:
        """:meth:`map` drawn over ``picture`` -- the image as the model saw it (``s.vision.view(made)``; the
        processor may have cropped it) -- a labelled figure with a colour bar in attention probability."""
        from labkit.records.figures import overlay

        grid = self.map(step, image, layers, heads, reduce)
        what = "all layers" if layers is None else f"layers {list(layers)}"
        return overlay(picture, grid, colorbar=f"attention probability ({reduce} over heads and layers)",
                       title=f"step {step % self.mass.shape[0]} {self.tokens[step]!r}:\nattention on image {image} "
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


@dataclass
class ImageAttribution:
    """Gradient attribution of one prediction over an image prompt."""

    attribution: Any
    """The :class:`labkit.why.attribution.Attribution` over every position of the prompt (image tokens as
    ``<img i:r,c>``): its scores with ``to="tokens"``; with ``to="pixels"`` they are 0 and :attr:`pixels` holds
    the scores (its ``value``, ``completeness_error`` and labels hold for both)."""
    layout: ImagePositions
    pixels: torch.Tensor | None = None
    """``to="pixels"``: shape (images, H, W), each pixel's score summed over its colour channels (the processor's
    resolution); else None."""

    def map(self, image: int = 0, view: int = 0) -> torch.Tensor:
        """Shape (rows, cols): the scores of image ``image``'s tokens on its feature grid (``to="tokens"``; ``view``
        1: an Idefics3 image's global thumbnail)."""
        one = self.layout.of_image(image, view)
        rows, cols = self.layout.grid_of(image, view)
        grid = torch.full((rows, cols), float("nan"))
        scores = torch.tensor(self.attribution.scores)
        grid[one.row, one.col] = scores[one.positions].float()
        return grid

    def plot(self, picture: Any, image: int = 0) -> Any:
        """The token map (or the pixel scores) over ``picture`` (the model's view, ``s.vision.view(made)``), signed
        scores on a diverging colour map centred on 0."""
        from labkit.records.figures import overlay

        a = self.attribution
        values = self.pixels[image] if self.pixels is not None else self.map(image)
        where = "pixels" if self.pixels is not None else "image tokens"
        return overlay(picture, values, colorbar=f"{a.method} ({a.unit})", alpha=0.6,
                       title=f"{a.method} of {a.label}\nover image {image}'s {where}")


def attribute_image(session: Any, prompt: str, images: Any, target: str | int | None = None, *,
                    foil: str | int | None = None, method: str = "ig", to: str = "tokens", quantity: str = "prob",
                    steps: int = 64, max_steps: int = 512, tolerance: float = 0.01, baseline: str = "black"
                    ) -> ImageAttribution:
    """Why the model predicts ``target`` (default: its top token) after ``prompt`` with ``images``.

    ``to="tokens"``: one score per prompt position, with respect to the vectors entering the language model
    (``blocks.0.resid_pre``: text embeddings and projected image features alike); the model's own forward runs (vision
    tower, M-RoPE, masks), with that input replaced by the point of the path. ``to="pixels"``: with respect to the
    pixel values (LLaVA, Gemma 3). ``method`` "saliency" | "input_x_gradient" | "ig"; IG's path starts from
    ``baseline``: "black" (the features or pixels of all-black images of the same size; text positions keep their
    own embeddings, so only the images are attributed) or "zero"; its completeness error is reported, and its rule
    refined (labkit's adaptive IG) until the error is under ``tolerance`` or ``max_steps`` points are used."""
    from PIL import Image

    from labkit.core.errors import check_int, invalid_choice
    from labkit.core.tokens import token_id
    from labkit.why.attribution import Attribution, check_quantity

    for name, value, allowed in (("method", method, ("saliency", "input_x_gradient", "ig")),
                                 ("to", to, ("tokens", "pixels")), ("baseline", baseline, ("black", "zero"))):
        if value not in allowed:
            raise invalid_choice(name, value, allowed)
    check_quantity(quantity)
    check_int("steps", steps, 2, 4096)
    if session.vision is None:
        raise InvalidArgument(f"attribute_image needs a vision-language model; {session.model_id!r} is a text model")
    made = session.vision.prompt(prompt, images)
    if to == "pixels" and made.pixels["pixel_values"].ndim != 4:
        raise InvalidArgument(f"to='pixels' needs (images, 3, H, W) pixel values; the {session.vision.family} "
                              "processor flattens patches or splits images into tiles: use to='tokens'")
    black = session.vision.prompt(prompt, [Image.new("RGB", p.size) for p in made.images])  # all-black, same sizes
    ids, model = made.ids.to(session.device), session.model
    with session.exclusive(), torch.no_grad(), session.sites.read(["blocks.0.resid_pre"]) as seen:
        with attached(model, session.vision, black):
            model(input_ids=ids, logits_to_keep=1)  # seen[0]: the black images' vectors
        with attached(model, session.vision, made):
            own = model(input_ids=ids, logits_to_keep=1).logits[:, -1]  # seen[1]: the images'
    target_id = int(own[0].argmax()) if target is None else token_id(session.tokenizer, target)
    foil_id = None if foil is None else token_id(session.tokenizer, foil)
    goal = _Goal(target_id, foil_id, quantity)
    with session.exclusive(), attached(model, session.vision, made):
        if to == "tokens":
            x, x0, f = _token_path(session, ids, [t[0] for t in seen["blocks.0.resid_pre"]], made, baseline, goal)
        else:
            x, x0, f = _pixel_path(session, ids, made, black, baseline, goal)
        scores, value, extra = _integrate(session, f, x, x0, goal.of(own), method, steps, max_steps, tolerance,
                                          ids.shape[1])
    if method == "ig":
        extra["baseline"] = baseline
    pixels = made.pixels["pixel_values"]
    attribution = Attribution(tokens=display_tokens(session.token_text, made.ids, made),
                              token_ids=made.ids[0].tolist(),
                              scores=scores.tolist() if to == "tokens" else [0.0] * ids.shape[1], method=method,
                              target=session.token_text(target_id), target_id=target_id, position=ids.shape[1] - 1,
                              quantity=quantity, value=value, foil=None if foil_id is None else
                              session.token_text(foil_id), foil_id=foil_id, **extra)
    return ImageAttribution(attribution=attribution, layout=made.layout,
                            pixels=scores.reshape(pixels.shape[0], *pixels.shape[2:]) if to == "pixels" else None)


@dataclass(frozen=True)
class _Goal:
    """What is attributed: the target's quantity (minus the foil's) at the last position."""

    target: int
    foil: int | None
    quantity: str

    def of(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) last-position logits -> (B,)."""
        from labkit.why.attribution import quantity_of

        return quantity_of(logits.float(), self.target, self.foil, self.quantity)


def _token_path(session: Any, ids: torch.Tensor, seen: list[torch.Tensor], made: Any, baseline: str, goal: _Goal
                ) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(x, x0, f) for attribution to the vectors entering the language model: f runs the model with
    ``blocks.0.resid_pre`` replaced by the point (B, T, d)."""
    dark, x = seen[0][None].detach(), seen[1][None].detach()
    x0 = dark if baseline == "black" else torch.where(_image_mask(made, x), torch.zeros_like(x), x)

    def f(points: torch.Tensor) -> torch.Tensor:
        with session.sites.edit({"blocks.0.resid_pre": lambda value, positions: points}):
            return goal.of(session.model(input_ids=ids.expand(points.shape[0], -1), logits_to_keep=1).logits[:, -1])

    return x, x0, f


def _pixel_path(session: Any, ids: torch.Tensor, made: Any, black: Any, baseline: str, goal: _Goal
                ) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(x, x0, f) for attribution to the pixels (images, 3, H, W), laid out as (1, images·H·W, 3) so that a
    position's score sums its channels."""
    pixels = made.pixels["pixel_values"]
    n, c, h, w = pixels.shape

    def laid(values: torch.Tensor) -> torch.Tensor:
        return values.to(session.device, session.model.dtype).permute(0, 2, 3, 1).reshape(1, n * h * w, c)

    x = laid(pixels)
    x0 = torch.zeros_like(x) if baseline == "zero" else laid(black.pixels["pixel_values"])

    def f(points: torch.Tensor) -> torch.Tensor:
        values = points.reshape(points.shape[0] * n, h, w, c).permute(0, 3, 1, 2)
        return goal.of(session.model(input_ids=ids.expand(points.shape[0], -1), pixel_values=values,
                                     logits_to_keep=1).logits[:, -1])

    return x, x0, f


def _integrate(session: Any, f: Any, x: torch.Tensor, x0: torch.Tensor, own: torch.Tensor, method: str, steps: int,
               max_steps: int, tolerance: float, length: int) -> tuple[torch.Tensor, float, dict[str, Any]]:
    """(scores (positions,), f at the input, IG's extra fields): the path's function checked against the model's
    own value first (refused when they differ)."""
    from labkit.core.memory import Shape, backward_bytes, pieces
    from labkit.why.attribution import GRADIENT_METHODS, adaptive_ig

    batch = pieces(steps, backward_bytes(Shape.of(session.model), length), 0, f"{method} attribution of an image "
                   "prompt", session.device, "use a shorter prompt or method='saliency'")
    with torch.inference_mode(False), torch.enable_grad():
        with torch.no_grad():
            value, base_value = (float(v) for v in f(torch.cat([x, x0])))
        if abs(value - float(own[0])) > 1e-3 * max(1.0, abs(float(own[0]))):
            raise InvalidArgument(f"the attributed function gives {value:.6g} at the input, the model "
                                  f"{float(own[0]):.6g}: this model's image path is not one labkit follows")
        if method != "ig":
            return GRADIENT_METHODS[method](f, x.clone().requires_grad_()).detach().float(), value, {}
        scores, used = adaptive_ig(f, x, x0, steps, max_steps, tolerance, batch, (base_value, value))
    gap = value - base_value
    error = abs(float(scores.double().sum()) - gap) / abs(gap) if gap else float("inf")
    return scores, value, {"baseline_value": base_value, "completeness_error": error, "steps": used}


def _image_mask(made: Any, x: torch.Tensor) -> torch.Tensor:
    """Shape (1, T, 1): True at the image tokens."""
    mask = torch.zeros(1, x.shape[1], 1, dtype=torch.bool, device=x.device)
    mask[0, made.layout.positions.to(x.device)] = True
    return mask
