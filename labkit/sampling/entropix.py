"""Entropix (seed 004; reference: the open-source entropix JAX ``sampler.py``, Oct 2024): choose how to sample
each token from the entropy and varentropy of the next-token distribution and the attention of the last layer.

The pieces are exposed so they can be tested alone: :func:`metrics` (the six numbers), :func:`decide` (the branch
and its sampling parameters) and :class:`Entropix` (the sampler the decoding loop uses). Entropies in bits,
varentropies in bits².

Where the reference is wrong we are correct:

- its min-p filter computes a mask and never applies it; we apply min-p relative to the top probability after
  temperature;
- its top-p mask runs over ascending probabilities; we keep the smallest set of most probable tokens that reaches
  top_p (transformers' TopPLogitsWarper);
- its draw divides probabilities by exponential noise of a fixed key; ours is an exact categorical draw with the
  generation's seeded ``torch.Generator``;
- its clarifying token id 2564 belongs to the Llama 3 tokenizer; ours is configurable text (default ``" ..."``),
  tokenized by the session's tokenizer, and must be a single token.

Filters are applied in the reference's order: temperature, min-p, top-k, top-p.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from labkit.core.errors import InvalidArgument
from labkit.measures import information as info
from labkit.measures.attention import AttentionRow, step_metrics
from labkit.sampling.base import Sampler, argmax_only
from labkit.sampling.params import MIN_P, TEMPERATURE, THRESHOLD, TOP_K, TOP_P, Param

_LN2 = math.log(2.0)


class Branch(enum.StrEnum):
    """Entropix's decision at one step, from the entropy and varentropy of the raw distribution."""

    LELV = "LELV"
    """Low entropy, low varentropy: confident; take the argmax."""
    HELV = "HELV"
    """High entropy, low varentropy: uniformly unsure; insert the clarification token (or sample hotter)."""
    LEHV = "LEHV"
    """Low entropy, high varentropy: a few strong candidates; sample hotter with a wider top-k."""
    HEHV = "HEHV"
    """High entropy, high varentropy: lost; sample much hotter with a narrower top-p."""
    ADAPTIVE = "ADAPTIVE"
    """Anything else: every parameter adapted; best of n candidates by untempered log-probability."""


@dataclass
class EntropixConfig:
    """Every constant of Entropix (the reference's defaults), each a live attribute the sliders may change."""

    temperature: float = 0.666
    top_p: float = 0.90
    top_k: int = 27
    min_p: float = 0.03
    # thresholds (entropy in bits, varentropy in bits²), checked in the order LELV, HELV, LEHV, HEHV
    low_ent: float = 0.1
    low_vent: float = 0.1
    med_ent: float = 3.0
    high_ent: float = 5.0
    high_vent: float = 5.0
    # HELV: T = min(helv_temp_max, temperature·(helv_temp_base + helv_temp_attn_ent·attn_entropy))
    helv_temp_base: float = 1.3
    helv_temp_attn_ent: float = 0.2
    helv_temp_max: float = 1.5
    # LEHV: T = min(lehv_temp_max, temperature·(lehv_temp_base + lehv_temp_strength·interaction_strength));
    #       top_k = max(lehv_top_k_min, int(top_k·(1 + lehv_top_k_agreement·(1 − agreement))))
    lehv_temp_base: float = 1.2
    lehv_temp_strength: float = 0.3
    lehv_temp_max: float = 1.5
    lehv_top_k_agreement: float = 0.5
    lehv_top_k_min: int = 5
    # HEHV: T = max(hehv_temp_min, temperature·(hehv_temp_base + hehv_temp_attn_vent·attn_varentropy));
    #       top_p = max(hehv_top_p_min, top_p − hehv_top_p_attn_ent·attn_entropy)
    hehv_temp_base: float = 2.0
    hehv_temp_attn_vent: float = 0.5
    hehv_temp_min: float = 2.0
    hehv_top_p_attn_ent: float = 0.2
    hehv_top_p_min: float = 0.5
    # ADAPTIVE (see decide)
    ada_temp_logits: float = 0.3
    ada_temp_attn: float = 0.2
    ada_temp_agreement: float = 0.2
    ada_top_p_attn_vent: float = 0.1
    ada_top_p_min: float = 0.1
    ada_top_p_max: float = 1.0
    ada_top_k_strength: float = 0.3
    ada_top_k_agreement: float = 0.2
    ada_top_k_min: int = 1
    ada_top_k_max: int = 100
    ada_min_p_logits: float = 0.5
    ada_min_p_min: float = 0.01
    ada_min_p_max: float = 0.5
    n_candidates: int = 5
    clarify_text: str = " ..."
    """Text of the clarification token HELV inserts; must encode to exactly one token."""

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "clarify_text":
            if not isinstance(value, str) or not value:
                raise InvalidArgument(f"clarify_text must be a non-empty string; got {value!r}")
        elif key in Entropix.params:
            value = Entropix.params[key].check(key, value)
        elif key in _FIELD_TYPES:
            kind = _FIELD_TYPES[key]
            ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok or not math.isfinite(value):
                raise InvalidArgument(f"{key} must be a finite {kind.__name__}; got {value!r}")
            allowed, in_range = _FIELD_RANGES.get(_range_kind(key), ("", lambda v: True))
            if not in_range(value):
                raise InvalidArgument(f"{key} must be {allowed}; got {value!r}")
            value = kind(value)
        else:
            raise InvalidArgument(f"EntropixConfig has no setting {key!r}")
        object.__setattr__(self, key, value)


