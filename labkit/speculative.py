"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023), exact and instrumented.

A *draft* proposes γ tokens; the target verifies them all in one forward pass with its KV cache (THE decoding loop
in :mod:`labkit.decode` does this, one round at a time); a drafted token x is kept with probability
min(1, p(x)/q(x)), the first rejected one is replaced by a draw from norm(max(0, p − q)), and after γ acceptances a
bonus token is drawn from p. p and q are the distributions *after* the sampler's own processing (temperature,
top-k, top-p, min-p, ...), so the output is distributed exactly as plain decoding with that sampler; with greedy
(p one-hot) the same rule keeps drafted tokens while they are the target's argmax. Rejected tokens' cache entries
are cropped. Every Step records its round and whether its token was drafted and accepted or drawn by the target.

Drafts: :class:`ModelDraft` (another local model, same tokenizer), :class:`LayerSkipDraft` (the target's first n
layers, sharing its weights and cache), :class:`QuantizedDraft` (the target at lower precision) and
:class:`PromptLookupDraft` (copy the continuation of an earlier n-gram match). :class:`SpeculativeStats` sums a run.
"""

from __future__ import annotations

import collections
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from labkit.errors import InvalidArgument, check_int
from labkit.hooks import sites_of
from labkit.models import forward_cached, new_cache
from labkit.sampling.base import Greedy

ORIGINS = ("accepted", "resampled", "bonus", "target")
"""``Step.speculative["origin"]``: a drafted token the target kept; the target's draw after rejecting a drafted
token; the target's draw after all γ drafted tokens were kept; a plain target draw in a round with nothing drafted."""


# -- the exact rule -------------------------------------------------------------------------------------------

def accepts(px: torch.Tensor, qx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool, shape of ``px``: keep each drafted token with probability min(1, p(x)/q(x)) (u·q(x) < p(x), u ~ U[0,1),
    so q(x) = 0 is safe)."""
    u = torch.rand(px.shape, generator=generator, dtype=px.dtype, device=px.device)
    return u * qx < px


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Shape (..., V): norm(max(0, p − q)), the distribution to draw from after a rejection; p itself where
    p ≤ q everywhere (then a rejection has probability 0)."""
    res = (p - q).clamp(min=0.0)
    mass = res.sum(-1, keepdim=True)
    return torch.where(mass > 0, res / mass.clamp(min=1e-30), p)


@dataclass(frozen=True)
class Verdict:
    """Result of verifying one round per batch row."""

    accepted: torch.Tensor
    """Shape (B,): how many drafted tokens were kept (0..γ)."""
    next_token: torch.Tensor
    """Shape (B,): the token after the kept ones — drawn from the residual after a rejection, else a bonus token
    drawn from the target's distribution after the last drafted position."""


def verify(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, generator: torch.Generator | None = None,
           greedy: bool = False) -> Verdict:
    """Verify drafted tokens exactly, batched (the loop applies the same :func:`accepts` / :func:`residual` one
    position at a time, so it can stop computing at the first rejection).

    ``p``: (B, γ + 1, V) target probabilities at the γ drafted positions and the one after; ``q``: (B, γ, V) draft
    probabilities the tokens were drawn from (one-hot for a deterministic draft); ``drafted``: (B, γ) token ids.
    ``greedy``: keep while x is p's argmax, then take p's argmax.
    """
    b, g1, v = p.shape
    gamma = g1 - 1
    if q.shape != (b, gamma, v) or drafted.shape != (b, gamma):
        raise InvalidArgument(f"verify needs p (B, γ+1, V), q (B, γ, V), drafted (B, γ); got {tuple(p.shape)}, "
                              f"{tuple(q.shape)}, {tuple(drafted.shape)}")
    idx = drafted.unsqueeze(-1)  # (B, γ, 1)
    if greedy:
        ok = p[:, :gamma].argmax(-1) == drafted  # (B, γ)
    else:
        ok = accepts(p[:, :gamma].gather(-1, idx)[..., 0], q.gather(-1, idx)[..., 0], generator)  # (B, γ)
    accepted = ok.long().cumprod(-1).sum(-1)  # (B,) leading run of acceptances
    rows = torch.arange(b, device=p.device)
    target = p[rows, accepted]  # (B, V): the distribution at the first unkept position
    if greedy:
        return Verdict(accepted, target.argmax(-1))
    if gamma > 0:
        at = accepted.clamp(max=gamma - 1)
        res = residual(p[rows, at], q[rows, at])  # (B, V)
        target = torch.where((accepted < gamma).unsqueeze(-1), res, target)
    return Verdict(accepted, torch.multinomial(target, 1, generator=generator)[:, 0])


def judge(p: torch.Tensor, q: torch.Tensor | None, token: int,
          generator: torch.Generator | None = None) -> tuple[int, bool]:
    """One drafted ``token`` at one position: ``(token, True)`` if kept, else ``(replacement, False)`` drawn from
    the residual. ``p``, ``q``: shape (V,) target and draft probabilities; ``q=None`` is a deterministic draft
    (one-hot on ``token``)."""
    qx = q[token] if q is not None else p.new_ones(())
    if bool(accepts(p[token], qx, generator)):
        return token, True
    if q is None:
        q = torch.zeros_like(p)
        q[token] = 1.0
    return int(torch.multinomial(residual(p, q), 1, generator=generator)), False


def expected_speedup(alpha: float, gamma: float, cost_ratio: float, verify_growth: float = 0.0) -> float:
    """Expected speedup of speculative decoding over plain decoding (Leviathan et al., 2023, Theorem 3.8):
    (1 − α^(γ+1)) / ((1 − α)(γ·c + 1)), with α the acceptance rate, γ the drafted tokens per round and c the
    draft/target cost ratio per token. At α = 1 the first factor is its limit γ + 1. The theorem assumes verifying
    γ + 1 tokens costs one target step (true on a GPU); ``verify_growth`` g is the extra cost of each further
    verified position as a fraction of one target step (on a CPU a pass over n positions costs 1 + g·(n − 1)
    steps), giving (1 − α^(γ+1)) / ((1 − α)(γ·c + 1 + g·γ))."""
    if not 0 <= alpha <= 1 or gamma < 1 or cost_ratio < 0 or verify_growth < 0:
        raise InvalidArgument(f"need 0 ≤ alpha ≤ 1, gamma ≥ 1, cost_ratio ≥ 0, verify_growth ≥ 0; got {alpha}, "
                              f"{gamma}, {cost_ratio}, {verify_growth}")
    tokens = gamma + 1 if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * cost_ratio + 1 + verify_growth * gamma)


