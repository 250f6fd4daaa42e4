"""Samplers on the default model: live parameters, transformers generate plug-in, evaluate(), specs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LogitsProcessorList

from labkit.core.errors import InvalidArgument
from labkit.sampling import (
    Classic,
    Entropix,
    EntropyGuided,
    Greedy,
    Mirostat,
    distinct_n,
    evaluate,
    label,
    parse_sampler,
    repetition_rate,
)
from labkit.sampling.measure import sampling_info_of

PROMPT = "The old lighthouse keeper looked at the storm and"


def raw_logits(session, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return session.model(torch.tensor([ids])).logits[:, -1].float()


def test_changing_a_parameter_mid_generation_changes_the_next_distribution(session):
    sampler = Classic(temperature=1.0)

    def slider(step):
        if step.index == 2:
            sampler.temperature = 0.2  # what a panel slider does between two tokens
        if step.index == 4:
            sampler.top_k = 1

    t = session.generate(PROMPT, max_new_tokens=7, sampler=sampler, seed=3, on_step=slider)
    assert [s.sampler["temperature"] for s in t.steps] == [1.0] * 3 + [0.2] * 4
    assert [s.sampler["kept"] for s in t.steps][-2:] == [1, 1]
    for i in (1, 3):  # each step's recorded effect equals an independent recomputation with its settings
        logits = raw_logits(session, t.prompt_ids + t.token_ids[:i])
        expected = sampling_info_of(logits, Classic(temperature=t.steps[i].sampler["temperature"])(None, logits))
        assert t.steps[i].sampler["entropy_after_bits"] == pytest.approx(expected.entropy_after_bits, abs=2e-3)
    assert t.steps[3].sampler["entropy_after_bits"] < t.steps[3].entropy_bits  # cooler than the raw distribution
    with pytest.raises(InvalidArgument, match="on_step must be a callable"):
        session.generate(PROMPT, max_new_tokens=2, on_step=3)


@pytest.mark.parametrize("make", [Greedy, lambda: Classic(top_k=1), lambda: Classic(top_n_sigma=0.01)])
def test_one_token_samplers_in_transformers_generate_equal_greedy(session, make):
    ids = session.encode("The capital of France is")
    out = session.model.generate(ids, do_sample=True, max_new_tokens=4, logits_processor=LogitsProcessorList(
        [make()]), top_k=None, top_p=None, pad_token_id=2)
    greedy = session.model.generate(ids, do_sample=False, max_new_tokens=4, pad_token_id=2)
    assert out.tolist() == greedy.tolist()


@pytest.mark.parametrize("make", [lambda: Mirostat(tau=2.0), lambda: EntropyGuided(0.5, 0.0),
                                  lambda: Classic(typical_p=0.5, eta_cutoff=0.01)])
def test_stateful_and_guided_samplers_run_inside_transformers_generate(session, make):
    sampler = make()
    ids = session.encode("The capital of France is")
    torch.manual_seed(0)
    out = session.model.generate(ids, do_sample=True, max_new_tokens=6, logits_processor=LogitsProcessorList(
        [sampler]), top_k=None, top_p=None, pad_token_id=2)
    assert out.shape[1] == ids.shape[1] + 6
    if isinstance(sampler, Mirostat):
        assert sampler.mu.item() != 2 * sampler.tau  # the state moved with the drawn tokens


def test_every_sampler_is_reproducible_in_a_session(session):
    for spec in ("classic:temperature=0.9,top_p=0.95", "mirostat", "entropy_guided", "entropix"):
        a = session.generate(PROMPT, max_new_tokens=6, sampler=parse_sampler(spec), seed=11)
        b = session.generate(PROMPT, max_new_tokens=6, sampler=parse_sampler(spec), seed=11)
        assert a.token_ids == b.token_ids, spec
        assert a.meta.sampler["name"] == spec.split(":")[0]


def test_parse_sampler_specs():
    c = parse_sampler("classic:temperature=0.7, top_p=0.9,top_k=40")
    assert (c.temperature, c.top_p, c.top_k) == (0.7, 0.9, 40) and isinstance(c.top_k, int)
    assert isinstance(parse_sampler("Entropy-Guided"), EntropyGuided)
    assert parse_sampler("entropix:temperature=0.5").cfg.temperature == 0.5
    assert label(parse_sampler("classic:temperature=0.7,top_p=0.9")) == "classic:temperature=0.7,top_p=0.9"
    assert label(parse_sampler("entropix")) == "entropix"
    for spec, match in [("", "sampler spec must be a string"), ("nucleus", "sampler 'nucleus' is unknown"),
                        ("classic:temperature", "must look like key=value"),
                        ("classic:temprature=1", "sampler 'classic' does not take"),
                        ("greedy:temperature=1", "sampler 'greedy' does not take")]:
        with pytest.raises(InvalidArgument, match=match):
            parse_sampler(spec)


def test_distinct_n_and_repetition_rate_on_hand_examples():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)  # (1,2) twice, (2,3), (2,4)
    assert math.isnan(distinct_n([[1]], 2))
    assert repetition_rate([1, 2, 3, 4, 1, 2, 3, 4], 4) == pytest.approx(1 - 4 / 5)
    assert repetition_rate([1, 2, 3], 4) == 0.0


def test_evaluate_reports_each_sampler_against_independent_numbers(session):
    prompts = ["Once upon a time", "The capital of France is"]
    df = evaluate(session, prompts, ["greedy", Entropix()], seeds=[0], max_new_tokens=6)
    assert list(df["sampler"]) == ["greedy", "entropix"]
    assert list(df["generations"]) == [2, 2] and list(df["tokens"]) == [12, 12]
    nll = []  # greedy's own perplexity, recomputed from a teacher-forced forward pass
    for p in prompts:
        t = session.generate(p, max_new_tokens=6)
        ids = torch.tensor([t.prompt_ids + t.token_ids])
        with torch.no_grad():
            logp = session.model(ids).logits[0, :-1].float().log_softmax(-1)
        n = len(t.prompt_ids)
        nll += (-logp[n - 1:].gather(-1, ids[0, n:, None])).flatten().tolist()
    assert df["perplexity"][0] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-3)
    assert df["mean_surprisal_bits"][0] == pytest.approx(sum(nll) / len(nll) / math.log(2), rel=1e-3)
    assert sum(df["branches"][1].values()) == 12
    with pytest.raises(InvalidArgument, match="prompts must be a non-empty list"):
        evaluate(session, "one prompt", ["greedy"])
    with pytest.raises(InvalidArgument, match="seeds must be a non-empty list of integers"):
        evaluate(session, prompts, ["greedy"], seeds=[])
