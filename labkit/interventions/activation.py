"""Activation-level interventions (what TransformerLens and nnsight users expect), on any architecture labkit has
an adapter for: hooks at the documented sites of :mod:`labkit.model.hooks`, switched on only inside a scope."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from labkit.core.errors import InvalidArgument
from labkit.interventions.base import ActivationIntervention
from labkit.model.hooks import MODEL_SITES, module_named, sites_of

DEFAULT_REFERENCE = ("The museum opened its doors at nine in the morning. Visitors walked slowly through the halls, "
                     "reading the small cards beside each painting and talking quietly.")
"""The reference text whose mean head output AblateHead(mode="mean") uses when none is given."""


@torch.no_grad()
def read_sites(session: Any, prompt: str, names: list[str]) -> dict[str, torch.Tensor]:
    """{site name: its value in one forward pass over ``prompt``} (batch dim dropped: (T, ...)), detached."""
    ids = session.encode(prompt)
    with sites_of(session.model).read(names) as seen:
        session.model(input_ids=ids, logits_to_keep=1)
    return {name: values[0][0] for name, values in seen.items()}


class AblateHead(ActivationIntervention):
    """Remove one attention head's contribution: its slice of the attention output (site ``blocks.L.attn.z``) is
    set to zero (``"zero"``) or to its mean over the positions of a reference text (``"mean"``) before the output
    projection."""

    def __init__(self, layer: int, head: int, mode: str = "zero", reference: str | None = None) -> None:
        if mode not in ("zero", "mean"):
            raise InvalidArgument(f"mode must be 'zero' or 'mean'; got {mode!r}")
        self.layer, self.head, self.mode, self.reference = layer, head, mode, reference
        self._fill: torch.Tensor | None = None

    def bind(self, session: Any) -> None:
        sites = sites_of(session.model)
        self.layer = sites.check_layer(self.layer)
        self.head = sites.check_head(self.head)
        if self.mode == "mean":
            z = read_sites(session, self.reference or DEFAULT_REFERENCE, [self._site])[self._site]  # (T, H, D)
            self._fill = z[:, self.head].mean(0)  # (D,)

    @property
    def _site(self) -> str:
        return f"blocks.{self.layer}.attn.z"

    def attach(self, model: Any) -> list[Any]:
        head, fill = self.head, self._fill

        def ablate(z: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            z = z.clone()  # (B, T, H, D)
            z[..., head, :] = 0.0 if fill is None else fill.to(z.dtype)
            return z

        return sites_of(model).hook(self._site, ablate)

    def __repr__(self) -> str:
        return f"AblateHead(layer={self.layer}, head={self.head}, mode={self.mode!r})"


class Steer(ActivationIntervention):
    """Add ``scale · vector`` to the residual stream after decoder block ``layer`` (site ``blocks.L.resid_post``),
    at every position."""

    def __init__(self, layer: int, vector: torch.Tensor, scale: float = 1.0) -> None:
        if not isinstance(vector, torch.Tensor) or vector.ndim != 1:
            raise InvalidArgument(f"vector must be a 1-D tensor of the model's hidden size; got "
                                  f"{tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector)}")
        if not bool(torch.isfinite(vector).all()):
            raise InvalidArgument(f"Steer vector must be finite; it has {int((~torch.isfinite(vector)).sum())} "
                                  "NaN or infinite entries")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not torch.isfinite(torch.tensor(scale)):
            raise InvalidArgument(f"scale must be a finite number; got {scale!r}")
        self.layer, self.vector, self.scale = layer, vector, float(scale)

    def bind(self, session: Any) -> None:
        sites = sites_of(session.model)
        self.layer = sites.check_layer(self.layer)
        if self.vector.shape[0] != sites.d_model:
            raise InvalidArgument(f"vector must have the model's hidden size {sites.d_model}; got "
                                  f"{self.vector.shape[0]}")

    def attach(self, model: Any) -> list[Any]:
        p = next(model.parameters())
        delta = (self.scale * self.vector.float()).to(device=p.device)

        def steer(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return hidden + delta.to(hidden.dtype)

        return sites_of(model).hook(f"blocks.{self.layer}.resid_post", steer)

    def __repr__(self) -> str:
        return f"Steer(layer={self.layer}, scale={self.scale:g}, |vector|={float(self.vector.norm()):.3g})"


def residual(session: Any, prompt: str, layer: int) -> torch.Tensor:
    """Shape (T, d_model): the residual stream after decoder block ``layer`` for ``prompt``, float32."""
    site = f"blocks.{sites_of(session.model).check_layer(layer)}.resid_post"
    return read_sites(session, prompt, [site])[site].float()


def steering_vector(session: Any, positive: str, negative: str, layer: int) -> torch.Tensor:
    """Shape (d_model,): mean residual activation after ``layer`` over the positions of ``positive`` minus the same
    for ``negative`` (a difference-of-means steering vector)."""
    return residual(session, positive, layer).mean(0) - residual(session, negative, layer).mean(0)


class Patch(ActivationIntervention):
    """Activation patching: at the given token positions, the residual stream after decoder block ``layer`` is
    replaced by its value in a run on ``source_prompt``. Positions count from 0 in the sequence (negative ones
    from the end of the source prompt); any forward pass that computes such a position is patched."""

    def __init__(self, source_prompt: str, layer: int, positions: int | Sequence[int]) -> None:
        if not isinstance(source_prompt, str) or not source_prompt:
            raise InvalidArgument(f"source_prompt must be a non-empty string; got {source_prompt!r}")
        self.source_prompt, self.layer = source_prompt, layer
        self.positions = [positions] if isinstance(positions, int) else list(positions)
        if not self.positions or any(isinstance(p, bool) or not isinstance(p, int) for p in self.positions):
            raise InvalidArgument(f"positions must be an int or a non-empty list of ints; got {positions!r}")
        self._source: torch.Tensor | None = None

    def bind(self, session: Any) -> None:
        src = residual(session, self.source_prompt, self.layer)  # (Ts, d_model)
        self.layer = sites_of(session.model).check_layer(self.layer)
        n = src.shape[0]
        bad = [p for p in self.positions if not -n <= p < n]
        if bad:
            raise InvalidArgument(f"positions {bad} are outside the source prompt's {n} tokens")
        self._pos = sorted({p % n for p in self.positions})
        self._source = src

    def attach(self, model: Any) -> list[Any]:
        src, wanted = self._source, torch.tensor(self._pos)

        def patch(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
            hit = torch.isin(positions, wanted)  # (t,)
            if not bool(hit.any()):
                return None
            hidden = hidden.clone()
            idx = hit.nonzero().flatten()
            hidden[:, idx.to(hidden.device)] = src[positions[idx]].to(hidden.dtype).to(hidden.device)
            return hidden

        return sites_of(model).hook(f"blocks.{self.layer}.resid_post", patch)

    def __repr__(self) -> str:
        return f"Patch({self.source_prompt!r}, layer={self.layer}, positions={self.positions})"


class ActivationHook(ActivationIntervention):
    """Any hook, nnsight-style, at a site name or a module path.

    - A site name (``"blocks.3.resid_post"``, ``"embed"``..., see :mod:`labkit.model.hooks`): ``fn(value, positions) ->
      value | None`` with the site's documented shape.
    - Any other name is a module path of the model (``model.named_modules()``): ``fn`` is a plain PyTorch forward
      hook ``fn(module, inputs, output) -> output | None``.
    """

    def __init__(self, module: str, fn: Callable[..., Any]) -> None:
        if not isinstance(module, str) or not module:
            raise InvalidArgument(f"module must be a site name or a module path; got {module!r}")
        if not callable(fn):
            raise InvalidArgument(f"fn must be a callable; got {fn!r}")
        self.module, self.fn = module, fn

    @property
    def is_site(self) -> bool:
        """True when ``module`` is a hook-site name (``blocks.L...``, ``embed``, ``final_norm``), False for a module
        path."""
        return self.module.startswith("blocks.") or self.module in MODEL_SITES

    def bind(self, session: Any) -> None:
        if self.is_site:
            sites_of(session.model).resolve(self.module)
        else:
            module_named(session.model, self.module)

    def attach(self, model: Any) -> list[Any]:
        if self.is_site:
            return sites_of(model).hook(self.module, self.fn)
        return [module_named(model, self.module).register_forward_hook(self.fn)]

    def __repr__(self) -> str:
        return f"ActivationHook({self.module!r}, {getattr(self.fn, '__name__', 'fn')})"


@torch.no_grad()
def head_importance(session: Any, reference: str | None = None) -> torch.Tensor:
    """Shape (L, H): each head's mean output norm ‖W_O,h z_h‖ over the positions of ``reference`` — how much the
    head writes into the residual stream (one forward pass; each head's output through its block's own output
    projection)."""
    sites = sites_of(session.model)
    names = [f"blocks.{layer}.attn.z" for layer in range(sites.n_layers)]
    z = read_sites(session, reference or DEFAULT_REFERENCE, names)  # each (T, H, D)
    return torch.stack([sites.head_outputs(layer, z[name]).float().norm(dim=-1).mean(0)  # (H,)
                        for layer, name in enumerate(names)])


# -- patching sweep ------------------------------------------------------------------------------------------

@dataclass
class PatchingSweep:
    """How much of the clean run's target logit (difference) each (layer, position) patch recovers."""

    recovered: torch.Tensor
    """Shape (L, T): (patched − corrupt) / (clean − corrupt) of the metric; 1 = fully recovered."""
    tokens: list[str]
    """Shape (T,): the corrupt prompt's tokens."""
    clean: float
    corrupt: float
    """The metric (target logit, or target − other logit) on the clean and the corrupt prompt."""

    def image(self, size: int = 480) -> Any:
        """The map as a :class:`labkit.records.figures.Picture`: rows are layers (0 at the top), columns the corrupt
        prompt's tokens, colour the fraction recovered on a diverging scale centred on 0 (red = recovered, blue =
        pushed further towards the corrupt answer)."""
        from labkit.records.figures import heatmap

        layers, _ = self.recovered.shape
        bound = max(1.0, float(self.recovered.abs().max()))
        return heatmap(self.recovered, size=size, vmin=-bound, vmax=bound, cmap="RdBu_r",
                       x_labels=self.tokens, y_labels=list(range(layers)),
                       xlabel="position patched (corrupt prompt's token)", ylabel="layer patched (resid_post)",
                       colorbar="fraction of the logit difference recovered",
                       title="activation patching: clean residual stream into the corrupt run")

    def to_pandas(self) -> Any:
        """``recovered`` as a DataFrame: one row per layer, one column per position (``i:token``)."""
        import pandas as pd

        return pd.DataFrame(self.recovered.numpy(), columns=[f"{i}:{t}" for i, t in enumerate(self.tokens)])