@dataclass
class VerifyCost:
    """Least-squares line through the target's verification passes: ms = a + b·n for a pass over n positions
    (fitted on the rounds of one generation). Gives the cost of one plain step, a + b, and the growth g = b/(a + b)
    of :func:`expected_speedup`."""

    count: int = 0
    sum_n: float = 0.0
    sum_nn: float = 0.0
    sum_ms: float = 0.0
    sum_n_ms: float = 0.0

    def add(self, n: int, ms: float) -> None:
        self.count += 1
        self.sum_n += n
        self.sum_nn += n * n
        self.sum_ms += ms
        self.sum_n_ms += n * ms

    def fit(self) -> tuple[float, float] | None:
        """(ms of a one-position pass, growth g ≥ 0), or None until two different pass sizes were seen."""
        spread = self.count * self.sum_nn - self.sum_n ** 2
        if self.count < 2 or spread <= 1e-9:
            return None
        b = (self.count * self.sum_n_ms - self.sum_n * self.sum_ms) / spread
        a = (self.sum_ms - b * self.sum_n) / self.count
        step = a + b
        if step <= 0:
            return None
        return step, max(0.0, b / step)


# -- drafts ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Proposal:
    """What a draft proposes for one round."""

    tokens: list[int]
    """Shape (γ,): drafted token ids (γ may be 0: nothing to propose)."""
    q: torch.Tensor | None = None
    """Shape (γ, V): the draft's probabilities (after the sampler) the tokens were drawn from; None for a
    deterministic draft (one-hot on each token)."""

    def q_row(self, i: int) -> torch.Tensor | None:
        return None if self.q is None else self.q[i]


NOTHING = Proposal([])


def crop(cache: Any, length: int) -> None:
    """Cut every layer of a transformers cache to its first ``length`` positions (layers may differ in length)."""
    for layer in cache.layers:
        extra = layer.get_seq_length() - length
        if extra > 0:
            layer.crop(-extra)


