"""The exact rule of speculative decoding (Leviathan et al., 2023, Algorithm 1; Chen et al., 2023).

A drafted token x is kept with probability min(1, p(x)/q(x)); the first rejected one is replaced by a draw from
norm(max(0, p − q)); after γ acceptances a bonus token is drawn from p. p and q are the target's and the draft's
distributions *after* the sampler's processing, so the output is distributed exactly as plain decoding with that
sampler; with greedy (p one-hot) the rule keeps drafted tokens while they are the target's argmax. This module is the
part a reader checks against the paper; it knows nothing of models, caches or sessions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from labkit.core.errors import InvalidArgument

ORIGINS = ("accepted", "resampled", "bonus", "target")
"""``Step.speculative["origin"]``: a drafted token the target kept; the target's draw after rejecting a drafted
token; the target's draw after all γ drafted tokens were kept; a plain target draw in a round with nothing drafted."""


# -- the exact rule -------------------------------------------------------------------------------------------

def accepts(px: torch.Tensor, qx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool, shape of ``px``: keep each drafted token with probability min(1, p(x)/q(x)) (u·q(x) < p(x), u ~ U[0,1),
    so q(x) = 0 is safe)."""
    u = torch.rand(px.shape, generator=generator, dtype=px.dtype, device=px.device)
    return u * qx < px


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Shape (..., V): norm(max(0, p − q)), the distribution to draw from after a rejection; p itself where
    p ≤ q everywhere (then a rejection has probability 0)."""
    res = (p - q).clamp(min=0.0)
    mass = res.sum(-1, keepdim=True)
    return torch.where(mass > 0, res / mass.clamp(min=1e-30), p)


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
    """Verify drafted tokens exactly, batched (the loop applies the same :func:`accepts` / :func:`residual` one
    position at a time, so it can stop computing at the first rejection).

    ``p``: (B, γ + 1, V) target probabilities at the γ drafted positions and the one after; ``q``: (B, γ, V) draft
    probabilities the tokens were drawn from (one-hot for a deterministic draft); ``drafted``: (B, γ) token ids.
    ``greedy``: keep while x is p's argmax, then take p's argmax.
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
        ok = accepts(p[:, :gamma].gather(-1, idx)[..., 0], q.gather(-1, idx)[..., 0], generator)  # (B, γ)
    accepted = ok.long().cumprod(-1).sum(-1)  # (B,) leading run of acceptances
    rows = torch.arange(b, device=p.device)
    target = p[rows, accepted]  # (B, V): the distribution at the first unkept position
    if greedy:
        return Verdict(accepted, target.argmax(-1))
    if gamma > 0:
        at = accepted.clamp(max=gamma - 1)
        res = residual(p[rows, at], q[rows, at])  # (B, V)
        target = torch.where((accepted < gamma).unsqueeze(-1), res, target)
    return Verdict(accepted, torch.multinomial(target, 1, generator=generator)[:, 0])


def judge(p: torch.Tensor, q: torch.Tensor | None, token: int,
          generator: torch.Generator | None = None) -> tuple[int, bool]:
    """One drafted ``token`` at one position: ``(token, True)`` if kept, else ``(replacement, False)`` drawn from
    the residual. ``p``, ``q``: shape (V,) target and draft probabilities; ``q=None`` is a deterministic draft
    (one-hot on ``token``)."""
    qx = q[token] if q is not None else p.new_ones(())
    if bool(accepts(p[token], qx, generator)):
        return token, True
    if q is None:
        q = torch.zeros_like(p)
        q[token] = 1.0
    return int(torch.multinomial(residual(p, q), 1, generator=generator)), False


def expected_speedup(alpha: float, gamma: float, cost_ratio: float, verify_growth: float = 0.0) -> float:
    """Expected speedup of speculative decoding over plain decoding (Leviathan et al., 2023, Theorem 3.8):
    (1 − α^(γ+1)) / ((1 − α)(γ·c + 1)), with α the acceptance rate, γ the drafted tokens per round and c the
    draft/target cost ratio per token. At α = 1 the first factor is its limit γ + 1. The theorem assumes verifying
    γ + 1 tokens costs one target step (true on a GPU); ``verify_growth`` g is the extra cost of each further
    verified position as a fraction of one target step (on a CPU a pass over n positions costs 1 + g·(n − 1)
    steps), giving (1 − α^(γ+1)) / ((1 − α)(γ·c + 1 + g·γ))."""
    if not 0 <= alpha <= 1 or gamma < 1 or cost_ratio < 0 or verify_growth < 0:
        raise InvalidArgument(f"need 0 ≤ alpha ≤ 1, gamma ≥ 1, cost_ratio ≥ 0, verify_growth ≥ 0; got {alpha}, "
                              f"{gamma}, {cost_ratio}, {verify_growth}")
    tokens = gamma + 1 if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * cost_ratio + 1 + verify_growth * gamma)
