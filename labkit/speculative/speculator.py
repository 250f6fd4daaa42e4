"""One speculative generation's bookkeeping for the decoding loop — adaptive γ, timing, the exact choice at each
position of a round — and the run's :class:`SpeculativeStats`. Times in milliseconds."""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from labkit.core.errors import InvalidArgument
from labkit.measures.information import probs
from labkit.model.cache import crop
from labkit.speculative.drafts import NOTHING, Draft, Proposal
from labkit.speculative.rule import expected_speedup, judge


@dataclass
class VerifyCost:
    """Least-squares line through the target's verification passes: ms = a + b·n for a pass over n positions
    (fitted on the rounds of one generation). Gives the cost of one plain step, a + b, and the growth g = b/(a + b)
    of :func:`~labkit.speculative.rule.expected_speedup`."""

    count: int = 0
    sum_n: float = 0.0
    sum_nn: float = 0.0
    sum_ms: float = 0.0
    sum_n_ms: float = 0.0

    def add(self, n: int, ms: float) -> None:
        """Record one verification pass over ``n`` positions that took ``ms`` milliseconds."""
        self.count += 1
        self.sum_n += n
        self.sum_nn += n * n
        self.sum_ms += ms
        self.sum_n_ms += n * ms

    def fit(self) -> tuple[float, float] | None:
        """(ms of a one-position pass, growth g ≥ 0), or None until two different pass sizes were seen."""
        spread = self.count * self.sum_nn - self.sum_n ** 2
        if self.count < 2 or spread <= 1e-9:
            return None
        b = (self.count * self.sum_n_ms - self.sum_n * self.sum_ms) / spread
        a = (self.sum_ms - b * self.sum_n) / self.count
        step = a + b
        if step <= 0:
            return None
        return step, max(0.0, b / step)


@dataclass
class SpeculativeStats:
    """What a speculative generation did. Times in milliseconds; α is per drafted token."""

    draft: dict[str, Any]
    """The draft's name and settings."""
    rounds: int = 0
    """Target forward passes (one per round)."""
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    """Tokens generated (accepted drafts plus one target draw per round, fewer when a stop rule ends a round)."""
    draft_ms: float = 0.0
    """Time spent drafting."""
    target_ms: float = 0.0
    """Time in the target's verification forward passes."""
    total_ms: float = 0.0
    """Wall time of the generation (the sum of its steps' times)."""
    gammas: list[int] = field(default_factory=list)
    """γ of each round (0 when the draft had nothing to propose)."""
    plain_ms_per_token: float | None = None
    """Plain (non-speculative) decoding's ms/token on the same prompt, when measured
    (:func:`~labkit.speculative.measure.evaluate`)."""

    @property
    def alpha(self) -> float:
        """Acceptance rate: accepted / drafted (nan when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else math.nan

    @property
    def tokens_per_round(self) -> float:
        """Tokens made per round: accepted + resampled or bonus (nan before any round)."""
        return self.tokens / self.rounds if self.rounds else math.nan

    @property
    def mean_gamma(self) -> float:
        """Drafted tokens per round (nan before the first round)."""
        return self.drafted / self.rounds if self.rounds else math.nan

    @property
    def cost_ratio(self) -> float:
        """c: draft time per drafted token / target time per verification pass."""
        if not self.drafted or not self.target_ms:
            return math.nan
        return (self.draft_ms / self.drafted) / (self.target_ms / self.rounds)

    @property
    def expected_speedup(self) -> float:
        """:func:`~labkit.speculative.rule.expected_speedup` at the measured α, mean γ and c (nan when nothing was
        drafted)."""
        if not self.drafted or math.isnan(self.cost_ratio):
            return math.nan
        return expected_speedup(self.alpha, max(self.mean_gamma, 1.0), self.cost_ratio)

    @property
    def ms_per_token(self) -> float:
        """Wall time per generated token, milliseconds (nan before any token)."""
        return self.total_ms / self.tokens if self.tokens else math.nan

    @property
    def measured_speedup(self) -> float:
        """plain ms/token ÷ speculative ms/token (nan until ``plain_ms_per_token`` is measured)."""
        if self.plain_ms_per_token is None or not self.tokens:
            return math.nan
        return self.plain_ms_per_token / self.ms_per_token

    def as_dict(self) -> dict[str, Any]:
        """The fields plus the derived figures (stored in ``Trace.meta.speculative``; None where undefined)."""
        derived = ("alpha", "tokens_per_round", "mean_gamma", "cost_ratio", "expected_speedup", "ms_per_token",
                   "measured_speedup")
        figures = {k: getattr(self, k) for k in derived}
        return asdict(self) | {k: None if math.isnan(v) else v for k, v in figures.items()}  # None: undefined

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeculativeStats:
        """Statistics from their saved form (``trace.meta.speculative``); unknown keys ignored."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def of(cls, trace: Any) -> SpeculativeStats:
        """The statistics of a speculative Trace (InvalidArgument for a plain one)."""
        if not trace.meta.speculative:
            raise InvalidArgument("this trace was not generated with speculative=...")
        return cls.from_dict(trace.meta.speculative)

    def __str__(self) -> str:
        def f(x: float, spec: str) -> str:
            return "n/a" if x is None or math.isnan(x) else format(x, spec)

        return (f"{self.draft.get('name')}: {self.tokens} tokens in {self.rounds} rounds, "
                f"α={f(self.alpha, '.3f')}, {f(self.tokens_per_round, '.2f')} tokens/round, "
                f"mean γ={f(self.mean_gamma, '.2f')}, c={f(self.cost_ratio, '.3f')}, "
                f"{f(self.ms_per_token, '.1f')} ms/token, expected speedup {f(self.expected_speedup, '.2f')}×, "
                f"measured {f(self.measured_speedup, '.2f')}×")