class Draft:
    """Base class of draft kinds. ``gamma``: drafted tokens per round (the most, when ``adaptive``);
    ``adaptive``: choose γ each round from the recent accepted run lengths, the measured draft cost and the
    measured growth of the verification pass (see :meth:`Speculator.gamma`); ``confidence`` (model drafts): end
    a round's drafting after a token the draft gave a raw probability below it (transformers'
    ``assistant_confidence_threshold``, default 0.4 there).

    The loop calls ``bind(session)`` once per generation call (before it starts), ``start(prompt_ids)`` per
    generation, ``propose(...)`` per round and ``rollback(length)`` after each verification.
    """

    name: ClassVar[str] = "draft"
    deterministic: ClassVar[bool] = False
    """True when the draft does not sample (prompt lookup): q is one-hot and the sampler is not applied to it."""

    def __init__(self, gamma: int = 4, adaptive: bool = False, confidence: float = 0.0) -> None:
        check_int("gamma (drafted tokens per round)", gamma, 1, 64)
        if not isinstance(adaptive, bool):
            raise InvalidArgument(f"adaptive must be True or False; got {adaptive!r}")
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 <= confidence < 1:
            raise InvalidArgument(f"confidence must be a number in [0, 1) (0: always draft gamma tokens); "
                                  f"got {confidence!r}")
        self.gamma = gamma
        self.adaptive = adaptive
        self.confidence = float(confidence)

    def bind(self, session: Any) -> None:
        """Check the draft fits ``session``'s model and load what it needs (once per target)."""

    def start(self, prompt_ids: torch.Tensor) -> None:
        """Clear per-generation state."""

    def propose(self, ids: torch.Tensor, gamma: int, cache: Any, sampler: Any,
                generator: torch.Generator | None, stop: frozenset[int] = frozenset()) -> Proposal:
        """Up to ``gamma`` tokens to follow ``ids`` (shape (1, T)). ``cache`` is the target's KV cache (holding
        positions 0..T−2); a draft that writes into it must leave it as it found it. ``stop``: token ids that end
        generation (EOS, stop tokens); a proposal ends at the first of them, since nothing after it is kept."""
        raise NotImplementedError  # every concrete draft overrides it

    def rollback(self, length: int) -> None:
        """The verified sequence is now ``length`` tokens plus one new token: drop any state beyond ``length``."""

    def config(self) -> dict[str, Any]:
        """Name and settings (stored in the Trace metadata)."""
        return {"name": self.name, "gamma": self.gamma, "adaptive": self.adaptive, "confidence": self.confidence}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


def _autoregress(forward: Callable[[torch.Tensor], torch.Tensor], feed: torch.Tensor, ids: torch.Tensor,
                 gamma: int, sampler: Any, generator: torch.Generator | None, vocab: int,
                 confidence: float = 0.0, stop: frozenset[int] = frozenset()) -> Proposal:
    """Draw up to ``gamma`` tokens one by one from a draft model: ``forward(input_ids) -> logits (1, t, V')``
    advances the draft's cache; ``feed`` (1, t) is what the draft has not seen yet. q is the sampler-processed draft
    distribution, cut or padded to the target's ``vocab``. Drafting stops early after a token whose raw draft
    probability is below ``confidence`` (transformers' ``assistant_confidence_threshold`` rule) or after a token in
    ``stop``."""
    tokens: list[int] = []
    rows: list[torch.Tensor] = []
    greedy = isinstance(sampler, Greedy)  # deterministic: q is one-hot on the token (Proposal.q = None)
    for _ in range(gamma):
        logits = forward(feed)[:, -1].float()  # (1, V')
        if logits.shape[-1] != vocab:
            logits = logits[:, :vocab] if logits.shape[-1] > vocab else torch.nn.functional.pad(
                logits, (0, vocab - logits.shape[-1]), value=float("-inf"))
        if greedy:
            token = logits.argmax(-1)  # (1,)
        else:
            scores = sampler(ids, logits.to(ids.device))  # (1, V)
            token = sampler.draw(scores, generator)  # (1,)
            rows.append(torch.softmax(scores[0], dim=-1))
        tokens.append(int(token))
        if tokens[-1] in stop or (confidence and float(torch.softmax(logits[0], dim=-1)[tokens[-1]]) < confidence):
            break
        feed = token.view(1, 1)
        ids = torch.cat([ids, feed.to(ids.device)], dim=1)
    return Proposal(tokens, torch.stack(rows) if rows else None)


