"""Shared benchmark helpers: interleaved timing and a ~1,000-token prompt."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

LONG_SEED = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
             "grain, salt and cloth. Over the centuries it grew into a market town and then a capital. ")


def long_prompt(tokenizer, n_tokens: int = 1000) -> str:
    """A prompt of exactly ``n_tokens`` tokens (before any special tokens)."""
    text = LONG_SEED
    while len(tokenizer(text).input_ids) < n_tokens:
        text += LONG_SEED
    return tokenizer.decode(tokenizer(text).input_ids[:n_tokens])


def interleaved(runs: dict[str, Callable[[], int]], repeats: int = 7) -> dict[str, list[float]]:
    """Time each run (returns how many tokens it generated) ``repeats`` times, interleaved, after one warm-up
    each. Returns ms per generated token for every repeat."""
    for fn in runs.values():
        fn()
    out: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            n = fn()
            out[name].append((time.perf_counter() - t0) * 1e3 / n)
    return out


def best_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best and median wall time of ``fn`` in ms over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times), statistics.median(times)


def summary(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float | list[float]]]:
    """Per run: best (minimum, the timeit convention: the least disturbed by other load on this 2-core machine)
    and median ms/token, and their ratios to ``baseline``."""
    best, med = min(times[baseline]), statistics.median(times[baseline])
    return {name: {"ms_per_token": round(min(v), 2), "ratio": round(min(v) / best, 4),
                   "median_ms_per_token": round(statistics.median(v), 2),
                   "median_ratio": round(statistics.median(v) / med, 4),
                   "runs_ms": [round(x, 2) for x in v]} for name, v in times.items()}
