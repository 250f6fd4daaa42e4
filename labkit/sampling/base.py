"""The sampler protocol every labkit sampler follows, and the two basic samplers.

A sampler is a transformers :class:`~transformers.LogitsProcessor` (``__call__(input_ids, scores) -> scores``,
never modifying ``scores`` in place, so it also plugs into ``model.generate``) plus a seeded ``draw``.
Its parameters are plain attributes read at every step, so changing one while a generation runs changes
the next token (the live-slider rule). Parameters are validated on every assignment.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers import LogitsProcessor
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from labkit.sampling.params import MIN_P, TEMPERATURE, TOP_K, TOP_P, Param, Tunable


def keep_only(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Scores with −inf wherever ``keep`` (bool, same shape or broadcastable) is False; a new tensor."""
    return scores.masked_fill(~keep, float("-inf"))


def argmax_only(scores: torch.Tensor) -> torch.Tensor:
    """Shape (B, V): 0 at each row's argmax, −inf elsewhere (a one-hot distribution)."""
    out = torch.full_like(scores, float("-inf"))
    return out.scatter_(-1, scores.argmax(dim=-1, keepdim=True), 0.0)


class Sampler(Tunable, LogitsProcessor):
    """Base class: turns raw logits into processed scores, then draws a token.

    The decoding loop calls, per generation, ``reset(tokenizer)``; per step, ``observe(captures)`` (what the
    loop captured, e.g. ``{"attention": AttentionRow}`` when the sampler ``needs`` it), then
    ``__call__(input_ids, logits)``, ``draw(scores, generator)`` and ``record(scores)``.
    """

    name: ClassVar[str] = "sampler"
    needs: ClassVar[frozenset[str]] = frozenset()
    """Captures the decoding loop must switch on for this sampler (e.g. ``{"attention"}``)."""
    stateless: ClassVar[bool] = True
    """True when the processed scores depend only on the logits (row by row) and ``draw`` draws from
    softmax(scores): the condition for exact speculative decoding (all positions of a round are processed as one
    batch, including drafted positions that may be rejected)."""

    def bind(self, session: Any) -> None:
        """Prepare for generating with ``session`` (called by the Session before each generation, the Session
        held): a sampler that reads the model's layers or loads a second model does it here."""

    def reset(self, tokenizer: Any = None) -> None:
        """Clear per-generation state (called by the decoding loop before a generation)."""

    def observe(self, captures: dict[str, Any]) -> None:
        """Receive this step's captures before ``__call__`` (only what ``needs`` asked for)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Shape (B, V) -> (B, V): the scores to draw from (a new tensor; ``scores`` is not modified)."""
        return scores

    def draw(self, scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Shape (B, V) -> (B,): draw one token per row from softmax(scores), with ``generator``."""
        probs = torch.softmax(scores.float(), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def record(self, scores: torch.Tensor) -> dict[str, Any]:
        """What the sampler did at the step whose processed scores are ``scores`` (stored in Step.sampler):
        by default its name and parameters."""
        return self.config()


class Greedy(Sampler):
    """Always the most probable token (``sampler=None`` means this). Its processed scores keep only the argmax,
    so it also works as a ``model.generate`` logits processor."""

    name = "greedy"

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return argmax_only(scores)

    def draw(self, scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return scores.argmax(dim=-1)


class TopNSigmaLogitsWarper(LogitsProcessor):
    """Top-nσ (Tang et al., 2024): keep the tokens whose logit is ≥ max − n·σ, σ the standard deviation of the
    row's finite logits. Invariant to temperature (both sides scale alike). transformers has no such warper."""

    def __init__(self, n: float) -> None:
        self.n = n

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        x = scores.float().where(torch.isfinite(scores), torch.nan)  # (B, V); −inf (already removed) left out
        mean = x.nanmean(dim=-1, keepdim=True)
        sigma = (x - mean).square().nanmean(dim=-1, keepdim=True).sqrt()  # population std, (B, 1)
        return keep_only(scores, scores >= x.nan_to_num(nan=float("-inf")).amax(-1, keepdim=True) - self.n * sigma)


class Classic(Sampler):
    """The transformers ``GenerationConfig`` sampling knobs, on transformers' own warpers, then a seeded draw.

    Applied in transformers' order: temperature, top-k, top-p, min-p, typical, epsilon, eta; top-nσ (which
    transformers lacks) comes first, on the raw logits, as in its paper. ``temperature`` > 0; ``top_k`` ≥ 0
    (0 = off); ``top_p``, ``typical_p`` in (0, 1] (1 = off); ``min_p``, ``epsilon_cutoff``, ``eta_cutoff`` in
    [0, 1) (0 = off; min-p is relative to the top probability); ``top_n_sigma`` ≥ 0 (0 = off).
    """

    name = "classic"
    params: ClassVar[dict[str, Param]] = {
        "temperature": TEMPERATURE, "top_k": TOP_K, "top_p": TOP_P, "min_p": MIN_P,
        "typical_p": Param(1.0, lo=0.0, hi=1.0, open_lo=True, help="locally typical sampling's mass"),
        "epsilon_cutoff": Param(0.0, lo=0.0, hi=1.0, open_hi=True, note="0 disables it",
                                help="drop tokens whose probability is below it"),
        "eta_cutoff": Param(0.0, lo=0.0, hi=1.0, open_hi=True, note="0 disables it",
                            help="eta sampling: an entropy-dependent probability floor"),
        "top_n_sigma": Param(0.0, lo=0.0, note="0 disables it",
                             help="keep the tokens whose logit is within n standard deviations of the top one"),
    }

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 typical_p: float = 1.0, epsilon_cutoff: float = 0.0, eta_cutoff: float = 0.0,
                 top_n_sigma: float = 0.0) -> None:
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.min_p = min_p
        self.typical_p = typical_p
        self.epsilon_cutoff = epsilon_cutoff
        self.eta_cutoff = eta_cutoff
        self.top_n_sigma = top_n_sigma

    def config(self) -> dict[str, Any]:
        """Name and the parameters that are switched on (the defaults that do nothing are left out)."""
        on = {p: getattr(self, p) for p, param in self.params.items()
              if p == "temperature" or getattr(self, p) != param.default}
        return {"name": self.name, **on}

    def warpers(self) -> list[LogitsProcessor]:
        """The warpers for the current parameters, in application order."""
        chain: list[LogitsProcessor] = []
        if self.top_n_sigma > 0:
            chain.append(TopNSigmaLogitsWarper(self.top_n_sigma))
        if self.temperature != 1.0:
            chain.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k > 0:
            chain.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            chain.append(TopPLogitsWarper(self.top_p))
        if self.min_p > 0.0:
            chain.append(MinPLogitsWarper(self.min_p))
        if self.typical_p < 1.0:
            chain.append(TypicalLogitsWarper(self.typical_p))
        if self.epsilon_cutoff > 0.0:
            chain.append(EpsilonLogitsWarper(self.epsilon_cutoff))
        if self.eta_cutoff > 0.0:
            chain.append(EtaLogitsWarper(self.eta_cutoff))
        return chain

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()  # transformers' warpers may write in place; keep the caller's scores intact
        for warper in self.warpers():
            out = warper(input_ids, out)
        return out

