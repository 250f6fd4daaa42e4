"""Greedy and Classic samplers: hand-computed small logits, validation, live parameters, generate() plug-in."""

from __future__ import annotations

import math

import pytest
import torch

from labkit.core.errors import InvalidArgument
from labkit.sampling import Classic, Greedy, sampling_info

PROBS = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
LOGITS = PROBS.log()
IDS = torch.zeros((1, 1), dtype=torch.long)


def kept_probs(sampler) -> list[float]:
    return torch.softmax(sampler(IDS, LOGITS), -1)[0].tolist()


def test_greedy_keeps_only_the_argmax():
    g = Greedy()
    assert kept_probs(g) == [0, 0, 0, 1.0]
    assert torch.equal(LOGITS, PROBS.log())  # the caller's scores are untouched
    assert g.draw(LOGITS, None).tolist() == [3]
    assert g.record(LOGITS) == {"name": "greedy"}


@pytest.mark.parametrize("kwargs, expected", [
    ({"top_k": 1}, [0, 0, 0, 1.0]),
    ({"top_k": 3}, [0, 0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9]),
    ({"top_p": 0.7}, [0, 0, 0.3 / 0.7, 0.4 / 0.7]),
    ({"min_p": 0.26}, [0, 0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9]),
])
def test_truncation_matches_hand_computed_values(kwargs, expected):
    assert kept_probs(Classic(**kwargs)) == pytest.approx(expected, abs=1e-6)


def test_temperature_matches_closed_form():
    t = 0.5
    z = sum(p ** (1 / t) for p in PROBS[0].tolist())
    assert kept_probs(Classic(temperature=t)) == pytest.approx([p ** (1 / t) / z for p in PROBS[0].tolist()], rel=1e-5)


def test_call_does_not_modify_scores_in_place():
    logits = LOGITS.clone()
    Classic(temperature=0.5, top_k=2, top_p=0.9, min_p=0.1)(IDS, logits)
    assert torch.equal(logits, LOGITS)


def test_seeded_draws_repeat_and_follow_the_distribution():
    c = Classic()
    draws = [c.draw(LOGITS, torch.Generator().manual_seed(7)).item() for _ in range(3)]
    assert len(set(draws)) == 1
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.stack([c.draw(LOGITS, g) for _ in range(4000)]).flatten(), minlength=4)
    assert (counts / 4000).tolist() == pytest.approx(PROBS[0].tolist(), abs=0.03)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0}, "temperature must be > 0"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]; got 1.5"),
    ({"top_p": 0}, "top_p must be in"),
    ({"top_k": -1}, "top_k must be an integer ≥ 0"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"min_p": 1.0}, r"min_p must be in \[0, 1\)"),
])
def test_bad_parameters_name_parameter_value_and_range(kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        Classic(**kwargs)


def test_live_parameter_change_is_validated_and_used():
    c = Classic(temperature=1.0)
    with pytest.raises(InvalidArgument):
        c.temperature = -1
    assert c.temperature == 1.0
    c.top_k = 1
    assert kept_probs(c) == pytest.approx([0, 0, 0, 1.0])
    assert sampling_info(LOGITS, c).kept == 1
    assert c.config() == {"name": "classic", "temperature": 1.0, "top_k": 1}  # the knobs that are on


def test_classic_plugs_into_transformers_generate(session):
    from transformers import LogitsProcessorList

    ids = session.encode("The capital of France is")
    out = session.model.generate(ids, do_sample=True, max_new_tokens=3, logits_processor=LogitsProcessorList(
        [Classic(top_k=1)]), pad_token_id=2)
    greedy = session.model.generate(ids, do_sample=False, max_new_tokens=3, pad_token_id=2)
    assert out.tolist() == greedy.tolist()
    assert math.isfinite(float(session.next_token("x").entropy()))