class _ModelDrafting(Draft):
    """A draft that is a separate model with its own KV cache, loaded by ``_load`` when bound to a target."""

    def __init__(self, gamma: int, adaptive: bool, confidence: float) -> None:
        super().__init__(gamma, adaptive, confidence)
        self._for: Any = None  # the target session this draft is bound to
        self._model: Any = None
        self._cache: Any = None

    def _load(self, session: Any) -> tuple[Any, Any]:
        """(model, tokenizer) of the draft for ``session``."""
        raise NotImplementedError  # ModelDraft and QuantizedDraft override it

    def bind(self, session: Any) -> None:
        if self._for is session:
            return
        model, tokenizer = self._load(session)
        if tokenizer.get_vocab() != session.tokenizer.get_vocab():
            raise InvalidArgument(f"{type(self).__name__} needs the target's tokenizer: the draft's vocabulary "
                                  f"({len(tokenizer)} tokens) differs from the target's ({len(session.tokenizer)})")
        self._model, self._for = model, session

    def start(self, prompt_ids: torch.Tensor) -> None:
        self._cache = new_cache()

    def propose(self, ids: torch.Tensor, gamma: int, cache: Any, sampler: Any,
                generator: torch.Generator | None, stop: frozenset[int] = frozenset()) -> Proposal:
        device = self._model.device

        def forward(x: torch.Tensor) -> torch.Tensor:
            return forward_cached(self._model, x.to(device), self._cache)

        seen = self._cache.get_seq_length()
        return _autoregress(forward, ids[:, seen:], ids, gamma, sampler, generator, self._for.info.vocab_size,
                            self.confidence, stop)

    def rollback(self, length: int) -> None:
        crop(self._cache, length)


class ModelDraft(_ModelDrafting):
    """Another local model with the target's tokenizer drafts (e.g. a smaller model of the same family).
    ``model``: a :class:`~labkit.session.Session` or a local model folder (loaded on the target's device)."""

    name = "model"

    def __init__(self, model: Any, gamma: int = 10, adaptive: bool = False, confidence: float = 0.4) -> None:
        super().__init__(gamma, adaptive, confidence)
        from labkit.session import Session

        if not isinstance(model, (Session, str, os.PathLike)):
            raise InvalidArgument(f"ModelDraft needs a Session or a local model folder; got {type(model).__name__}")
        self.source = model

    def _load(self, session: Any) -> tuple[Any, Any]:
        from labkit import models
        from labkit.session import Session

        if isinstance(self.source, Session):
            return self.source.model, self.source.tokenizer
        model, tokenizer, _ = models.load(self.source, device=session.info.device, progress=False)
        return model, tokenizer

    def config(self) -> dict[str, Any]:
        source = self.source.model_id if hasattr(self.source, "model_id") else str(self.source)
        return {**super().config(), "model": source}


class QuantizedDraft(_ModelDrafting):
    """The target model itself at lower precision drafts: ``dtype`` "bfloat16"|"float16" and/or ``quantization``
    "8bit"|"4bit" (bitsandbytes, CUDA). Loaded once from the target's folder, beside the target."""

    name = "quantized"

    def __init__(self, dtype: str | None = "bfloat16", quantization: str | None = None, gamma: int = 10,
                 adaptive: bool = False, confidence: float = 0.4) -> None:
        super().__init__(gamma, adaptive, confidence)
        from labkit import models

        if dtype not in (None, "bfloat16", "float16"):
            raise InvalidArgument(f"dtype must be 'bfloat16', 'float16' or None; got {dtype!r}")
        if quantization not in models.QUANTIZATIONS:
            raise InvalidArgument(f"quantization must be one of {models.QUANTIZATIONS}; got {quantization!r}")
        if dtype is None and quantization is None:
            raise InvalidArgument("QuantizedDraft needs a lower-precision dtype or a quantization; got neither")
        self.dtype, self.quantization = dtype, quantization

    def _load(self, session: Any) -> tuple[Any, Any]:
        from labkit import models

        model, tokenizer, _ = models.load(session.info.path, device=session.info.device, dtype=self.dtype or "auto",
                                          quantization=self.quantization, attn=session.info.attn, progress=False)
        return model, tokenizer

    def config(self) -> dict[str, Any]:
        return {**super().config(), "dtype": self.dtype, "quantization": self.quantization}