_FIELD_TYPES: dict[str, type] = {}  # filled below: field name -> int | float
_FIELD_RANGES: dict[str, tuple[str, Any]] = {
    "threshold": ("≥ 0 (bits or bits²)", lambda v: v >= 0),
    "probability": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "top_k": ("an integer ≥ 1", lambda v: v >= 1),
    "positive": ("> 0", lambda v: v > 0),
}
_ORDERED = (("low_ent", "med_ent", "high_ent"), ("low_vent", "high_vent"), ("ada_top_k_min", "ada_top_k_max"),
            ("ada_top_p_min", "ada_top_p_max"), ("ada_min_p_min", "ada_min_p_max"))
"""Settings that must not decrease along each tuple (checked when a generation starts: sliders move one at a time)."""


def _range_kind(key: str) -> str:
    if key.endswith(("_ent", "_vent")) and key.split("_")[0] in ("low", "med", "high"):
        return "threshold"
    if "top_p" in key or "min_p" in key:
        return "probability"
    if "top_k_min" in key or "top_k_max" in key:
        return "top_k"
    if "_temp_" in key and key.endswith(("_max", "_min", "_base")):
        return "positive"
    return ""


def check_order(cfg: EntropixConfig) -> None:
    """InvalidArgument when ordered settings are out of order (e.g. low_ent > med_ent)."""
    for names in _ORDERED:
        values = [getattr(cfg, n) for n in names]
        if values != sorted(values):
            shown = " ≤ ".join(f"{n}={v!r}" for n, v in zip(names, values, strict=True))
            raise InvalidArgument(f"Entropix settings must satisfy {shown}")


