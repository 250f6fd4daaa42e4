"""Classic knobs beyond temperature/top-k/top-p/min-p, Mirostat, entropy-guided sampling, sampling_info:
golden vectors worked out by hand (llama.cpp's test distribution), and 100,000-draw chi-square tests."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from scipy.stats import chisquare

from labkit.core.errors import InvalidArgument
from labkit.sampling import Classic, EntropyGuided, Greedy, Mirostat, sampling_info
from labkit.sampling.guided import guided_scores

PROBS = [0.1, 0.2, 0.3, 0.4]
LOGITS = torch.tensor([PROBS]).log()
IDS = torch.zeros((1, 1), dtype=torch.long)
H_NATS = -sum(p * math.log(p) for p in PROBS)


def kept(sampler, logits=LOGITS) -> list[float]:
    return torch.softmax(sampler(IDS, logits), -1)[0].tolist()


NINE = [0, 0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9]


@pytest.mark.parametrize("sampler, expected", [
    # epsilon: drop p < 0.15 -> the 0.1 token
    (Classic(epsilon_cutoff=0.15), NINE),
    # eta: cutoff = min(0.2, sqrt(0.2)·exp(−H)) = 0.124 -> the 0.1 token goes
    (Classic(eta_cutoff=0.2), NINE),
    # typical: |−ln p − H| orders the tokens 0.3, 0.2, 0.4, 0.1; keep until the mass reaches typical_p
    (Classic(typical_p=0.25), [0, 0, 1.0, 0]),
    (Classic(typical_p=0.55), NINE),
    # top-nσ, n = 1: keep ln p ≥ max − σ(ln p) (population σ = 0.521) -> 0.3 and 0.4
    (Classic(top_n_sigma=1.0), [0, 0, 3 / 7, 4 / 7]),
    # mirostat τ = 1.5: μ = 2τ = 3 bits keeps surprise −log2 p ≤ 3 -> not the 0.1 token (3.32 bits)
    (Mirostat(tau=1.5), NINE),
    (Greedy(), [0, 0, 0, 1.0]),
])
def test_golden_vectors(sampler, expected):
    assert kept(sampler) == pytest.approx(expected, abs=1e-6)


def test_golden_vectors_rest_on_the_hand_computation():
    assert min(0.2, math.sqrt(0.2) * math.exp(-H_NATS)) == pytest.approx(0.1243, abs=1e-4)
    sigma = statistics.pstdev([math.log(p) for p in PROBS])
    assert math.log(0.2) < math.log(0.4) - sigma < math.log(0.3)
    order = sorted(range(4), key=lambda i: abs(-math.log(PROBS[i]) - H_NATS))
    assert order == [2, 1, 3, 0]


def test_top_n_sigma_ignores_temperature_and_removed_tokens():
    a = Classic(top_n_sigma=0.5)(IDS, LOGITS)
    b = Classic(top_n_sigma=0.5, temperature=0.3)(IDS, LOGITS)
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    with_inf = torch.cat([LOGITS, torch.tensor([[float("-inf")]])], -1)
    assert kept(Classic(top_n_sigma=1.0), with_inf) == pytest.approx([0, 0, 3 / 7, 4 / 7, 0], abs=1e-6)


def test_mirostat_steers_mu_towards_tau_and_resets():
    m = Mirostat(tau=1.5, eta=0.1)
    m(IDS, LOGITS)
    assert m.mu.tolist() == [3.0]
    m(torch.tensor([[0, 3]]), LOGITS)  # token 3 was drawn: p = 0.4/0.9 in the truncated distribution
    surprise = -math.log2(0.4 / 0.9)
    assert m.mu.tolist() == pytest.approx([3.0 - 0.1 * (surprise - 1.5)])
    assert m.record(None)["mu_bits"] == pytest.approx(3.0 - 0.1 * (surprise - 1.5))
    m.reset()
    m(IDS, LOGITS)
    assert m.mu.tolist() == [3.0]
    tiny = Mirostat(tau=0.01)
    assert kept(tiny) == [0, 0, 0, 1.0]  # μ below every surprise: the top token is still kept


def test_entropy_guided_score_on_a_hand_computed_example():
    h_bits = H_NATS / math.log(2)
    w = 0.2
    expected = [(1 - w) * math.log(p) + w * h_bits * math.log(1 - p) for p in PROBS]
    got = guided_scores(LOGITS.log_softmax(-1), torch.tensor([h_bits]), w)[0].tolist()
    assert got == pytest.approx(expected, rel=1e-6)
    g = EntropyGuided(entropy_weight=w, min_entropy=1.0, temperature=0.5)
    z = [math.exp(e / 0.5) for e in expected]
    assert kept(g) == pytest.approx([v / sum(z) for v in z], rel=1e-5)
    assert g.record(None)["guided"] is True


def test_entropy_guided_with_zero_weight_or_low_entropy_is_plain_sampling():
    plain = kept(Classic(temperature=0.7))
    assert kept(EntropyGuided(entropy_weight=0.0, min_entropy=0.0, temperature=0.7)) == pytest.approx(plain, abs=1e-7)
    below = EntropyGuided(entropy_weight=0.9, min_entropy=5.0, temperature=0.7)  # H = 1.85 bits < 5
    assert kept(below) == pytest.approx(plain, abs=1e-7)
    assert below.record(None)["guided"] is False
    assert EntropyGuided.preset().config() == {"name": "entropy_guided", "entropy_weight": 0.2, "min_entropy": 2.0,
                                               "temperature": 1.0}


def test_entropy_guided_handles_certain_and_impossible_tokens():
    certain = torch.tensor([[0.0, -1e4, -1e4, float("-inf")]])  # p = 1 (to float precision), and a −inf entry
    for w in (0.0, 0.5, 1.0):
        out = EntropyGuided(entropy_weight=w, min_entropy=0.0)(IDS, certain)
        assert not torch.isnan(out).any() and out[0, 3] == float("-inf")
        if w < 1:  # at w = 1 and H = 0 the score is 0 for every possible token: the formula, not a fault
            assert torch.softmax(out, -1)[0, 0] > 0.99


def test_sampling_info_before_and_after():
    si = sampling_info(LOGITS, Classic(top_k=2))
    h_after = -(3 / 7 * math.log2(3 / 7) + 4 / 7 * math.log2(4 / 7))
    assert si.entropy_before_bits == pytest.approx(H_NATS / math.log(2))
    assert si.entropy_after_bits == pytest.approx(h_after)
    assert si.entropy_change_bits == pytest.approx(h_after - H_NATS / math.log(2))
    assert si.effective_vocab_after == pytest.approx(2 ** h_after)
    assert (si.kept, si.top_prob_before, si.top_prob_after) == (2, pytest.approx(0.4), pytest.approx(4 / 7))
    g = sampling_info(LOGITS, Greedy())
    assert (g.entropy_after_bits, g.effective_vocab_after, g.kept, g.top_prob_after) == (0.0, 1.0, 1, 1.0)


# -- distributions: 100,000 seeded draws against each sampler's own filtered distribution ---------------------

WIDE = torch.tensor([[2.0, 1.5, 1.2, 1.0, 0.4, 0.0, -0.5, -1.5]])  # 8 tokens, no ties
N = 100_000


def draw_counts(sampler, scores: torch.Tensor, seed: int = 0) -> torch.Tensor:
    draws = sampler.draw(scores.expand(N, -1), torch.Generator().manual_seed(seed))
    return torch.bincount(draws, minlength=scores.shape[-1]).double()


def chi2_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of the counts under ``probs``; a draw where ``probs`` is 0 is an outright rejection."""
    probs = probs.double()
    if (counts[probs == 0] > 0).any():
        return 0.0
    live = probs > 0
    return float(chisquare(counts[live], probs[live] / probs[live].sum() * counts.sum()).pvalue)


