"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023): the exact verification rule.

This module holds the part every draft kind shares: given the target's and the draft's distributions at the γ
drafted positions (both *after* the sampler's own processing, so any Classic sampler is preserved exactly), decide
how many drafted tokens to keep and draw the one token that follows. The decoding-loop integration and the draft
kinds (model, layer-skip, quantized, prompt lookup) build on it (issue 7, in progress).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from labkit.errors import InvalidArgument


@dataclass(frozen=True)
class Verdict:
    """Result of verifying one round per batch row."""

    accepted: torch.Tensor
    """Shape (B,): how many drafted tokens were kept (0..γ)."""
    next_token: torch.Tensor
    """Shape (B,): the token after the kept ones — drawn from the residual after a rejection, else a bonus token
    drawn from the target's distribution after the last drafted position."""


def verify(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, generator: torch.Generator | None = None,
           greedy: bool = False) -> Verdict:
    """Verify drafted tokens exactly.

    ``p``: (B, γ + 1, V) target probabilities at the γ drafted positions and the one after; ``q``: (B, γ, V) draft
    probabilities the tokens were drawn from (one-hot for a deterministic draft); ``drafted``: (B, γ) token ids.
    Sampling: keep token x with probability min(1, p(x)/q(x)); at the first rejection draw from
    norm(max(0, p − q)); after γ acceptances draw a bonus token from p. The kept tokens plus the next one are then
    distributed exactly as tokens drawn from p one by one. ``greedy``: keep while x is p's argmax, then p's argmax.
    """
    b, g1, v = p.shape
    gamma = g1 - 1
    if q.shape != (b, gamma, v) or drafted.shape != (b, gamma):
        raise InvalidArgument(f"verify needs p (B, γ+1, V), q (B, γ, V), drafted (B, γ); got {tuple(p.shape)}, "
                              f"{tuple(q.shape)}, {tuple(drafted.shape)}")
    idx = drafted.unsqueeze(-1)  # (B, γ, 1)
    if greedy:
        ok = p[:, :gamma].argmax(-1) == drafted  # (B, γ)
    else:
        px, qx = p[:, :gamma].gather(-1, idx)[..., 0], q.gather(-1, idx)[..., 0]  # (B, γ)
        u = torch.rand(px.shape, generator=generator, dtype=px.dtype, device=px.device)
        ok = u * qx < px  # u < p(x)/q(x) without dividing by a zero q(x)
    accepted = ok.long().cumprod(-1).sum(-1)  # (B,) leading run of acceptances
    rows = torch.arange(b, device=p.device)
    target = p[rows, accepted]  # (B, V): the distribution at the first unkept position
    if greedy:
        return Verdict(accepted, target.argmax(-1))
    residual = (p[:, :gamma] - q).clamp(min=0.0)  # (B, γ, V)
    rejected = accepted < gamma
    at = accepted.clamp(max=max(gamma - 1, 0))
    if gamma > 0:
        res = residual[rows, at]  # (B, V)
        mass = res.sum(-1, keepdim=True)
        res = torch.where(mass > 0, res / mass.clamp(min=1e-30), target)  # p == q: a rejection has probability 0
        target = torch.where(rejected.unsqueeze(-1), res, target)
    return Verdict(accepted, torch.multinomial(target, 1, generator=generator)[:, 0])


def expected_speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
    """Expected speedup of speculative decoding over plain decoding (Leviathan et al., 2023, Theorem 3.8):
    (1 − α^(γ+1)) / ((1 − α)(γ·c + 1)), with α the acceptance rate, γ the drafted tokens per round and c the
    draft/target cost ratio per token. At α = 1 the first factor is its limit γ + 1."""
    if not 0 <= alpha <= 1 or gamma < 1 or cost_ratio < 0:
        raise InvalidArgument(f"need 0 ≤ alpha ≤ 1, gamma ≥ 1, cost_ratio ≥ 0; got {alpha}, {gamma}, {cost_ratio}")
    tokens = gamma + 1 if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * cost_ratio + 1)
