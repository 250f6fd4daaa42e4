"""Vision-language models: which positions of a prompt are image tokens, and where in which image each one sits.

A VLM's processor expands each image placeholder into one token per image feature (LLaVA: one per vision-tower
patch, row-major; Qwen2-VL: one per 2 × 2 block of patches after the merger). :func:`image_positions` maps the
prompt's image tokens back to ``(image, row, column)`` on that feature grid, per family, from the model's config
and the processor's outputs (Qwen2-VL's ``image_grid_thw``). An unsupported family gets one error naming the
supported ones. (Work in progress for issue 31: the Session does not take ``images=`` yet.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from labkit.core.errors import InvalidArgument, LabkitError


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
    """(rows, columns) of each image's feature grid."""

    def __len__(self) -> int:
        return int(self.positions.numel())


def family(config: object) -> str:
    """The VLM family of a transformers config (``"llava"``, ``"qwen2_vl"``); UnsupportedVLM otherwise."""
    name = getattr(config, "model_type", None)
    if name not in _LAYOUTS:
        raise UnsupportedVLM(f"labkit maps the image tokens of {', '.join(sorted(_LAYOUTS))} models; "
                             f"got model_type {name!r}")
    return name


def image_positions(config: object, input_ids: torch.Tensor,
                    image_grid_thw: torch.Tensor | None = None) -> ImagePositions:
    """The image tokens of ``input_ids`` (shape (T,) or (1, T)) with their image, row and column, for the family of
    ``config``. ``image_grid_thw`` (images, 3) is required for Qwen2-VL (the processor returns it)."""
    ids = input_ids.reshape(-1) if input_ids.dim() == 2 and input_ids.shape[0] == 1 else input_ids
    if ids.dim() != 1:
        raise InvalidArgument(f"input_ids must have shape (T,) or (1, T); got {tuple(input_ids.shape)}")
    return _LAYOUTS[family(config)](config, ids, image_grid_thw)


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


_LAYOUTS = {"llava": _llava, "qwen2_vl": _qwen2_vl}
