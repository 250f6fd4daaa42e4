"""Gradient attribution of one next-token prediction to every token of its context (inseq's per-token attribution).

The attributed quantity f is a function of the input token embeddings (the output of the model's embedding module,
what ``inputs_embeds`` takes), at one ``position`` of the context: the target token's probability there (the
default, as inseq's), its log-probability (nats) or its logit, or, with a ``foil``, f(target) − f(foil) (inseq's
``contrast_prob_diff`` is the default quantity with a foil). Methods, each a score per context token:

- ``saliency``: ‖∂f/∂e_t‖₂ over the embedding dimensions (≥ 0);
- ``input_x_gradient``: Σ_d e_t,d · ∂f/∂e_t,d (signed);
- ``ig`` (integrated gradients): Σ_d of the integral of ∂f/∂e along the straight path from a baseline (captum's
  Gauss–Legendre ``IntegratedGradients`` on one interval; adaptive over many here), ``steps`` points run in batches
  sized by memory (:mod:`labkit.core.memory`). Baselines: ``"unk"`` (the
  default, as inseq's): every token replaced by the tokenizer's UNK token (its pad token, else EOS, where it has no
  UNK), EOS tokens kept; ``"zero"``: zero embeddings (captum's default); ``"mean"``: the mean token embedding.
  Completeness: the scores sum to f(input) − f(baseline); the residual is ``completeness_error``, always reported.
  The rule is adaptive (:func:`adaptive_ig`): ``steps`` points in intervals of 8, and the intervals whose own
  residual is largest halved until the residuals add up to ``tolerance`` (1 %) or ``max_steps`` points are used;
  ``steps`` records the final rule's points. Why "unk" is the default: on a model with RMSNorm the zero baseline is
  a singular point — the first norm rescales α·x back to x's scale, so the integrand is flat except for a spike
  near α = 0 (measured on the 12 tiny architectures of the tests at 64 fixed points: 1–113 % error, where GPT-2 and
  OPT with LayerNorm are within 1 %); from UNK, an ordinary embedding, 32 points give ≤ 0.2 % on every one of them.
  Real models are rougher: on the default model f jumps and swings along any straight path between embeddings,
  which is what the adaptive rule is for;
- ``rollout`` (attention rollout, Abnar & Zuidema 2020): the product over layers of (½·A + ½·I) with A the heads'
  mean eager attention, rows renormalised; the row of ``position`` (sums to 1). It depends on the position only,
  not on the target token.

captum does saliency and input × gradient; IG's adaptive rule and rollout are written here (captum integrates one
path per call and has no attention-flow method). A position's
score is exactly 0 for tokens after it (causal attention: f cannot see them).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from labkit.core.errors import InvalidArgument, UnsupportedArchitecture, check_int, invalid_choice
from labkit.core.memory import Shape, attention_maps_bytes, backward_bytes, check, pieces
from labkit.model.hooks import Sites
from labkit.model.models import input_device

#: The attribution methods of :meth:`labkit.session.Session.attribute`.
GRADIENT_METHODS: dict[str, Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]] = {}
"""One-pass gradient methods by name: ``fn(f, embeds)`` → scores (T,), ``f`` the target function of the input
embeddings (1, T, d_model) and ``embeds`` with ``requires_grad``. Open: :func:`register_method` adds one (a captum
method, say), and ``attribute(method=...)``, the command line's ``--method`` and the why view accept it."""


def methods() -> tuple[str, ...]:
    """Every attribution method: the one-pass gradient methods registered (saliency, input × gradient...), IG,
    rollout."""
    return (*GRADIENT_METHODS, "ig", "rollout")


def register_method(name: str, fn: Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor],
                                            torch.Tensor]) -> None:
    """Register a one-pass gradient method ``fn(f, embeds) -> (T,)`` under ``name``."""
    if not isinstance(name, str) or not name.isidentifier() or name in ("ig", "rollout"):
        raise InvalidArgument(f"an attribution method's name must be an identifier other than 'ig' and 'rollout'; "
                              f"got {name!r}")
    if not callable(fn):
        raise InvalidArgument(f"register_method takes a callable fn(f, embeds) -> scores (T,); got {fn!r}")
    GRADIENT_METHODS[name] = fn
