"""Drafts: what proposes γ tokens for the target to verify.

:class:`ModelDraft` (another local model with the target's tokenizer), :class:`LayerSkipDraft` (the target's first n
layers, sharing its weights and KV cache), :class:`QuantizedDraft` (the target at lower precision) and
:class:`PromptLookupDraft` (copy the continuation of an earlier n-gram match). ``parse_draft`` reads a CLI spec.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from labkit.core.errors import InvalidArgument, check_int
from labkit.core.extras import require
from labkit.core.specs import parse_spec
from labkit.model import models
from labkit.model.cache import crop, forward_cached, new_cache
from labkit.model.hooks import sites_of
from labkit.sampling.base import Greedy


@dataclass(frozen=True)
class Proposal:
    """What a draft proposes for one round."""

    tokens: list[int]
    """Shape (γ,): drafted token ids (γ may be 0: nothing to propose)."""
    q: torch.Tensor | None = None
    """Shape (γ, V): the draft's probabilities (after the sampler) the tokens were drawn from; None for a
    deterministic draft (one-hot on each token)."""

    def q_row(self, i: int) -> torch.Tensor | None:
        """The draft's distribution for drafted token ``i`` (V,), or None for a deterministic draft."""
        return None if self.q is None else self.q[i]


#: The empty proposal: a round that drafts nothing (a plain step).
NOTHING = Proposal([])


class Draft:
    """Base class of draft kinds. ``gamma``: drafted tokens per round (the most, when ``adaptive``);
    ``adaptive``: choose γ each round from the recent accepted run lengths, the measured draft cost and the
    measured growth of the verification pass (see :meth:`~labkit.speculative.speculator.Speculator.gamma`);
    ``confidence`` (model drafts): end a round's drafting after a token the draft gave a raw probability below it
    (transformers' ``assistant_confidence_threshold``, default 0.4 there).

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
    ``model``: anything with ``.model`` and ``.tokenizer`` (a :class:`~labkit.session.Session`), or a local model
    folder (loaded on the target's device)."""

    name = "model"

    def __init__(self, model: Any, gamma: int = 10, adaptive: bool = False, confidence: float = 0.4) -> None:
        super().__init__(gamma, adaptive, confidence)
        loaded = hasattr(model, "model") and hasattr(model, "tokenizer")
        if not (loaded or isinstance(model, (str, os.PathLike))):
            raise InvalidArgument(f"ModelDraft needs a Session (anything with .model and .tokenizer) or a local model "
                                  f"folder; got {type(model).__name__}")
        self.source = model

    def _load(self, session: Any) -> tuple[Any, Any]:
        if not isinstance(self.source, (str, os.PathLike)):
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
        if dtype not in (None, "bfloat16", "float16"):
            raise InvalidArgument(f"dtype must be 'bfloat16', 'float16' or None; got {dtype!r}")
        if quantization not in models.QUANTIZATIONS:
            raise InvalidArgument(f"quantization must be one of {models.QUANTIZATIONS}; got {quantization!r}")
        if dtype is None and quantization is None:
            raise InvalidArgument("QuantizedDraft needs a lower-precision dtype or a quantization; got neither")
        if quantization is not None:
            require("quant", f"QuantizedDraft(quantization={quantization!r})", "bitsandbytes")
        self.dtype, self.quantization = dtype, quantization

    def _load(self, session: Any) -> tuple[Any, Any]:
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


#: The draft spec forms ``--speculative`` and :func:`parse_draft` accept.
DRAFT_SPECS = ("prompt-lookup[:ngram=3,max_tokens=10]", "layer-skip:N[,gamma=10,confidence=0.4]",
               "bf16|fp16[:gamma=10,confidence=0.4]", "8bit|4bit[:gamma=10]", "model:PATH[,gamma=10]")


def parse_draft(spec: str) -> Draft:
    """A draft from a CLI spec: ``prompt-lookup``, ``layer-skip:8``, ``bf16``, ``8bit``, ``model:/path`` (each with
    optional ``gamma=…``/``confidence=…``/``adaptive=1`` settings after a comma, e.g. ``layer-skip:8,gamma=3``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidArgument(f"speculative spec must be one of {DRAFT_SPECS}; got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    first, _, more = rest.partition(",")
    positional = first if first and "=" not in first else ""
    _, settings = parse_spec(f"{name}:{more if positional else rest}", "speculative")
    if "adaptive" in settings:  # bool("false") is True: read the text
        flag = str(settings["adaptive"]).strip().lower()
        if flag not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise InvalidArgument(f"speculative spec {spec!r}: adaptive must be 1/0, true/false, yes/no or on/off; "
                                  f"got {settings['adaptive']!r}")
        settings["adaptive"] = flag in ("1", "true", "yes", "on")
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
