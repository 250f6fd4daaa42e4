"""Vision-language models: image prompts, which positions are image tokens, and where in which image each one sits.

A VLM's processor expands each image into one token per image feature (LLaVA: one per vision-tower patch,
row-major; Qwen2-VL: one per 2 × 2 block of patches after the merger, between vision-start and vision-end tokens;
Gemma 3: ``mm_tokens_per_image`` average-pooled cells between begin- and end-of-image tokens). labkit builds that
expansion itself, per family (:class:`Vision`), from the model's config and its image processor alone, so a prompt's
image tokens are known by construction: :func:`image_positions` maps them to ``(image, row, column)`` on each image's
feature grid. An unsupported family gets one error naming the supported ones.

The pixels reach the model through :func:`attached`: a pre-hook on the model that adds them (and the family's
per-pass inputs: Qwen2-VL's ``mm_token_type_ids``, Gemma 3's ``token_type_ids``) to every forward pass whose
``input_ids`` hold the prompt's image tokens -- the prefill of a generation, a scoring pass, a pass that reads
activations -- and to none of the one-token decoding passes after it (their keys and values of the image are in the
cache). Everything labkit does through the model (KV cache, captures, hook sites, interventions) therefore works on
image prompts unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from labkit.core.errors import InvalidArgument, LabkitError

MARK = "<image>"
MARK_TOKEN = "<image>"  # Idefics3's image token text (the same string as the mark)
"""Where an image goes in a prompt's text (one mark per image; with no mark the images come first)."""


class UnsupportedVLM(LabkitError):
    """The model is a vision-language family labkit does not map yet."""


@dataclass(frozen=True)
class ImagePositions:
    """The image tokens of one prompt. Shapes (n,) for n image tokens, in prompt order."""

    positions: torch.Tensor
    """Index of each image token in the prompt."""
    image: torch.Tensor
    """Which image (0-based, in prompt order) the token belongs to."""
    row: torch.Tensor
    """Row of the token's cell on its image's feature grid (0 at the top)."""
    col: torch.Tensor
    """Column of the token's cell (0 at the left)."""
    grids: tuple[tuple[int, int], ...]
    """(rows, columns) of each image's feature grid (Idefics3: the tiles' cells side by side)."""
    view: torch.Tensor | None = None
    """Tiled families (Idefics3, LLaVA-NeXT): 0 for a token of the tiles (the full-resolution grid), 1 for a token of
    the image's global thumbnail (its own grid, :attr:`thumbnail`), 2 for LLaVA-NeXT's end-of-row token after each
    row of the tiles' grid (``col`` = the row's width: not a cell); None elsewhere (all 0)."""
    thumbnail: tuple[int, int] | None = None
    """(rows, columns) of a tiled image's global thumbnail grid; None elsewhere."""

    def __len__(self) -> int:
        return int(self.positions.numel())

    def as_dict(self) -> dict[str, list[Any]]:
        """JSON-ready lists (what ``Trace.images`` holds; :meth:`from_dict` reads it back)."""
        out = {"positions": self.positions.tolist(), "image": self.image.tolist(), "row": self.row.tolist(),
               "col": self.col.tolist(), "grids": [list(g) for g in self.grids]}
        if self.view is not None:
            out.update(view=self.view.tolist(), thumbnail=list(self.thumbnail))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, list[Any]]) -> ImagePositions:
        """The layout :meth:`as_dict` wrote (a ``Trace.images`` record)."""
        tensor = {k: torch.tensor(data[k], dtype=torch.long) for k in ("positions", "image", "row", "col")}
        view = torch.tensor(data["view"], dtype=torch.long) if "view" in data else None
        thumbnail = tuple(data["thumbnail"]) if "thumbnail" in data else None
        return cls(**tensor, grids=tuple(tuple(g) for g in data["grids"]), view=view, thumbnail=thumbnail)

    def of_image(self, image: int, view: int = 0) -> ImagePositions:
        """The tokens of image ``image`` alone, on ``view`` (0: its grid; 1: an Idefics3 global thumbnail);
        InvalidArgument naming how many images and views there are."""
        if isinstance(image, bool) or not isinstance(image, int) or not 0 <= image < len(self.grids):
            raise InvalidArgument(f"image must be an integer in [0, {len(self.grids)}): the prompt holds "
                                  f"{len(self.grids)} images; got {image!r}")
        if view not in ((0, 1) if self.view is not None else (0,)):
            also = " or 1 (its global thumbnail)" if self.view is not None else ""
            raise InvalidArgument(f"view must be 0 (the image's grid){also}; got {view!r}")
        keep = self.mask(image, view)
        return ImagePositions(self.positions[keep], self.image[keep], self.row[keep], self.col[keep], self.grids,
                              None if self.view is None else self.view[keep], self.thumbnail)

    def mask(self, image: int, view: int = 0) -> torch.Tensor:
        """Shape (n,), bool: the tokens of image ``image`` on ``view``."""
        views = self.view if self.view is not None else torch.zeros_like(self.image)
        return (self.image == image) & (views == view)

    def grid_of(self, image: int, view: int = 0) -> tuple[int, int]:
        """(rows, columns) of image ``image``'s grid on ``view``."""
        return self.thumbnail if view == 1 else self.grids[image]