@torch.no_grad()
def patching_sweep(session: Any, clean: str, corrupt: str, target_token: str | int,
                   other_token: str | int | None = None) -> PatchingSweep:
    """Patch every layer's residual stream at every position from ``clean`` into ``corrupt`` (one batched forward
    per layer) and measure the recovered metric at the last position: the logit of ``target_token``, or its
    difference to ``other_token``'s logit."""
    from labkit.core.tokens import token_id

    model = session.model
    ci, xi = session.encode(clean), session.encode(corrupt)
    if ci.shape != xi.shape:
        raise InvalidArgument(f"clean and corrupt must have the same number of tokens; got {ci.shape[1]} and "
                              f"{xi.shape[1]}")
    target = token_id(session.tokenizer, target_token)
    other = None if other_token is None else token_id(session.tokenizer, other_token)

    def metric(logits: torch.Tensor) -> torch.Tensor:  # logits (B, V) -> (B,)
        m = logits[:, target].float()
        return m - logits[:, other].float() if other is not None else m

    sites = sites_of(model)
    names = [f"blocks.{layer}.resid_post" for layer in range(sites.n_layers)]
    with sites.read(names) as seen:
        clean_m = float(metric(model(ci.to(model.device), logits_to_keep=1).logits[:, -1])[0])
    corrupt_m = float(metric(model(xi.to(model.device), logits_to_keep=1).logits[:, -1])[0])
    if abs(clean_m - corrupt_m) < 1e-6:
        raise InvalidArgument("clean and corrupt give the same metric for the target token: nothing to recover")
    t = ci.shape[1]
    batch = xi.repeat(t, 1).to(model.device)  # row i patches position i
    rows = torch.arange(t)
    out = torch.zeros(sites.n_layers, t)
    for layer, name in enumerate(names):
        src = seen[name][0][0]  # (T, d_model)

        def patch(hidden: torch.Tensor, positions: torch.Tensor, src: torch.Tensor = src) -> torch.Tensor:
            hidden = hidden.clone()  # (T rows, T, d_model)
            hidden[rows, rows] = src[rows].to(hidden.dtype)
            return hidden

        with sites.edit({name: patch}):
            patched = metric(model(batch, logits_to_keep=1).logits[:, -1]).cpu()  # only the last position is read
        out[layer] = (patched - corrupt_m) / (clean_m - corrupt_m)
    return PatchingSweep(out, [session.token_text(i) for i in xi[0].tolist()], clean_m, corrupt_m)
