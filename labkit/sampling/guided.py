"""Entropy-guided sampling (seed 000): when the model is uncertain, favour tokens that keep the distribution
diverse. Entropies in bits, log-probabilities in nats."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from labkit.measures import information as info
from labkit.sampling.base import Sampler
from labkit.sampling.params import TEMPERATURE, Param

_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)  # ln of the smallest normal float32 (≈ −87.3)


def guided_scores(logp: torch.Tensor, entropy_bits: torch.Tensor, weight: float) -> torch.Tensor:
    """score_i = (1 − w)·log p_i + w·H·ln(1 − p_i), H in bits, log p in nats. Shapes (B, V), (B,) -> (B, V).

    ln(1 − p) is computed as ln(−expm1(log p)) and floored at ln(float32 tiny), so p_i = 1 gives a finite
    score; tokens with p_i = 0 keep −inf.
    """
    log1mp = torch.log(-torch.expm1(logp)).clamp(min=_LOG_TINY)  # (B, V) nats
    score = (1.0 - weight) * logp + weight * entropy_bits.unsqueeze(-1) * log1mp
    return score.masked_fill(torch.isneginf(logp), float("-inf"))


class EntropyGuided(Sampler):
    """Entropy-guided sampling: tokens are drawn from softmax(score / temperature) with :func:`guided_scores`
    when the step's entropy H ≥ ``min_entropy`` bits; below it, plain sampling from softmax(log p / temperature).

    ``entropy_weight`` w in [0, 1] (0 = plain sampling exactly); ``min_entropy`` ≥ 0 bits; ``temperature`` > 0.
    The ln(1 − p) term penalises the most probable tokens in proportion to the uncertainty H.
    """

    name = "entropy_guided"
    params: ClassVar[dict[str, Param]] = {
        "entropy_weight": Param(0.2, lo=0.0, hi=1.0, slider=(0.0, 1.0, 0.05),
                                help="how much of the step's entropy raises the temperature"),
        "min_entropy": Param(2.0, lo=0.0, unit="bits", slider=(0.0, 8.0, 0.1),
                             help="below this entropy the step is sampled as is"),
        "temperature": TEMPERATURE,
    }

    def __init__(self, entropy_weight: float = 0.2, min_entropy: float = 2.0, temperature: float = 1.0) -> None:
        self.entropy_weight = entropy_weight
        self.min_entropy = min_entropy
        self.temperature = temperature
        self._guided: list[bool] = []

    @classmethod
    def preset(cls) -> EntropyGuided:
        """Seed 000's ``entropy_guided()`` preset: entropy_weight 0.2, min_entropy 2.0 bits."""
        return cls(entropy_weight=0.2, min_entropy=2.0)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logp = info.log_probs(scores.float())  # (B, V) nats
        h = info.entropy(scores.float(), "bits")  # (B,)
        guided = h >= self.min_entropy  # (B,)
        self._guided = guided.tolist()
        out = logp
        if self.entropy_weight > 0 and bool(guided.any()):
            out = torch.where(guided.unsqueeze(-1), guided_scores(logp, h, self.entropy_weight), logp)
        return out / self.temperature

    def record(self, scores: torch.Tensor) -> dict[str, Any]:
        return {**self.config(), "guided": bool(self._guided[0]) if self._guided else False}
