"""Attention: cheap capture of the current query row while decoding, full maps for a prompt, per-head metrics.

Capture goes through a registered attention function (transformers ``AttentionInterface``) named
``"labkit_capture"``: the layer's output is still computed by the SDPA implementation, and beside it the last
query row ``softmax(q·Kᵀ·scale + mask)`` is computed for every head (grouped-query attention handled by
grouping the query heads over their KV head, no copy of K). The function is switched on only inside
:func:`capturing` (a scoped context manager), so the model is otherwise untouched.

Units: attention entropies in bits; varentropy across heads in bits²; scores are raw pre-softmax logits.
"""

from __future__ import annotations

import contextlib
import enum
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from labkit.core.errors import InvalidArgument

CAPTURE_ATTN = "labkit_capture"
_LN2 = math.log(2.0)


@dataclass
class AttentionRow:
    """The current query's attention in every layer and head, at one decoding step."""

    scores: torch.Tensor
    """Shape (L, H, T_k): pre-softmax scores q·Kᵀ·scale (softcapped where the model softcaps; + mask, −inf where
    masked) of the last query row; column j is sequence position j. A key outside a layer's sliding window
    scores −inf (weight 0) in every head of that layer: see :attr:`outside_window`."""

    def __post_init__(self) -> None:
        if self.scores.ndim != 3:
            raise InvalidArgument(f"AttentionRow.scores must have shape (L, H, T_k); got {tuple(self.scores.shape)}")

    @property
    def probs(self) -> torch.Tensor:
        """Shape (L, H, T_k): attention probabilities softmax(scores) (each row sums to 1); computed on access."""
        return torch.softmax(self.scores, dim=-1)

    @property
    def outside_window(self) -> torch.Tensor:
        """Shape (L, T_k), bool: key positions the layer does not attend to at all (outside its sliding window, or
        evicted by a KV-cache policy; their weight is 0). All False on a model without either."""
        return torch.isneginf(self.scores).all(dim=1)


class _Recorder:
    """Per-layer slots filled by the capture function during one forward pass (scores only: probabilities are
    a softmax away, taken when needed)."""

    def __init__(self, n_layers: int, base: str) -> None:
        self.scores: list[torch.Tensor | None] = [None] * n_layers
        self.base = base
        """The attention implementation that computes each layer's output: "sdpa" or "eager"."""

    def take(self) -> AttentionRow:
        """The newest pass's last query rows of batch row 0, all layers."""
        return self.take_rows()[0]

    def take_rows(self) -> list[AttentionRow]:
        """The newest pass's last query rows, one AttentionRow (L, H, Tk) per batch row."""
        if any(s is None for s in self.scores):
            missing = [i for i, s in enumerate(self.scores) if s is None]
            raise RuntimeError(f"attention capture missed layers {missing}: does this model use AttentionInterface?")
        rows: list[torch.Tensor] = self.scores  # type: ignore[assignment]
        width = max(r.shape[-1] for r in rows)
        # a layer whose cache holds only its sliding window sees the last keys: align every row on positions
        rows = [r if r.shape[-1] == width else torch.nn.functional.pad(r, (width - r.shape[-1], 0),
                                                                        value=float("-inf")) for r in rows]
        scores = torch.stack(rows)  # (L, B, H, Tk)
        self.scores = [None] * len(self.scores)
        return [AttentionRow(scores[:, b]) for b in range(scores.shape[1])]


_RECORDERS: dict[int, Any] = {}  # id(model.config) -> recorder, only inside `capturing`
_REGISTER_LOCK = threading.Lock()


