"""Decoding by contrast: contrastive decoding, DoLa and contrastive search, as samplers of the one loop.

transformers 5 moved DoLa and contrastive search out of its core (they load Hub code), so they are written here;
each is a :class:`~labkit.sampling.base.Sampler` (live, validated parameters; a spec string; ``Step.sampler``
records what it did) that draws greedily over its own scores, as the papers decode. None is ``stateless`` (they
read more than the logits), so none runs under speculative decoding.

- :class:`ContrastiveDecoding` (Li et al. 2023): ``log p_expert − β · log p_amateur`` over the plausible tokens
  ``p_expert ≥ α · max p_expert`` (−inf elsewhere). The amateur is the model's own first K blocks read through
  its final norm and unembedding (``amateur="layers:K"``, early exit) or another local model with the same
  tokenizer (``amateur="model:PATH"`` or a Session), run beside the target with its own KV cache.
- :class:`DoLa` (Chuang et al. 2024): per step, the premature layer among the candidates whose next-token
  distribution (the logit lens: final norm + unembedding) has the largest Jensen–Shannon divergence from the
  final layer's; score ``log p_final − log p_premature`` over ``p_final ≥ α · max p_final``. Layer j is the
  residual stream after j blocks (0: the embeddings), as in the paper's transformers port; the final layer is N.
- :class:`ContrastiveSearch` (Su et al. 2022): among the ``top_k`` most probable tokens, the one maximising
  ``(1 − α) · p(v) − α · max_j cos(h_v, h_j)``, h the final-norm hidden states of the context and h_v that of the
  candidate (one look-ahead pass of the k candidates on a copy of the cache).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch

from labkit.core.errors import InvalidArgument
from labkit.measures import information as info
from labkit.sampling.base import Sampler
from labkit.sampling.params import ALPHA, TOP_K, Param


def _plausible(logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """Shape (B, V) log-probabilities (nats) -> bool mask of the tokens with p ≥ α · max p (the head)."""
    return logp >= logp.amax(dim=-1, keepdim=True) + torch.log(torch.tensor(alpha))


class _Shared:
    """Holds what batch rows' copies of a sampler share (the model's sites, a loaded amateur): ``copy.deepcopy``
    keeps it as is; pickling leaves it out."""

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict[int, Any]) -> _Shared:
        return self

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return _Shared, ()  # pickled empty (a Ray worker binds the sampler to its own Session)


class _Contrasting(Sampler):
    """Base of the three: greedy draw over the scores; ``record`` returns the last step's figures."""

    stateless = False

    def __init__(self) -> None:
        self._last: dict[str, Any] = {}
        self._sites = _Shared()  # the model's hook sites (shared, not copied, by batch rows' copies)

    def bind(self, session: Any) -> None:
        self._sites.value = session.sites

    def draw(self, scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return scores.argmax(dim=-1)

    def record(self, scores: torch.Tensor) -> dict[str, Any]:
        return {**self.config(), **self._last}

    def _lens(self, stream: torch.Tensor) -> torch.Tensor:
        """Residual streams (..., d_model) -> next-token log-probabilities (..., V) nats through the final norm,
        unembedding and softcapping (the logit lens)."""
        if self._sites.value is None:
            raise InvalidArgument(f"{type(self).__name__} reads the model's layers: generate with it through a "
                                  "Session (it is bound there)")
        return torch.log_softmax(self._sites.value.logits(stream).float(), dim=-1)


def _stream_site(j: int) -> str:
    """The site holding the residual stream after ``j`` blocks (0: the embeddings)."""
    return "embed" if j == 0 else f"blocks.{j - 1}.resid_post"


class ContrastiveDecoding(_Contrasting):
    """Contrastive decoding: ``alpha`` the plausibility threshold in (0, 1]; ``beta`` ≥ 0 the amateur's weight
    (0: greedy); ``amateur`` "layers:K" (the first K blocks, 1 ≤ K < N) or "model:PATH" / a Session."""

    name = "contrastive"
    params: ClassVar[dict[str, Param]] = {"alpha": ALPHA, "beta": Param(0.5, lo=0.0, slider=(0.0, 2.0, 0.05),
                                            help="weight of the amateur's log-probabilities subtracted")}

    def __init__(self, alpha: float = 0.1, beta: float = 0.5, amateur: Any = "layers:8") -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.amateur = amateur
        self._layers: int | None = None
        self._model = _Shared()
        self._cache: Any = None
        if isinstance(amateur, str):
            kind, _, value = amateur.partition(":")
            if kind == "layers" and value.isdigit() and int(value) >= 1:
                self._layers = int(value)
            elif not (kind == "model" and value):
                raise InvalidArgument(f"amateur must be 'layers:K' (K ≥ 1 blocks of the model itself) or "
                                      f"'model:PATH' (a local model with the same tokenizer); got {amateur!r}")
        elif not (hasattr(amateur, "model") and hasattr(amateur, "tokenizer")):
            raise InvalidArgument(f"amateur must be 'layers:K', 'model:PATH' or a Session; got "
                                  f"{type(amateur).__name__}")
        self.needs = frozenset({_stream_site(self._layers)}) if self._layers else frozenset()

    def config(self) -> dict[str, Any]:
        source = self.amateur if isinstance(self.amateur, str) else f"model:{getattr(self.amateur, 'model_id', '?')}"
        return {"name": self.name, "alpha": self.alpha, "beta": self.beta, "amateur": source}

    def bind(self, session: Any) -> None:
        super().bind(session)
        n = session.info.n_layers
        if self._layers is not None:
            if self._layers >= n:
                raise InvalidArgument(f"amateur 'layers:{self._layers}' must use fewer blocks than the model's {n}")
            return
        if self._model.value is not None and self._model.value[2] is session:
            return
        if isinstance(self.amateur, str):
            from labkit.model import models

            model, tokenizer, _ = models.load(os.path.expanduser(self.amateur[len("model:"):]),
                                              device=session.info.device, progress=False)
        else:
            model, tokenizer = self.amateur.model, self.amateur.tokenizer
        if tokenizer.get_vocab() != session.tokenizer.get_vocab():
            raise InvalidArgument("the amateur needs the target's tokenizer: their vocabularies differ")
        self._model.value = (model, tokenizer, session)

    def reset(self, tokenizer: Any = None) -> None:
        self._cache, self._stream, self._last = None, None, {}

    def observe(self, captures: dict[str, Any]) -> None:
        if self._layers is not None:
            self._stream = captures[_stream_site(self._layers)][-1:]  # (1, d_model): the newest position

    def _amateur(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Shape (1, V): the amateur's next-token log-probabilities (nats) after ``input_ids`` (n, T)."""
        if self._layers is not None:
            return self._lens(self._stream)
        from labkit.model.cache import forward_cached, new_cache

        model = self._model.value[0]
        if self._cache is None:
            self._cache = new_cache()
        seen = self._cache.get_seq_length()
        logits = forward_cached(model, input_ids[:1, seen:].to(model.device), self._cache)[:, -1]
        return torch.log_softmax(logits.float(), dim=-1).to(input_ids.device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        expert = torch.log_softmax(scores.float(), dim=-1)  # (1, V) nats
        amateur = self._amateur(input_ids)[..., :expert.shape[-1]]
        head = _plausible(expert, self.alpha)
        out = (expert - self.beta * amateur).masked_fill(~head, float("-inf"))
        self._last = {"plausible": int(head.sum()), "amateur_top": int(amateur.argmax())}
        return out


def dola_layers(spec: Any, n_layers: int) -> list[int]:
    """The candidate premature layers for ``spec``: "high" / "low" (every second layer of the upper / lower half,
    or of the last / first 20 when the model has more than 40, as DoLa's transformers port), an int, or a list."""
    if spec == "high":
        return list(range(n_layers // 2, n_layers, 2) if n_layers <= 40 else range(n_layers - 20, n_layers, 2))
    if spec == "low":
        return list(range(0, n_layers // 2, 2) if n_layers <= 40 else range(0, 20, 2))
    items = [spec] if isinstance(spec, int) and not isinstance(spec, bool) else spec
    if not isinstance(items, (list, tuple)) or not items or not all(
            isinstance(j, int) and not isinstance(j, bool) and 0 <= j < n_layers for j in items):
        raise InvalidArgument(f"layers must be 'high', 'low', or layer numbers in [0, {n_layers}) (0: the "
                              f"embeddings; {n_layers} is the final layer itself); got {spec!r}")
    return sorted(set(items))


class DoLa(_Contrasting):
    """DoLa: ``layers`` the candidate premature layers ("high", "low", an int or a list); ``alpha`` in (0, 1] the
    relative-top threshold. ``Step.sampler`` records the chosen ``premature_layer`` and every candidate's
    Jensen–Shannon divergence from the final layer (``js_bits``)."""

    name = "dola"
    params: ClassVar[dict[str, Param]] = {"alpha": ALPHA}

    def __init__(self, layers: Any = "high", alpha: float = 0.1) -> None:
        super().__init__()
        self.layers = layers
        self.alpha = alpha
        self._candidates: list[int] = []
        self._streams: dict[str, torch.Tensor] = {}

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "layers": self.layers, "alpha": self.alpha}

    def bind(self, session: Any) -> None:
        super().bind(session)
        self._candidates = dola_layers(self.layers, session.info.n_layers)
        self.needs = frozenset(_stream_site(j) for j in self._candidates)

    def reset(self, tokenizer: Any = None) -> None:
        self._last = {}

    def observe(self, captures: dict[str, Any]) -> None:
        self._streams = {k: v[-1] for k, v in captures.items()}  # site -> (d_model,) at the newest position

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        final = torch.log_softmax(scores.float(), dim=-1)  # (1, V) nats
        early = self._lens(torch.stack([self._streams[_stream_site(j)] for j in self._candidates]))  # (C, V)
        early = early[:, :final.shape[-1]]
        js = info.js_divergence(final.expand_as(early), early, "bits")  # (C,)
        pick = int(js.argmax())
        head = _plausible(final, self.alpha)
        out = (final - early[pick]).masked_fill(~head, float("-inf"))
        self._last = {"premature_layer": self._candidates[pick],
                      "js_bits": dict(zip(map(str, self._candidates), js.tolist(), strict=True))}
        return out


class ContrastiveSearch(_Contrasting):
    """Contrastive search: ``penalty_alpha`` α in [0, 1] (0: greedy), ``top_k`` ≥ 1 candidates. ``Step.sampler``
    records the chosen token's model probability, ``degeneration`` (its max cosine similarity to the context) and
    every candidate's score."""

    name = "contrastive_search"
    params: ClassVar[dict[str, Param]] = {"penalty_alpha": Param(0.6, lo=0.0, hi=1.0, slider=(0.0, 1.0, 0.05),
                                     help="weight of the degeneration penalty (similarity to the context)"),
              "top_k": TOP_K.but(default=4, lo=1, note="the candidates", slider=(1, 20, 1))}
    needs = frozenset({"final_norm", "lookahead"})

    def __init__(self, penalty_alpha: float = 0.6, top_k: int = 4) -> None:
        super().__init__()
        self.penalty_alpha, self.top_k = penalty_alpha, top_k
        self._context: torch.Tensor | None = None
        self._lookahead: Any = None

    def reset(self, tokenizer: Any = None) -> None:
        self._context, self._last = None, {}

    def observe(self, captures: dict[str, Any]) -> None:
        seen = captures["final_norm"].float()  # (t, d_model): the positions of the newest pass
        self._context = seen if self._context is None else torch.cat([self._context, seen])
        self._lookahead = captures["lookahead"]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)  # (1, V)
        k = min(self.top_k, probs.shape[-1])
        top_p, top_ids = probs[0].topk(k)  # (k,)
        cand = self._lookahead(top_ids).float()  # (k, d_model): each candidate's final-norm hidden state
        context = torch.nn.functional.normalize(self._context, dim=-1)  # (T, d)
        cosine = torch.nn.functional.normalize(cand, dim=-1) @ context.T  # (k, T)
        penalty = cosine.amax(dim=-1)  # (k,)
        value = (1 - self.penalty_alpha) * top_p - self.penalty_alpha * penalty  # (k,)
        out = torch.full_like(probs, float("-inf"))
        out[0, top_ids] = value.to(out.dtype)
        best = int(value.argmax())
        self._last = {"prob": float(top_p[best]), "degeneration": float(penalty[best]),
                      "candidates": dict(zip(map(str, top_ids.tolist()), value.tolist(), strict=True))}
        return out