@pytest.mark.parametrize("sampler", [
    Classic(), Classic(temperature=0.6), Classic(top_k=3), Classic(top_p=0.8), Classic(min_p=0.2),
    Classic(typical_p=0.7), Classic(epsilon_cutoff=0.05), Classic(eta_cutoff=0.05), Classic(top_n_sigma=1.0),
    Classic(temperature=1.5, top_k=5, top_p=0.9, min_p=0.05), Mirostat(tau=2.0),
    EntropyGuided(entropy_weight=0.5, min_entropy=0.0), EntropyGuided(entropy_weight=1.0, min_entropy=0.0,
                                                                        temperature=0.8),
], ids=repr)
def test_draws_follow_the_filtered_distribution(sampler):
    scores = sampler(IDS, WIDE)
    own = torch.softmax(scores, -1)[0]
    counts = draw_counts(sampler, scores)
    assert chi2_p(counts, own) > 0.001
    live = (own > 0).nonzero().flatten()
    wrong = own.clone()
    wrong[live] = own[live.flip(0)]  # negative control: the same probabilities on the wrong tokens
    assert chi2_p(counts, wrong) < 0.001


def test_same_seed_same_draws_different_seed_different_draws():
    c = Classic(temperature=1.2)
    scores = c(IDS, WIDE)
    assert torch.equal(draw_counts(c, scores, 3), draw_counts(c, scores, 3))
    assert not torch.equal(draw_counts(c, scores, 3), draw_counts(c, scores, 4))


@pytest.mark.parametrize("make, match", [
    (lambda: Classic(typical_p=0), r"typical_p must be in \(0, 1\]; got 0"),
    (lambda: Classic(epsilon_cutoff=1.0), r"epsilon_cutoff must be in \[0, 1\)"),
    (lambda: Classic(eta_cutoff=-0.1), r"eta_cutoff must be in \[0, 1\)"),
    (lambda: Classic(top_n_sigma=-1), "top_n_sigma must be ≥ 0"),
    (lambda: Mirostat(tau=0), "tau must be > 0"),
    (lambda: Mirostat(eta=float("nan")), "eta must be a finite number"),
    (lambda: EntropyGuided(entropy_weight=1.5), r"entropy_weight must be in \[0, 1\]; got 1.5"),
    (lambda: EntropyGuided(entropy_weight=float("nan")), "entropy_weight must be a finite number"),
    (lambda: EntropyGuided(min_entropy=-1), "min_entropy must be ≥ 0 bits"),
    (lambda: EntropyGuided(temperature=0), "temperature must be > 0"),
])
def test_bad_parameters_are_named(make, match):
    with pytest.raises(InvalidArgument, match=match):
        make()