def _row_scores(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float | None,
                softcap: float | None = None, rows: slice = slice(-1, None)) -> torch.Tensor:
    """Pre-softmax scores of the query ``rows``, shape (B, Hq, R, Tk), in float32: q·Kᵀ·scale, then
    softcap·tanh(·/softcap) where the model softcaps attention logits (Gemma 2), then the mask (a boolean mask or an
    additive one; additive entries at the dtype's minimum count as masked, −inf; no mask = causal, as SDPA's
    ``is_causal``, aligned on the last key)."""
    b, hq, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    scale = d ** -0.5 if scaling is None else scaling
    q = query[:, :, rows, :].float() * scale  # (B, Hq, R, D)
    r = q.shape[2]
    grouped = q.reshape(b, hkv, (hq // hkv) * r, d)  # (B, Hkv, n_rep·R, D): grouped by KV head, no copy of K
    scores = torch.matmul(grouped, key.float().transpose(-1, -2)).view(b, hq, r, tk)  # (B, Hq, R, Tk)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        part = mask[:, :, rows, :tk]  # (B, 1|H, R, Tk)
        if part.dtype == torch.bool:
            scores = scores.masked_fill(~part, float("-inf"))
        else:
            blocked = part <= torch.finfo(part.dtype).min / 2
            scores = (scores + part.float()).masked_fill(blocked, float("-inf"))
    else:
        first = rows.indices(tq)[0] + (tk - tq)  # absolute position of the first row's query
        q_pos = torch.arange(first, first + r, device=scores.device)[:, None]  # (R, 1)
        scores = scores.masked_fill(torch.arange(tk, device=scores.device)[None, :] > q_pos, float("-inf"))
    return scores


def _last_row_scores(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float | None, softcap: float | None = None) -> torch.Tensor:
    """Pre-softmax scores of the last query row, shape (B, Hq, Tk), in float32 (see :func:`_row_scores`)."""
    return _row_scores(query, key, mask, scaling, softcap)[:, :, 0]


class _MapRecorder:
    """Full attention maps of chosen layers and heads, computed beside the model's own attention a block of query
    rows at a time and stored in ``dtype`` on the CPU: ``maps[layer]`` (H_sel, T, T)."""

    def __init__(self, layers: list[int], heads: list[int], dtype: torch.dtype, rows: int, base: str,
                 mean_heads: bool = False) -> None:
        self.layers, self.heads, self.dtype, self.rows, self.base = set(layers), heads, dtype, rows, base
        self.mean_heads = mean_heads
        """Keep the mean over the chosen heads only: maps[layer] of shape (1, T, T)."""
        self.maps: dict[int, torch.Tensor] = {}

    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
               scaling: float | None, softcap: float | None) -> None:
        if layer not in self.layers:
            return
        tq, tk = query.shape[2], key.shape[2]
        out = torch.empty(1 if self.mean_heads else len(self.heads), tq, tk, dtype=self.dtype)  # (H_sel | 1, T, Tk)
        pick = torch.tensor(self.heads, device=query.device)
        for start in range(0, tq, self.rows):
            block = slice(start, min(tq, start + self.rows))
            scores = _row_scores(query[:1], key[:1], None if mask is None else mask[:1], scaling, softcap, block)
            probs = torch.softmax(scores[0].index_select(0, pick), dim=-1)  # (H_sel, R, Tk)
            if self.mean_heads:
                probs = probs.mean(0, keepdim=True)  # (1, R, Tk)
            out[:, block] = probs.to(self.dtype).cpu()
        self.maps[layer] = out


def capture_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None,
                              dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """AttentionInterface function: the layer's output from the model's own implementation (SDPA, or its eager
    function for an eager-only model), plus the last query row recorded when capture is on."""
    recorder = _RECORDERS.get(id(module.config))
    if recorder is not None and recorder.base == "eager":
        from labkit.model.hooks import eager_attention_of

        out, weights = eager_attention_of(module)(module, query, key, value, attention_mask, scaling=scaling,
                                                  dropout=dropout, **kwargs)
    else:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                              dropout=dropout, **kwargs)
    if isinstance(recorder, _MapRecorder):
        recorder.record(module.layer_idx, query, key, attention_mask, scaling, kwargs.get("softcap"))
    elif recorder is not None:
        recorder.scores[module.layer_idx] = _last_row_scores(query, key, attention_mask, scaling,
                                                             kwargs.get("softcap"))  # (B, Hq, Tk)
    return out, weights


CAPTURE_BASES = {"sdpa": CAPTURE_ATTN, "eager": CAPTURE_ATTN + "_eager"}
"""Attention implementation the capture runs beside -> the name its capture function is registered under."""


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    with _REGISTER_LOCK:
        for base, name in CAPTURE_BASES.items():
            AttentionInterface.register(name, capture_attention_forward)
            AttentionMaskInterface.register(name, sdpa_mask if base == "sdpa" else eager_mask)  # the base's masks


