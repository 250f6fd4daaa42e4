"""Sequence-level uncertainty: how unsure the model is of a whole answer, from n sampled answers.

``s.uncertainty(prompt, n=10, seed=0)`` samples n answers in one batched generation (sample b is the single run
with ``seed + b``) and reports, per sample, its sequence negative log-likelihood under the model (nats and bits;
raw log-probabilities, before the sampler) and per token, its mean and max token entropy (bits); over the samples:

- the **predictive entropy** ``−(1/n) Σ_i log p(s_i | x)``, the Monte-Carlo estimate of the entropy of the model's
  distribution over whole answers (unbiased when the answers are drawn from the model itself, the default sampler
  ``Classic(temperature=1)``), and its length-normalised form ``−(1/n) Σ_i log p(s_i | x) / |s_i|`` (per token);
- the **semantic entropy** (Kuhn et al. 2023; discrete form of Farquhar et al. 2024): answers are grouped into
  clusters of equal meaning, by a normaliser (default :func:`normalize_answer`: first line, lower case, no
  punctuation or articles) or a user's ``equivalent(a, b)``; ``−Σ_C p(C) log p(C)`` with p(C) the fraction of
  samples in C; and the probability-weighted form, p(C) ∝ Σ_{s∈C} p(s | x) over the sampled clusters.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from labkit.core.errors import InvalidArgument

_LN2 = math.log(2)


def normalize_answer(text: str) -> str:
    """The default answer normaliser: the first non-empty line, lower-cased, without punctuation, the articles
    a/an/the, and repeated spaces (SQuAD's normalisation, on the first line)."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = line.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in line.split() if w not in ("a", "an", "the"))


@dataclass(frozen=True)
class Sample:
    """One sampled answer."""

    text: str
    answer: str
    """Its normalised form (or the first text of its cluster with a user equivalence)."""
    cluster: int
    n_tokens: int
    nll_nats: float
    """−log p(answer | prompt), raw model probabilities (nats)."""
    nll_bits: float
    nll_per_token_bits: float
    mean_entropy_bits: float
    """Mean over its steps of the next-token entropy (bits)."""
    max_entropy_bits: float
    stop_reason: str


@dataclass(frozen=True)
class Uncertainty:
    """The uncertainty of one prompt's answers (every figure says its unit)."""

    prompt: str
    samples: list[Sample]
    predictive_entropy_bits: float
    predictive_entropy_nats: float
    predictive_entropy_per_token_bits: float
    semantic_entropy_bits: float
    """Of the cluster frequencies ``|C| / n``."""
    semantic_entropy_weighted_bits: float
    """Of p(C) ∝ Σ_{s∈C} p(s | prompt) (normalised over the sampled clusters)."""
    clusters: dict[str, int]
    """Representative answer -> number of samples."""

    def summary(self) -> dict[str, Any]:
        """The figures without the samples (one row of a table)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("samples", "clusters")}
        return {**out, "n": len(self.samples), "n_clusters": len(self.clusters),
                "mean_token_entropy_bits": sum(s.mean_entropy_bits for s in self.samples) / len(self.samples),
                "max_token_entropy_bits": max(s.max_entropy_bits for s in self.samples)}

    def to_pandas(self) -> Any:
        """One row per sample."""
        import pandas as pd

        return pd.DataFrame([asdict(s) for s in self.samples])

    def as_dict(self) -> dict[str, Any]:
        """Every field as a JSON-ready dict."""
        return asdict(self)

    def __repr__(self) -> str:
        return (f"Uncertainty(n={len(self.samples)}, predictive={self.predictive_entropy_bits:.3f} bits, "
                f"semantic={self.semantic_entropy_bits:.3f} bits over {len(self.clusters)} clusters)")


def clusters_of(texts: Sequence[str], normalize: Callable[[str], str] = normalize_answer,
                equivalent: Callable[[str, str], bool] | None = None) -> tuple[list[int], list[str]]:
    """Cluster index of each text and each cluster's representative: by equal ``normalize(text)``, or, with
    ``equivalent``, by comparing each text with the first member of every cluster so far (Kuhn et al.)."""
    labels: list[int] = []
    heads: list[str] = []  # each cluster's normalised answer
    firsts: list[str] = []  # each cluster's first text (what ``equivalent`` compares with)
    for text in texts:
        key = normalize(text)
        match = [c for c in range(len(heads)) if (equivalent(firsts[c], text) if equivalent else heads[c] == key)]
        if match:
            labels.append(match[0])
        else:
            labels.append(len(heads))
            heads.append(key)
            firsts.append(text)
    return labels, heads


def estimate(prompt: str, texts: Sequence[str], nll_nats: Sequence[float], n_tokens: Sequence[int],
             entropies_bits: Sequence[Sequence[float]], stop_reasons: Sequence[str] | None = None,
             normalize: Callable[[str], str] = normalize_answer,
             equivalent: Callable[[str, str], bool] | None = None) -> Uncertainty:
    """The estimates from n samples: their texts, sequence NLLs (nats), lengths and per-step entropies (bits)."""
    n = len(texts)
    if n == 0 or not (len(nll_nats) == len(n_tokens) == len(entropies_bits) == n):
        raise InvalidArgument("estimate needs one NLL, length and entropy list per sample, and at least one sample")
    labels, heads = clusters_of(texts, normalize, equivalent)
    samples = [Sample(text=t, answer=heads[c], cluster=c, n_tokens=k, nll_nats=nll, nll_bits=nll / _LN2,
                      nll_per_token_bits=nll / _LN2 / max(k, 1),
                      mean_entropy_bits=sum(h) / len(h) if h else 0.0, max_entropy_bits=max(h, default=0.0),
                      stop_reason=(stop_reasons or [""] * n)[i])
               for i, (t, c, k, nll, h) in enumerate(zip(texts, labels, n_tokens, nll_nats, entropies_bits,
                                                          strict=True))]
    counts = [labels.count(c) for c in range(len(heads))]
    semantic = -sum(k / n * math.log2(k / n) for k in counts)
    # p(C) ∝ Σ p(s): log-sum-exp over each cluster's −NLL, normalised over the clusters seen
    logs = [_logsumexp([-s.nll_nats for s in samples if s.cluster == c]) for c in range(len(heads))]
    total = _logsumexp(logs)
    weighted = -sum(math.exp(lc - total) * (lc - total) for lc in logs) / _LN2
    predictive = sum(s.nll_nats for s in samples) / n
    return Uncertainty(prompt=prompt, samples=samples, predictive_entropy_bits=predictive / _LN2,
                       predictive_entropy_nats=predictive,
                       predictive_entropy_per_token_bits=sum(s.nll_per_token_bits for s in samples) / n,
                       semantic_entropy_bits=semantic + 0.0, semantic_entropy_weighted_bits=weighted + 0.0,
                       clusters=dict(zip(heads, counts, strict=True)))


def _logsumexp(values: Sequence[float]) -> float:
    return float(torch.logsumexp(torch.tensor(values, dtype=torch.float64), dim=0))


def uncertainty(session: Any, prompt: str, n: int = 10, seed: int = 0, max_new_tokens: int = 32,
                sampler: Any = None, stop: Any = None, chat: bool = False,
                normalize: Callable[[str], str] = normalize_answer,
                equivalent: Callable[[str, str], bool] | None = None) -> Uncertainty:
    """Sample ``n`` answers (one batched generation; default sampler ``Classic(temperature=1)``) and estimate."""
    if not callable(normalize):
        raise InvalidArgument(f"normalize must be a function str -> str; got {normalize!r}")
    if equivalent is not None and not callable(equivalent):
        raise InvalidArgument(f"equivalent must be a function (str, str) -> bool or None; got {equivalent!r}")
    if n < 2 if isinstance(n, int) and not isinstance(n, bool) else True:
        raise InvalidArgument(f"n must be an integer ≥ 2 (entropies need several samples); got {n!r}")
    traces = session.generate(prompt, max_new_tokens=max_new_tokens, sampler=sampler or "classic:temperature=1",
                              seed=seed, n=n, stop=stop, chat=chat)
    return estimate(prompt, [t.text for t in traces], [-sum(s.logprob for s in t.steps) for t in traces],
                    [len(t.steps) for t in traces], [[s.entropy_bits for s in t.steps] for t in traces],
                    [t.stop_reason for t in traces], normalize, equivalent)

