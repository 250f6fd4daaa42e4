"""Named, documented intervention recipes (seed 002's roadmap), for Python and the CLI (``--recipe``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from labkit.core.errors import InvalidArgument, TokenizationError
from labkit.core.specs import parse_spec
from labkit.core.tokens import token_id
from labkit.interventions.activation import AblateHead, Steer, head_importance, steering_vector
from labkit.interventions.base import Intervention
from labkit.interventions.token import Boost, EntropyTarget, Suppress
from labkit.model.hooks import sites_of


def word_tokens(session: Any, word: str) -> list[int]:
    """The single-token spellings of ``word`` in the session's vocabulary: " word", "word", " Word", "Word"."""
    variants = dict.fromkeys([f" {word.strip()}", word.strip(), f" {word.strip().capitalize()}",
                              word.strip().capitalize()])
    ids = []
    for v in variants:
        with contextlib.suppress(TokenizationError):
            ids.append(token_id(session.tokenizer, v))
    if not ids:
        pieces = session.tokenizer.tokenize(f" {word.strip()}")
        raise InvalidArgument(f"word {word!r} is not a single token in any spelling ({pieces}); pass a shorter word "
                              "or token ids")
    return sorted(set(ids))


def _suppress_word(session: Any, word: str) -> list[Intervention]:
    return [Suppress(word_tokens(session, word))]


def _topic_boost(session: Any, words: str, factor: float = 3.0) -> list[Intervention]:
    ids = sorted({i for w in str(words).split("+") for i in word_tokens(session, w)})
    return [Boost(ids, factor=float(factor))]


def _ablate_top_heads(session: Any, n: int = 3, reference: str | None = None) -> list[Intervention]:
    imp = head_importance(session, reference)
    top = torch.topk(imp.flatten(), int(n)).indices.tolist()
    return [AblateHead(i // imp.shape[1], i % imp.shape[1]) for i in top]


def _steer_sentiment(session: Any, direction: str = "positive", scale: float = 4.0,
                     layer: int | None = None) -> list[Intervention]:
    if direction not in ("positive", "negative"):
        raise InvalidArgument(f"direction must be 'positive' or 'negative'; got {direction!r}")
    layer = sites_of(session.model).n_layers // 2 if layer is None else int(layer)
    vec = steering_vector(session, "I love this. It is wonderful, happy and great.",
                          "I hate this. It is terrible, sad and awful.", layer)
    return [Steer(layer, vec, float(scale) if direction == "positive" else -float(scale))]


def _calm(session: Any, bits: float = 1.0) -> list[Intervention]:
    return [EntropyTarget(float(bits))]


@dataclass(frozen=True)
class Recipe:
    """A named intervention recipe: ``build(session, **settings)`` returns its interventions."""

    name: str
    description: str
    build: Callable[..., list[Intervention]]


#: The named recipes by name (``labkit recipes`` lists them).
RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("suppress-word", "Never generate a word (all its single-token spellings). Args: word.", _suppress_word),
    Recipe("topic-boost", "Multiply the probability of topic words by factor. Args: words (joined by '+'), "
           "factor=3.", _topic_boost),
    Recipe("ablate-top-heads", "Zero-ablate the n heads that write most into the residual stream on a reference "
           "text. Args: n=3, reference.", _ablate_top_heads),
    Recipe("steer-sentiment", "Add a love−hate difference-of-means vector to the middle layer's residual stream. "
           "Args: direction=positive|negative, scale=4, layer.", _steer_sentiment),
    Recipe("entropy-target", "Rescale every step to a fixed entropy. Args: bits=1.", _calm),
]}


def recipe(session: Any, spec: str) -> list[Intervention]:
    """Interventions from ``name[:key=value,...]``, e.g. ``suppress-word:word=Paris``, ``topic-boost:words=science+
    physics,factor=5``, ``ablate-top-heads:n=2``, ``steer-sentiment:direction=negative``."""
    name, kwargs = parse_spec(spec, "recipe")
    if name not in RECIPES:
        raise InvalidArgument(f"recipe {name!r} is unknown; choose from {sorted(RECIPES)}")
    try:
        return RECIPES[name].build(session, **kwargs)
    except TypeError as e:
        raise InvalidArgument(f"recipe {name!r} does not take {sorted(kwargs)}: {e}") from None