@contextlib.contextmanager
def attn_implementation(model: Any, name: str) -> Iterator[None]:
    """Switch ``model`` to attention implementation ``name`` inside the block; restored on exit or error."""
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def check_capturable(model: Any) -> str:
    """The attention implementation capture runs beside ("sdpa" or "eager"); InvalidArgument for another."""
    impl = model.config._attn_implementation
    base = {v: k for k, v in CAPTURE_BASES.items()}.get(impl, impl)
    if base not in CAPTURE_BASES:
        raise InvalidArgument(f"capture=['attention'] needs the session's attn='sdpa' or 'eager' (attn='auto' picks "
                              f"one); this model uses {impl!r}")
    return base


@contextlib.contextmanager
def capturing(model: Any, recorder: Any = None) -> Iterator[Any]:
    """Record the last query row of every layer at each forward pass inside the block (or, given a map recorder,
    the full maps of its layers)."""
    base = check_capturable(model) if recorder is None else recorder.base
    _register()
    if recorder is None:
        recorder = _Recorder(model.config.get_text_config(decoder=True).num_hidden_layers, base)
    key = id(model.config.get_text_config(decoder=True))  # a VLM's language-model layers hold its text config
    _RECORDERS[key] = recorder
    try:
        with attn_implementation(model, CAPTURE_BASES[base]):
            yield recorder
    finally:
        _RECORDERS.pop(key, None)


# -- full maps -------------------------------------------------------------------------------------------

@dataclass
class AttentionMaps:
    """Full attention matrices of one prompt, for the layers and heads asked for (all by default)."""

    probs: torch.Tensor
    """Shape (L, H, T, T): attention probabilities, row = query position, column = key position (causal); index i
    of the first two dims is layer ``layers[i]`` and head ``heads[i]``. float32, or the dtype asked for."""
    tokens: list[str]
    """Shape (T,): display text of each position's token."""
    layers: list[int] = field(default_factory=list)
    """The model layers of ``probs``' first dim (all, 0..L−1, when empty at construction)."""
    heads: list[int] = field(default_factory=list)
    """The heads of ``probs``' second dim (all when empty at construction)."""
    image_block: list[int] | None = None
    """The positions of image tokens (a vision-language prompt), marked on the attention images' axes; else None."""

    def __post_init__(self) -> None:
        if self.probs.ndim != 4 or self.probs.shape[-1] != self.probs.shape[-2] != len(self.tokens):
            raise InvalidArgument(f"AttentionMaps.probs must have shape (L, H, T, T) with T = {len(self.tokens)} "
                                  f"tokens; got {tuple(self.probs.shape)}")
        self.layers = list(self.layers) or list(range(self.probs.shape[0]))
        self.heads = list(self.heads) or list(range(self.probs.shape[1]))
        if (len(self.layers), len(self.heads)) != tuple(self.probs.shape[:2]):
            raise InvalidArgument(f"AttentionMaps: {len(self.layers)} layers and {len(self.heads)} heads listed for "
                                  f"probs of shape {tuple(self.probs.shape)}")

    @property
    def n_layers(self) -> int:
        """Number of layers held (L)."""
        return self.probs.shape[0]

    @property
    def n_heads(self) -> int:
        """Number of attention heads held per layer (H)."""
        return self.probs.shape[1]

    def head(self, layer: int, head: int) -> torch.Tensor:
        """Shape (T, T): one head's matrix, by model layer and head number (an error lists the ones held)."""
        if layer not in self.layers:
            raise InvalidArgument(f"layer must be one of the layers held, {_span(self.layers)}; got {layer}")
        if head not in self.heads:
            raise InvalidArgument(f"head must be one of the heads held, {_span(self.heads)}; got {head}")
        return self.probs[self.layers.index(layer), self.heads.index(head)]

    def entropy_bits(self) -> torch.Tensor:
        """Shape (L, H): mean over query positions of each row's attention entropy (bits)."""
        return head_entropy(self.probs).mean(-1)

    def plot(self, layer: int, head: int, size: int = 512) -> Any:
        """One head's matrix as a heatmap (:func:`labkit.records.figures.heatmap`), tokens on both axes; the image
        tokens of a vision-language prompt marked by dashed lines around their block and named "image"."""
        from labkit.records.figures import heatmap

        marked = " (dashed: the image tokens' block)" if self.image_block else ""
        picture = heatmap(self.head(layer, head), labels=self.tokens, size=size,
                          title=f"layer {layer}, head {head}{marked}")
        if self.image_block:
            ax = picture.figure.axes[0]
            for edge in (min(self.image_block) - 0.5, max(self.image_block) + 0.5):
                ax.axvline(edge, color="white", linestyle="--", linewidth=1.2)
                ax.axhline(edge, color="white", linestyle="--", linewidth=1.2)
        return picture


