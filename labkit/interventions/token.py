"""Token-level interventions (seed 002's set): act on each step's logits. Tokens are text (exactly one token,
else an error shows how it tokenizes) or ids. Entropies in bits."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from labkit.core.errors import InvalidArgument
from labkit.core.tokens import token_id
from labkit.interventions.base import InterventionContext, TokenIntervention, check_interventions
from labkit.measures import information as info

Token = str | int  #: a token: its text (exactly one token) or its id


def _tokens(tokens: Token | Sequence[Token], name: str) -> list[Token]:
    items = [tokens] if isinstance(tokens, (str, int)) else list(tokens)
    if not items or any(isinstance(t, bool) or not isinstance(t, (str, int)) for t in items):
        raise InvalidArgument(f"{name} must be a token (text or id) or a non-empty list of them; got {tokens!r}")
    return items


class _OnTokens(TokenIntervention):
    """Shared by Boost and Suppress: a list of tokens resolved to ids by ``bind``."""

    def __init__(self, tokens: Token | Sequence[Token]) -> None:
        self.tokens = _tokens(tokens, "tokens")
        self.ids: list[int] = list(self.tokens) if all(isinstance(t, int) for t in self.tokens) else []

    def bind(self, session: Any) -> None:
        self.ids = [token_id(session.tokenizer, t) for t in self.tokens]

    def _index(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.ids:
            raise InvalidArgument(f"{self!r} holds token text: use it through a Session (which resolves it)")
        return torch.tensor(self.ids, device=logits.device)


class Suppress(_OnTokens):
    """Make ``tokens`` impossible: probability exactly 0 (logit −inf)."""

    def apply(self, logits: torch.Tensor, ctx: InterventionContext) -> torch.Tensor:
        return logits.index_fill(-1, self._index(logits), float("-inf"))

    def __repr__(self) -> str:
        return f"Suppress({self.tokens!r})"


class Boost(_OnTokens):
    """Multiply the (unnormalised) probability of ``tokens`` by ``factor`` > 0: add ln(factor) to their logits.
    For one token of probability p the new probability is p·f / (p·f + 1 − p)."""

    def __init__(self, tokens: Token | Sequence[Token], factor: float = 3.0) -> None:
        super().__init__(tokens)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) \
                or factor <= 0:
            raise InvalidArgument(f"factor must be a finite number > 0 (1 = no change); got {factor!r}")
        self.factor = float(factor)

    def apply(self, logits: torch.Tensor, ctx: InterventionContext) -> torch.Tensor:
        idx = self._index(logits)
        return logits.index_add(-1, idx, torch.full((logits.shape[0], len(idx)), math.log(self.factor),
                                                    dtype=logits.dtype, device=logits.device))

    def __repr__(self) -> str:
        return f"Boost({self.tokens!r}, factor={self.factor:g})"


class ForceTokens(TokenIntervention):
    """Generate exactly the given token at the given steps: ``{step: token}`` (or a list: steps 0, 1, ...).
    The model continues from the forced tokens; each forced Step still records the model's own probability."""

    def __init__(self, tokens: Mapping[int, Token] | Sequence[Token]) -> None:
        items = dict(tokens) if isinstance(tokens, Mapping) else dict(enumerate(_tokens(tokens, "tokens")))
        if not items:
            raise InvalidArgument("ForceTokens needs at least one {step: token}")
        for step, tok in items.items():
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise InvalidArgument(f"ForceTokens steps must be integers ≥ 0; got {step!r}")
            _tokens(tok, f"the token for step {step}")
        self.tokens = items
        self.ids = {s: t for s, t in items.items() if isinstance(t, int)}

    def bind(self, session: Any) -> None:
        self.ids = {s: token_id(session.tokenizer, t) for s, t in self.tokens.items()}

    def apply(self, logits: torch.Tensor, ctx: InterventionContext) -> torch.Tensor:
        if ctx.step not in self.ids:
            return logits
        out = torch.full_like(logits, float("-inf"))
        out[..., self.ids[ctx.step]] = 0.0
        return out

    def __repr__(self) -> str:
        return f"ForceTokens({self.tokens!r})"


