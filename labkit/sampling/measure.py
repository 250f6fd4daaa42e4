"""What a sampler does to a distribution (seed 001's "sampling info"): entropy before and after, effective
vocabulary, top-token probability. Entropies in bits."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from labkit import info
from labkit.errors import InvalidArgument


@dataclass(frozen=True)
class SamplingInfo:
    """One step's distribution before the sampler (raw logits) and after it (processed scores)."""

    entropy_before_bits: float
    entropy_after_bits: float
    entropy_change_bits: float
    """after − before (bits); negative when the sampler concentrates the distribution."""
    effective_vocab_after: float
    """2^H after (tokens): the size of a uniform distribution with the same entropy."""
    kept: int
    """Tokens the sampler left possible (finite score)."""
    top_prob_before: float
    top_prob_after: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _row(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1:
        raise InvalidArgument(f"{name} must have shape (V,) or (1, V); got {tuple(x.shape)}")
    return x.float()


def sampling_info_of(logits: torch.Tensor, scores: torch.Tensor) -> SamplingInfo:
    """SamplingInfo from raw ``logits`` and the sampler's processed ``scores`` (each (V,) or (1, V))."""
    before, after = _row(logits, "logits"), _row(scores, "scores")
    if before.shape != after.shape:
        raise InvalidArgument(f"logits and scores must have the same shape; got {tuple(before.shape)} and "
                              f"{tuple(after.shape)}")
    h0, h1 = float(info.entropy(before, "bits")) + 0.0, float(info.entropy(after, "bits")) + 0.0  # no −0.0
    return SamplingInfo(entropy_before_bits=h0, entropy_after_bits=h1, entropy_change_bits=h1 - h0,
                        effective_vocab_after=2.0 ** h1,
                        kept=int(torch.isfinite(after).sum()), top_prob_before=float(info.top_token_prob(before)),
                        top_prob_after=float(info.top_token_prob(after)))


def sampling_info(logits: torch.Tensor, sampler: Any, input_ids: torch.Tensor | None = None) -> SamplingInfo:
    """Apply ``sampler`` to ``logits`` ((V,) or (1, V)) and describe the effect. A stateful sampler (Mirostat,
    Entropix) advances its state as in a real step; Entropix needs ``observe`` called first."""
    logits = _row(logits, "logits")[None]
    ids = input_ids if input_ids is not None else torch.zeros((1, 0), dtype=torch.long)
    return sampling_info_of(logits, sampler(ids, logits))
