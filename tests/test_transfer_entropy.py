"""Transfer entropy on series with known answers."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from labkit.core.errors import InvalidArgument
from labkit.measures.transfer_entropy import transfer_entropy


def test_lagged_copy_gives_high_te_one_way_only():
    rng = np.random.default_rng(0)
    x = rng.normal(size=600)
    y = np.r_[0.0, x[:-1]] + 0.05 * rng.normal(size=600)  # y(t) = x(t−1) + small noise
    forward, backward = transfer_entropy(x, y), transfer_entropy(y, x)
    assert forward.significant and forward.te_bits > 0.8 * math.log2(3)  # near the 3-bin maximum
    assert not backward.significant and backward.excess_bits < 0.02


def test_independent_series_are_not_significant_beyond_the_false_positive_rate():
    rng = np.random.default_rng(100)
    results = [transfer_entropy(rng.normal(size=200), rng.normal(size=200), surrogates=100, seed=s) for s in range(60)]
    false_positives = sum(r.significant for r in results)
    assert false_positives <= 8  # alpha = 0.05: about 3 of 60 expected; 8 has probability < 1% under H0
    assert np.mean([r.excess_bits for r in results]) < 0.01


def test_exact_plug_in_value_on_a_deterministic_binary_example():
    # x alternates randomly; y copies x one step later: TE = H(y_next | y_past) = 1 bit for a fair binary x.
    x = np.array([0, 1, 1, 0, 1, 0, 0, 1] * 50, dtype=float)
    y = np.r_[0.0, x[:-1]]
    r = transfer_entropy(x, y, bins=2, surrogates=50)
    # independent reference: H(y_{t+1} | y_t) from counts
    pairs = list(itertools.pairwise(y))
    c, cy = Counter(pairs), Counter(p[0] for p in pairs)
    n = len(pairs)
    cond = -sum(v / n * math.log2(v / cy[a]) for (a, b), v in c.items())
    assert r.te_bits == pytest.approx(cond, abs=0.02)


def test_bad_arguments():
    with pytest.raises(InvalidArgument, match="same length"):
        transfer_entropy([1, 2, 3, 4, 5, 6], [1, 2, 3])
    with pytest.raises(InvalidArgument, match="k must be a positive integer"):
        transfer_entropy(range(10), range(10), k=0)
    with pytest.raises(InvalidArgument, match="at least k \\+ 4"):
        transfer_entropy([1, 2, 3], [1, 2, 3])
    with pytest.raises(InvalidArgument, match="bins must be"):
        transfer_entropy(range(10), range(10), bins=1)
