"""Information theory on logits.

Plain functions on torch tensors whose last dimension is the vocabulary (any leading batch dims).
Everything starts from logits through ``log_softmax`` (never the log of a softmax), so entries of
``-inf`` and extreme values (±1e4) give finite results. Units are explicit: ``unit="bits"`` (base 2)
or ``unit="nats"`` (base e).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from labkit.errors import invalid_choice

Unit = Literal["bits", "nats"]
_LN2 = math.log(2.0)


def _scale(unit: str) -> float:
    """Factor that converts nats to ``unit``."""
    if unit == "nats":
        return 1.0
    if unit == "bits":
        return 1.0 / _LN2
    raise invalid_choice("unit", unit, ("bits", "nats"))


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Natural-log probabilities, float32 or wider, from logits (last dim = vocabulary)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1)


def _plogp(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, p·log p) with 0·log 0 taken as 0."""
    p = logp.exp()
    return p, torch.where(p > 0, p * logp, torch.zeros_like(p))


def entropy(logits: torch.Tensor, unit: Unit = "bits") -> torch.Tensor:
    """Shannon entropy H = −Σ p log p of softmax(logits), in ``unit`` (bits or nats). Shape: leading dims."""
    _, plogp = _plogp(log_probs(logits))
    return -plogp.sum(-1) * _scale(unit)


def varentropy(logits: torch.Tensor, unit: Unit = "bits") -> torch.Tensor:
    """Variance of the surprisal −log p under p (Entropix's varentropy).

    In squared ``unit`` (bits² when ``unit="bits"``, as Entropix reports it in "bits"). Shape: leading dims.
    """
    return entropy_and_varentropy(log_probs(logits), unit)[1]


def entropy_and_varentropy(logp: torch.Tensor, unit: Unit = "bits") -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (``unit``) and varentropy (``unit``²) from already-normalised natural-log probabilities.

    The decoding loop uses this to compute both from one ``log_softmax``.
    """
    p, plogp = _plogp(logp)
    h = -plogp.sum(-1)
    dev = torch.where(p > 0, (-logp - h.unsqueeze(-1)) ** 2, torch.zeros_like(p))
    s = _scale(unit)
    return h * s, (p * dev).sum(-1) * s * s
