"""Divergences, perplexity, coverage, health and the metric registry, against scipy and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.special
import scipy.stats
import torch

from labkit.core.errors import InvalidArgument
from labkit.measures import information as info


def rand_logits(seed: int, shape=(4, 31)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 3


@pytest.mark.parametrize("seed", range(4))
def test_kl_js_cross_entropy_match_scipy(seed):
    p, q = rand_logits(seed), rand_logits(seed + 100)
    pp, qq = scipy.special.softmax(p.numpy(), -1), scipy.special.softmax(q.numpy(), -1)
    for r in range(p.shape[0]):
        assert info.kl_divergence(p, q)[r].item() == pytest.approx(scipy.stats.entropy(pp[r], qq[r], base=2), rel=1e-9)
        js = scipy.spatial.distance.jensenshannon(pp[r], qq[r], base=2) ** 2
        assert info.js_divergence(p, q)[r].item() == pytest.approx(js, rel=1e-7)
        ce = -(pp[r] * np.log(qq[r])).sum()
        assert info.cross_entropy(p, q, "nats")[r].item() == pytest.approx(ce, rel=1e-9)
    # laws: H(p, q) = H(p) + KL(p‖q); KL ≥ 0; KL(p‖p) = 0; JS symmetric and ≤ 1 bit
    torch.testing.assert_close(info.cross_entropy(p, q), info.entropy(p) + info.kl_divergence(p, q))
    assert (info.kl_divergence(p, q) >= 0).all()
    torch.testing.assert_close(info.kl_divergence(p, p), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(info.js_divergence(p, q), info.js_divergence(q, p))
    assert (info.js_divergence(p, q) <= 1.0 + 1e-12).all()


def test_extreme_logits_stay_finite_where_defined():
    p = torch.tensor([1e4, -1e4, float("-inf"), 0.0])
    q = torch.tensor([0.0, 1e4, 0.0, float("-inf")])
    assert math.isfinite(info.js_divergence(p, q).item())
    assert info.js_divergence(p, q).item() == pytest.approx(1.0, abs=1e-6)  # disjoint supports: exactly 1 bit
    assert math.isfinite(info.kl_divergence(p, p).item()) and info.kl_divergence(p, p).item() == 0
    assert info.kl_divergence(p, q).item() > 1e3  # p's mass sits where q has ~e^-1e4
    assert math.isinf(info.kl_divergence(torch.tensor([0.0, 0.0]), torch.tensor([0.0, float("-inf")])).item())


def test_surprisal_perplexity_and_effective_vocab():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(0.5), math.log(0.25), math.log(0.25), -math.inf]])
    assert info.surprisal(logits, torch.tensor([1, 0])).tolist() == pytest.approx([2.0, 1.0])
    assert info.surprisal(logits, torch.tensor([1, 0]), "nats").tolist() == pytest.approx([math.log(4), math.log(2)])
    assert info.effective_vocab_size(logits).tolist() == pytest.approx([4.0, 2 ** 1.5])
    assert info.top_token_prob(logits).tolist() == pytest.approx([0.25, 0.5])
    assert info.coverage_count(logits, 0.5).tolist() == [2, 1]
    assert info.coverage_count(logits, 0.75).tolist() == [3, 2]
    assert info.coverage_count(logits, 1.0).tolist() == [4, 3]
    lp = torch.tensor([math.log(0.5), math.log(0.25)])
    assert info.perplexity(lp).item() == pytest.approx(math.sqrt(8))
    with pytest.raises(InvalidArgument, match=r"mass must be in \(0, 1\]"):
        info.coverage_count(logits, 1.5)


def test_distribution_health_thresholds():
    ref = torch.tensor([2.0, 1.0, 0.0])
    assert info.distribution_health(ref, ref) is info.Health.HEALTHY
    shifted = torch.tensor([0.5, 1.0, 1.5])
    kl = info.kl_divergence(shifted, ref).item()
    assert 0.5 < kl < 2.0 and info.distribution_health(shifted, ref) == "Warning"
    assert info.distribution_health(torch.tensor([-9.0, 0.0, 9.0]), ref) == "Critical"
    assert info.distribution_health(shifted, ref, warning_bits=kl + 0.1, critical_bits=5) == "Healthy"
    with pytest.raises(InvalidArgument, match="warning_bits ≤ critical_bits"):
        info.distribution_health(ref, ref, warning_bits=3, critical_bits=1)


def test_registry_lists_refuses_duplicates_and_names_valid_ones():
    assert {"entropy_bits", "varentropy_bits", "effective_vocab_size", "top_token_prob"} <= set(info.metrics())
    spec = info.metric("entropy_bits")
    assert spec.unit == "bits" and spec.fn(torch.zeros(8)).item() == pytest.approx(3.0)
    with pytest.raises(InvalidArgument, match="already registered"):
        info.register("entropy_bits", info.entropy, "bits")
    with pytest.raises(InvalidArgument, match=r"unknown metric 'nope'; registered: .*entropy_bits"):
        info.metric("nope")
    info.register("test_max_logit", lambda x: x.max(-1).values, "logit")
    try:
        assert "test_max_logit" in info.metrics()
        info.register("test_max_logit", lambda x: x.min(-1).values, "logit", overwrite=True)
        assert info.metric("test_max_logit").fn(torch.tensor([1.0, 2.0])).item() == 1.0
    finally:
        info._REGISTRY.pop("test_max_logit")
