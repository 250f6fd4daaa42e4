"""The speculative verification rule: it reproduces the target distribution exactly (chi-square over 100,000
seeded rounds), a wrong rule is caught by the same test, and the expected-speedup formula's closed forms."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from labkit.core.errors import InvalidArgument
from labkit.speculative import (
    PromptLookupDraft,
    Proposal,
    Speculator,
    VerifyCost,
    expected_speedup,
    judge,
    verify,
)

N = 100_000
PAIRS = [
    ([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]),
    ([0.5, 0.25, 0.125, 0.125], [0.0, 0.5, 0.5, 0.0]),  # q has zeros where p does not
    ([0.05, 0.05, 0.6, 0.3], [1.0, 0.0, 0.0, 0.0]),  # a deterministic draft (prompt lookup): q one-hot
    ([0.3, 0.3, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]),  # p == q: everything accepted
]


def chi2_p(counts: torch.Tensor, probs) -> float:
    expected = torch.tensor(probs, dtype=torch.float64)
    return float(chisquare(counts.double(), expected / expected.sum() * counts.sum()).pvalue)


def first_tokens(p, q, seed=0, rule=verify):
    """One single-token round (γ = 1) per row: the first token the round emits."""
    p_t, q_t = torch.tensor(p).expand(N, 2, -1).double(), torch.tensor(q).expand(N, 1, -1).double()
    g = torch.Generator().manual_seed(seed)
    drafted = torch.multinomial(q_t[:, 0], 1, replacement=True, generator=g)  # (N, 1) drawn from q
    verdict = rule(p_t, q_t, drafted, g)
    return torch.where(verdict.accepted == 1, drafted[:, 0], verdict.next_token)


@pytest.mark.parametrize("p, q", PAIRS)
def test_first_token_follows_the_target_distribution(p, q):
    counts = torch.bincount(first_tokens(p, q), minlength=len(p)).double()
    assert chi2_p(counts, p) > 0.001


@pytest.mark.parametrize("p, q", PAIRS[:3])
def test_accepting_always_is_caught(p, q):
    def accept_always(p_t, q_t, drafted, g):
        v = verify(p_t, q_t, drafted, g)
        return type(v)(torch.ones_like(v.accepted), v.next_token)

    counts = torch.bincount(first_tokens(p, q, rule=accept_always), minlength=len(p)).double()
    assert chi2_p(counts, p) < 0.001


def test_second_token_after_a_full_acceptance_comes_from_the_bonus_position():
    p = torch.tensor([[[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]]]).expand(N, -1, -1)
    q = torch.tensor([[[0.0, 1.0, 0.0]]]).expand(N, -1, -1)
    v = verify(p, q, torch.ones((N, 1), dtype=torch.long), torch.Generator().manual_seed(1))
    assert bool((v.accepted == 1).all())
    counts = torch.bincount(v.next_token, minlength=3).double()
    assert chi2_p(counts, [0.2, 0.3, 0.5]) > 0.001


def test_greedy_keeps_the_agreeing_prefix_then_takes_the_target_argmax():
    p = torch.tensor([[[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]])  # target argmaxes 1, 0, 1
    q = torch.full((1, 2, 2), 0.5)
    v = verify(p, q, torch.tensor([[1, 1]]), greedy=True)
    assert (v.accepted.item(), v.next_token.item()) == (1, 0)
    v = verify(p, q, torch.tensor([[1, 0]]), greedy=True)
    assert (v.accepted.item(), v.next_token.item()) == (2, 1)
    with pytest.raises(InvalidArgument, match="verify needs p"):
        verify(p, q[:, :1], torch.tensor([[1, 0]]))


def test_expected_speedup_closed_forms():
    assert expected_speedup(0.0, 4, 0.0) == 1.0  # nothing accepted, free draft: one token per round
    assert expected_speedup(1.0, 4, 0.0) == 5.0  # everything accepted: γ + 1 tokens per target pass
    assert expected_speedup(0.8, 4, 0.1) == pytest.approx((1 - 0.8 ** 5) / (0.2 * 1.4))
    # a verification pass over n positions costing 1 + g(n − 1) target steps (CPU)
    assert expected_speedup(0.8, 4, 0.1, 0.05) == pytest.approx((1 - 0.8 ** 5) / (0.2 * (1.4 + 0.2)))
    assert expected_speedup(0.0, 1, 0.0, 0.25) == pytest.approx(1 / 1.25)  # a rejected free draft still costs
    with pytest.raises(InvalidArgument):
        expected_speedup(1.5, 4, 0.1)
    with pytest.raises(InvalidArgument):
        expected_speedup(0.5, 4, 0.1, -0.1)


def test_verify_cost_fits_the_pass_time_line():
    cost = VerifyCost()
    cost.add(5, 40.0)
    assert cost.fit() is None  # one pass size: no slope yet
    for n in (1, 3, 11):
        cost.add(n, 30.0 + 2.0 * n)
    cost.add(5, 40.0)
    step, growth = cost.fit()
    assert step == pytest.approx(32.0) and growth == pytest.approx(2.0 / 32.0)


def test_expected_tokens_per_round_from_recent_runs():
    spec = Speculator(PromptLookupDraft(adaptive=True))
    assert spec.expected_tokens(3) == pytest.approx((1 - 0.5 ** 4) / 0.5)  # no rounds yet: Leviathan at α = 1/2

    def geometric(alpha, n):  # expected kept among n drafts, each kept with probability α in turn
        return sum(alpha ** k for k in range(1, n + 1))

    spec.settle(Proposal([7] * 5), accepted=2, tokens=3, target_ms=50.0, length=0)  # rejected at the 3rd draft
    alpha = (2 + 1) / (5 + 2)
    for g in (1, 2, 4, 10):  # the prior round (geometric at α, weight 1) and the observed one (weight 1)
        assert spec.expected_tokens(g) == pytest.approx(1 + (geometric(alpha, g) + min(2, g)) / 2)
    spec.settle(Proposal([7] * 5), accepted=5, tokens=6, target_ms=50.0, length=0)  # all 5 kept: L ≥ 5
    alpha = (0.8 * 2 + 5 + 1) / (0.8 * 5 + 5 + 2)
    newest = 5 + geometric(alpha, 3)  # beyond the 5 kept drafts, 3 more kept with probability α each in turn
    assert spec.expected_tokens(8) == pytest.approx(1 + (geometric(alpha, 8) + newest + 0.8 * 2) / 2.8)
    assert spec.expected_tokens(4) == pytest.approx(1 + (geometric(alpha, 4) + 4 + 0.8 * 2) / 2.8)


def test_adaptive_gamma_stops_drafting_when_no_gamma_pays_and_probes_again():
    """Nothing accepted and each verified position costing a quarter of a step: no γ ≥ 1 is expected to beat a
    plain step, so the adaptive rule drafts nothing, then probes with the best γ (here 1) every 9th round."""
    spec = Speculator(PromptLookupDraft(max_tokens=10, adaptive=True))
    for n in (1, 1, 11, 11, 11, 1):  # first settle is the prefill pass and does not enter the fit
        spec.settle(Proposal(list(range(n - 1))), accepted=0, tokens=1, target_ms=40.0 + 10.0 * (n - 1), length=0)
    assert spec.verify.fit() == pytest.approx((40.0, 0.25))
    assert [spec.gamma(limit=50) for _ in range(10)] == [0] * 8 + [1, 0]
    fixed = Speculator(PromptLookupDraft(max_tokens=10))
    assert fixed.gamma(limit=50) == 10 and fixed.gamma(limit=3) == 3


@pytest.mark.parametrize("p, q", PAIRS[:3])
def test_the_loops_one_position_rule_follows_the_target_distribution(p, q):
    """`judge` (what the decoding loop calls per position) against p; the deterministic-draft form (q=None)
    against the same p with q one-hot on the drafted token."""
    n = 20_000
    g = torch.Generator().manual_seed(3)
    p_t, q_t = torch.tensor(p, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)
    drafted = torch.multinomial(q_t, n, replacement=True, generator=g).tolist()
    deterministic = q_t.max() == 1.0
    tokens = [judge(p_t, None if deterministic else q_t, x, g)[0] for x in drafted]
    assert chi2_p(torch.bincount(torch.tensor(tokens), minlength=len(p)).double(), p) > 0.001


@pytest.mark.parametrize(("flag", "expected"), [("false", False), ("0", False), ("off", False), ("true", True),
                                                ("1", True), ("yes", True)])
def test_the_adaptive_setting_of_a_draft_spec_reads_false_as_false(flag, expected):
    from labkit.speculative.drafts import parse_draft

    assert parse_draft(f"prompt-lookup:adaptive={flag}").adaptive is expected  # bool("false") would be True
    assert parse_draft(f"layer-skip:8,gamma=3,adaptive={flag}").adaptive is expected


def test_an_unreadable_adaptive_setting_is_refused():
    from labkit.speculative.drafts import parse_draft

    with pytest.raises(InvalidArgument, match="adaptive must be 1/0, true/false"):
        parse_draft("prompt-lookup:adaptive=maybe")
