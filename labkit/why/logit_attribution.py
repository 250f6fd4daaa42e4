"""Direct logit attribution (TransformerLens' ``decompose_resid``, ``stack_head_results``, ``logit_attrs``): the final
position's logit of one token — or a logit difference ``token`` − ``foil`` — split into what each part of the
model wrote into the residual stream.

The last block's output is a sum: the stream entering block 0 (token embedding, plus position embeddings or scaling
where the model has them: ``embed``), and each block's attention and MLP outputs as added to the stream (through the
block's own output norm on Gemma 2/3 and OLMo 2). The final norm is nonlinear only through its scale 1/σ(x); frozen
at the value it takes on the actual stream x (as TransformerLens does), norm and unembedding are affine, so each
part's logit is the affine map's linear part applied to it, and the constant part (the norms' and unembedding's
biases) is the ``bias`` term. Attention splits further into heads (each head's slice through the block's own output
projection) plus the projection's bias (``attn_bias``). Everything sums to the logit (difference) before any final
softcapping — labkit checks that it does on the model in front of it and refuses the model otherwise.

Units: logit units (nats of unnormalised log-probability; a logit difference is a log-odds ratio in nats).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import align_module_device

from labkit.core.errors import InvalidArgument, UnsupportedArchitecture, deprecated
from labkit.model.hooks import Sites


@dataclass
class LogitAttribution:
    """The decomposed logit (difference) at the last position; values in logit units. ``to_pandas()`` (one row
    per part), ``accumulated()`` (the residual stream, layer by layer), ``top_heads(k)``, ``image()`` (layers ×
    heads) and ``plot()`` (bars per layer)."""

    tokens: list[str]
    token: str
    token_id: int
    foil: str | None
    foil_id: int | None
    embed: float
    attn: list[float]
    """Shape (L,): each block's attention output, as added to the residual stream."""
    mlp: list[float]
    """Shape (L,): each block's MLP output, as added to the residual stream."""
    heads: list[list[float]]
    """Shape (L, H): each head's part of its block's attention term."""
    attn_bias: list[float]
    """Shape (L,): the attention output projection's bias (0 where it has none); heads + attn_bias = attn."""
    bias: float
    """The final norm's and unembedding's biases (0 where they have none)."""
    total: float
    """Σ of every part: the logit (difference) before softcapping, recomputed from the parts."""
    logit: float
    """The model's own logit (difference) at the last position, after any final softcapping."""
    softcap: float | None
    scale: float
    """The frozen final-norm scale 1/σ(x) of the actual stream."""

    @property
    def label(self) -> str:
        """What is attributed, as text: ``logit(' Paris')`` or ``logit(' Paris') − logit(' Rome')``."""
        return f"logit({self.token!r})" + (f" − logit({self.foil!r})" if self.foil is not None else "")

    @property
    def against(self) -> str | None:
        """Deprecated name of :attr:`foil`."""
        deprecated("LogitAttribution.against is now .foil (the name attribute() uses)")
        return self.foil

    @property
    def against_id(self) -> int | None:
        """Deprecated name of :attr:`foil_id`."""
        deprecated("LogitAttribution.against_id is now .foil_id (the name attribute() uses)")
        return self.foil_id

    def __repr__(self) -> str:
        top = ", ".join(f"L{layer}H{head} {v:+.3g}" for layer, head, v in self.top_heads(3))
        return f"LogitAttribution({self.label} = {self.total:.4g}; top heads {top})"

    def parts(self) -> list[tuple[str, int | None, int | None, float]]:
        """(kind, layer, head, value) of every part, in forward order: embed; per layer its heads, attn_bias and
        mlp; then bias. ``attn`` itself is the sum of its heads and attn_bias (listed in :meth:`to_pandas`)."""
        rows: list[tuple[str, int | None, int | None, float]] = [("embed", None, None, self.embed)]
        for layer in range(len(self.attn)):
            rows += [("head", layer, h, v) for h, v in enumerate(self.heads[layer])]
            rows += [("attn_bias", layer, None, self.attn_bias[layer]), ("mlp", layer, None, self.mlp[layer])]
        return [*rows, ("bias", None, None, self.bias)]

    def to_pandas(self) -> Any:
        """One row per part: component (``embed``, ``L3.attn``, ``L3.H4``, ``L3.attn_bias``, ``L3.mlp``, ``bias``),
        kind, layer, head, value (logit units). Heads and attn_bias rows refine their layer's ``attn`` row: sum
        ``kind in ("embed", "attn", "mlp", "bias")`` for the total."""
        import pandas as pd

        rows = [{"component": "embed", "kind": "embed", "layer": None, "head": None, "value": self.embed}]
        for layer in range(len(self.attn)):
            rows.append({"component": f"L{layer}.attn", "kind": "attn", "layer": layer, "head": None,
                         "value": self.attn[layer]})
            rows += [{"component": f"L{layer}.H{h}", "kind": "head", "layer": layer, "head": h, "value": v}
                     for h, v in enumerate(self.heads[layer])]
            rows.append({"component": f"L{layer}.attn_bias", "kind": "attn_bias", "layer": layer, "head": None,
                         "value": self.attn_bias[layer]})
            rows.append({"component": f"L{layer}.mlp", "kind": "mlp", "layer": layer, "head": None,
                         "value": self.mlp[layer]})
        rows.append({"component": "bias", "kind": "bias", "layer": None, "head": None, "value": self.bias})
        return pd.DataFrame(rows)

    def accumulated(self) -> Any:
        """The residual-stream view: the logit (difference) of the stream after the embedding and after each
        block's attention and MLP, with the final norm's scale frozen; every row includes the constant ``bias``, so
        the last row is ``total``. Columns: stage, layer, value."""
        import pandas as pd

        running, rows = self.embed + self.bias, [{"stage": "embed", "layer": None, "value": self.embed + self.bias}]
        for layer in range(len(self.attn)):
            running += self.attn[layer]
            rows.append({"stage": f"L{layer}.attn", "layer": layer, "value": running})
            running += self.mlp[layer]
            rows.append({"stage": f"L{layer}.mlp", "layer": layer, "value": running})
        return pd.DataFrame(rows)

    def top_heads(self, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` heads with the largest ``|value|``: (layer, head, value), largest first."""
        flat = [(layer, h, v) for layer, row in enumerate(self.heads) for h, v in enumerate(row)]
        return sorted(flat, key=lambda t: -abs(t[2]))[:k]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form: every field, the label and the unit (logit units)."""
        from dataclasses import asdict

        return {**asdict(self), "label": self.label, "unit": "logit units"}

    def image(self, title: str | None = None) -> Any:
        """Layers × heads image of the head terms (diverging colours centred on 0; a Picture)."""
        from labkit.records.figures import layer_head_summary

        values = torch.tensor(self.heads)  # (L, H)
        peak = float(values.abs().max()) or 1.0
        return layer_head_summary(values, title=title or f"direct logit attribution of {self.label} per head",
                                  colorbar="logit units", vmin=-peak, vmax=peak, cmap="RdBu_r")

    def layer_image(self, title: str | None = None) -> Any:
        """Bars of each block's attention and MLP terms side by side (a :class:`labkit.records.figures.Picture`)."""
        from labkit.records.figures import grouped_bars

        return grouped_bars({"attention": self.attn, "MLP": self.mlp}, list(range(len(self.attn))), "layer",
                            "logit units", title=title or f"direct logit attribution of {self.label} by layer "
                            f"(embed {self.embed:+.2f}, bias {self.bias:+.2f})")

    def plot(self, title: str | None = None) -> Any:
        """Bars of each block's attention and MLP terms (a :class:`labkit.records.figures.Chart`)."""
        import plotly.graph_objects as go

        from labkit.records.figures import Chart

        layers = list(range(len(self.attn)))
        fig = Chart(data=[go.Bar(x=layers, y=self.attn, name="attention"), go.Bar(x=layers, y=self.mlp, name="MLP")])
        fig.update_layout(barmode="group", title=title or f"direct logit attribution of {self.label} by layer "
                          f"(embed {self.embed:+.2f}, bias {self.bias:+.2f})",
                          xaxis_title="layer", yaxis_title="logit units", height=320)
        return fig


# -- the frozen final norm ---------------------------------------------------------------------------------------

def frozen_norm(module: torch.nn.Module, x: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                                     torch.Tensor, float]:
    """``module`` (a LayerNorm or RMSNorm of any family) as an affine map at ``x`` (d,) with its scale 1/σ(x)
    frozen: (linear part applied to (N, d) vectors, constant (d,), the frozen 1/σ), with linear(x) + constant
    = module(x).

    Written by hand (torch and transformers have no "norm with frozen statistics"): the forms LayerNorm, RMSNorm and
    Gemma's RMSNorm with (1 + weight) are tried, and the one that reproduces ``module(x)`` is used; none does ->
    UnsupportedArchitecture."""
    want = module(x[None])[0].float()
    xf = x.float()
    with align_module_device(module):  # an offloaded module's weights are on "meta" outside its forward
        weight, b = getattr(module, "weight", None), getattr(module, "bias", None)
        w = torch.ones_like(xf) if weight is None else weight.detach().float().to(xf.device)
        b = torch.zeros_like(xf) if b is None else b.detach().float().to(xf.device)
    eps = next((float(getattr(module, n)) for n in ("eps", "variance_epsilon", "epsilon") if hasattr(module, n)), 1e-5)
    centred_sigma = torch.sqrt(xf.var(unbiased=False) + eps)
    rms_sigma = torch.sqrt(xf.pow(2).mean() + eps)
    forms = {
        "layernorm": (lambda v: w * (v - v.mean(-1, keepdim=True)) / centred_sigma, centred_sigma),
        "rmsnorm": (lambda v: w * v / rms_sigma, rms_sigma),
        "rmsnorm(1+w)": (lambda v: (1.0 + w) * v / rms_sigma, rms_sigma),
    }
    for linear, sigma in forms.values():
        got = linear(xf[None])[0] + b
        if torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max() + 1)):
            return linear, b, 1.0 / float(sigma)
    raise UnsupportedArchitecture(f"the final norm {type(module).__name__} is not a LayerNorm or RMSNorm labkit can "
                                  "freeze: direct logit attribution needs its scale")


def _linear_part(module: torch.nn.Module, v: torch.Tensor) -> torch.Tensor:
    """The linear part of an affine ``module`` (Linear, a projection; called, never read) on rows ``v`` (N, d)."""
    return module(v) - module(torch.zeros_like(v[:1]))  # (N, d')


# -- the decomposition -----------------------------------------------------------------------------------------

def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def decompose(sites: Sites, ids: torch.Tensor, token: int, foil: int | None = None,
              token_text: Callable[[int], str] | None = None) -> LogitAttribution:
    """Direct logit attribution of ``token`` (minus ``foil``) at the last position of ``ids`` (1, T). One forward
    pass; the caller holds the model. UnsupportedArchitecture when the parts do not sum to the model's logit."""
    if foil is not None and foil == token:
        raise InvalidArgument(f"foil must differ from token; both are token id {token}")
    n = sites.n_layers
    names = ["blocks.0.resid_pre", f"blocks.{n - 1}.resid_post"]
    names += [f"blocks.{layer}.{kind}" for layer in range(n) for kind in ("attn.z", "attn_out", "mlp_out")]
    with torch.inference_mode(), sites.read(names, last=True) as seen:
        model_logits = sites.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()  # (V,)
        got = {name: seen[name][0][0] for name in names}  # (d,) or (H, d_head): the last position
        dtype = got["blocks.0.resid_pre"].dtype
        tol = _tolerance(dtype)
        parts, stream = _stream_parts(sites, got)  # (N, d) rows: embed, per layer H heads, attn bias, mlp
        x = got[f"blocks.{n - 1}.resid_post"]
        err = float((stream - x.float()).norm() / (x.float().norm() + 1e-12))
        if err > tol:
            raise UnsupportedArchitecture(
                f"{type(sites.model).__name__}: the blocks' attention and MLP outputs do not add up to the residual "
                f"stream (relative error {err:.2g}); its blocks scale or normalise what they add in a way labkit "
                "does not model, so direct logit attribution would be wrong")
        logits, constant, scale = _through_final(sites, parts, x)
        pick = (lambda v: v[..., token] - v[..., foil]) if foil is not None else (lambda v: v[..., token])
        values = pick(logits).double()  # (N,)
        bias = float(pick(constant))
        own = float(pick(model_logits))
        raw = sites.unembedding(_final_only(sites, x)[None])[0].float()  # (V,) before any softcapping
        capped = torch.tanh(raw / sites.logit_softcap) * sites.logit_softcap if sites.logit_softcap else raw
        uncapped, via_sites = float(pick(raw)), float(pick(capped))
    total = float(values.sum()) + bias
    if not math.isclose(via_sites, own, rel_tol=tol, abs_tol=tol):
        raise UnsupportedArchitecture(f"{type(sites.model).__name__}: its logits are not the final norm and "
                                      f"unembedding of the last block's output ({via_sites:.6g} vs the model's "
                                      f"{own:.6g}): it rescales them in a way labkit does not model")
    if not math.isclose(total, uncapped, rel_tol=tol, abs_tol=tol * max(1.0, float(values.abs().max()))):
        raise UnsupportedArchitecture(f"{type(sites.model).__name__}: the parts sum to {total:.6g}, the logit is "
                                      f"{uncapped:.6g}; its final norm cannot be frozen exactly")
    h = sites.n_heads
    per_layer = values[1:].view(n, h + 2)  # (L, H + 2): heads, attn bias, mlp
    text = token_text or (lambda i: str(i))
    return LogitAttribution(
        tokens=[text(i) for i in ids[0].tolist()], token=text(token), token_id=token,
        foil=None if foil is None else text(foil), foil_id=foil, embed=float(values[0]),
        attn=per_layer[:, :h + 1].sum(-1).tolist(), mlp=per_layer[:, h + 1].tolist(),
        heads=per_layer[:, :h].tolist(), attn_bias=per_layer[:, h].tolist(), bias=bias, total=total, logit=own,
        softcap=sites.logit_softcap, scale=scale)


def _stream_parts(sites: Sites, got: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts of the last block's output at one position: rows (1 + L·(H + 2), d) float32 — embed, then per
    layer each head, the projection's bias, the MLP — and their sum as measured (attention and MLP outputs as
    added to the stream, through a post norm where the block has one)."""
    rows = [got["blocks.0.resid_pre"].float()[None]]
    stream = rows[0][0].clone()
    for layer in range(sites.n_layers):
        z = got[f"blocks.{layer}.attn.z"]  # (H, d_head)
        heads = sites.head_outputs(layer, z).float()  # (H, d)
        out = got[f"blocks.{layer}.attn_out"].float()  # (d,)
        attn_bias = out - heads.sum(0)  # the projection's bias: what no head wrote
        post = sites.part(layer, "attn_post")
        if post is not None:  # a norm on the attention output: frozen at the actual output, like the final norm
            linear, constant, _ = frozen_norm(post, got[f"blocks.{layer}.attn_out"])
            heads, attn_bias = linear(heads), linear(attn_bias[None])[0] + constant
        mlp = got[f"blocks.{layer}.mlp_out"]
        mlp_post = sites.part(layer, "mlp_post")
        mlp = (mlp_post(mlp[None])[0] if mlp_post is not None else mlp).float()
        rows += [heads, attn_bias[None], mlp[None]]
        stream += heads.sum(0) + attn_bias + mlp
    return torch.cat(rows), stream


def _final_only(sites: Sites, x: torch.Tensor) -> torch.Tensor:
    for module in sites.final:
        x = module(x[None])[0]
    return x


def _through_final(sites: Sites, parts: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Parts (N, d) through the final modules (the first a norm, frozen at ``x``; any later ones affine) and the
    unembedding: (logits of each part's linear image (N, V), the constant's logits (V,), the scale 1/σ)."""
    dtype = x.dtype
    if not sites.final:
        raise UnsupportedArchitecture("this model has no final norm: direct logit attribution needs one")
    linear, constant, scale = frozen_norm(sites.final[0], x)
    v, c = linear(parts), constant[None]
    for module in [*sites.final[1:], sites.unembedding]:
        v = _linear_part(module, v.to(dtype))
        c = module(c.to(dtype))
        v, c = v.float(), c.float()
    return v, c[0], scale