def temperature_for_entropy(logits: torch.Tensor, bits: float, iterations: int = 50) -> float:
    """The temperature T at which softmax(logits / T) has entropy ``bits`` (bisection on ln T in [1e-4, 1e4];
    the entropy grows with T). A target beyond the reachable range gives the nearest end."""
    lo, hi = math.log(1e-4), math.log(1e4)
    x = logits.float()
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if float(info.entropy(x / math.exp(mid), "bits").max()) < bits:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


class EntropyTarget(TokenIntervention):
    """Rescale the step's logits by the temperature that brings its entropy to ``bits`` (bisection)."""

    def __init__(self, bits: float) -> None:
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits) or bits < 0:
            raise InvalidArgument(f"bits must be a finite number ≥ 0 (the target entropy in bits); got {bits!r}")
        self.bits = float(bits)
        self.last_temperature: float | None = None

    def apply(self, logits: torch.Tensor, ctx: InterventionContext) -> torch.Tensor:
        self.last_temperature = temperature_for_entropy(logits, self.bits)
        return logits.float() / self.last_temperature

    def __repr__(self) -> str:
        return f"EntropyTarget({self.bits:g})"


class EntropyMaximize(TokenIntervention):
    """The limit of EntropyTarget as the target grows: every possible token (finite logit) equally likely."""

    def apply(self, logits: torch.Tensor, ctx: InterventionContext) -> torch.Tensor:
        return torch.where(torch.isfinite(logits), torch.zeros_like(logits), logits)

    def __repr__(self) -> str:
        return "EntropyMaximize()"


class Conditional(TokenIntervention):
    """Apply ``if_true`` at the steps where ``condition(step, context)`` holds, else ``if_false`` (or nothing).
    Either branch may be one intervention or a list (applied in order)."""

    def __init__(self, condition: Callable[[int, InterventionContext], bool], if_true: Any, if_false: Any = None):
        if not callable(condition):
            raise InvalidArgument(f"condition must be a callable (step, context) -> bool; got {condition!r}")
        self.condition = condition
        self.if_true = _token_level(if_true, "if_true")
        self.if_false = _token_level(if_false, "if_false")

    def bind(self, session: Any) -> None:
        for item in self.if_true + self.if_false:
            item.bind(session)

    def apply(self, logits: torch.Tensor, ctx: InterventionContext) -> torch.Tensor:
        for item in self.if_true if self.condition(ctx.step, ctx) else self.if_false:
            logits = item.apply(logits, ctx)
        return logits

    def __repr__(self) -> str:
        return f"Conditional({getattr(self.condition, '__name__', 'condition')}, {self.if_true!r}, {self.if_false!r})"


def _token_level(items: Any, name: str) -> list[TokenIntervention]:
    out = check_interventions(items)
    for item in out:
        if not isinstance(item, TokenIntervention):
            raise InvalidArgument(f"{name} must hold token-level interventions; {item!r} acts on activations")
    return out


class Custom(TokenIntervention):
    """Any logits edit: ``fn(logits, step, context) -> logits`` with logits of shape (1, V)."""

    def __init__(self, fn: Callable[[torch.Tensor, int, InterventionContext], torch.Tensor], name: str = "") -> None:
        if not callable(fn):
            raise InvalidArgument(f"fn must be a callable (logits, step, context) -> logits; got {fn!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")

    def apply(self, logits: torch.Tensor, ctx: InterventionContext) -> torch.Tensor:
        out = self.fn(logits, ctx.step, ctx)
        if not isinstance(out, torch.Tensor) or out.shape != logits.shape:
            raise InvalidArgument(f"Custom({self.name}) must return a tensor of shape {tuple(logits.shape)}; got "
                                  f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        return out

    def __repr__(self) -> str:
        return f"Custom({self.name})"
