"""Entropy and varentropy against closed forms and an independent (numpy/scipy) computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from labkit.core.errors import InvalidArgument
from labkit.measures import information as info


def _numpy_entropy_varentropy(logits: np.ndarray) -> tuple[float, float]:
    """Independent reference in float64, bits."""
    z = logits - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    nz = p > 0
    s = -np.log2(p[nz])
    h = float((p[nz] * s).sum())
    return h, float((p[nz] * (s - h) ** 2).sum())


def test_uniform_entropy_is_log2_vocab_and_varentropy_zero():
    for v in (2, 10, 49152):
        logits = torch.zeros(v)
        assert info.entropy(logits).item() == pytest.approx(math.log2(v), rel=1e-5)
        assert info.entropy(logits, "nats").item() == pytest.approx(math.log(v), rel=1e-5)
        assert info.varentropy(logits).item() == pytest.approx(0.0, abs=1e-6)


def test_one_hot_is_zero_and_extreme_logits_are_finite():
    logits = torch.tensor([1e4, -1e4, float("-inf"), 0.0])
    assert info.entropy(logits).item() == pytest.approx(0.0, abs=1e-6)
    assert info.varentropy(logits).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.tensor([float("-inf"), 3.0, 3.0, float("-inf")])
    assert info.entropy(logits).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.isfinite(info.varentropy(logits)).all()


def test_two_point_distribution_closed_form():
    # p = (0.25, 0.75): H = 0.811278 bits; varentropy = p(1-p)·(log2(p/(1-p)))^2
    p = torch.tensor([0.25, 0.75])
    logits = p.log()
    assert info.entropy(logits).item() == pytest.approx(0.8112781, abs=1e-6)
    expected = 0.25 * 0.75 * math.log2(0.25 / 0.75) ** 2
    assert info.varentropy(logits).item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_random_logits_match_independent_reference(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=rng.uniform(0.5, 8), size=(3, 97))
    h = info.entropy(torch.tensor(logits, dtype=torch.float64))
    vh = info.varentropy(torch.tensor(logits, dtype=torch.float64))
    for row in range(3):
        ref_h, ref_vh = _numpy_entropy_varentropy(logits[row])
        assert h[row].item() == pytest.approx(ref_h, rel=1e-9)
        assert h[row].item() == pytest.approx(scipy.stats.entropy(scipy.special.softmax(logits[row]), base=2), rel=1e-9)
        assert vh[row].item() == pytest.approx(ref_vh, rel=1e-9)


def test_half_precision_inputs_are_upcast():
    logits = torch.randn(4, 50).to(torch.bfloat16)
    assert info.entropy(logits).dtype == torch.float32
    torch.testing.assert_close(info.entropy(logits), info.entropy(logits.float()))


def test_unknown_unit_is_rejected():
    with pytest.raises(InvalidArgument, match="unit must be one of 'bits', 'nats'; got 'bans'"):
        info.entropy(torch.zeros(3), unit="bans")


def test_entropy_and_varentropy_refuses_raw_logits_instead_of_returning_wrong_numbers():
    logits = torch.tensor([3.0, 1.0, 0.5, -1.0])
    with pytest.raises(InvalidArgument, match="normalised log-probabilities"):
        info.entropy_and_varentropy(logits)
    h, v = info.entropy_and_varentropy(torch.log_softmax(logits, -1))
    p = torch.softmax(logits, -1)
    assert h.item() == pytest.approx(float(-(p * p.log2()).sum()), abs=1e-6)
    assert v.item() == pytest.approx(float((p * (-p.log2() - h) ** 2).sum()), abs=1e-5)
