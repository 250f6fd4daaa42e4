"""What a sampler does to a distribution (seed 001's "sampling info"): entropy before and after, effective
vocabulary, top-token probability. Entropies in bits."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from labkit.core.errors import InvalidArgument
from labkit.measures import information as info


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
        """The fields as a plain dict (entropies in bits)."""
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
    logp = info.log_probs(before[None])  # (1, V) nats
    return sampling_infos(after[None], info.entropy(logp, "bits"), logp.amax(-1).exp())[0][0]


def sampling_infos(scores: torch.Tensor, entropy_before_bits: torch.Tensor, top_prob_before: torch.Tensor,
                   log_q: torch.Tensor | None = None) -> tuple[list[SamplingInfo], torch.Tensor]:
    """Batched, for the decoding loop (which already has the raw figures): ``scores`` (N, V) the sampler's output,
    ``entropy_before_bits`` and ``top_prob_before`` (N,) of the raw distributions → one SamplingInfo per row, and
    the sampler's probabilities softmax(scores), shape (N, V) (what the loop draws from and verifies drafts
    against). ``log_q``: log_softmax(scores) in nats when the caller has it already."""
    if log_q is None:
        log_q = torch.log_softmax(scores.float(), dim=-1)
    q, qlogq = info.probs_and_plogp(log_q)  # (N, V), (N, V) nats
    h0 = entropy_before_bits.tolist()
    h1 = (-qlogq.sum(-1) / math.log(2)).tolist()
    kept = torch.isfinite(scores).sum(-1).tolist()
    top0, top1 = top_prob_before.tolist(), q.amax(-1).tolist()
    rows = [SamplingInfo(entropy_before_bits=a + 0.0, entropy_after_bits=b + 0.0, entropy_change_bits=b - a,
                         effective_vocab_after=2.0 ** b, kept=int(k), top_prob_before=t0, top_prob_after=t1)
            for a, b, k, t0, t1 in zip(h0, h1, kept, top0, top1, strict=True)]  # + 0.0: no −0.0
    return rows, q


def sampling_info(logits: torch.Tensor, sampler: Any, input_ids: torch.Tensor | None = None) -> SamplingInfo:
    """Apply ``sampler`` to ``logits`` ((V,) or (1, V)) and describe the effect. A stateful sampler (Mirostat,
    Entropix) advances its state as in a real step; Entropix needs ``observe`` called first."""
    logits = _row(logits, "logits")[None]
    ids = input_ids if input_ids is not None else torch.zeros((1, 0), dtype=torch.long)
    return sampling_info_of(logits, sampler(ids, logits))
