"""Speed of speculative decoding against plain decoding on the same prompt, through a Session.

This sits above the Session (it calls ``session.generate``); the decoding loop never imports it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from labkit.core.errors import check_int, deprecated
from labkit.speculative.drafts import Draft
from labkit.speculative.speculator import SpeculativeStats


@dataclass(frozen=True)
class Measurement:
    """A speculative run and plain decoding on the same prompt, interleaved."""

    stats: SpeculativeStats
    """The last speculative run's statistics, with ``plain_ms_per_token`` set (median over repeats)."""
    speculative_ms_per_token: float
    """Median over repeats."""
    identical: bool
    """Whether the speculative tokens equal the plain run's (expected for greedy; sampled runs agree in
    distribution, not token by token)."""
    trace: Any = field(repr=False, default=None)
    """The last speculative Trace."""

    @property
    def plain_ms_per_token(self) -> float:
        """Median over repeats."""
        return self.stats.plain_ms_per_token

    @property
    def speedup(self) -> float:
        """Plain ms/token divided by speculative ms/token (> 1: speculative decoding is faster)."""
        return self.plain_ms_per_token / self.speculative_ms_per_token


def evaluate(session: Any, prompt: str, draft: Draft, repeats: int = 3, **generate_kw: Any) -> Measurement:
    """Run plain and speculative generation of ``prompt`` ``repeats`` times each, interleaved; compare ms/token
    (median, so a first warm-up run does not count with repeats ≥ 3) and tokens. ``generate_kw`` go to
    :meth:`~labkit.session.Session.generate` for both."""
    check_int("repeats", repeats, 1)
    plain_times, spec_times = [], []
    plain = spec = None
    for _ in range(repeats):
        plain = session.generate(prompt, **generate_kw)
        spec = session.generate(prompt, speculative=draft, **generate_kw)
        plain_times.append(sum(s.time_ms for s in plain) / len(plain))
        spec_times.append(sum(s.time_ms for s in spec) / len(spec))
    stats = SpeculativeStats.of(spec)
    stats.plain_ms_per_token = statistics.median(plain_times)
    stats.total_ms = statistics.median(spec_times) * stats.tokens
    return Measurement(stats, statistics.median(spec_times),
                       plain.token_ids == spec.token_ids, spec)


def measure(*args: Any, **kwargs: Any) -> Measurement:
    """Deprecated name of :func:`evaluate` (a variant against a baseline is ``evaluate`` everywhere)."""
    deprecated("labkit.speculative.measure is now labkit.speculative.evaluate")
    return evaluate(*args, **kwargs)