#: What is attributed: the target's probability, log-probability (nats) or logit.
QUANTITIES = ("prob", "logprob", "logit")
#: Integrated gradients' baselines: the UNK token's embedding (inseq's), zero embeddings, the mean token embedding.
BASELINES = ("unk", "zero", "mean")
#: IG's default completeness target: points are doubled until the relative error is at most this (or max_steps).
TOLERANCE = 0.01
UNITS = {"logprob": "nats", "prob": "probability", "logit": "logit units"}


@dataclass
class Attribution:
    """Scores of every context token for one prediction: ``scores[t]`` is token t's share (see the module docstring
    for each method's meaning and unit); ``top(k)``, ``to_pandas()``, ``html()`` and ``image()`` show them."""

    tokens: list[str]
    token_ids: list[int]
    scores: list[float]
    """Shape (T,): one score per context token (0 for tokens after ``position``)."""
    method: str
    target: str
    target_id: int
    position: int
    """The context position whose next-token prediction is attributed (its output predicts ``target``)."""
    quantity: str
    value: float
    """f at the input: the quantity (in ``unit``) for the target, minus the foil's with a foil."""
    foil: str | None = None
    foil_id: int | None = None
    baseline_value: float | None = None
    """IG: f at the baseline."""
    completeness_error: float | None = None
    """IG: ``|Σ scores − (f(input) − f(baseline))| / |f(input) − f(baseline)|`` (relative)."""
    steps: int | None = None
    """IG: the number of points used (``steps`` asked for, doubled while the completeness error exceeded the
    tolerance)."""
    baseline: str | None = None
    baseline_token: str | None = None
    """IG with ``baseline="unk"``: the token every position (but EOS) was replaced by."""

    @property
    def unit(self) -> str:
        """The unit of the scores: the attributed quantity's (probability, nats or logit units); the norm of its
        gradient per embedding unit for saliency; an attention share for rollout."""
        if self.method == "rollout":
            return "attention share"
        if self.method == "saliency":
            return f"‖gradient‖ ({UNITS[self.quantity]} per embedding unit)"
        return UNITS[self.quantity]

    @property
    def label(self) -> str:
        """What was attributed, e.g. ``logprob(' Paris') − logprob(' Rome') at position 5``."""
        what = f"{self.quantity}({self.target!r})" + (f" − {self.quantity}({self.foil!r})" if self.foil else "")
        return f"{what} at position {self.position}"

    def __repr__(self) -> str:
        best = ", ".join(f"{t!r} {s:+.3g}" for t, s in self.top(3)[["token", "score"]].itertuples(index=False))
        extra = ""
        if self.completeness_error is not None:
            extra = f", completeness error {self.completeness_error:.2%}"
            extra += " — too large: raise steps" if self.completeness_error > 0.05 else ""
        return f"Attribution({self.method}: {self.label}; top {best}{extra})"

    def to_pandas(self) -> Any:
        """One row per context token: position, token, token_id, score."""
        import pandas as pd

        return pd.DataFrame({"position": range(len(self.tokens)), "token": self.tokens, "token_id": self.token_ids,
                             "score": self.scores})

    def top(self, k: int = 5) -> Any:
        """The ``k`` tokens with the largest ``|score|`` (signs kept), largest first: a DataFrame like ``to_pandas``."""
        check_int("k", k, 1)
        frame = self.to_pandas()
        return frame.reindex(frame["score"].abs().sort_values(ascending=False, kind="stable").index).head(k)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``labkit attribute --json``)."""
        return {**asdict(self), "unit": self.unit}

    def html(self) -> str:
        """The context as a token strip, each token on a background as strong as its ``|score|`` (red positive, blue
        negative; the largest ``|score|`` is full colour), the target after it; a score in each token's title."""
        peak = max((abs(s) for s in self.scores), default=0.0) or 1.0
        spans = []
        for i, (tok, score) in enumerate(zip(self.tokens, self.scores, strict=True)):
            a = abs(score) / peak
            rgb = (214, 39, 40) if score >= 0 else (31, 119, 180)
            shade = ",".join(str(round(255 - (255 - c) * a)) for c in rgb)
            spans.append(f'<span class="lk-attr" data-position="{i}" style="background:rgb({shade})" '
                         f'title="{html.escape(f"{score:+.4g}")}">{html.escape(tok)}</span>')
        return (f'<div class="labkit-attribution" style="font-family:monospace;white-space:pre-wrap;color:black;'
                f'background:white">{"".join(spans)}<b style="border:1px solid #333"> → '
                f'{html.escape(self.target)}</b></div><div style="font-size:11px;color:#666">{html.escape(self.method)}'
                f" of {html.escape(self.label)}; colour ∝ |score| (max {peak:.3g} {html.escape(self.unit)}), red "
                "positive, blue negative</div>")

    def _repr_html_(self) -> str:
        return self.html()

    def image(self, title: str | None = None) -> Any:
        """A one-row heatmap of the scores over the context tokens (a :class:`labkit.records.figures.Picture`)."""
        from labkit.records.figures import heatmap

        values = torch.tensor([self.scores])  # (1, T)
        peak = float(values.abs().max()) or 1.0
        signed = self.method in ("input_x_gradient", "ig")
        return heatmap(values, x_labels=self.tokens, y_labels=[f"→ {self.target!r}"], tokens=True,
                       vmin=-peak if signed else 0.0, vmax=peak, cmap="RdBu_r" if signed else "viridis",
                       xlabel="context token", ylabel="target", colorbar=f"{self.method} ({self.unit})",
                       title=title or f"{self.method} attribution of {self.label}")