@dataclass(frozen=True)
class EntropixMetrics:
    """The six numbers Entropix decides on."""

    entropy: float
    """Next-token entropy (bits)."""
    varentropy: float
    """Variance of the next-token surprisal (bits²)."""
    attn_entropy: float
    """Mean over heads of each head's attention entropy (bits, last layer, current query)."""
    attn_varentropy: float
    """Population variance across heads of those entropies (bits²)."""
    agreement: float
    """Mean over heads and positions of ``|P_h − mean over heads of P|`` (probability units)."""
    interaction_strength: float
    """Mean ``|pre-softmax attention score|`` (logit units)."""

    def as_dict(self) -> dict[str, float]:
        """The metrics as a plain dict (bits, bits²)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Decision:
    """A branch and the sampling parameters it chose."""

    branch: Branch
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    clarify: bool = False
    """Insert the clarification token instead of sampling."""
    n_candidates: int = 1
    """Candidates drawn; the one with the highest untempered log-probability is kept."""

    def as_dict(self) -> dict[str, Any]:
        """The decision as a JSON-ready dict (the branch as its name)."""
        return {**dataclasses.asdict(self), "branch": str(self.branch)}


def metrics(logits: torch.Tensor, attention_scores: torch.Tensor) -> EntropixMetrics:
    """EntropixMetrics from raw ``logits`` (V,) and the last layer's pre-softmax ``attention_scores`` (heads, T)
    for the current query, real positions only (−inf entries are left out). The attention figures are
    :func:`labkit.measures.attention.step_metrics` of that one layer (the same measures the loop records per Step)."""
    logits = logits.reshape(-1).float()
    if attention_scores.ndim != 2:
        raise InvalidArgument(f"attention_scores must have shape (heads, T); got {tuple(attention_scores.shape)}")
    h, v = info.entropy_and_varentropy(info.log_probs(logits), "bits")
    a = step_metrics(AttentionRow(attention_scores[None]))  # one layer: (1, H, T)
    return EntropixMetrics(float(h), float(v), a.mean_entropy_bits, a.varentropy_bits, a.agreement,
                           a.interaction_strength)


def decide(m: EntropixMetrics, config: EntropixConfig | None = None, last_token_id: int | None = None,
           clarify_token_id: int | None = None) -> Decision:
    """The branch for metrics ``m`` and its sampling parameters (see :class:`Branch`).

    HELV inserts the clarification token (``clarify=True``) when ``clarify_token_id`` is known and the previous
    token (``last_token_id``) was not it; otherwise it samples hotter.
    """
    c = config or EntropixConfig()
    h, v = m.entropy, m.varentropy
    base = {"temperature": c.temperature, "top_p": c.top_p, "top_k": c.top_k, "min_p": c.min_p}
    if h < c.low_ent and v < c.low_vent:
        return Decision(Branch.LELV, **base)
    if h > c.high_ent and v < c.low_vent:
        if clarify_token_id is not None and last_token_id != clarify_token_id:
            return Decision(Branch.HELV, **base, clarify=True)
        t = min(c.helv_temp_max, c.temperature * (c.helv_temp_base + c.helv_temp_attn_ent * m.attn_entropy))
        return Decision(Branch.HELV, **{**base, "temperature": t})
    if h < c.high_ent and v > c.high_vent:
        t = min(c.lehv_temp_max, c.temperature * (c.lehv_temp_base + c.lehv_temp_strength * m.interaction_strength))
        k = max(c.lehv_top_k_min, int(c.top_k * (1 + c.lehv_top_k_agreement * (1 - m.agreement))))
        return Decision(Branch.LEHV, **{**base, "temperature": t, "top_k": k})
    if h > c.med_ent and v > c.high_vent:
        t = max(c.hehv_temp_min, c.temperature * (c.hehv_temp_base + c.hehv_temp_attn_vent * m.attn_varentropy))
        p = max(c.hehv_top_p_min, c.top_p - c.hehv_top_p_attn_ent * m.attn_entropy)
        return Decision(Branch.HEHV, **{**base, "temperature": t, "top_p": p})
    t = c.temperature * (1 + c.ada_temp_logits * (h + v) + c.ada_temp_attn * (m.attn_entropy + m.attn_varentropy)
                         - c.ada_temp_agreement * m.agreement)
    p = min(max(c.top_p * (1 + c.ada_top_p_attn_vent * m.attn_varentropy), c.ada_top_p_min), c.ada_top_p_max)
    k = round(c.top_k * (1 + c.ada_top_k_strength * m.interaction_strength - c.ada_top_k_agreement * m.agreement))
    k = min(max(k, c.ada_top_k_min), c.ada_top_k_max)
    mp = min(max(c.min_p * (1 - c.ada_min_p_logits * (h + v)), c.ada_min_p_min), c.ada_min_p_max)
    return Decision(Branch.ADAPTIVE, temperature=max(t, 1e-3), top_p=p, top_k=int(k), min_p=mp,
                    n_candidates=c.n_candidates)


def filtered_scores(scores: torch.Tensor, d: Decision) -> torch.Tensor:
    """Shape (B, V): ``scores`` after temperature, min-p, top-k and top-p of decision ``d`` (a new tensor)."""
    out = TemperatureLogitsWarper(d.temperature)(None, scores.float().clone())
    if d.min_p > 0:
        out = MinPLogitsWarper(d.min_p)(None, out)
    if d.top_k > 0:
        out = TopKLogitsWarper(d.top_k)(None, out)
    if d.top_p < 1.0:
        out = TopPLogitsWarper(d.top_p)(None, out)
    return out


class Entropix(Sampler):
    """The Entropix sampler. Switches on the attention capture it needs; every Step records its metrics and
    decision. Its settings are the fields of ``cfg`` (an :class:`EntropixConfig`), also reachable as attributes
    (``sampler.temperature = 0.5`` sets ``sampler.cfg.temperature``). Batch size 1 only."""

    name = "entropix"
    stateless = False
    needs = frozenset({"attention"})
    params: ClassVar[dict[str, Param]] = {
        "temperature": TEMPERATURE.but(default=0.666), "top_p": TOP_P.but(default=0.90),
        "top_k": TOP_K.but(default=27), "min_p": MIN_P.but(default=0.03),
        "low_ent": THRESHOLD.but(default=0.1, help="below it a step's entropy is low"),
        "med_ent": THRESHOLD.but(default=3.0, help="the middle entropy band's upper end"),
        "high_ent": THRESHOLD.but(default=5.0, slider=(0.0, 12.0, 0.05), help="above it a step's entropy is high"),
        "low_vent": THRESHOLD.but(default=0.1, unit="bits²", help="below it a step's varentropy is low"),
        "high_vent": THRESHOLD.but(default=5.0, unit="bits²", slider=(0.0, 20.0, 0.1),
                                   help="above it a step's varentropy is high"),
        "n_candidates": Param(5, int, lo=1, help="ADAPTIVE's candidates, best by untempered log-probability"),
    }
    """The settings with a range, unit and slider; every other EntropixConfig constant is checked by its kind."""

    def __init__(self, config: EntropixConfig | None = None, **settings: Any) -> None:
        object.__setattr__(self, "cfg", dataclasses.replace(config or EntropixConfig()))
        for key, value in settings.items():
            setattr(self.cfg, key, value)
        self.reset()

    def __getattr__(self, key: str) -> Any:
        cfg = self.__dict__.get("cfg")
        if cfg is not None and key in _FIELD_TYPES:
            return getattr(cfg, key)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    def __setattr__(self, key: str, value: Any) -> None:
        if key in _FIELD_TYPES:
            setattr(self.cfg, key, value)
        else:
            super().__setattr__(key, value)

    def reset(self, tokenizer: Any = None) -> None:
        check_order(self.cfg)
        self.clarify_token_id: int | None = None
        if tokenizer is not None:
            ids = tokenizer(self.cfg.clarify_text, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise InvalidArgument(f"clarify_text must encode to exactly one token; {self.cfg.clarify_text!r} "
                                      f"gives {len(ids)} tokens {ids}")
            self.clarify_token_id = ids[0]
        self._attention: torch.Tensor | None = None
        self._last: tuple[EntropixMetrics, Decision, torch.Tensor] | None = None

    def observe(self, captures: dict[str, Any]) -> None:
        self._attention = captures["attention"].scores[-1]  # (H, T): the last layer's current query

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != 1:
            raise InvalidArgument(f"Entropix samples one sequence at a time; got a batch of {scores.shape[0]}")
        if self._attention is None:
            raise InvalidArgument("Entropix needs the attention capture: use it through Session.generate/stream")
        m = metrics(scores[0], self._attention)
        last = int(input_ids[0, -1]) if input_ids.shape[-1] > 0 else None
        d = decide(m, self.cfg, last, self.clarify_token_id)
        self._last = (m, d, info.log_probs(scores.float()))
        self._attention = None  # one observation per step
        if d.branch is Branch.LELV:
            return argmax_only(scores)
        if d.clarify:
            out = torch.full_like(scores, float("-inf"), dtype=torch.float32)
            out[:, self.clarify_token_id] = 0.0
            return out
        return filtered_scores(scores, d)

    def draw(self, scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self._last is not None and (self._last[1].branch is Branch.LELV or self._last[1].clarify):
            return scores.argmax(dim=-1)  # a one-hot: no random number used
        if self._last is None or self._last[1].n_candidates <= 1:
            return super().draw(scores, generator)
        n, logp = self._last[1].n_candidates, self._last[2]  # logp: untempered (1, V) nats
        candidates = torch.multinomial(torch.softmax(scores.float(), -1), n, replacement=True, generator=generator)
        best = logp.expand(candidates.shape[0], -1).gather(-1, candidates).argmax(-1, keepdim=True)  # (B, 1)
        return candidates.gather(-1, best).squeeze(-1)

    def record(self, scores: torch.Tensor) -> dict[str, Any]:
        if self._last is None:
            return {"name": self.name}
        m, d, _ = self._last
        return {"name": self.name, **m.as_dict(), **d.as_dict()}

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.cfg)}

    def __repr__(self) -> str:
        changed = {k: v for k, v in dataclasses.asdict(self.cfg).items()
                   if v != getattr(EntropixConfig, k, None)}
        return f"Entropix({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


_FIELD_TYPES.update({f.name: (int if f.type in ("int", int) else float) for f in dataclasses.fields(EntropixConfig)
                     if f.name != "clarify_text"})
_FIELD_TYPES["clarify_text"] = str