class LayerSkipDraft(Draft):
    """Self-speculative decoding (LayerSkip, Elhoushi et al., 2024): the target's first ``n_layers`` decoder layers
    plus its final norm and unembedding draft, sharing the target's weights and KV cache (the draft's entries in
    the first layers are cropped before the target verifies)."""

    name = "layer-skip"

    def __init__(self, n_layers: int, gamma: int = 10, adaptive: bool = False, confidence: float = 0.4) -> None:
        super().__init__(gamma, adaptive, confidence)
        check_int("n_layers", n_layers, 1)
        self.n_layers = n_layers
        self._model: Any = None

    def bind(self, session: Any) -> None:
        total = session.info.n_layers
        if self.n_layers >= total:
            raise InvalidArgument(f"n_layers must be in [1, {total - 1}] (the target has {total} layers); "
                                  f"got {self.n_layers}")
        self._model = session.model
        self._vocab = session.info.vocab_size

    def propose(self, ids: torch.Tensor, gamma: int, cache: Any, sampler: Any,
                generator: torch.Generator | None, stop: frozenset[int] = frozenset()) -> Proposal:
        base = cache.get_seq_length()

        def forward(x: torch.Tensor) -> torch.Tensor:
            return forward_cached(self._model, x, cache)

        try:
            with sites_of(self._model).first_blocks(self.n_layers):
                return _autoregress(forward, ids[:, base:], ids, gamma, sampler, generator, self._vocab,
                                    self.confidence, stop)
        finally:
            crop(cache, base)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "n_layers": self.n_layers}


class PromptLookupDraft(Draft):
    """Prompt lookup decoding (Saxena, 2023): find the most recent earlier occurrence of the last ``ngram`` tokens
    (then of shorter n-grams, down to 1) in the prompt and generated text, and propose the up to ``max_tokens``
    tokens that followed it. Deterministic (q one-hot), no model: strong on copy-heavy tasks (editing code)."""

    name = "prompt-lookup"
    deterministic = True

    def __init__(self, ngram: int = 3, max_tokens: int = 10, adaptive: bool = False) -> None:
        check_int("max_tokens", max_tokens, 1, 64)
        super().__init__(max_tokens, adaptive)
        check_int("ngram", ngram, 1, 16)
        self.ngram = ngram

    def propose(self, ids: torch.Tensor, gamma: int, cache: Any, sampler: Any,
                generator: torch.Generator | None, stop: frozenset[int] = frozenset()) -> Proposal:
        seq = ids[0]
        for n in range(min(self.ngram, seq.numel() - 1), 0, -1):
            earlier = seq[:-1].unfold(0, n, 1)  # (T − n, n): every n-gram that has a token after it
            hits = (earlier == seq[-n:]).all(-1).nonzero()
            if hits.numel():
                start = int(hits[-1]) + n
                tokens = seq[start:start + gamma].tolist()
                end = next((i + 1 for i, token in enumerate(tokens) if token in stop), len(tokens))
                return Proposal(tokens[:end])
        return NOTHING

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "ngram": self.ngram, "max_tokens": self.gamma, "adaptive": self.adaptive}


DRAFT_SPECS = ("prompt-lookup[:ngram=3,max_tokens=10]", "layer-skip:N[,gamma=10,confidence=0.4]",
               "bf16|fp16[:gamma=10,confidence=0.4]", "8bit|4bit[:gamma=10]", "model:PATH[,gamma=10]")