# -- computation ---------------------------------------------------------------------------------------------------

def check_method(method: Any) -> str:
    """``method`` if it is one of :func:`methods`, else InvalidArgument naming the choices."""
    if method not in methods():
        raise invalid_choice("method", method, methods())
    return method


def check_quantity(quantity: Any) -> str:
    """``quantity`` if it is one of :data:`QUANTITIES`, else InvalidArgument naming the choices."""
    if quantity not in QUANTITIES:
        raise invalid_choice("quantity", quantity, QUANTITIES)
    return quantity


def quantity_of(logits: torch.Tensor, target: int, foil: int | None, quantity: str) -> torch.Tensor:
    """Shape (B, V) logits -> (B,): the quantity for ``target`` (minus the foil's)."""
    logits = logits.float()
    values = {"logit": lambda: logits, "logprob": lambda: torch.log_softmax(logits, -1),
              "prob": lambda: torch.softmax(logits, -1)}[quantity]()
    out = values[:, target]
    return out - values[:, foil] if foil is not None else out


def target_function(sites: Sites, position: int, length: int, target: int, foil: int | None,
                    quantity: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """f(embeddings (B, T, d_model)) -> (B,): the attributed quantity at ``position`` (the model's forward on
    ``inputs_embeds``; only the logits of positions ≥ ``position`` are computed)."""
    model = sites.model

    def f(embeds: torch.Tensor) -> torch.Tensor:
        logits = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=length - position).logits[:, 0]
        return quantity_of(logits, target, foil, quantity)

    return f


def check_baseline(baseline: Any) -> str:
    """``baseline`` if it is one of :data:`BASELINES`, else InvalidArgument naming the choices."""
    if baseline not in BASELINES:
        raise invalid_choice("baseline", baseline, BASELINES)
    return baseline


