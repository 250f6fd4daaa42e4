"""Activations: the tensors at named hook sites of one forward pass (TransformerLens' ``run_with_cache``, nnsight's
``.save()``), savable as safetensors, and the per-Step recorder ``generate(capture=[site, ...])`` uses.

Site names and shapes are those of :mod:`labkit.model.hooks` (``embed``, ``blocks.L.resid_pre``, ``blocks.L.attn.z``,
``blocks.L.attn_out``, ``blocks.L.mlp_out``, ``blocks.L.resid_post``, ``final_norm``); one prompt, so the batch
dimension is dropped: (T, d_model), or (T, H, d_head) for ``attn.z``. Tensors are kept in the model's dtype, on the
CPU, detached.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from labkit.core.errors import ActivationsFormatError, InvalidArgument
from labkit.core.files import atomic_path
from labkit.model.hooks import Sites

FORMAT = "labkit-activations-1"


def check_site_names(sites: Sites, names: Any, what: str = "sites") -> tuple[str, ...]:
    """``names`` as a tuple of valid, distinct site names (InvalidArgument naming ``what`` otherwise)."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise InvalidArgument(f"{what} must be a non-empty list of site names such as ['blocks.0.resid_post']; "
                              f"got {names!r}")
    for name in names:
        sites.resolve(name)  # an unknown name is refused with the close ones
    if len(set(names)) != len(names):
        raise InvalidArgument(f"{what} names a site twice: {list(names)!r}")
    return tuple(names)


@dataclass
class Activations:
    """Named activations of one prompt: ``acts["blocks.3.resid_post"]`` is a tensor of shape (T, d_model)
    (``blocks.L.attn.z``: (T, H, d_head)); ``acts.tokens`` the T token texts. ``save``/``load`` round-trip bit
    for bit (safetensors); ``to_pandas()`` gives the L2 norm of every site at every position."""

    tensors: dict[str, torch.Tensor]
    tokens: list[str]
    token_ids: list[int]
    prompt: str = ""
    model: str = ""
    meta: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise InvalidArgument(f"no activations for site {name!r}; this result holds {list(self.tensors)}")
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in list(self.tensors.items())[:4])
        more = f", … {len(self.tensors) - 4} more" if len(self.tensors) > 4 else ""
        return f"Activations({len(self.tokens)} tokens; {shapes}{more})"

    def to_pandas(self) -> Any:
        """One row per site and position: site, layer (None for embed/final_norm), position, token, norm (the L2
        norm of the site's vector at that position, all heads together for ``attn.z``; in activation units). Image-side
        sites of a vision-language model are left out (their rows are patches)."""
        import pandas as pd

        rows = []
        for name, value in self.tensors.items():
            if _image_side(name):  # rows of patches, not of the prompt's tokens: read the tensor itself
                continue
            parts = name.split(".")
            layer = int(parts[1]) if parts[0] == "blocks" else None
            norms = value.float().flatten(1).norm(dim=-1).tolist()  # (T,)
            rows += [{"site": name, "layer": layer, "position": p, "token": self.tokens[p], "norm": n}
                     for p, n in enumerate(norms)]
        return pd.DataFrame(rows)

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (atomically): the tensors as they are, the tokens and prompt in its metadata."""
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "tokens": json.dumps(self.tokens), "token_ids": json.dumps(self.token_ids),
                "prompt": self.prompt, "model": self.model, "meta": json.dumps(self.meta)}
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Activations:
        """Read a file written by :meth:`save` (ActivationsFormatError for anything else)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        except (OSError, ValueError, SafetensorError) as e:
            raise ActivationsFormatError(f"cannot read activations from {str(path)!r}: {e}") from e
        if meta.get("format") != FORMAT:
            raise ActivationsFormatError(f"{str(path)!r} is not a labkit activations file "
                                         f"(format {meta.get('format')!r})")
        return cls(tensors=tensors, tokens=json.loads(meta["tokens"]), token_ids=json.loads(meta["token_ids"]),
                   prompt=meta.get("prompt", ""), model=meta.get("model", ""), meta=json.loads(meta.get("meta", "{}")))


def run_with_cache(sites: Sites, ids: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """One forward pass over ``ids`` (1, T); ``{site: tensor}`` of each named site without its batch dimension
    ((T, d_model) or (T, H, d_head)), detached, on the CPU; a vision-language model's image-side sites
    (``vision.blocks.L``, ``projector``) keep their first dimension, the images (or tiles). The caller holds the
    model (no lock here)."""
    with torch.inference_mode(), sites.read(names) as seen:
        sites.model(input_ids=ids, logits_to_keep=1)
    return {name: (seen[name][0] if _image_side(name) else seen[name][0][0]).cpu() for name in names}


def _image_side(name: str) -> bool:
    return name == "projector" or name.startswith("vision.")


class SiteRecorder:
    """Keeps the sites ``names`` of the newest forward pass (the loop's target pass): ``clear()`` before it,
    ``rows(n)`` after it -> for each of its last ``n`` positions, {site: vector} ((d_model,) or (H, d_head))."""

    def __init__(self, sites: Sites, names: Sequence[str]) -> None:
        self.sites, self.names = sites, tuple(names)
        self._seen: dict[str, list[torch.Tensor]] = {}

    @contextlib.contextmanager
    def recording(self) -> Iterator[SiteRecorder]:
        """Record the sites at every forward pass inside the ``with`` block; hooks removed on exit."""
        with self.sites.read(self.names) as seen:
            self._seen = seen
            yield self

    def clear(self) -> None:
        """Forget what was recorded so far (the loop calls it before each target pass)."""
        for kept in self._seen.values():
            kept.clear()

    def newest(self) -> dict[str, torch.Tensor]:
        """Each site over the newest pass: {site: (B, t, ...)} (taken before anything else runs the model)."""
        return {name: kept[-1] for name, kept in self._seen.items()}
