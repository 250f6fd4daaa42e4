"""Mirostat v2 (Basu et al., 2021, as in llama.cpp): truncate to the tokens whose surprise is at most μ, and
steer μ so the observed surprise tracks a target τ. Surprise in bits."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from labkit.sampling.base import Sampler, keep_only
from labkit.sampling.params import TEMPERATURE, Param

_LN2 = math.log(2.0)


class Mirostat(Sampler):
    """Mirostat v2. ``tau`` > 0: target surprise (bits); ``eta`` in (0, 1]: learning rate; ``temperature`` > 0.

    State per generation (cleared by ``reset``): μ starts at 2τ. Each step keeps the tokens with surprise
    −log₂ p ≤ μ (at least the top one) of softmax(logits / temperature); after a token is drawn, μ ← μ − η·(s − τ)
    with s its surprise under the truncated, renormalised distribution. The update is made when the next step
    sees the drawn token as the last of ``input_ids``, so it also works inside ``model.generate`` (call
    ``reset()`` between generations there).
    """

    name = "mirostat"
    stateless = False
    params: ClassVar[dict[str, Param]] = {
        "tau": Param(5.0, lo=0.0, open_lo=True, unit="bits", slider=(0.5, 10.0, 0.1),
                     help="the target surprise per token"),
        "eta": Param(0.1, lo=0.0, hi=1.0, open_lo=True, slider=(0.01, 1.0, 0.01),
                     help="how fast the threshold follows the target"),
        "temperature": TEMPERATURE,
    }

    def __init__(self, tau: float = 5.0, eta: float = 0.1, temperature: float = 1.0) -> None:
        self.tau = tau
        self.eta = eta
        self.temperature = temperature
        self.reset()

    def reset(self, tokenizer: Any = None) -> None:
        self.mu: torch.Tensor | None = None  # (B,) bits
        self._last_logp: torch.Tensor | None = None  # (B, V) nats, the previous step's truncated distribution
        self._mu_used: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        b = scores.shape[0]
        if self.mu is None or self.mu.shape[0] != b:
            self.mu = torch.full((b,), 2.0 * self.tau)
        elif self._last_logp is not None and input_ids.shape[-1] > 0:
            drawn = input_ids[:, -1:].to(self._last_logp.device)  # (B, 1)
            surprise = -self._last_logp.gather(-1, drawn).squeeze(-1).cpu() / _LN2  # (B,) bits
            self.mu = self.mu - self.eta * (surprise - self.tau)
        tempered = scores.float() / self.temperature
        surprise_all = -torch.log_softmax(tempered, dim=-1) / _LN2  # (B, V) bits
        keep = surprise_all <= self.mu.to(scores.device).unsqueeze(-1)
        keep.scatter_(-1, tempered.argmax(-1, keepdim=True), True)  # never empty
        out = keep_only(tempered, keep)
        self._last_logp = torch.log_softmax(out, dim=-1)
        self._mu_used = self.mu.tolist()
        return out

    def record(self, scores: torch.Tensor) -> dict[str, Any]:
        return {**self.config(), "mu_bits": self._mu_used[0] if self._mu_used else 2.0 * self.tau}
