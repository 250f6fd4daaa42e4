"""Entropix: metrics against an independent numpy computation, every branch from constructed logits, the
decision formulas on hand-worked numbers, the best-of-n draw against its closed form, and the real model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from labkit.core.errors import InvalidArgument
from labkit.measures.attention import AttentionRow
from labkit.sampling import Entropix, EntropixConfig
from labkit.sampling.entropix import Branch, EntropixMetrics, decide, filtered_scores, metrics

ATTN = torch.tensor([[0.0, 0.0, 0.0], [4.0, 1.0, -2.0]])  # head 0 uniform, head 1 peaked
IDS = torch.tensor([[5, 7]])


def spread(top: float, n_rest: int) -> torch.Tensor:
    """Logits with one token at probability ``top`` and ``n_rest`` tokens sharing the rest equally."""
    return torch.tensor([math.log(top)] + [math.log((1 - top) / n_rest)] * n_rest)


def test_metrics_match_an_independent_numpy_computation():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    m = metrics(logits, ATTN)
    p = np.exp(logits.numpy().astype(np.float64))
    p /= p.sum()
    s = -np.log2(p)
    assert m.entropy == pytest.approx((p * s).sum(), rel=1e-5)
    assert m.varentropy == pytest.approx((p * (s - (p * s).sum()) ** 2).sum(), rel=1e-4)
    a = np.exp(ATTN.numpy().astype(np.float64))
    a /= a.sum(-1, keepdims=True)
    head = -(a * np.log2(np.clip(a, 1e-10, 1))).sum(-1)
    assert head[0] == pytest.approx(math.log2(3))
    assert m.attn_entropy == pytest.approx(head.mean(), rel=1e-5)
    assert m.attn_varentropy == pytest.approx(head.var(), rel=1e-4)  # population variance
    assert m.agreement == pytest.approx(np.abs(a - a.mean(0)).mean(), rel=1e-5)
    assert m.interaction_strength == pytest.approx(np.abs(ATTN.numpy()).mean())


def test_masked_positions_are_left_out():
    masked = torch.cat([ATTN, torch.full((2, 1), float("-inf"))], -1)
    a, b = metrics(torch.zeros(4), ATTN), metrics(torch.zeros(4), masked)
    assert b.interaction_strength == pytest.approx(a.interaction_strength)
    assert b.attn_entropy == pytest.approx(a.attn_entropy)


@pytest.mark.parametrize("logits, branch", [
    (spread(0.9999999, 3), Branch.LELV),  # H ≈ 0, V ≈ 0
    (torch.zeros(64), Branch.HELV),  # uniform over 64: H = 6 bits, V = 0
    (spread(0.9, 999), Branch.LEHV),  # H = 1.47 bits, V = 15.5 bits²
    (spread(0.5, 9999), Branch.HEHV),  # H = 7.64 bits, V = 44 bits²
    (torch.tensor([0.0, 0.0]), Branch.ADAPTIVE),  # H = 1 bit, V = 0
])
def test_constructed_logits_land_in_each_branch(logits, branch):
    assert decide(metrics(logits, ATTN)).branch is branch


def closed_form(top: float, n_rest: int) -> tuple[float, float]:
    """(H bits, V bits²) of ``spread``: two surprisal levels, −log2 top and −log2((1 − top)/n_rest)."""
    s1, s2 = -math.log2(top), -math.log2((1 - top) / n_rest)
    h = top * s1 + (1 - top) * s2
    return h, top * (s1 - h) ** 2 + (1 - top) * (s2 - h) ** 2


@pytest.mark.parametrize("top, n_rest", [(0.9, 999), (0.5, 9999)])
def test_the_branch_entropies_match_their_closed_form(top, n_rest):
    m = metrics(spread(top, n_rest), ATTN)
    h, v = closed_form(top, n_rest)
    assert (m.entropy, m.varentropy) == (pytest.approx(h, rel=1e-4), pytest.approx(v, rel=1e-3))


def M(h, v, ae=2.0, av=0.5, ag=0.1, s=1.0) -> EntropixMetrics:
    return EntropixMetrics(h, v, ae, av, ag, s)


def test_decision_formulas_on_hand_worked_numbers():
    d = decide(M(0.05, 0.05))
    assert (d.branch, d.temperature, d.top_p, d.top_k, d.min_p) == (Branch.LELV, 0.666, 0.9, 27, 0.03)
    d = decide(M(6, 0.05), last_token_id=9, clarify_token_id=4)
    assert d.branch is Branch.HELV and d.clarify
    d = decide(M(6, 0.05), last_token_id=4, clarify_token_id=4)  # just clarified: sample hotter instead
    assert not d.clarify and d.temperature == pytest.approx(min(1.5, 0.666 * 1.7))  # 1.1322
    assert not decide(M(6, 0.05)).clarify  # no clarification token known
    d = decide(M(1, 6, ag=0.2, s=1.0))
    assert d.branch is Branch.LEHV and d.temperature == pytest.approx(0.999) and d.top_k == 37  # int(27·1.4)
    d = decide(M(6, 6, ae=2.0, av=1.0))
    assert d.branch is Branch.HEHV and d.temperature == 2.0 and d.top_p == pytest.approx(0.5)
    d = decide(M(1, 0.5, ae=2, av=0.5, ag=0.1, s=1))
    assert d.branch is Branch.ADAPTIVE and d.n_candidates == 5
    assert d.temperature == pytest.approx(0.666 * 1.93)  # 1 + 0.3·1.5 + 0.2·2.5 − 0.2·0.1
    assert d.top_p == pytest.approx(0.945) and d.top_k == 35 and d.min_p == pytest.approx(0.01)  # clipped


def test_branch_order_and_config_constants_are_live():
    cfg = EntropixConfig()
    assert decide(M(4, 6), cfg).branch is Branch.LEHV  # H < 5 and V > 5 is checked before HEHV
    cfg.high_ent = 3.5
    assert decide(M(4, 6), cfg).branch is Branch.HEHV
    cfg.n_candidates = 3
    assert decide(M(1, 0.5), cfg).n_candidates == 3
    with pytest.raises(InvalidArgument, match="top_p must be in"):
        cfg.top_p = 0
    with pytest.raises(InvalidArgument, match="high_vent must be a finite number ≥ 0 bits²"):
        cfg.high_vent = float("nan")
    with pytest.raises(InvalidArgument, match="no setting 'hihg_ent'"):
        cfg.hihg_ent = 1.0


def test_filters_keep_the_most_probable_set_and_apply_min_p():
    logits = torch.tensor([[math.log(p) for p in (0.05, 0.1, 0.15, 0.3, 0.4)]])
    d = decide(M(1, 0.5))
    for top_p, min_p, expected in [(0.65, 0.0, [0, 0, 0, 3 / 7, 4 / 7]),  # smallest most-probable set ≥ 0.65
                                   (1.0, 0.3, [0, 0, 0.15 / 0.85, 0.3 / 0.85, 0.4 / 0.85])]:  # p ≥ 0.3·0.4
        dd = type(d)(d.branch, temperature=1.0, top_p=top_p, top_k=0, min_p=min_p)
        assert torch.softmax(filtered_scores(logits, dd), -1)[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_best_of_n_draw_matches_its_closed_form():
    logits = torch.tensor([[1.0, 0.8, 0.5, 0.0, -0.5, -1.0]])
    s = Entropix(high_ent=100.0, med_ent=100.0)  # only LELV or ADAPTIVE possible
    s.observe({"attention": AttentionRow(ATTN[None])})
    scores = s(IDS, logits)
    d = s.record(scores)
    assert d["branch"] == "ADAPTIVE" and d["n_candidates"] == 5
    q = torch.softmax(scores, -1)[0].double()  # the filtered distribution the candidates come from
    order = torch.argsort(logits[0], descending=True)  # untempered log-probability ranks
    expected, above = torch.zeros_like(q), 0.0
    for i in order.tolist():  # best of 5 is i: no candidate ranked above i, and not all below it
        expected[i] = (1 - above) ** 5 - (1 - above - q[i]) ** 5
        above += q[i]
    draws = s.draw(scores.expand(100_000, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=6).double()
    live = expected > 0
    assert counts[~live].sum() == 0
    assert chisquare(counts[live], expected[live] * 100_000).pvalue > 0.001
    assert chisquare(counts[live], q[live] / q[live].sum() * 100_000).pvalue < 0.001  # not a plain draw


def test_sampler_settings_are_attributes_and_errors_are_clear():
    s = Entropix(temperature=0.5)
    assert s.temperature == 0.5 and s.cfg.temperature == 0.5
    s.top_k = 10
    assert s.cfg.top_k == 10 and s.config()["top_k"] == 10
    assert Entropix().cfg.top_k == 27  # instances do not share a config
    with pytest.raises(InvalidArgument, match="top_k must be an integer ≥ 0"):
        s.top_k = -3
    with pytest.raises(InvalidArgument, match="needs the attention capture"):
        Entropix()(IDS, torch.zeros(1, 4))
    with pytest.raises(InvalidArgument, match="one sequence at a time"):
        Entropix()(IDS, torch.zeros(2, 4))


# -- on the default model ----------------------------------------------------------------------------------

def test_entropix_in_a_session_records_metrics_and_decisions(session):
    t = session.generate("The capital of France is", max_new_tokens=10, sampler=Entropix(), seed=0)
    assert session.model.config._attn_implementation == "sdpa"  # capture switched off again
    for st in t.steps:
        assert st.sampler["branch"] in {b.value for b in Branch}
        assert st.sampler["entropy"] == pytest.approx(st.entropy_bits, abs=1e-5)
        assert st.captures == {} and st.attention == {}  # captured for the sampler only
    again = session.generate("The capital of France is", max_new_tokens=10, sampler=Entropix(), seed=0)
    assert again.token_ids == t.token_ids
    with_rows = session.generate("The capital of France is", max_new_tokens=4, sampler=Entropix(), seed=0,
                                 capture=["attention"])
    st = with_rows.steps[2]
    m = metrics(torch.zeros(3), st.captures["attention"].scores[-1])  # the last layer's row, recomputed
    assert st.sampler["attn_entropy"] == pytest.approx(m.attn_entropy, rel=1e-5)
    assert st.sampler["interaction_strength"] == pytest.approx(m.interaction_strength, rel=1e-5)


def test_clarification_token_is_inserted_then_not_repeated(session):
    s = Entropix(low_ent=0.0, med_ent=0.0, high_ent=0.0, low_vent=1e9, high_vent=1e9)  # every step is HELV
    t = session.generate("Tell me a story", max_new_tokens=6, sampler=s, seed=0)
    clarify = session.tokenizer(" ...", add_special_tokens=False).input_ids[0]
    assert [st.sampler["clarify"] for st in t.steps] == [True, False] * 3
    assert t.token_ids[0::2] == [clarify] * 3 and clarify not in t.token_ids[1::2]
    with pytest.raises(InvalidArgument, match="clarify_text must encode to exactly one token"):
        session.generate("Hi", max_new_tokens=2, sampler=Entropix(clarify_text=" let me think"))
    assert len(session.generate("Hi", max_new_tokens=2)) == 2  # the session is still usable