def is_vlm(config: object) -> bool:
    """Whether a transformers config is a vision-language model's (it has a vision tower)."""
    return getattr(config, "vision_config", None) is not None


def family(config: object) -> str:
    """The VLM family of a transformers config (``"gemma3"``, ``"idefics3"``, ``"llava"``, ``"qwen2_5_vl"``,
    ``"qwen2_vl"``); UnsupportedVLM otherwise."""
    name = getattr(config, "model_type", None)
    if name not in _LAYOUTS:
        raise UnsupportedVLM(f"labkit maps the image tokens of {', '.join(sorted(_LAYOUTS))} models; "
                             f"got model_type {name!r}")
    return name


def image_positions(config: object, input_ids: torch.Tensor, grid: Any = None) -> ImagePositions:
    """The image tokens of ``input_ids`` (shape (T,) or (1, T)) with their image, row and column, for the family of
    ``config``. ``grid``: Qwen2-VL's ``image_grid_thw`` (images, 3), Idefics3's tiles per image [(rows, cols), ...]
    ((0, 0): not split), as the processor returns them; None for the others."""
    ids = input_ids.reshape(-1) if input_ids.dim() == 2 and input_ids.shape[0] == 1 else input_ids
    if ids.dim() != 1:
        raise InvalidArgument(f"input_ids must have shape (T,) or (1, T); got {tuple(input_ids.shape)}")
    return _LAYOUTS[family(config)](config, ids, grid)


