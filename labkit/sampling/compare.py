"""Compare samplers: evaluate them on many prompts (perplexity of their own output, distinct-n, repetition,
entropy). Samplers given as specs are built by :mod:`labkit.sampling.registry`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from labkit.core.errors import InvalidArgument
from labkit.measures import information as info
from labkit.sampling.base import Sampler
from labkit.sampling.registry import label, parse_sampler

# -- text-quality measures on token ids ---------------------------------------------------------------------

def _ngrams(ids: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]


def distinct_n(generations: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n (Li et al., 2016): unique n-grams / all n-grams over all generations (token ids); nan if none."""
    grams = [g for ids in generations for g in _ngrams(ids, n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repetition_rate(ids: Sequence[int], n: int = 4) -> float:
    """seq-rep-n (Welleck et al., 2019): 1 − unique n-grams / n-grams of one generation; 0 = no repeated n-gram."""
    grams = _ngrams(ids, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def summarize(traces: Sequence[Any]) -> dict[str, Any]:
    """Per-token figures over the steps of ``traces``: ``perplexity`` (exp of the mean −log p of the generated
    tokens under the raw model), ``mean_entropy_bits``, ``mean_surprisal_bits`` (nan when there is no token),
    ``tokens``, and ``branches`` (Entropix branch counts; empty for other samplers)."""
    steps = [s for t in traces for s in t.steps]
    logprobs = torch.tensor([s.logprob for s in steps], dtype=torch.float64)
    n = len(steps)
    return {"perplexity": float(info.perplexity(logprobs)) if n else float("nan"),
            "mean_entropy_bits": sum(s.entropy_bits for s in steps) / n if n else float("nan"),
            "mean_surprisal_bits": sum(s.surprisal_bits for s in steps) / n if n else float("nan"),
            "tokens": n,
            "branches": dict(sorted(Counter(s.sampler["branch"] for s in steps if "branch" in s.sampler).items()))}


def evaluate(session: Any, prompts: Sequence[str], samplers: Sequence[Sampler | str], seeds: Sequence[int] = (0,),
             max_new_tokens: int = 32, chat: bool = False) -> Any:
    """Generate from every prompt with every sampler and seed; one DataFrame row per sampler with:

    ``perplexity`` of its own output under the model (exp of the mean −log p of the generated tokens, p from the
    raw logits), ``distinct_1``/``distinct_2`` over all its outputs, ``repetition_rate`` (mean seq-rep-4),
    ``mean_entropy_bits`` and ``mean_surprisal_bits`` per token, ``tokens`` generated, ``generations``; for
    Entropix also ``branches`` (counts per branch).
    """
    import pandas as pd

    if isinstance(prompts, str) or not prompts:
        raise InvalidArgument("prompts must be a non-empty list of strings")
    if isinstance(samplers, (str, Sampler)) or not samplers:
        raise InvalidArgument("samplers must be a non-empty list of samplers or specs")
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise InvalidArgument(f"seeds must be a non-empty list of integers; got {seeds!r}")
    rows = []
    for spec in samplers:
        sampler = parse_sampler(spec) if isinstance(spec, str) else spec
        traces = [t for prompt in prompts for t in _runs(session, prompt, sampler, list(seeds), max_new_tokens, chat)]
        outputs = [t.token_ids for t in traces]
        figures = summarize(traces)
        branches = figures.pop("branches")
        row = {"sampler": label(sampler), "perplexity": figures.pop("perplexity"),
               "distinct_1": distinct_n(outputs, 1), "distinct_2": distinct_n(outputs, 2),
               "repetition_rate": sum(repetition_rate(o) for o in outputs) / len(outputs),
               **figures, "generations": len(outputs)}
        if branches:
            row["branches"] = branches
        rows.append(row)
    return pd.DataFrame(rows)


def _runs(session: Any, prompt: str, sampler: Sampler, seeds: list[int], max_new_tokens: int, chat: bool) -> list[Any]:
    """The traces of one prompt for every seed: one batched generation (each row = the single run with its seed),
    except for beam search, which is deterministic and uses the batch for its beams (one run per seed)."""
    from labkit.sampling.beam import BeamSearch, strategy_arguments

    if isinstance(sampler, BeamSearch) or len(seeds) == 1:
        return [session.generate(prompt, max_new_tokens=max_new_tokens, **strategy_arguments(sampler), seed=seed,
                                 chat=chat)
                for seed in seeds]
    return session.generate(prompt, max_new_tokens=max_new_tokens, sampler=sampler, seed=seeds, chat=chat)