def _span(values: list[int]) -> str:
    return f"[{values[0]}, {values[-1] + 1})" if values == list(range(values[0], values[-1] + 1)) else str(values)


MAP_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def attention_maps(model: Any, ids: torch.Tensor, layers: list[int], heads: list[int], dtype: torch.dtype,
                   mean_heads: bool = False) -> dict[int, torch.Tensor]:
    """Full maps of ``ids`` (1, T) in ``layers`` × ``heads``: {layer: (H_sel, T, T) on the CPU, in ``dtype``}. One
    forward pass with the model's own attention computing every output; beside it, a block of query rows at a time
    (as many as the memory budget of the ids' device holds), softmax(q·Kᵀ·scale + mask) — what eager
    ``output_attentions`` returns, without its L·H·T² float32 tensors (``mean_heads``: only the mean over
    ``heads``, (1, T, T) per layer). The caller checks the kept maps against the budget."""
    from labkit.core import memory

    cfg = model.config.get_text_config(decoder=True)
    length = ids.shape[1]
    rows = memory.pieces(length, 3 * cfg.num_attention_heads * length * 4, 0, "one query row of attention scores",
                         ids.device, "use a shorter prompt")  # scores, probabilities and a copy, float32
    impl = model.config._attn_implementation
    base = "eager" if impl in ("eager", CAPTURE_BASES["eager"]) else "sdpa"
    recorder = _MapRecorder(layers, heads, dtype, rows, base, mean_heads)
    with torch.no_grad(), capturing(model, recorder):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return recorder.maps


# -- metrics ---------------------------------------------------------------------------------------------

def head_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (bits) of attention rows over the last dim (keys). Shape: leading dims."""
    return torch.special.entr(probs.float()).sum(-1) / _LN2  # entr(p) = −p ln p, 0 at p = 0


@dataclass
class StepAttention:
    """Entropix-style attention metrics of one decoding step (the current query row, all layers and heads)."""

    entropy_bits: torch.Tensor
    """Shape (L, H): entropy of each head's attention row (bits)."""
    varentropy_bits: float
    """Variance across heads of the head entropies, averaged over layers (bits²)."""
    agreement: float
    """Mean ``|p − mean over heads of p|`` over keys, heads and layers (probability units; 0 = all heads agree)."""
    interaction_strength: float
    """Mean ``|pre-softmax score|`` over layers, heads and (unmasked) keys (logit units)."""

    @property
    def mean_entropy_bits(self) -> float:
        """Mean of the per-head entropies over layers and heads (bits)."""
        return float(self.entropy_bits.mean())

    def summary(self) -> dict[str, float]:
        """The scalars stored in ``Step.attention``."""
        return {"entropy_bits": self.mean_entropy_bits, "varentropy_bits": self.varentropy_bits,
                "agreement": self.agreement, "interaction_strength": self.interaction_strength}


def step_metrics(row: AttentionRow) -> StepAttention:
    """Per-head entropy, varentropy across heads, agreement and interaction strength of one captured row.

    Runs at every decoding step, so it makes few passes over the (L, H, T_k) scores: one softmax, and the
    masked-key bookkeeping only when some key is masked (score −inf). Entropix's attention metrics are this
    function on the last layer.
    """
    scores = row.scores.float()
    probs = torch.softmax(scores, dim=-1)  # (L, H, Tk), 0 at masked keys
    ent = head_entropy(probs)  # (L, H) bits
    var = ent.var(dim=-1, unbiased=False).mean()  # across heads, then layers
    agreement = probs.sub_(probs.mean(dim=1, keepdim=True)).abs_().mean()  # in place: probs is a fresh tensor
    if bool(scores.min() > float("-inf")):
        strength = scores.abs().mean()
    else:  # masked keys are left out
        magnitude = scores.abs()
        masked = int(torch.isinf(magnitude).sum())
        strength = magnitude.nan_to_num_(posinf=0.0).sum() / max(1, magnitude.numel() - masked)
    return StepAttention(ent, float(var), float(agreement), float(strength))


