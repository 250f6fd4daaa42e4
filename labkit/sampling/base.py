"""The sampler protocol every labkit sampler follows, and the two basic samplers.

A sampler is a transformers :class:`~transformers.LogitsProcessor` (``__call__(input_ids, scores) -> scores``,
never modifying ``scores`` in place, so it also plugs into ``model.generate``) plus a seeded ``draw``.
Its parameters are plain attributes read at every step, so changing one while a generation runs changes
the next token (the live-slider rule). Parameters are validated on every assignment.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from transformers import LogitsProcessor
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from labkit.errors import InvalidArgument


class Sampler(LogitsProcessor):
    """Base class: turns raw logits into processed scores, then draws a token."""

    name: ClassVar[str] = "sampler"
    params: ClassVar[tuple[str, ...]] = ()

    def __setattr__(self, key: str, value: Any) -> None:
        if key in self.params:
            value = self.validate(key, value)
        super().__setattr__(key, value)

    def validate(self, key: str, value: Any) -> Any:
        """Check one parameter; return the (normalised) value or raise InvalidArgument."""
        return value

    def reset(self) -> None:
        """Clear per-generation state (called by the decoding loop before a generation)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Shape (B, V) -> (B, V): the scores to draw from (a new tensor; ``scores`` is not modified)."""
        return scores

    def draw(self, scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Shape (B, V) -> (B,): draw one token per row from softmax(scores), with ``generator``."""
        probs = torch.softmax(scores.float(), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def record(self, scores: torch.Tensor) -> dict[str, Any]:
        """What the sampler did at the step whose processed scores are ``scores`` (stored in Step.sampler)."""
        return {}

    def config(self) -> dict[str, Any]:
        """Name and current parameters (stored in Trace metadata)."""
        return {"name": self.name, **{p: getattr(self, p) for p in self.params}}

    def __repr__(self) -> str:
        args = ", ".join(f"{p}={getattr(self, p)!r}" for p in self.params)
        return f"{type(self).__name__}({args})"


class Greedy(Sampler):
    """Always the most probable token (``sampler=None`` means this)."""

    name = "greedy"

    def draw(self, scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return scores.argmax(dim=-1)


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidArgument(f"{key} must be a number; got {value!r}")
    return float(value)


class Classic(Sampler):
    """Temperature, then top-k, top-p and min-p truncation (transformers' warpers), then a seeded draw.

    ``temperature`` > 0; ``top_k`` ≥ 0 (0 = off); ``top_p`` in (0, 1] (1 = off); ``min_p`` in [0, 1) (0 = off).
    """

    name = "classic"
    params = ("temperature", "top_k", "top_p", "min_p")

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> None:
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.min_p = min_p

    def validate(self, key: str, value: Any) -> Any:
        if key == "top_k":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"top_k must be an integer ≥ 0 (0 disables it); got {value!r}")
            return value
        v = _number(key, value)
        if key == "temperature" and not v > 0:
            raise InvalidArgument(f"temperature must be > 0 (use sampler=None for greedy); got {value!r}")
        if key == "top_p" and not 0 < v <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1]; got {value!r}")
        if key == "min_p" and not 0 <= v < 1:
            raise InvalidArgument(f"min_p must be in [0, 1); got {value!r}")
        return v

    def warpers(self) -> list[LogitsProcessor]:
        """The transformers warpers for the current parameters, in application order."""
        chain: list[LogitsProcessor] = []
        if self.temperature != 1.0:
            chain.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k > 0:
            chain.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            chain.append(TopPLogitsWarper(self.top_p))
        if self.min_p > 0.0:
            chain.append(MinPLogitsWarper(self.min_p))
        return chain

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()  # transformers' warpers may write in place; keep the caller's scores intact
        for warper in self.warpers():
            out = warper(input_ids, out)
        return out

    def record(self, scores: torch.Tensor) -> dict[str, Any]:
        kept = int(torch.isfinite(scores).sum())
        return {**self.config(), "kept": kept}