def _assemble(positions: torch.Tensor, grids: list[tuple[int, int]], per_image: list[int]) -> ImagePositions:
    """Split ``positions`` into consecutive blocks of ``per_image`` tokens, row-major on each image's grid."""
    if sum(per_image) != positions.numel():
        raise InvalidArgument(f"the prompt holds {positions.numel()} image tokens but the images need "
                              f"{sum(per_image)} ({per_image}): was the prompt made by this model's processor?")
    counts = torch.tensor(per_image, dtype=torch.long)
    image = torch.repeat_interleave(torch.arange(len(per_image)), counts)  # (n,)
    cols = torch.repeat_interleave(torch.tensor([c for _, c in grids], dtype=torch.long), counts)  # (n,)
    within = torch.arange(positions.numel()) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)  # (n,)
    return ImagePositions(positions, image, within // cols, within % cols, tuple(grids))


def _llava(config: object, ids: torch.Tensor, _: torch.Tensor | None) -> ImagePositions:
    """LLaVA: each image is (image_size / patch_size)² tokens, the vision tower's patches in row-major order (the
    CLS token dropped: ``vision_feature_select_strategy="default"``; kept as an extra first token with "full")."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    if getattr(config, "vision_feature_select_strategy", "default") == "full":
        raise UnsupportedVLM("LLaVA with vision_feature_select_strategy='full' (a CLS token per image) is not mapped")
    positions = (ids == config.image_token_index).nonzero().reshape(-1)
    count = positions.numel() // (side * side)
    return _assemble(positions, [(side, side)] * count, [side * side] * count)


def _paligemma(config: object, ids: torch.Tensor, _: Any) -> ImagePositions:
    """PaliGemma: each image is (image_size / patch_size)² SigLIP patch tokens, row-major, all images before the
    text."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    positions = (ids == config.image_token_index).nonzero().reshape(-1)
    count = positions.numel() // (side * side)
    return _assemble(positions, [(side, side)] * count, [side * side] * count)


def _qwen2_vl(config: object, ids: torch.Tensor, grid_thw: torch.Tensor | None) -> ImagePositions:
    """Qwen2-VL: image i is t·h·w patches merged in blocks of merge × merge, so (h / merge) × (w / merge) tokens per
    frame (``image_grid_thw[i] = (t, h, w)`` in patches), row-major."""
    if grid_thw is None:
        raise InvalidArgument("image_grid_thw is required for Qwen2-VL (the processor returns it with the pixels)")
    merge = config.vision_config.spatial_merge_size
    grids = [(int(h) // merge, int(w) // merge) for _, h, w in grid_thw.tolist()]
    per_image = [int(t) * r * c for (t, _, _), (r, c) in zip(grid_thw.tolist(), grids, strict=True)]
    positions = (ids == config.image_token_id).nonzero().reshape(-1)
    return _assemble(positions, grids, per_image)


def _gemma3(config: object, ids: torch.Tensor, _: torch.Tensor | None) -> ImagePositions:
    """Gemma 3: each image is ``mm_tokens_per_image`` tokens, the vision tower's patch grid average-pooled to
    √n × √n cells, row-major."""
    side = round(config.mm_tokens_per_image ** 0.5)
    positions = (ids == config.image_token_index).nonzero().reshape(-1)
    count = positions.numel() // (side * side)
    return _assemble(positions, [(side, side)] * count, [side * side] * count)


def _idefics3(config: object, ids: torch.Tensor, tiles: Any) -> ImagePositions:
    """Idefics3 (SmolVLM): an image split into R × C tiles is R·C blocks of s² tokens (s = the tower's patches per
    side / ``scale_factor``: pixel shuffle keeps them row-major), tile by tile row-major, then s² tokens of a global
    thumbnail; an image not split ((0, 0)) is the thumbnail alone, as its grid. The tiles' cells side by side make
    the image's (R·s) × (C·s) grid (view 0); the thumbnail's s × s grid is view 1."""
    if tiles is None:
        raise InvalidArgument("the tiles of each image ([(rows, cols), ...]) are required for Idefics3")
    vision = config.vision_config
    side = vision.image_size // vision.patch_size // config.scale_factor
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)  # (s²,): a tile's cells, row-major
    image, row, col, view, grids = [], [], [], [], []
    for i, (rows, cols) in enumerate(tiles):
        for tr in range(rows):
            for tc in range(cols):
                image.append(torch.full_like(r, i))
                row.append(tr * side + r)
                col.append(tc * side + c)
                view.append(torch.zeros_like(r))
        image.append(torch.full_like(r, i))
        row.append(r)
        col.append(c)
        view.append(torch.full_like(r, 1 if rows else 0))
        grids.append((rows * side, cols * side) if rows else (side, side))
    return _tiled(ids == config.image_token_id, image, row, col, view, grids, (side, side))


def _tiled(is_image: torch.Tensor, image: list[torch.Tensor], row: list[torch.Tensor], col: list[torch.Tensor],
           view: list[torch.Tensor], grids: list[tuple[int, int]], thumbnail: tuple[int, int]) -> ImagePositions:
    """A tiled family's layout from its per-block pieces (in prompt order), checked against the prompt's image
    tokens (``is_image`` (T,), bool)."""
    positions = is_image.nonzero().reshape(-1)
    n = sum(len(x) for x in image)
    if positions.numel() != n:
        raise InvalidArgument(f"the prompt holds {positions.numel()} image tokens but the images need {n}: was the "
                              "prompt made by this model's processor?")
    return ImagePositions(positions, torch.cat(image), torch.cat(row), torch.cat(col), tuple(grids),
                          torch.cat(view), thumbnail)


def _llava_next_grid(config: Any, size: Any) -> tuple[int, int]:
    """(rows, columns) of a LLaVA-NeXT image's tiles grid after the padding is cut off, for its original (height,
    width): the tiles of the best-fitting resolution side by side, unpadded (transformers' own functions)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    tiles_h, tiles_w = get_anyres_image_grid_shape(list(size), config.image_grid_pinpoints, vision.image_size)
    kept = unpad_image(torch.zeros(1, tiles_h * side, tiles_w * side), list(size))[0]
    return int(kept.shape[0]), int(kept.shape[1])


def _llava_next(config: object, ids: torch.Tensor, sizes: Any) -> ImagePositions:
    """LLaVA-NeXT: per image, the thumbnail's s × s patch tokens (s = image_size / patch_size; view 1), then the
    tiles of the best-fitting resolution side by side with the padding rows or columns cut off (transformers'
    ``unpad_image``), row by row, each row followed by an end-of-row token (view 2). ``sizes``: each image's
    original (height, width), as the processor's ``image_sizes``."""
    if getattr(config, "vision_feature_select_strategy", "default") == "full":
        raise UnsupportedVLM("LLaVA-NeXT with vision_feature_select_strategy='full' is not mapped")
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    r, c = (t.reshape(-1) for t in torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"))
    image, row, col, view, grids = [], [], [], [], []
    for i, size in enumerate(sizes):
        h, w = _llava_next_grid(config, size)
        rr, cc = (t.reshape(-1) for t in torch.meshgrid(torch.arange(h), torch.arange(w + 1), indexing="ij"))
        image += [torch.full_like(r, i), torch.full_like(rr, i)]
        row += [r, rr]
        col += [c, cc]
        view += [torch.ones_like(r), torch.where(cc == w, 2, 0)]
        grids.append((h, w))
    return _tiled(ids == config.image_token_index, image, row, col, view, grids, (side, side))


_LAYOUTS = {"llava": _llava, "llava_next": _llava_next, "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_vl,
            "gemma3": _gemma3, "idefics3": _idefics3, "paligemma": _paligemma}
_SAME_AS = {"qwen2_5_vl": "qwen2_vl"}  # a family whose prompts and inputs are another's (its tower differs)


# -- image prompts ---------------------------------------------------------------------------------------------

def load_images(images: Any) -> list[Any]:
    """``images`` (one or a list: PIL images, (H, W, 3) uint8 or [0, 1] float arrays, or file paths) as RGB PIL
    images; InvalidArgument naming the one that is none of these."""
    from PIL import Image

    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise InvalidArgument("images must hold at least one image (a PIL image, an array or a path)")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Image.Image):
            out.append(item.convert("RGB"))
        elif isinstance(item, (str, os.PathLike)):
            path = Path(item).expanduser()
            if not path.is_file():
                raise InvalidArgument(f"images[{i}]: no image file at {str(path)!r}")
            with Image.open(path) as opened:
                out.append(opened.convert("RGB"))
        elif hasattr(item, "shape") and len(item.shape) == 3 and item.shape[-1] in (3, 4):
            import numpy as np

            array = np.asarray(item)
            if array.dtype != np.uint8:
                if array.min() < 0 or array.max() > 1:
                    raise InvalidArgument(f"images[{i}]: a float array must hold values in [0, 1]; got "
                                          f"[{array.min():.3g}, {array.max():.3g}]")
                array = (array * 255).round().astype(np.uint8)
            out.append(Image.fromarray(array[..., :3]))
        else:
            raise InvalidArgument(f"images[{i}] must be a PIL image, an (H, W, 3) array or an image file path; got "
                                  f"{type(item).__name__}")
    return out


@dataclass(frozen=True)
class ImagePrompt:
    """A prompt with its images, ready for the model: the ids with each image expanded into its tokens, the
    pixels (and grids) the model takes with them, and where each image token sits."""

    ids: torch.Tensor
    """Shape (1, T): the prompt's token ids, image tokens included."""
    pixels: dict[str, torch.Tensor]
    """The model's image inputs for a pass over the prompt (``pixel_values``, Qwen2-VL's ``image_grid_thw``)."""
    layout: ImagePositions
    images: list[Any] = field(default_factory=list)
    """The RGB PIL images, in prompt order (as resized by nothing: what the user gave)."""
    tiles: list[tuple[int, int]] | None = None
    """Idefics3: (rows, columns) of tiles per image ((0, 0): not split); None elsewhere."""


class Vision:
    """The image side of one loaded VLM: its family, config, tokenizer and image processor. :meth:`prompt` makes an
    :class:`ImagePrompt`."""

    def __init__(self, config: Any, tokenizer: Any, image_processor: Any) -> None:
        self.family = family(config)
        self.kind = _SAME_AS.get(self.family, self.family)
        """The family whose prompt layout and per-pass inputs this one shares (Qwen2.5-VL: Qwen2-VL's)."""
        self.config, self.tokenizer, self.image_processor = config, tokenizer, image_processor
        self.image_token = {"llava": "image_token_index", "llava_next": "image_token_index",
                            "qwen2_vl": "image_token_id", "gemma3": "image_token_index",
                            "idefics3": "image_token_id", "paligemma": "image_token_index"}[self.kind]
        self.image_token_id = int(getattr(config, self.image_token))

    def __repr__(self) -> str:
        return f"Vision(family={self.family!r}, image_token_id={self.image_token_id})"

    def _expansion(self, index: int, pixels: dict[str, torch.Tensor], tiles: Any) -> list[int] | str:
        """What stands for image ``index`` in the prompt: token ids (the family's markers around its tokens), or
        for Idefics3 the text its processor writes (tile tokens, row/column tags, line breaks; tokenized with the
        prompt, so that the breaks merge as the processor's do)."""
        c = self.config
        if self.kind == "idefics3":
            side = c.vision_config.image_size // c.vision_config.patch_size // c.scale_factor
            image = MARK_TOKEN * side * side
            rows, cols = tiles[index]
            around = "<fake_token_around_image>"
            thumbnail = f"{around}<global-img>{image}{around}"
            if not rows:
                return thumbnail
            grid = "".join("".join(f"{around}<row_{r + 1}_col_{q + 1}>{image}" for q in range(cols)) + "\n"
                           for r in range(rows))
            return f"{grid}\n{thumbnail}"
        if self.kind in ("llava", "paligemma"):
            side = c.vision_config.image_size // c.vision_config.patch_size
            return [self.image_token_id] * side * side
        if self.kind == "llava_next":
            side = c.vision_config.image_size // c.vision_config.patch_size
            h, w = _llava_next_grid(c, pixels["image_sizes"][index].tolist())
            return [self.image_token_id] * (side * side + h * (w + 1))
        if self.kind == "qwen2_vl":
            t, h, w = (int(v) for v in pixels["image_grid_thw"][index])
            n = t * h * w // c.vision_config.spatial_merge_size ** 2
            return [c.vision_start_token_id, *[self.image_token_id] * n, c.vision_end_token_id]
        return [c.boi_token_index, *[self.image_token_id] * c.mm_tokens_per_image, c.eoi_token_index]

    def prompt(self, text: str, images: Any, chat: bool = False) -> ImagePrompt:
        """``text`` with ``images`` at its ``<image>`` marks (one per image, in order; no mark: the images first),
        the chat template applied when ``chat``. Each text segment is tokenized on its own (special tokens of the
        tokenizer only before the first), then each mark replaced by the image's tokens."""
        if self.image_processor is None or not callable(self.image_processor):
            raise InvalidArgument(f"this {self.family} model has no image processor: give it when loading "
                                  "(Session.from_model(model, tokenizer, image_processor=...), e.g. "
                                  "transformers.AutoImageProcessor.from_pretrained(folder))")
        pictures = load_images(images)
        marks = text.count(MARK)
        if marks not in (0, len(pictures)):
            raise InvalidArgument(f"the prompt has {marks} {MARK!r} marks for {len(pictures)} images; put one mark "
                                  f"where each image goes, or none to put the images first")
        if marks == 0:
            text = MARK * len(pictures) + text
        if chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        extra = {"return_row_col_info": True} if self.kind == "idefics3" else {}
        processed = self.image_processor(images=pictures, return_tensors="pt", **extra)
        pixels = {k: v for k, v in processed.items()
                  if k in ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")}
        tiles = ([(int(r), int(c)) for r, c in zip(processed["rows"][0], processed["cols"][0], strict=True)]
                 if self.kind == "idefics3" else None)
        pieces = text.split(MARK)
        if self.kind == "paligemma":  # as its processor: every image first, then BOS, the text and "\n"
            bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None and not chat else []
            ids = [*(t for i in range(len(pictures)) for t in self._expansion(i, pixels, tiles)), *bos,
                   *self.tokenizer("".join(pieces) + "\n", add_special_tokens=False).input_ids]
        elif self.kind == "idefics3":  # the processor's text, tokenized whole
            whole = pieces[0] + "".join(self._expansion(i, pixels, tiles) + piece
                                        for i, piece in enumerate(pieces[1:]))
            ids = self.tokenizer(whole, add_special_tokens=not chat).input_ids
        else:
            ids = []
            for i, segment in enumerate(pieces):
                if i > 0:
                    ids += self._expansion(i - 1, pixels, tiles)
                if segment or i == 0:
                    ids += self.tokenizer(segment, add_special_tokens=(i == 0 and not chat)).input_ids
        tensor = torch.tensor([ids], dtype=torch.long)
        grid = tiles if tiles is not None else pixels.get("image_grid_thw", pixels.get("image_sizes"))
        layout = image_positions(self.config, tensor, grid.tolist() if self.kind == "llava_next" else grid)
        return ImagePrompt(ids=tensor, pixels=pixels, layout=layout, images=pictures, tiles=tiles)

    def view(self, made: ImagePrompt, image: int = 0, view: int = 0) -> Any:
        """Image ``image`` of ``made`` as the model sees it, as a PIL image: the processor's pixels un-normalised
        (its resize and crop included: LLaVA's CLIP processor crops the centre square), or, where the processor
        flattens patches (Qwen2-VL, which resizes without cropping), the picture itself. Feature grids and pixel
        attributions are drawn over this. Idefics3: its tiles side by side (``view=0``) or its thumbnail (1)."""
        from PIL import Image

        pixels = made.pixels["pixel_values"]
        if pixels.ndim == 2:  # flattened patches
            return made.images[image]
        mean = torch.tensor(getattr(self.image_processor, "image_mean", None) or [0.0] * 3)[:, None, None]
        std = torch.tensor(getattr(self.image_processor, "image_std", None) or [1.0] * 3)[:, None, None]
        if pixels.ndim == 5 and self.kind == "llava_next":  # (images, thumbnail + tiles, 3, H, W)
            from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

            size = made.pixels["image_sizes"][image].tolist()
            rows, cols = get_anyres_image_grid_shape(size, self.config.image_grid_pinpoints,
                                                     self.config.vision_config.image_size)
            full = _side_by_side(pixels[image, 1:1 + rows * cols], rows, cols)  # (3, rows·S, cols·S) pixels
            patch = self.config.vision_config.patch_size
            cells = torch.arange(full.shape[1] // patch * (full.shape[2] // patch)).view(1, full.shape[1] // patch, -1)
            kept = unpad_image(cells, size)[0]  # the feature cells kept: cut the pixels at the same cell edges
            top, left = divmod(int(kept[0, 0]), cells.shape[2])
            h, w = kept.shape
            x = pixels[image, 0] if view == 1 else full[:, top * patch:(top + h) * patch,
                                                        left * patch:(left + w) * patch]
        elif pixels.ndim == 5:  # Idefics3: (1, tiles of every image, 3, H, W), each image's tiles then its thumbnail
            first = sum(r * c + 1 for r, c in made.tiles[:image])
            rows, cols = made.tiles[image]
            if view == 1 or not rows:
                x = pixels[0, first + rows * cols]  # the thumbnail
            else:
                x = _side_by_side(pixels[0, first:first + rows * cols], rows, cols)
        else:
            x = pixels[image]
        x = (x.float() * std + mean).clamp(0, 1)  # (3, H, W) in [0, 1]
        return Image.fromarray((x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())

    def per_pass(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inputs a pass over ``ids`` (B, t) takes beside the pixels: which tokens are image tokens, in the
        argument the family reads (Qwen2-VL's M-RoPE, Gemma 3's bidirectional image blocks, PaliGemma's
        bidirectional prefix)."""
        is_image = (ids == self.image_token_id).long()
        if self.kind == "qwen2_vl":
            return {"mm_token_type_ids": is_image.int()}
        if self.kind == "gemma3":
            return {"token_type_ids": is_image}
        if self.kind == "paligemma":  # the whole prompt is the prefix, attended bidirectionally
            return {"token_type_ids": torch.zeros_like(is_image)}
        return {}


@contextlib.contextmanager
def attached(model: Any, vision: Vision, prompt: ImagePrompt | None) -> Iterator[None]:
    """Inside the block, every forward pass of ``model`` whose ``input_ids`` hold image tokens gets ``prompt``'s
    pixels (repeated for each row of a batch) and the family's per-pass inputs; passes without image tokens run as
    they are. A pass whose rows do not hold exactly the prompt's image tokens is refused (they would be misplaced).
    Qwen2-VL keeps its M-RoPE offset on the model between passes: it is cleared on entry and exit (a later prompt
    never inherits it) and cut to one row after the prefill (a batch's rows share the prompt, and rows that end
    leave the batch)."""
    if prompt is None:
        yield
        return
    n = len(prompt.layout)
    inner = getattr(model, "model", None)

    def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        ids = kwargs.get("input_ids")
        if ids is None or not bool((ids == vision.image_token_id).any()):
            return None
        counts = (ids == vision.image_token_id).sum(1).tolist()
        if any(c != n for c in counts):
            raise InvalidArgument(f"a pass over ids with {counts} image tokens per row; the images need {n}")
        rows = ids.shape[0]
        extra = {k: torch.cat([v] * rows).to(ids.device, dtype=module.dtype if v.is_floating_point() else v.dtype)
                 for k, v in prompt.pixels.items()
                 if kwargs.get(k) is None}  # pixels the caller passes (attribution to pixels) are kept
        return args, {**kwargs, **extra, **vision.per_pass(ids)}

    def post(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        deltas = getattr(inner, "rope_deltas", None)
        if deltas is not None and deltas.shape[0] > 1:
            inner.rope_deltas = deltas[:1]

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True)]
    if hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if hasattr(inner, "rope_deltas"):
            inner.rope_deltas = None


def _side_by_side(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Tiles (rows·cols, 3, H, W), row-major -> one (3, rows·H, cols·W) picture."""
    return torch.cat([torch.cat(list(tiles[r * cols:(r + 1) * cols]), dim=-1) for r in range(rows)], dim=-2)


def display_tokens(token_text: Any, ids: torch.Tensor, made: ImagePrompt | None) -> list[str]:
    """Display texts of ``ids`` (1, T) by ``token_text``; the image tokens of ``made`` as ``<img i:r,c>`` (image i,
    row r, column c)."""
    texts = [token_text(i) for i in ids[0].tolist()]
    if made is not None:
        lay = made.layout
        views = (lay.view if lay.view is not None else torch.zeros_like(lay.image)).tolist()
        for p, i, r, c, v in zip(*(t.tolist() for t in (lay.positions, lay.image, lay.row, lay.col)), views,
                                 strict=True):
            where = f"{r},{c}" if v == 0 else f"g {r},{c}" if v == 1 else f"end of row {r}"
            texts[p] = f"<img {i}:{where}>"  # "g": a tiled image's global thumbnail
    return texts


def vision_of(model: Any, tokenizer: Any, image_processor: Any = None, folder: str | None = None) -> Vision | None:
    """The :class:`Vision` of a loaded model (None for a text model): ``image_processor`` as given, else the one
    saved in ``folder`` (read offline), else none (image prompts are then refused with the way to give one)."""
    if not is_vlm(model.config):
        return None
    if image_processor is None and folder is not None and Path(folder).is_dir():
        from transformers import AutoImageProcessor

        from labkit.model.models import offline

        try:
            with offline():
                image_processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise InvalidArgument(f"could not read the image processor of {folder!r}: {e}") from e
    return Vision(model.config, tokenizer, image_processor)