def token_importance(probs: torch.Tensor) -> torch.Tensor:
    """Attention received by each key position, averaged over every other dim, normalised to sum 1. Shape (T_k,)."""
    received = probs.float().reshape(-1, probs.shape[-1]).mean(0)
    return received / received.sum()


@dataclass(frozen=True)
class RunStats:
    """Statistics of one metric over a run."""

    mean: float
    std: float
    min: float
    max: float
    count: int
    unit: str = "bits"

    @classmethod
    def of(cls, values: Any, unit: str = "bits") -> RunStats:
        """Mean, std (population), min, max and count of ``values`` (any shape, flattened), in ``unit``."""
        v = torch.as_tensor(values, dtype=torch.float64).flatten()
        if v.numel() == 0:
            raise InvalidArgument("RunStats needs at least one value")
        return cls(float(v.mean()), float(v.std(unbiased=False)), float(v.min()), float(v.max()), v.numel(), unit)


class AttentionHealth(enum.StrEnum):
    """A label for a run's attention entropy, with thresholds in :class:`HealthThresholds`."""

    HEALTHY = "Healthy"
    COLLAPSED = "Collapsed"
    TOO_FOCUSED = "TooFocused"
    TOO_DIFFUSE = "TooDiffuse"


@dataclass(frozen=True)
class HealthThresholds:
    """Thresholds of :func:`attention_health`, all in bits except ``collapsed_fraction``."""

    collapse_mean_bits: float = 1.0
    """Collapsed when the average head entropy is below this ..."""
    collapse_head_bits: float = 0.5
    collapsed_fraction: float = 0.8
    """... or when at least this fraction of heads is below ``collapse_head_bits``."""
    focused_bits: float = 1.0
    diffuse_bits: float = 5.0


def is_collapsed(entropy_bits: torch.Tensor, t: HealthThresholds = HealthThresholds()) -> bool:
    """True when attention has collapsed: mean head entropy < 1 bit, or ≥ 80% of heads < 0.5 bit (defaults)."""
    e = entropy_bits.float().flatten()
    return bool(e.mean() < t.collapse_mean_bits or (e < t.collapse_head_bits).float().mean() >= t.collapsed_fraction)


def attention_health(entropy_bits: torch.Tensor, t: HealthThresholds = HealthThresholds()) -> AttentionHealth:
    """Collapsed (see :func:`is_collapsed`), TooFocused (mean < 1 bit), TooDiffuse (mean > 5 bits) or Healthy."""
    mean = float(entropy_bits.float().mean())
    if is_collapsed(entropy_bits, t):
        return AttentionHealth.COLLAPSED
    if mean < t.focused_bits:
        return AttentionHealth.TOO_FOCUSED
    if mean > t.diffuse_bits:
        return AttentionHealth.TOO_DIFFUSE
    return AttentionHealth.HEALTHY


@dataclass
class AttentionReport:
    """Attention over a whole generation, from the Steps' summaries."""

    entropy: RunStats
    varentropy: RunStats
    agreement: RunStats
    interaction_strength: RunStats
    health: AttentionHealth
    per_step: list[dict[str, float]] = field(repr=False, default_factory=list)


def report(steps: list[Any], thresholds: HealthThresholds = HealthThresholds()) -> AttentionReport:
    """Statistics of the attention metrics over steps generated with ``capture=["attention"]``."""
    rows = [s.attention for s in steps if s.attention]
    if not rows:
        raise InvalidArgument("no attention metrics in these steps: generate with capture=['attention']")
    ent = torch.tensor([r["entropy_bits"] for r in rows])
    return AttentionReport(
        entropy=RunStats.of(ent), varentropy=RunStats.of([r["varentropy_bits"] for r in rows], "bits²"),
        agreement=RunStats.of([r["agreement"] for r in rows], "probability"),
        interaction_strength=RunStats.of([r["interaction_strength"] for r in rows], "logit"),
        health=attention_health(ent, thresholds), per_step=rows)
