"""Interventions on a vision-language prompt's image tokens: a grounding map tested rather than believed."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from labkit.core.errors import InvalidArgument
from labkit.interventions.base import ActivationIntervention
from labkit.model.hooks import sites_of
from labkit.model.vlm import attached

MODES = ("zero", "mean", "image")


class AblatePatches(ActivationIntervention):
    """Ablate image cells where they enter the language model (site ``blocks.0.resid_pre``, at the image tokens of
    the prompt being run): ``"zero"`` sets their vectors to 0, ``"mean"`` to the mean over that image's tokens,
    ``"image"`` to another image's vectors at the same cells (``source``: a PIL image, array or path; same grid).
    ``cells``: (row, col) pairs of image ``image``'s feature grid, or None for all of it (``view`` 1: an Idefics3
    image's global thumbnail). Only the passes over the prompt are edited; later tokens see the edited keys and
    values through the cache."""

    def __init__(self, cells: Sequence[tuple[int, int]] | None = None, image: int = 0, mode: str = "zero",
                 source: Any = None, view: int = 0) -> None:
        if mode not in MODES:
            raise InvalidArgument(f"mode must be one of {MODES}; got {mode!r}")
        if (mode == "image") != (source is not None):
            raise InvalidArgument("source= (another image) goes with mode='image', and only with it")
        if cells is not None:
            cells = [tuple(c) for c in cells]
            if not cells or any(len(c) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in c)
                                for c in cells):
                raise InvalidArgument(f"cells must be a non-empty list of (row, col) integer pairs or None; got "
                                      f"{cells!r}")
        self.cells, self.image, self.mode, self.source, self.view = cells, image, mode, source, view
        self._session: Any = None
        self._source_vectors: torch.Tensor | None = None

    def bind(self, session: Any) -> None:
        if session.vision is None:
            raise InvalidArgument(f"AblatePatches needs a vision-language model; {session.model_id!r} is a text model")
        self._session = weakref.ref(session)
        if self.mode == "image":  # the source's vectors entering the language model (the caller holds the model)
            made = session.vision.prompt("<image>", self.source)
            sites = sites_of(session.model)
            with torch.no_grad(), attached(session.model, session.vision, made), \
                    sites.read(["blocks.0.resid_pre"]) as seen:
                session.model(input_ids=made.ids.to(session.device), logits_to_keep=1)
            self._source_vectors = seen["blocks.0.resid_pre"][0][0, made.layout.positions]  # (n_src, d)
            self._source_layout = made.layout

    def _targets(self, layout: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions to edit, their index among the image's tokens) for the prompt's ``layout``."""
        one = layout.of_image(self.image, self.view)
        rows, cols = layout.grid_of(self.image, self.view)
        if self.cells is None:
            keep = torch.ones(len(one), dtype=torch.bool)
        else:
            bad = [c for c in self.cells if not (0 <= c[0] < rows and 0 <= c[1] < cols)]
            if bad:
                raise InvalidArgument(f"cells {bad} are outside image {self.image}'s {rows} × {cols} grid")
            wanted = {(r, c) for r, c in self.cells}
            keep = torch.tensor([(r, c) in wanted for r, c in zip(one.row.tolist(), one.col.tolist(), strict=True)])
        return one.positions[keep], keep.nonzero().flatten()

    def attach(self, model: Any) -> list[Any]:
        def ablate(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
            session = self._session() if self._session is not None else None
            made = None if session is None else session.image_prompt
            if made is None:
                return None  # a pass with no image prompt (a text prompt, or a decoding step)
            targets, index = self._targets(made.layout)
            hit = torch.isin(positions, targets)
            if not bool(hit.any()):
                return None
            columns = hit.nonzero().flatten().to(hidden.device)
            hidden = hidden.clone()  # (B, t, d)
            if self.mode == "zero":
                hidden[:, columns] = 0.0
            elif self.mode == "mean":
                everything = made.layout.of_image(self.image, self.view).positions
                cols = torch.isin(positions, everything).nonzero().flatten().to(hidden.device)
                hidden[:, columns] = hidden[:, cols].mean(1, keepdim=True)
            else:
                if self._source_layout.grid_of(0, self.view) != made.layout.grid_of(self.image, self.view):
                    raise InvalidArgument(f"the source image's grid {self._source_layout.grid_of(0, self.view)} "
                                          f"differs from image {self.image}'s "
                                          f"{made.layout.grid_of(self.image, self.view)}: resize it to match")
                source = self._source_layout.mask(0, self.view).nonzero().flatten()[index]  # the same cells
                hidden[:, columns] = self._source_vectors[source].to(hidden.device, hidden.dtype)
            return hidden

        return sites_of(model).hook("blocks.0.resid_pre", ablate)

    def __repr__(self) -> str:
        cells = "all" if self.cells is None else self.cells
        return f"AblatePatches(cells={cells}, image={self.image}, mode={self.mode!r})"
