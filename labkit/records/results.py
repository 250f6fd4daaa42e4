"""What a Session's reading verbs return (no generation): :class:`Distribution` (``next_token``) and :class:`Score`
(``score``). Log-probabilities in nats; entropy and surprisal in bits."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from labkit.core.errors import InvalidArgument
from labkit.core.tokens import token_id
from labkit.measures import information as info
from labkit.records.trace import Alternative

if TYPE_CHECKING:
    import pandas as pd


@dataclass(eq=False)
class Distribution:
    """The next-token distribution after a prompt (no sampler): the model's own, or, inside a
    ``Session.intervene`` scope, after the scope's interventions (named in ``interventions``)."""

    logprobs: torch.Tensor
    """Shape (V,): natural-log probabilities over the full vocabulary, float32, on CPU."""
    tokenizer: Any = field(repr=False)
    prompt: str = ""
    interventions: list[str] = field(default_factory=list)
    """Token-level interventions of open scopes that changed these logits (activation-level ones are part of the
    forward pass and always apply inside their scope)."""

    def __post_init__(self) -> None:
        if self.logprobs.ndim != 1:
            raise InvalidArgument(f"Distribution.logprobs must have shape (V,); got {tuple(self.logprobs.shape)}")

    @property
    def probs(self) -> torch.Tensor:
        """Shape (V,): probabilities, summing to 1."""
        return self.logprobs.exp()

    def top(self, k: int = 10) -> list[Alternative]:
        """The ``k`` most probable tokens as ``(token_text, token_id, prob)``, most probable first."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidArgument(f"k must be a positive integer; got {k!r}")
        values, ids = self.logprobs.topk(min(k, self.logprobs.numel()))
        return [Alternative(self.tokenizer.decode([i]), i, math.exp(v))
                for v, i in zip(values.tolist(), ids.tolist(), strict=True)]

    def logprob(self, token: str | int) -> float:
        """Natural-log probability (nats) of ``token`` (one token's text, or an id)."""
        return float(self.logprobs[token_id(self.tokenizer, token)])

    def prob(self, token: str | int) -> float:
        """Probability of ``token`` (one token's text, or an id)."""
        return math.exp(self.logprob(token))

    def entropy(self, unit: info.Unit = "bits") -> float:
        """Entropy of the distribution in ``unit`` ("bits" or "nats")."""
        return float(info.entropy(self.logprobs, unit))

    def varentropy(self, unit: info.Unit = "bits") -> float:
        """Varentropy (variance of the surprisal) in ``unit`` squared."""
        return float(info.varentropy(self.logprobs, unit))

    def __repr__(self) -> str:
        tops = ", ".join(f"{a.token!r}: {a.prob:.3f}" for a in self.top(5))
        return f"Distribution(prompt={self.prompt[-40:]!r}, entropy={self.entropy():.3f} bits, top=[{tops}])"


@dataclass
class Score:
    """How surprising a text is to the model, token by token (teacher forcing, no sampler).

    Position i of every per-token field describes token i+1 predicted from tokens 0..i (the first token has no
    prediction). Log-probabilities are natural logs (nats); surprisal and entropy are in bits.
    """

    text: str
    token_ids: list[int]
    """Shape (T,): the text's tokens."""
    tokens: list[str]
    """Shape (T,): display text of each token."""
    logprobs: list[float]
    """Shape (T−1,): natural-log probability of each actual token after its prefix (nats)."""
    entropy_bits: list[float]
    """Shape (T−1,): entropy of the distribution that predicted each token (bits)."""
    rank: list[int]
    """Shape (T−1,): rank of the actual token in that distribution (1 = most probable)."""

    def __post_init__(self) -> None:
        n = len(self.token_ids) - 1
        if not (len(self.tokens) == n + 1 and len(self.logprobs) == len(self.entropy_bits) == len(self.rank) == n):
            raise InvalidArgument("Score fields must have T tokens and T−1 predictions")

    @property
    def surprisal_bits(self) -> list[float]:
        """Shape (T−1,): −log₂ p of each actual token (bits)."""
        return [-lp / math.log(2.0) for lp in self.logprobs]

    @property
    def perplexity(self) -> float:
        """exp of the mean negative log-likelihood (nats) over the T−1 predicted tokens."""
        return math.exp(-sum(self.logprobs) / len(self.logprobs))

    def to_pandas(self) -> pd.DataFrame:
        """One row per predicted token: token, prob, surprisal (bits), entropy (bits), rank."""
        import pandas as pd

        return pd.DataFrame({
            "position": range(1, len(self.token_ids)), "token": self.tokens[1:], "token_id": self.token_ids[1:],
            "prob": [math.exp(lp) for lp in self.logprobs], "surprisal_bits": self.surprisal_bits,
            "entropy_bits": self.entropy_bits, "rank": self.rank,
        })

    def __repr__(self) -> str:
        return f"Score({len(self.token_ids)} tokens, perplexity={self.perplexity:.3f}, text={self.text[:40]!r})"
