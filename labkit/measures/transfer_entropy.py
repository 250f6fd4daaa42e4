"""Transfer entropy (bits) with shuffle-surrogate significance, and token influence from a Trace.

TE(X → Y) = I(Y_{t+1} ; X_t^(k) | Y_t^(k)): how much the last ``k`` values of a source series tell about the
next value of a target series beyond what the target's own last ``k`` values tell. Estimated by binning each
series into equal-frequency bins and counting (plug-in estimator). The plug-in estimate is biased upwards on
short series, so every estimate comes with surrogates: the source is shuffled in time (destroying its relation
to the target, keeping its distribution), and the p-value is the fraction of surrogates reaching the observed TE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labkit.core.errors import InvalidArgument, check_int


@dataclass(frozen=True)
class TransferEntropy:
    """One TE estimate X → Y."""

    te_bits: float
    """Plug-in transfer entropy (bits, ≥ 0)."""
    p_value: float
    """Fraction (with +1 smoothing) of shuffled-source surrogates whose TE ≥ the observed TE."""
    surrogate_mean_bits: float
    """Mean TE of the surrogates: the estimator's bias on series like these (bits)."""
    alpha: float = 0.05

    @property
    def significant(self) -> bool:
        """Whether the shuffle-surrogate p-value is below ``alpha``."""
        return self.p_value < self.alpha

    @property
    def excess_bits(self) -> float:
        """TE above the surrogate mean, floored at 0 (bits): a bias-corrected strength."""
        return max(0.0, self.te_bits - self.surrogate_mean_bits)