class Speculator:
    """One speculative generation's bookkeeping for the decoding loop: picks γ, times the draft and the target,
    rolls the draft back and sums :class:`SpeculativeStats`."""

    def __init__(self, draft: Draft, stop: frozenset[int] = frozenset()) -> None:
        self.draft = draft
        self.stop = stop  # token ids that end generation: no drafting past them
        self.stats = SpeculativeStats(draft=draft.config())
        self._a = self._d = 0.0  # exponentially decayed accepted / drafted counts for adaptive γ
        self.verify = VerifyCost()  # the target's pass time against the positions it verifies
        self._idle = 0  # adaptive rounds in a row that drafted nothing because no γ was expected to pay
        self._runs: collections.deque[tuple[int, int]] = collections.deque(maxlen=32)  # (accepted, drafted)

    def start(self, prompt_ids: torch.Tensor) -> None:
        """Start a generation: the draft sees the prompt's ids."""
        self.draft.start(prompt_ids)

    def expected_tokens(self, gamma: int) -> float:
        """Expected tokens from a round that drafts ``gamma``: 1 + E[min(L, γ)] with L the accepted run length.
        E is a weighted mean over the recent rounds (weight 0.8^age) and one prior round whose L is geometric at
        the running acceptance rate α (Leviathan's model: alone it gives (1 − α^(γ+1)) / (1 − α)). A round that
        stopped at a rejection contributes min(accepted, γ); a round that kept all its d drafts only shows L ≥ d, so
        beyond d it continues geometrically at α."""
        alpha = (self._a + 1) / (self._d + 2)  # Laplace estimate of the running acceptance rate

        def geometric(n: int) -> float:  # E[accepted among n more drafts], each kept with probability α in turn
            return float(n) if alpha == 1 else alpha * (1 - alpha ** n) / (1 - alpha)

        total, weights = geometric(gamma), 1.0
        for age, (accepted, drafted) in enumerate(reversed(self._runs)):
            run = min(accepted, gamma) if accepted < drafted or gamma <= drafted else drafted + geometric(
                gamma - drafted)
            total += 0.8 ** age * run
            weights += 0.8 ** age
        return 1 + total / weights

    def gamma(self, limit: int) -> int:
        """γ for the next round, at most ``limit`` (tokens still allowed after the round's target draw).
        Adaptive: the γ ≤ ``gamma`` that maximises expected tokens per round (:meth:`expected_tokens`) over the
        round's cost in target steps, 1 + γ·c + γ·g (c: measured draft cost per token; g: measured growth of the
        verification pass per position, see :func:`~labkit.speculative.rule.expected_speedup`); 0 (a plain step) when
        no γ is expected to beat plain decoding, except every 9th such round, which drafts the best γ anyway to see if
        drafts pay again."""
        gamma = self.draft.gamma
        if self.draft.adaptive:
            fit = self.verify.fit()
            if fit is None:
                c, growth = self.stats.cost_ratio, 0.0
                c = 0.0 if math.isnan(c) else c
            else:
                step_ms, growth = fit
                c = self.stats.draft_ms / self.stats.drafted / step_ms if self.stats.drafted else 0.0
            speedup = {g: self.expected_tokens(g) / (1 + g * (c + growth)) for g in range(1, gamma + 1)}
            gamma = max(speedup, key=speedup.__getitem__)
            if speedup[gamma] < 1:
                self._idle += 1
                gamma = gamma if self._idle > 8 else 0
                self._idle = 0 if gamma else self._idle
        return max(0, min(gamma, limit))

    def propose(self, ids: torch.Tensor, cache: Any, limit: int, sampler: Any,
                generator: torch.Generator | None) -> Proposal:
        """Draft this round's tokens (γ chosen by :meth:`gamma`; none when γ is 0), timed."""
        gamma = self.gamma(limit)
        if gamma == 0:
            return NOTHING
        t0 = time.perf_counter()
        proposal = self.draft.propose(ids, gamma, cache, sampler, generator, self.stop)
        self.stats.draft_ms += (time.perf_counter() - t0) * 1e3
        return proposal

    def choose(self, proposal: Proposal, i: int, scores: torch.Tensor, log_q: torch.Tensor, sampler: Any,
               generator: torch.Generator | None, token_text: Callable[[int], str]) -> tuple[int, dict[str, Any]]:
        """The token at position ``i`` of a round (``scores`` (1, V): the sampler's output there; ``log_q`` (V,):
        log_softmax(scores), nats) and its ``Step.speculative`` record: the drafted token judged exactly, or, after
        the last drafted position, the sampler's own draw."""
        p = probs(log_q)  # (V,) what the sampler draws from
        gamma = len(proposal.tokens)
        if i < gamma:
            q, drafted = proposal.q_row(i), proposal.tokens[i]
            token, ok = judge(p, q, drafted, generator)
            qx = (lambda t: float(q[t])) if q is not None else (lambda t: float(t == drafted))
            record: dict[str, Any] = {"origin": "accepted" if ok else "resampled", "p": float(p[token]),
                                      "q": qx(token)}
            if not ok:
                record["rejected"] = {"token": token_text(drafted), "token_id": drafted, "p": float(p[drafted]),
                                      "q": qx(drafted)}
        else:
            token = int(sampler.draw(scores, generator))
            record = {"origin": "bonus" if gamma else "target", "p": float(p[token])}
        record["round"] = self.stats.rounds
        if i == 0:
            record["drafted"] = [token_text(t) for t in proposal.tokens]
        return token, record

    def end_round(self, proposal: Proposal, records: list[dict[str, Any]], cache: Any, target_ms: float,
                  length: int) -> None:
        """After a round that made one Step per ``records`` entry (their ``Step.speculative``): crop the target's
        ``cache`` to the ``length`` verified tokens before the newest one (dropping rejected drafts) and settle."""
        crop(cache, length)
        accepted = sum(r.get("origin") == "accepted" for r in records)
        self.settle(proposal, accepted, len(records), target_ms, length)

    def settle(self, proposal: Proposal, accepted: int, tokens: int, target_ms: float, length: int) -> None:
        """After a round: ``accepted`` drafted tokens kept, ``tokens`` generated, ``length`` verified tokens before
        the newest one."""
        s = self.stats
        gamma = len(proposal.tokens)
        s.rounds += 1
        s.drafted += gamma
        s.accepted += accepted
        s.tokens += tokens
        s.target_ms += target_ms
        s.gammas.append(gamma)
        if s.rounds > 1:  # the first pass also reads the prompt; later ones read the new token + γ drafted
            self.verify.add(gamma + 1, target_ms)
        if gamma:
            self._a, self._d = 0.8 * self._a + accepted, 0.8 * self._d + gamma
            self._runs.append((accepted, gamma))
        self.draft.rollback(length)


def check_speculative(speculative: Any, sampler: Any, capture: Any) -> Draft | None:
    """The draft, after checking it can run exactly with ``sampler`` and ``capture``."""
    if speculative is None:
        return None
    if not isinstance(speculative, Draft):
        raise InvalidArgument(f"speculative must be a labkit.speculative draft (PromptLookupDraft(), "
                              f"LayerSkipDraft(n), QuantizedDraft(), ModelDraft(...)) or None; got {speculative!r}")
    if sampler.needs or not sampler.stateless:
        raise InvalidArgument(f"speculative decoding is exact only for samplers whose distribution depends on the "
                              f"logits alone (greedy, classic, entropy_guided); {sampler.name!r} keeps state or "
                              "reads attention")
    if "attention" in capture:
        raise InvalidArgument("capture=['attention'] cannot be combined with speculative decoding (a round verifies "
                              "several positions at once)")
    return speculative
