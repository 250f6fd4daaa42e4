"""Activation-level interventions (what TransformerLens and nnsight users expect): forward hooks on a
Llama-style model, switched on only inside a scope. Residual activations are the outputs of decoder layers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from labkit.errors import InvalidArgument
from labkit.interventions.base import (
    ActivationIntervention,
    check_layer,
    decoder_layers,
    hidden_of,
    module_named,
    replace_output,
)

DEFAULT_REFERENCE = ("The museum opened its doors at nine in the morning. Visitors walked slowly through the halls, "
                     "reading the small cards beside each painting and talking quietly.")
"""The reference text whose mean head output AblateHead(mode="mean") uses when none is given."""


def _o_proj(model: Any, layer: int) -> torch.nn.Module:
    return module_named(model, f"model.layers.{layer}.self_attn.o_proj")


def _head_geometry(model: Any) -> tuple[int, int]:
    cfg = model.config
    n = cfg.num_attention_heads
    return n, getattr(cfg, "head_dim", None) or cfg.hidden_size // n


@torch.no_grad()
def _run_capturing(session: Any, ids: torch.Tensor, module: torch.nn.Module, pre: bool) -> torch.Tensor:
    """The input (``pre``) or output of ``module`` during one forward pass of ``ids``."""
    seen: list[torch.Tensor] = []
    if pre:
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    else:
        handle = module.register_forward_hook(lambda m, args, out: seen.append(hidden_of(out).detach()))
    try:
        session.model(ids.to(session.model.device))
    finally:
        handle.remove()
    return seen[0]


class AblateHead(ActivationIntervention):
    """Remove one attention head's contribution: its slice of the attention output is set to zero (``"zero"``) or
    to its mean over the positions of a reference text (``"mean"``) before the output projection ``o_proj``."""

    def __init__(self, layer: int, head: int, mode: str = "zero", reference: str | None = None) -> None:
        if mode not in ("zero", "mean"):
            raise InvalidArgument(f"mode must be 'zero' or 'mean'; got {mode!r}")
        self.layer, self.head, self.mode, self.reference = layer, head, mode, reference
        self._fill: torch.Tensor | None = None

    def bind(self, session: Any) -> None:
        self.layer = check_layer(session.model, self.layer)
        n, d = _head_geometry(session.model)
        if isinstance(self.head, bool) or not isinstance(self.head, int) or not 0 <= self.head < n:
            raise InvalidArgument(f"head must be an integer in [0, {n}): layer {self.layer} has {n} heads; got "
                                  f"{self.head!r}")
        self._slice = slice(self.head * d, (self.head + 1) * d)
        if self.mode == "mean":
            ids = session.encode(self.reference or DEFAULT_REFERENCE)
            x = _run_capturing(session, ids, _o_proj(session.model, self.layer), pre=True)  # (1, T, H·D)
            self._fill = x[0, :, self._slice].mean(0)  # (D,)

    def attach(self, model: Any) -> list[Any]:
        sl, fill = self._slice, self._fill

        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0].clone()
            x[..., sl] = 0.0 if fill is None else fill.to(x.dtype)
            return (x, *args[1:])

        return [_o_proj(model, self.layer).register_forward_pre_hook(hook)]

    def __repr__(self) -> str:
        return f"AblateHead(layer={self.layer}, head={self.head}, mode={self.mode!r})"


class Steer(ActivationIntervention):
    """Add ``scale · vector`` to the residual stream after decoder layer ``layer``, at every position."""

    def __init__(self, layer: int, vector: torch.Tensor, scale: float = 1.0) -> None:
        if not isinstance(vector, torch.Tensor) or vector.ndim != 1:
            raise InvalidArgument(f"vector must be a 1-D tensor of the model's hidden size; got "
                                  f"{tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector)}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not torch.isfinite(torch.tensor(scale)):
            raise InvalidArgument(f"scale must be a finite number; got {scale!r}")
        self.layer, self.vector, self.scale = layer, vector, float(scale)

    def bind(self, session: Any) -> None:
        self.layer = check_layer(session.model, self.layer)
        size = session.model.config.hidden_size
        if self.vector.shape[0] != size:
            raise InvalidArgument(f"vector must have the model's hidden size {size}; got {self.vector.shape[0]}")

    def attach(self, model: Any) -> list[Any]:
        layer = decoder_layers(model)[self.layer]
        p = next(model.parameters())
        delta = (self.scale * self.vector.float()).to(device=p.device, dtype=p.dtype)

        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            return replace_output(output, hidden_of(output) + delta)

        return [layer.register_forward_hook(hook)]

    def __repr__(self) -> str:
        return f"Steer(layer={self.layer}, scale={self.scale:g}, |vector|={float(self.vector.norm()):.3g})"


def residual(session: Any, prompt: str, layer: int) -> torch.Tensor:
    """Shape (T, hidden): the residual stream after decoder layer ``layer`` for ``prompt``, float32."""
    layer = check_layer(session.model, layer)
    out = _run_capturing(session, session.encode(prompt), decoder_layers(session.model)[layer], pre=False)
    return out[0].float()


def steering_vector(session: Any, positive: str, negative: str, layer: int) -> torch.Tensor:
    """Shape (hidden,): mean residual activation after ``layer`` over the positions of ``positive`` minus the same
    for ``negative`` (a difference-of-means steering vector)."""
    return residual(session, positive, layer).mean(0) - residual(session, negative, layer).mean(0)


class Patch(ActivationIntervention):
    """Activation patching: at the given token positions, the residual stream after decoder layer ``layer`` is
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
        self.layer = check_layer(session.model, self.layer)
        src = _run_capturing(session, session.encode(self.source_prompt), decoder_layers(session.model)[self.layer],
                             pre=False)[0]  # (Ts, hidden)
        n = src.shape[0]
        bad = [p for p in self.positions if not -n <= p < n]
        if bad:
            raise InvalidArgument(f"positions {bad} are outside the source prompt's {n} tokens")
        self._pos = sorted({p % n for p in self.positions})
        self._source = src

    def attach(self, model: Any) -> list[Any]:
        src, wanted = self._source, torch.tensor(self._pos)

        def hook(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
            hidden = hidden_of(output)
            pos = kwargs.get("position_ids")
            pos = pos[0].cpu() if pos is not None else torch.arange(hidden.shape[1])  # (t,) absolute positions
            hit = torch.isin(pos, wanted)
            if not bool(hit.any()):
                return output
            hidden = hidden.clone()
            idx = hit.nonzero().flatten()
            hidden[:, idx.to(hidden.device)] = src[pos[idx]].to(hidden.dtype).to(hidden.device)
            return replace_output(output, hidden)

        return [decoder_layers(model)[self.layer].register_forward_hook(hook, with_kwargs=True)]

    def __repr__(self) -> str:
        return f"Patch({self.source_prompt!r}, layer={self.layer}, positions={self.positions})"


class ActivationHook(ActivationIntervention):
    """Any forward hook on a named module (nnsight-style): ``fn(module, inputs, output) -> output | None``."""

    def __init__(self, module: str, fn: Callable[[torch.nn.Module, Any, Any], Any]) -> None:
        if not callable(fn):
            raise InvalidArgument(f"fn must be a callable (module, inputs, output) -> output; got {fn!r}")
        self.module, self.fn = module, fn

    def bind(self, session: Any) -> None:
        module_named(session.model, self.module)

    def attach(self, model: Any) -> list[Any]:
        return [module_named(model, self.module).register_forward_hook(self.fn)]

    def __repr__(self) -> str:
        return f"ActivationHook({self.module!r}, {getattr(self.fn, '__name__', 'fn')})"


@torch.no_grad()
def head_importance(session: Any, reference: str | None = None) -> torch.Tensor:
    """Shape (L, H): each head's mean output norm ‖x_h W_oᵀ[:, h]‖ over the positions of ``reference`` — how much
    the head writes into the residual stream (a cheap, one-forward-per-layer importance)."""
    n, d = _head_geometry(session.model)
    ids = session.encode(reference or DEFAULT_REFERENCE)
    out = []
    for layer in range(len(decoder_layers(session.model))):
        o_proj = _o_proj(session.model, layer)
        x = _run_capturing(session, ids, o_proj, pre=True)[0].float()  # (T, H·D)
        w = o_proj.weight.float()  # (hidden, H·D)
        out.append(torch.stack([(x[:, h * d:(h + 1) * d] @ w[:, h * d:(h + 1) * d].T).norm(dim=-1).mean()
                                for h in range(n)]))
    return torch.stack(out)


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
        """The matrix as a PNG-ready PIL image (rows = layers, columns = positions, each position widened so the
        picture is about as wide as it is tall)."""
        from labkit.imaging import heatmap

        layers, positions = self.recovered.shape
        wide = self.recovered.repeat_interleave(max(1, layers // positions), dim=1)
        return heatmap(wide, size=size, vmin=None, title="recovered (layer × position)")

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.recovered.numpy(), columns=[f"{i}:{t}" for i, t in enumerate(self.tokens)])


@torch.no_grad()
def patching_sweep(session: Any, clean: str, corrupt: str, target_token: str | int,
                   other_token: str | int | None = None) -> PatchingSweep:
    """Patch every layer's residual stream at every position from ``clean`` into ``corrupt`` (one batched forward
    per layer) and measure the recovered metric at the last position: the logit of ``target_token``, or its
    difference to ``other_token``'s logit."""
    from labkit.tokens import token_id

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

    layers = decoder_layers(model)
    seen: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda m, a, out: seen.append(hidden_of(out).detach())) for layer in layers]
    try:
        clean_m = float(metric(model(ci.to(model.device)).logits[:, -1])[0])
    finally:
        for h in handles:
            h.remove()
    corrupt_m = float(metric(model(xi.to(model.device)).logits[:, -1])[0])
    if abs(clean_m - corrupt_m) < 1e-6:
        raise InvalidArgument("clean and corrupt give the same metric for the target token: nothing to recover")
    t = ci.shape[1]
    batch = xi.repeat(t, 1).to(model.device)  # row i patches position i
    rows = torch.arange(t)
    out = torch.zeros(len(layers), t)
    for li, layer in enumerate(layers):
        src = seen[li][0]  # (T, hidden)

        def hook(module: torch.nn.Module, args: Any, output: Any, src: torch.Tensor = src) -> Any:
            hidden = hidden_of(output).clone()
            hidden[rows, rows] = src[rows].to(hidden.dtype)
            return replace_output(output, hidden)

        handle = layer.register_forward_hook(hook)
        try:
            patched = metric(model(batch).logits[:, -1]).cpu()
        finally:
            handle.remove()
        out[li] = (patched - corrupt_m) / (clean_m - corrupt_m)
    return PatchingSweep(out, [session._texts(i) for i in xi[0].tolist()], clean_m, corrupt_m)