def _discretize(x: np.ndarray, bins: int) -> np.ndarray:
    """Equal-frequency bins 0..bins−1 by average rank (tied values share a bin; a constant series is all 0)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - counts + (counts - 1) / 2  # 0-based average rank of each distinct value
    return np.clip(np.floor(avg_rank[inverse] * bins / len(x)).astype(np.int64), 0, bins - 1)


def _history(s: np.ndarray, k: int, bins: int, n: int) -> np.ndarray:
    """Code of (s[t−k+1], ..., s[t]) for t = k−1 .. k−2+n."""
    code = np.zeros(n, dtype=np.int64)
    for lag in range(k):
        code = code * bins + s[k - 1 - lag: k - 1 - lag + n]
    return code


def _te(x: np.ndarray, y: np.ndarray, k: int, bins: int) -> float:
    n = len(y) - k
    y_next = y[k:]
    y_past = _history(y, k, bins, n)
    x_past = _history(x, k, bins, n)
    span = bins ** k

    def counts(*codes: np.ndarray) -> np.ndarray:
        joint = np.zeros(n, dtype=np.int64)
        for c, size in codes:
            joint = joint * size + c
        return np.unique(joint, return_inverse=True, return_counts=True)

    _, i_xyz, c_xyz = counts((y_next, bins), (y_past, span), (x_past, span))
    _, i_yp_xp, c_yp_xp = counts((y_past, span), (x_past, span))
    _, i_yn_yp, c_yn_yp = counts((y_next, bins), (y_past, span))
    _, i_yp, c_yp = counts((y_past, span))
    # per sample: log2 [ p(yn,yp,xp) p(yp) / (p(yp,xp) p(yn,yp)) ], averaged over samples = TE
    terms = np.log2(c_xyz[i_xyz] * c_yp[i_yp] / (c_yp_xp[i_yp_xp] * c_yn_yp[i_yn_yp]))
    return float(max(0.0, terms.mean()))


def transfer_entropy(source: Any, target: Any, k: int = 1, bins: int = 3, surrogates: int = 200,
                     seed: int = 0, alpha: float = 0.05) -> TransferEntropy:
    """TE(source → target) in bits with a shuffle-surrogate p-value. Series: 1-D, equal length ≥ k + 4."""
    x, y = np.asarray(source, dtype=float).ravel(), np.asarray(target, dtype=float).ravel()
    if x.shape != y.shape:
        raise InvalidArgument(f"source and target must have the same length; got {len(x)} and {len(y)}")
    check_int("k", k, 1)
    check_int("bins", bins, 2)
    if len(x) < k + 4:
        raise InvalidArgument(f"series must have at least k + 4 = {k + 4} values; got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InvalidArgument("source and target must be finite")
    xs, ys = _discretize(x, bins), _discretize(y, bins)
    observed = _te(xs, ys, k, bins)
    rng = np.random.default_rng(seed)
    null = np.array([_te(rng.permutation(xs), ys, k, bins) for _ in range(surrogates)])
    p = (1 + int((null >= observed - 1e-12).sum())) / (1 + surrogates)
    return TransferEntropy(observed, p, float(null.mean()) if surrogates else 0.0, alpha)


# -- token influence from a generation -------------------------------------------------------------------

@dataclass
class TokenInfluence:
    """Transfer entropy between prompt positions' attention series over a generation.

    Signals: at every generated step t, ``attention[j, t]`` is the attention the new token's query pays to
    prompt position j, averaged over all layers and heads (from ``capture=["attention"]``); and ``entropy[t]``
    is the step's next-token entropy (bits). ``to_entropy[j]`` = TE(attention on j → entropy): how much
    looking at token j tells about how uncertain the model is next. ``matrix[i, j]`` = TE(attention on i →
    attention on j). All TE in bits, each with its surrogate p-value.
    """

    tokens: list[str]
    """Shape (P,): the prompt tokens (positions)."""
    to_entropy: list[TransferEntropy]
    """Shape (P,): TE(attention on position j → next-token entropy)."""
    matrix: np.ndarray
    """Shape (P, P): TE in bits, source row → target column (diagonal 0)."""
    p_values: np.ndarray
    """Shape (P, P): p-values of ``matrix``."""
    alpha: float = 0.05
    stats: dict[str, float] = field(default_factory=dict)

    def influential_tokens(self, top: int = 5) -> list[tuple[int, str, float, float]]:
        """The ``top`` positions by bias-corrected TE to the entropy: (position, token, excess bits, p-value)."""
        order = sorted(range(len(self.tokens)), key=lambda j: -self.to_entropy[j].excess_bits)
        return [(j, self.tokens[j], self.to_entropy[j].excess_bits, self.to_entropy[j].p_value)
                for j in order[:top]]


def attention_signals(trace: Any) -> tuple[np.ndarray, np.ndarray]:
    """(attention (P, S), entropy (S,)) from a Trace generated with capture=["attention"]; see TokenInfluence."""
    rows = [s.captures.get("attention") for s in trace.steps]
    if not rows or any(r is None for r in rows):
        raise InvalidArgument("token influence needs a Trace generated with capture=['attention'] (in this session:"
                              " captured tensors are not saved with the trace)")
    p = len(trace.prompt_ids)
    att = np.stack([r.probs[..., :p].float().mean(dim=(0, 1)).numpy() for r in rows], axis=1)  # (P, S)
    return att, np.array([s.entropy_bits for s in trace.steps])


def token_influence(trace: Any, tokenizer: Any = None, k: int = 1, bins: int = 2, surrogates: int = 100,
                    seed: int = 0, alpha: float = 0.05) -> TokenInfluence:
    """Pairwise TE between prompt positions' attention series, and TE from each to the entropy (bits).

    ``tokenizer`` (e.g. ``session.tokenizer``) labels positions with their token text; else with ids.
    """
    att, entropy = attention_signals(trace)
    n = att.shape[0]
    to_entropy = [transfer_entropy(att[j], entropy, k, bins, surrogates, seed + j, alpha) for j in range(n)]
    matrix, pvals = np.zeros((n, n)), np.ones((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                r = transfer_entropy(att[i], att[j], k, bins, surrogates, seed + i * n + j, alpha)
                matrix[i, j], pvals[i, j] = r.te_bits, r.p_value
    off = ~np.eye(n, dtype=bool)
    stats = {"mean_bits": float(matrix[off].mean()) if n > 1 else 0.0,
             "max_bits": float(matrix.max()), "significant_links": int((pvals[off] < alpha).sum()),
             "links": int(off.sum()), "significant_to_entropy": sum(t.significant for t in to_entropy)}
    tokens = [tokenizer.decode([i]) if tokenizer is not None else str(i) for i in trace.prompt_ids]
    return TokenInfluence(tokens, to_entropy, matrix, pvals, alpha, stats)


def influential_tokens(trace: Any, top: int = 5, tokenizer: Any = None, **kwargs: Any
                       ) -> list[tuple[int, str, float, float]]:
    """The ``top`` prompt positions whose attention series carries the most transfer entropy (bias-corrected
    bits) to the next-token entropy: (position, token, excess bits, p-value). ``kwargs`` go to
    :func:`token_influence` (k, bins, surrogates, seed, alpha)."""
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise InvalidArgument(f"top must be a positive integer; got {top!r}")
    return token_influence(trace, tokenizer, **kwargs).influential_tokens(top)
