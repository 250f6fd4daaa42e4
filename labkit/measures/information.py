"""Information theory on logits.

Plain functions on torch tensors whose last dimension is the vocabulary (any leading batch dims).
Everything starts from logits through ``log_softmax`` (never the log of a softmax), so entries of
``-inf`` and extreme values (±1e4) give finite results. Units are explicit: ``unit="bits"`` (base 2)
or ``unit="nats"`` (base e).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from labkit.core.errors import InvalidArgument, invalid_choice

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


_FLOOR = -87.0
"""log p below this (p < 1.6·10⁻³⁸, under float32's normal range) counts as p = 0: exp of such values, and of
−inf, takes a slow path in torch's CPU kernels (×10 to ×30), and their share of any entropy is < 10⁻³⁴ bits."""


def _p_and_logp(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, log p clamped at _FLOOR) with p exactly 0 where log p < _FLOOR."""
    clamped = logp.clamp(min=_FLOOR)
    return clamped.exp() * (logp > _FLOOR), clamped


def probs(logp: torch.Tensor) -> torch.Tensor:
    """p = exp(log p), exactly 0 where log p < _FLOOR (without torch's slow exp of very negative values or −inf)."""
    return _p_and_logp(logp)[0]


def probs_and_plogp(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, p·log p) with 0·log 0 taken as 0."""
    p, logp = _p_and_logp(logp)
    return p, p * logp


def entropy(logits: torch.Tensor, unit: Unit = "bits") -> torch.Tensor:
    """Shannon entropy H = −Σ p log p of softmax(logits), in ``unit`` (bits or nats). Shape: leading dims."""
    _, plogp = probs_and_plogp(log_probs(logits))
    return -plogp.sum(-1) * _scale(unit)


def varentropy(logits: torch.Tensor, unit: Unit = "bits") -> torch.Tensor:
    """Variance of the surprisal −log p under p (Entropix's varentropy).

    In squared ``unit`` (bits² when ``unit="bits"``, as Entropix reports it in "bits"). Shape: leading dims.
    """
    return entropy_and_varentropy(log_probs(logits), unit)[1]


def entropy_and_varentropy(logp: torch.Tensor, unit: Unit = "bits") -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (``unit``) and varentropy (``unit`` squared) from already-normalised natural-log probabilities.

    The decoding loop uses this to compute both from one ``log_softmax``. Raw logits are refused (their
    probabilities would not sum to 1 and both numbers would be silently wrong): use :func:`entropy` and
    :func:`varentropy`, which normalise.
    """
    total = torch.logsumexp(logp.float(), dim=-1)
    if not bool((total.abs() <= 1e-3).all()):
        raise InvalidArgument(f"logp must be normalised log-probabilities (logsumexp 0); got logsumexp "
                              f"{float(total.flatten()[0]):.4g}: pass raw logits to entropy() / varentropy()")
    p, logp = _p_and_logp(logp)
    h = -(p * logp).sum(-1)
    dev = logp + h.unsqueeze(-1)  # −(surprisal − H); squared below, weighted by p (0 where p is 0)
    s = _scale(unit)
    return h * s, (p * dev * dev).sum(-1) * s * s


@dataclass(frozen=True)
class StepMeasures:
    """What the decoding loop records of each step's raw distribution, for m positions at once."""

    logprobs: torch.Tensor
    """Shape (m, V): natural-log probabilities (nats)."""
    entropy_bits: torch.Tensor
    """Shape (m,)."""
    varentropy_bits: torch.Tensor
    """Shape (m,): bits²."""
    top_probs: torch.Tensor
    """Shape (m, k): the k largest probabilities, descending."""
    top_ids: torch.Tensor
    """Shape (m, k): their token ids."""


def step_measures(logits: torch.Tensor, top_k: int) -> StepMeasures:
    """Shape (m, V) raw logits -> the step measures of each row (one log_softmax shared by all of them)."""
    logp = log_probs(logits)  # (m, V) nats
    entropy, varentropy = entropy_and_varentropy(logp, "bits")  # (m,), (m,)
    top_lp, top_ids = logp.topk(top_k, dim=-1)  # (m, k)
    return StepMeasures(logp, entropy, varentropy, top_lp.exp(), top_ids)


def surprisal(logits: torch.Tensor, token_ids: torch.Tensor, unit: Unit = "bits") -> torch.Tensor:
    """Surprisal −log p(token) of ``token_ids`` under softmax(logits), in ``unit``. Shape: leading dims."""
    token_ids = torch.as_tensor(token_ids, device=logits.device)
    logp = log_probs(logits)
    return -logp.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1) * _scale(unit)


def cross_entropy(p_logits: torch.Tensor, q_logits: torch.Tensor, unit: Unit = "bits") -> torch.Tensor:
    """Cross-entropy H(p, q) = −Σ p log q, in ``unit``; +inf where q gives 0 to a token p does not."""
    logp, logq = log_probs(p_logits), log_probs(q_logits)
    p = logp.exp()
    terms = torch.where(p > 0, -p * logq, torch.zeros_like(p))
    return terms.sum(-1) * _scale(unit)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, unit: Unit = "bits") -> torch.Tensor:
    """KL(p ‖ q) = Σ p (log p − log q), in ``unit`` (≥ 0; +inf where q is 0 and p is not)."""
    logp, logq = log_probs(p_logits), log_probs(q_logits)
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(-1).clamp_min(0.0) * _scale(unit)


def js_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, unit: Unit = "bits") -> torch.Tensor:
    """Jensen–Shannon divergence ½KL(p‖m) + ½KL(q‖m), m = (p + q)/2, in ``unit`` (≤ 1 bit, always finite)."""
    logp, logq = log_probs(p_logits), log_probs(q_logits)
    logm = torch.logaddexp(logp, logq) - _LN2

    def kl_to_m(logx: torch.Tensor) -> torch.Tensor:
        x = logx.exp()
        return torch.where(x > 0, x * (logx - logm), torch.zeros_like(x)).sum(-1)

    return (0.5 * (kl_to_m(logp) + kl_to_m(logq))).clamp_min(0.0) * _scale(unit)