def attribute(sites: Sites, ids: torch.Tensor, target: int, *, foil: int | None = None, method: str = "ig",
              position: int | None = None, quantity: str = "prob", steps: int = 64, batch: int | None = None,
              baseline: str = "unk", token_text: Callable[[int], str] | None = None, tokenizer: Any = None,
              tolerance: float = TOLERANCE, max_steps: int = 512) -> Attribution:
    """Attribute the prediction of ``target`` at ``position`` (default: the last) of ``ids`` (1, T) to each token.

    ``steps``: IG's number of points, doubled while the completeness error exceeds ``tolerance`` (up to
    ``max_steps``); ``batch``: IG points per forward pass (default: as many as the memory budget holds). The
    caller holds the model (no lock here); gradients are taken whatever the caller's mode."""
    method, quantity, baseline = check_method(method), check_quantity(quantity), check_baseline(baseline)
    length = ids.shape[1]
    position = length - 1 if position is None else position
    check_int("position", position, -length, length - 1)
    position %= length
    check_int("steps", steps, 2, 4096)
    check_int("max_steps", max_steps, steps, 4096)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise InvalidArgument(f"tolerance must be a number in [0, 1) (a relative completeness error); got "
                              f"{tolerance!r}")
    if batch is not None:
        check_int("batch", batch, 1)
    if foil is not None and foil == target:
        raise InvalidArgument(f"foil must differ from the target; both are token id {target}")
    text = token_text or (lambda i: str(i))
    id_list = ids[0].tolist()
    base = dict(tokens=[text(i) for i in id_list], token_ids=id_list, method=method, target=text(target),
                target_id=target, position=position, quantity=quantity, foil=None if foil is None else text(foil),
                foil_id=foil)
    if method == "rollout":
        with torch.no_grad():
            embeds = sites.embed(ids)
            value = float(target_function(sites, position, length, target, foil, quantity)(embeds)[0])
        return Attribution(scores=rollout(sites.model, ids)[position].tolist(), value=value, **base)
    shape = Shape.of(sites.model)
    per_point = backward_bytes(shape, length, kept_logits=length - position)
    device = input_device(sites.model)
    points = batch or pieces(steps, per_point, 0, f"{method} attribution over {length} tokens", device,
                             "use a shorter prompt, or method='saliency' (one point)")
    if batch is None and device.type == "cpu":  # on a CPU, passes of more positions run slower per point
        # (measured on the default model at 259 tokens: 0.66 s a point in passes of 8, 1.15 s in passes of 32)
        cap = max(1, CPU_POSITIONS_PER_PASS // length)
        points = min(points, cap if cap < POINTS_PER_INTERVAL else cap - cap % POINTS_PER_INTERVAL)
    with torch.inference_mode(False), torch.enable_grad():
        f = target_function(sites, position, length, target, foil, quantity)
        with torch.no_grad():
            embeds = sites.embed(ids).detach().clone()  # (1, T, d_model)
            if method == "ig":
                start, start_token = _baseline(sites, ids, embeds, baseline, tokenizer)
                value, base_value = (float(v) for v in f(torch.cat([embeds, start])))  # one pass for both ends
            else:
                value = float(f(embeds)[0])
            check_embedding_path(sites, ids, position, target, foil, quantity, value)
        extra: dict[str, Any] = {}
        if method != "ig":
            scores = GRADIENT_METHODS[method](f, embeds.requires_grad_()).detach().float()
        else:
            scores, used = adaptive_ig(f, embeds, start, steps, max_steps, tolerance, points, (base_value, value))
            gap = value - base_value
            error = abs(float(scores.double().sum()) - gap) / abs(gap) if gap else math.inf
            extra.update(baseline_value=base_value, completeness_error=error, steps=used, baseline=baseline,
                         baseline_token=start_token)
    scores[position + 1:] = 0.0  # exactly 0 already (causal mask): made explicit for the -0.0 of a product
    return Attribution(scores=scores.tolist(), value=value, **base, **extra)


#: On a CPU, gradient passes hold at most this many positions (points × tokens) unless ``batch`` is given.
CPU_POSITIONS_PER_PASS = 2048
#: Gauss–Legendre points per interval of IG's composite rule.
POINTS_PER_INTERVAL = 8


@dataclass
class _Piece:
    """One interval [a, b] of IG's composite rule: f at its ends, its scores (T,), its own completeness residual."""

    a: float
    b: float
    fa: float
    fb: float
    scores: torch.Tensor
    residual: float


def adaptive_ig(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, x0: torch.Tensor, steps: int,
                max_steps: int, tolerance: float, batch: int,
                f_ends: tuple[float, float] | None = None) -> tuple[torch.Tensor, int]:
    """Integrated gradients of f from ``x0`` to ``x`` (both (1, T, d_model)) by an adaptive composite Gauss–Legendre
    rule: shape (T,) scores and the number of points of the final rule. ``f_ends``: f(x0) and f(x) when the caller
    has them already (saves their forward pass).

    [0, 1] starts as ``steps // 8`` equal intervals of 8 points each. An interval [a, b]'s share of the scores must
    sum to f(x_b) − f(x_a) (completeness holds on every piece of the path), and f at the ends costs one forward
    pass, so each interval's own residual is known exactly; the intervals with the largest residuals are halved
    (as many at a time as fill a batch) until the residuals add up to at most ``tolerance · |f(x) − f(x0)|`` or
    ``max_steps`` points are used. Real models are not smooth along a straight path between two embeddings — on the
    default model f jumps by 0.08 within 2.5 % of the path and swings by 0.7 over a gap of 0.15 — and a fixed rule,
    however many points, leaves 15–130 % completeness error there. Written here rather than with captum, which
    integrates one path per call: the points of every interval being refined go through one batched pass."""
    m = min(POINTS_PER_INTERVAL, steps)
    nodes, weights = (torch.tensor(v, dtype=torch.float64) for v in np.polynomial.legendre.leggauss(m))
    direction = x - x0  # (1, T, d)

    def ends(alphas: list[float]) -> list[float]:
        if not alphas:
            return []
        with torch.no_grad():
            points = torch.cat([x0 + a * direction for a in alphas])  # (k, T, d)
            return [float(v) for chunk in points.split(max(1, batch)) for v in f(chunk)]

    def integrate(spans: list[tuple[float, float, float, float]]) -> list[_Piece]:
        """The pieces of ``spans`` (a, b, f(a), f(b)): every Gauss–Legendre point of every span in passes of
        ``batch`` points; a span's scores are (x − x0) · Σ_k w_k (b − a)/2 · ∇f(x0 + α_k (x − x0)), summed over d."""
        alphas = torch.cat([a + (b - a) * (nodes + 1) / 2 for a, b, _, _ in spans])  # (S·m,)
        w = torch.cat([(b - a) * weights / 2 for a, b, _, _ in spans])  # (S·m,)
        owner = torch.arange(len(spans)).repeat_interleave(m)  # (S·m,): the span of each point
        total = torch.zeros(len(spans), *x.shape[1:], dtype=torch.float64)  # (S, T, d): Σ w·∇f per span
        for part in torch.arange(len(alphas)).split(max(1, batch)):
            points = (x0 + alphas[part].to(x.dtype).to(x.device)[:, None, None] * direction).requires_grad_()
            (grad,) = torch.autograd.grad(f(points).sum(), points)  # (k, T, d): f's rows are independent
            total.index_add_(0, owner[part], w[part][:, None, None] * grad.detach().double().cpu())
        scores = (total * direction.detach().double().cpu()).sum(-1)  # (S, T)
        return [_Piece(a, b, fa, fb, scores[i], abs(float(scores[i].sum()) - (fb - fa)))
                for i, (a, b, fa, fb) in enumerate(spans)]

    n = max(1, steps // m)
    edges = [i / n for i in range(n + 1)]
    inner = edges[1:-1] if (n + 1) * m <= max_steps else []  # f inside only when an interval may be split
    known = ends(edges[:1] + edges[-1:]) if f_ends is None else list(f_ends)
    values = [known[0], *(ends(inner) if inner else [math.nan] * (n - 1)), known[1]]
    parts = integrate([(edges[i], edges[i + 1], values[i], values[i + 1]) for i in range(n)])
    gap = abs(values[-1] - values[0])
    while sum(p.residual for p in parts) > tolerance * gap:
        k = min(max(1, batch // (2 * m)), max_steps // m - len(parts))  # at most: a batch, the points left
        if k < 1:
            break
        excess = sum(p.residual for p in parts) - tolerance * gap / 2  # residual the splits should remove
        worst: list[int] = []
        for i in sorted(range(len(parts)), key=lambda i: parts[i].residual, reverse=True)[:k]:
            if excess <= 0:
                break
            worst.append(i)
            excess -= parts[i].residual
        mids = ends([(parts[i].a + parts[i].b) / 2 for i in worst])
        spans = [span for i, fm in zip(worst, mids, strict=True) for span in (
            (parts[i].a, (parts[i].a + parts[i].b) / 2, parts[i].fa, fm),
            ((parts[i].a + parts[i].b) / 2, parts[i].b, fm, parts[i].fb))]
        halves = integrate(spans)
        parts = [p for i, p in enumerate(parts) if i not in set(worst)] + halves
        parts.sort(key=lambda p: p.a)
    return torch.stack([p.scores for p in parts]).sum(0).float(), len(parts) * m


def unk_token_id(tokenizer: Any) -> int:
    """The token the "unk" baseline puts everywhere: the tokenizer's UNK token, else its pad token, else EOS."""
    for name in ("unk_token_id", "pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise InvalidArgument("baseline='unk' needs a tokenizer with an UNK, pad or EOS token; this one has none: use "
                          "baseline='zero' or 'mean'")


def _baseline(sites: Sites, ids: torch.Tensor, embeds: torch.Tensor, baseline: str,
              tokenizer: Any) -> tuple[torch.Tensor, str | None]:
    """The baseline embeddings, shape (1, T, d_model), and the replacement token's text for "unk"."""
    if baseline == "zero":
        return torch.zeros_like(embeds), None
    if baseline == "mean":
        return _mean_embedding(sites).expand_as(embeds).to(embeds.device), None
    if tokenizer is None:
        raise InvalidArgument("baseline='unk' needs the tokenizer (Session.attribute passes it)")
    unk = unk_token_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    keep = ids == eos if isinstance(eos, int) else torch.zeros_like(ids, dtype=torch.bool)
    return sites.embed(torch.where(keep, ids, torch.full_like(ids, unk))).detach(), \
        tokenizer.convert_ids_to_tokens(unk)


def _mean_embedding(sites: Sites) -> torch.Tensor:
    """Shape (1, 1, d_model): the embedding module's output averaged over the vocabulary (in chunks)."""
    n = sites.unembedding.out_features if hasattr(sites.unembedding, "out_features") else None
    vocab = getattr(sites.embed, "num_embeddings", None) or n
    device = next(sites.embed.parameters()).device
    with torch.no_grad():
        total = sum(sites.embed(chunk[None]).float().sum(1) for chunk in torch.arange(vocab, device=device).split(8192))
    return (total / vocab)[None].to(next(sites.embed.parameters()).dtype)


def saliency(f: Callable[[torch.Tensor], torch.Tensor], embeds: torch.Tensor) -> torch.Tensor:
    """Shape (T,): the norm of each position's gradient ``|∂f/∂e|`` (captum's Saliency)."""
    from captum.attr import Saliency

    return Saliency(f).attribute(embeds, abs=True)[0].float().norm(dim=-1)


def input_x_gradient(f: Callable[[torch.Tensor], torch.Tensor], embeds: torch.Tensor) -> torch.Tensor:
    """Shape (T,): each position's input × gradient, summed over the embedding (captum's InputXGradient)."""
    from captum.attr import InputXGradient

    return InputXGradient(f).attribute(embeds)[0].float().sum(-1)


GRADIENT_METHODS.update(saliency=saliency, input_x_gradient=input_x_gradient)


def check_embedding_path(sites: Sites, ids: torch.Tensor, position: int, target: int, foil: int | None,
                         quantity: str, value: float) -> None:
    """Refuse a model whose ``inputs_embeds`` path is not its ``input_ids`` path (attributions would be of another
    function): the quantity from the token ids must equal ``value`` from the embedding module's output."""
    length = ids.shape[1]
    logits = sites.model(input_ids=ids, use_cache=False, logits_to_keep=length - position).logits[:, 0]
    direct = float(quantity_of(logits, target, foil, quantity)[0])
    if not math.isclose(direct, value, rel_tol=1e-3, abs_tol=1e-4):
        raise UnsupportedArchitecture(
            f"{type(sites.model).__name__}: the forward pass from the embedding module's output (inputs_embeds) "
            f"gives {value:.6g}, from the token ids {direct:.6g}; the model transforms its embeddings in a way "
            "labkit's gradient attribution does not follow")


def rollout(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Attention rollout of ``ids`` (1, T): shape (T, T), row q = how much position q's output draws on each
    position through the residual stream and every layer's mean attention (rows sum to 1). The heads' mean maps
    (eager attention's probabilities) are computed beside the model's own attention, L·T² floats in all, checked
    against the memory budget first."""
    from labkit.measures.attention import attention_maps

    shape = Shape.of(model)
    length = ids.shape[1]
    check(attention_maps_bytes(shape, length, heads=1), f"attention rollout over {length} tokens",
          "cpu", "use a shorter prompt")
    layers = list(range(shape.n_layers))
    maps = attention_maps(model, ids, layers, list(range(shape.n_heads)), torch.float32, mean_heads=True)
    eye = torch.eye(length)
    flow = eye.clone()
    for layer in layers:  # input to output
        mixed = 0.5 * maps[layer][0] + 0.5 * eye  # (T, T): the residual connection as identity
        flow = (mixed / mixed.sum(-1, keepdim=True)) @ flow
    return flow