def parse_draft(spec: str) -> Draft:
    """A draft from a CLI spec: ``prompt-lookup``, ``layer-skip:8``, ``bf16``, ``8bit``, ``model:/path`` (each with
    optional ``gamma=…``/``confidence=…``/``adaptive=1`` settings after a comma, e.g. ``layer-skip:8,gamma=3``)."""
    from labkit.specs import parse_spec

    if not isinstance(spec, str) or not spec.strip():
        raise InvalidArgument(f"speculative spec must be one of {DRAFT_SPECS}; got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    first, _, more = rest.partition(",")
    positional = first if first and "=" not in first else ""
    _, settings = parse_spec(f"{name}:{more if positional else rest}", "speculative")
    if "adaptive" in settings:
        settings["adaptive"] = bool(settings["adaptive"])
    try:
        if name == "prompt-lookup" and not positional:
            return PromptLookupDraft(**settings)
        if name == "layer-skip" and positional.isdigit():
            return LayerSkipDraft(int(positional), **settings)
        if name in ("bf16", "fp16") and not positional:
            return QuantizedDraft(dtype={"bf16": "bfloat16", "fp16": "float16"}[name], **settings)
        if name in ("8bit", "4bit") and not positional:
            return QuantizedDraft(dtype=None, quantization=name, **settings)
        if name == "model" and positional:
            return ModelDraft(positional, **settings)
    except TypeError as e:
        raise InvalidArgument(f"speculative spec {spec!r}: {e}") from e
    raise InvalidArgument(f"speculative spec must be one of {DRAFT_SPECS}; got {spec!r}")


# -- the run: adaptive γ, timing, statistics -------------------------------------------------------------------

@dataclass
class SpeculativeStats:
    """What a speculative generation did. Times in milliseconds; α is per drafted token."""

    draft: dict[str, Any]
    """The draft's name and settings."""
    rounds: int = 0
    """Target forward passes (one per round)."""
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    """Tokens generated (accepted drafts plus one target draw per round, fewer when a stop rule ends a round)."""
    draft_ms: float = 0.0
    """Time spent drafting."""
    target_ms: float = 0.0
    """Time in the target's verification forward passes."""
    total_ms: float = 0.0
    """Wall time of the generation (the sum of its steps' times)."""
    gammas: list[int] = field(default_factory=list)
    """γ of each round (0 when the draft had nothing to propose)."""
    plain_ms_per_token: float | None = None
    """Plain (non-speculative) decoding's ms/token on the same prompt, when measured (:func:`measure`)."""

    @property
    def alpha(self) -> float:
        """Acceptance rate: accepted / drafted (nan when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else math.nan

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else math.nan

    @property
    def mean_gamma(self) -> float:
        return self.drafted / self.rounds if self.rounds else math.nan

    @property
    def cost_ratio(self) -> float:
        """c: draft time per drafted token / target time per verification pass."""
        if not self.drafted or not self.target_ms:
            return math.nan
        return (self.draft_ms / self.drafted) / (self.target_ms / self.rounds)

    @property
    def expected_speedup(self) -> float:
        """:func:`expected_speedup` at the measured α, mean γ and c (nan when nothing was drafted)."""
        if not self.drafted or math.isnan(self.cost_ratio):
            return math.nan
        return expected_speedup(self.alpha, max(self.mean_gamma, 1.0), self.cost_ratio)

    @property
    def ms_per_token(self) -> float:
        return self.total_ms / self.tokens if self.tokens else math.nan

    @property
    def measured_speedup(self) -> float:
        """plain ms/token ÷ speculative ms/token (nan until ``plain_ms_per_token`` is measured)."""
        if self.plain_ms_per_token is None or not self.tokens:
            return math.nan
        return self.plain_ms_per_token / self.ms_per_token

    def as_dict(self) -> dict[str, Any]:
        """The fields plus the derived figures (stored in ``Trace.meta.speculative``; None where undefined)."""
        derived = ("alpha", "tokens_per_round", "mean_gamma", "cost_ratio", "expected_speedup", "ms_per_token",
                   "measured_speedup")
        figures = {k: getattr(self, k) for k in derived}
        return asdict(self) | {k: None if math.isnan(v) else v for k, v in figures.items()}  # None: undefined

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeculativeStats:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def of(cls, trace: Any) -> SpeculativeStats:
        """The statistics of a speculative Trace (InvalidArgument for a plain one)."""
        if not trace.meta.speculative:
            raise InvalidArgument("this trace was not generated with speculative=...")
        return cls.from_dict(trace.meta.speculative)

    def __str__(self) -> str:
        def f(x: float, spec: str) -> str:
            return "n/a" if x is None or math.isnan(x) else format(x, spec)

        return (f"{self.draft.get('name')}: {self.tokens} tokens in {self.rounds} rounds, "
                f"α={f(self.alpha, '.3f')}, {f(self.tokens_per_round, '.2f')} tokens/round, "
                f"mean γ={f(self.mean_gamma, '.2f')}, c={f(self.cost_ratio, '.3f')}, "
                f"{f(self.ms_per_token, '.1f')} ms/token, expected speedup {f(self.expected_speedup, '.2f')}×, "
                f"measured {f(self.measured_speedup, '.2f')}×")


class Speculator:
    """One speculative generation's bookkeeping for the decoding loop: picks γ, times the draft and the target,
    rolls the draft back and sums :class:`SpeculativeStats`."""

    def __init__(self, draft: Draft, stop: frozenset[int] = frozenset()) -> None:
        self.draft = draft
        self.stop = stop  # token ids that end generation: no drafting past them
        self.stats = SpeculativeStats(draft=draft.config())
        self._a = self._d = 0.0  # exponentially decayed accepted / drafted counts for adaptive γ
        self.verify = VerifyCost()  # the target's pass time against the positions it verifies
        self._idle = 0  # adaptive rounds in a row that drafted nothing because no γ was expected to pay
        self._runs: collections.deque[tuple[int, int]] = collections.deque(maxlen=32)  # (accepted, drafted)

    def start(self, prompt_ids: torch.Tensor) -> None:
        self.draft.start(prompt_ids)

    def expected_tokens(self, gamma: int) -> float:
        """Expected tokens from a round that drafts ``gamma``: 1 + E[min(L, γ)] with L the accepted run length.
        E is a weighted mean over the recent rounds (weight 0.8^age) and one prior round whose L is geometric at
        the running acceptance rate α (Leviathan's model: alone it gives (1 − α^(γ+1)) / (1 − α)). A round that
        stopped at a rejection contributes min(accepted, γ); a round that kept all its d drafts only shows L ≥ d, so
        beyond d it continues geometrically at α."""
        alpha = (self._a + 1) / (self._d + 2)  # Laplace estimate of the running acceptance rate

        def geometric(n: int) -> float:  # E[accepted among n more drafts], each kept with probability α in turn
            return float(n) if alpha == 1 else alpha * (1 - alpha ** n) / (1 - alpha)

        total, weights = geometric(gamma), 1.0
        for age, (accepted, drafted) in enumerate(reversed(self._runs)):
            run = min(accepted, gamma) if accepted < drafted or gamma <= drafted else drafted + geometric(
                gamma - drafted)
            total += 0.8 ** age * run
            weights += 0.8 ** age
        return 1 + total / weights

    def gamma(self, limit: int) -> int:
        """γ for the next round, at most ``limit`` (tokens still allowed after the round's target draw).
        Adaptive: the γ ≤ ``gamma`` that maximises expected tokens per round (:meth:`expected_tokens`) over the
        round's cost in target steps, 1 + γ·c + γ·g (c: measured draft cost per token; g: measured growth of the
        verification pass per position, see :func:`expected_speedup`); 0 (a plain step) when no γ is expected to
        beat plain decoding, except every 9th such round, which drafts the best γ anyway to see if drafts pay again."""
        gamma = self.draft.gamma
        if self.draft.adaptive:
            fit = self.verify.fit()
            if fit is None:
                c, growth = self.stats.cost_ratio, 0.0
                c = 0.0 if math.isnan(c) else c
            else:
                step_ms, growth = fit
                c = self.stats.draft_ms / self.stats.drafted / step_ms if self.stats.drafted else 0.0
            speedup = {g: self.expected_tokens(g) / (1 + g * (c + growth)) for g in range(1, gamma + 1)}
            gamma = max(speedup, key=speedup.__getitem__)
            if speedup[gamma] < 1:
                self._idle += 1
                gamma = gamma if self._idle > 8 else 0
                self._idle = 0 if gamma else self._idle
        return max(0, min(gamma, limit))

    def propose(self, ids: torch.Tensor, cache: Any, limit: int, sampler: Any,
                generator: torch.Generator | None) -> Proposal:
        gamma = self.gamma(limit)
        if gamma == 0:
            return NOTHING
        t0 = time.perf_counter()
        proposal = self.draft.propose(ids, gamma, cache, sampler, generator, self.stop)
        self.stats.draft_ms += (time.perf_counter() - t0) * 1e3
        return proposal

    def choose(self, proposal: Proposal, i: int, scores: torch.Tensor, p: torch.Tensor, sampler: Any,
               generator: torch.Generator | None, token_text: Callable[[int], str]) -> tuple[int, dict[str, Any]]:
        """The token at position ``i`` of a round (``scores`` (1, V): the sampler's output there; ``p`` (V,):
        softmax(scores)) and its ``Step.speculative`` record: the drafted token judged exactly, or, after the last
        drafted position, the sampler's own draw."""
        gamma = len(proposal.tokens)
        if i < gamma:
            q, drafted = proposal.q_row(i), proposal.tokens[i]
            token, ok = judge(p, q, drafted, generator)
            qx = (lambda t: float(q[t])) if q is not None else (lambda t: float(t == drafted))
            record: dict[str, Any] = {"origin": "accepted" if ok else "resampled", "p": float(p[token]),
                                      "q": qx(token)}
            if not ok:
                record["rejected"] = {"token": token_text(drafted), "token_id": drafted, "p": float(p[drafted]),
                                      "q": qx(drafted)}
        else:
            token = int(sampler.draw(scores, generator))
            record = {"origin": "bonus" if gamma else "target", "p": float(p[token])}
        record["round"] = self.stats.rounds
        if i == 0:
            record["drafted"] = [token_text(t) for t in proposal.tokens]
        return token, record

    def settle(self, proposal: Proposal, accepted: int, tokens: int, target_ms: float, length: int) -> None:
        """After a round: ``accepted`` drafted tokens kept, ``tokens`` generated, ``length`` verified tokens before
        the newest one."""
        s = self.stats
        gamma = len(proposal.tokens)
        s.rounds += 1
        s.drafted += gamma
        s.accepted += accepted
        s.tokens += tokens
        s.target_ms += target_ms
        s.gammas.append(gamma)
        if s.rounds > 1:  # the first pass also reads the prompt; later ones read the new token + γ drafted
            self.verify.add(gamma + 1, target_ms)
        if gamma:
            self._a, self._d = 0.8 * self._a + accepted, 0.8 * self._d + gamma
            self._runs.append((accepted, gamma))
        self.draft.rollback(length)


def check_speculative(speculative: Any, sampler: Any, capture: Any) -> Draft | None:
    """The draft, after checking it can run exactly with ``sampler`` and ``capture``."""
    if speculative is None:
        return None
    if not isinstance(speculative, Draft):
        raise InvalidArgument(f"speculative must be a labkit.speculative draft (PromptLookupDraft(), "
                              f"LayerSkipDraft(n), QuantizedDraft(), ModelDraft(...)) or None; got {speculative!r}")
    if sampler.needs or not sampler.stateless:
        raise InvalidArgument(f"speculative decoding is exact only for samplers whose distribution depends on the "
                              f"logits alone (greedy, classic, entropy_guided); {sampler.name!r} keeps state or "
                              "reads attention")
    if "attention" in capture:
        raise InvalidArgument("capture=['attention'] cannot be combined with speculative decoding (a round verifies "
                              "several positions at once)")
    return speculative


@dataclass(frozen=True)
class Measurement:
    """A speculative run and plain decoding on the same prompt, interleaved."""

    stats: SpeculativeStats
    """The last speculative run's statistics, with ``plain_ms_per_token`` set (median over repeats)."""
    speculative_ms_per_token: float
    """Median over repeats."""
    identical: bool
    """Whether the speculative tokens equal the plain run's (expected for greedy; sampled runs agree in
    distribution, not token by token)."""
    trace: Any = field(repr=False, default=None)
    """The last speculative Trace."""

    @property
    def plain_ms_per_token(self) -> float:
        """Median over repeats."""
        return self.stats.plain_ms_per_token

    @property
    def speedup(self) -> float:
        return self.plain_ms_per_token / self.speculative_ms_per_token


def measure(session: Any, prompt: str, draft: Draft, repeats: int = 3, **generate_kw: Any) -> Measurement:
    """Run plain and speculative generation of ``prompt`` ``repeats`` times each, interleaved; compare ms/token
    (median, so a first warm-up run does not count with repeats ≥ 3) and tokens. ``generate_kw`` go to
    :meth:`Session.generate` for both."""
    import statistics

    check_int("repeats", repeats, 1)
    plain_times, spec_times = [], []
    plain = spec = None
    for _ in range(repeats):
        plain = session.generate(prompt, **generate_kw)
        spec = session.generate(prompt, speculative=draft, **generate_kw)
        plain_times.append(sum(s.time_ms for s in plain) / len(plain))
        spec_times.append(sum(s.time_ms for s in spec) / len(spec))
    stats = SpeculativeStats.of(spec)
    stats.plain_ms_per_token = statistics.median(plain_times)
    stats.total_ms = statistics.median(spec_times) * stats.tokens
    return Measurement(stats, statistics.median(spec_times),
                       plain.token_ids == spec.token_ids, spec)