def perplexity(logprobs: torch.Tensor) -> torch.Tensor:
    """exp of the mean negative log-likelihood of ``logprobs`` (natural-log probabilities of the actual tokens,
    last dim = sequence). Unitless, float64; shape: leading dims."""
    return torch.exp(-logprobs.double().mean(-1))


def effective_vocab_size(logits: torch.Tensor) -> torch.Tensor:
    """2^H with H in bits: the number of equally likely tokens with the same entropy. Shape: leading dims."""
    return torch.exp2(entropy(logits, "bits"))


def coverage_count(logits: torch.Tensor, mass: float = 0.9) -> torch.Tensor:
    """How many of the most probable tokens are needed to cover probability ``mass`` (in (0, 1]).

    Shape: leading dims, integer.
    """
    if not 0 < mass <= 1:
        raise InvalidArgument(f"mass must be in (0, 1]; got {mass!r}")
    p = log_probs(logits).exp().sort(dim=-1, descending=True).values
    cum = p.cumsum(-1)
    # the count of tokens strictly below the target mass, plus the one that crosses it
    return ((cum < mass - 1e-7).sum(-1) + 1).clamp_max(p.shape[-1])


def top_token_prob(logits: torch.Tensor) -> torch.Tensor:
    """Probability of the most probable token. Shape: leading dims."""
    return log_probs(logits).max(-1).values.exp()


class Health(enum.StrEnum):
    """Label of a distribution compared with a reference."""

    HEALTHY = "Healthy"
    WARNING = "Warning"
    CRITICAL = "Critical"


def distribution_health(p_logits: torch.Tensor, reference_logits: torch.Tensor, warning_bits: float = 0.5,
                        critical_bits: float = 2.0) -> Health:
    """Healthy / Warning (KL(p‖reference) > ``warning_bits``) / Critical (> ``critical_bits``); KL in bits,
    averaged over leading dims."""
    if not 0 <= warning_bits <= critical_bits:
        raise InvalidArgument(f"thresholds must satisfy 0 ≤ warning_bits ≤ critical_bits; got {warning_bits}, "
                              f"{critical_bits}")
    kl = float(kl_divergence(p_logits, reference_logits, "bits").mean())
    if kl > critical_bits:
        return Health.CRITICAL
    if kl > warning_bits:
        return Health.WARNING
    return Health.HEALTHY


# -- registry of per-distribution metrics (Trace columns and panels list these) ---------------------------

Metric = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric of one next-token distribution: ``fn(logits) -> tensor`` over leading dims."""

    name: str
    fn: Metric
    unit: str
    """"bits", "bits²", "nats", "tokens", "probability", ..."""
    description: str = ""


_REGISTRY: dict[str, MetricSpec] = {}


def register(name: str, fn: Metric, unit: str, description: str = "", overwrite: bool = False) -> MetricSpec:
    """Register a metric of logits under ``name`` (refuses to replace one unless ``overwrite``)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise InvalidArgument(f"metric name must be an identifier; got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise InvalidArgument(f"metric {name!r} is already registered; pass overwrite=True to replace it")
    spec = MetricSpec(name, fn, unit, description)
    _REGISTRY[name] = spec
    return spec


def metric(name: str) -> MetricSpec:
    """The registered metric ``name``; an unknown name lists the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidArgument(f"unknown metric {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def metrics() -> list[str]:
    """Names of all registered metrics."""
    return sorted(_REGISTRY)


register("entropy_bits", entropy, "bits", "Shannon entropy of the next-token distribution")
register("varentropy_bits", varentropy, "bits²", "variance of the surprisal under the distribution")
register("entropy_nats", lambda x: entropy(x, "nats"), "nats", "Shannon entropy in nats")
register("effective_vocab_size", effective_vocab_size, "tokens", "2^H (H in bits)")
register("coverage_90", coverage_count, "tokens", "tokens needed to cover 90% of the probability")
register("top_token_prob", top_token_prob, "probability", "probability of the most probable token")
