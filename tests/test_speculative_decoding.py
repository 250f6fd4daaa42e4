"""Speculative decoding in the loop, on the default model: greedy output equals plain greedy token for token with
every draft kind; after a rejection the cache is rolled back (the next logits equal a teacher-forced pass);
sampled output follows the sampler's distribution; stats, trace records, stop rules and errors."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from labkit.core.errors import InvalidArgument
from labkit.interventions import Suppress
from labkit.records.trace import Trace
from labkit.sampling import Classic, Entropix, Mirostat
from labkit.speculative import (
    LayerSkipDraft,
    ModelDraft,
    PromptLookupDraft,
    QuantizedDraft,
    SpeculativeStats,
    evaluate,
    parse_draft,
)

COPY = ("Repeat this paragraph exactly, changing 'river' to 'stream':\n\nThe river runs past the old mill, under "
        "the stone bridge and out into the fields, where the farmers bring their cattle to drink in the long summer "
        "evenings.")  # with chat=True the default model copies it: a copy-heavy prompt
OPEN = "The three most important inventions of the last century were"
CHAT = {COPY: True, OPEN: False}


@pytest.fixture(scope="module")
def plain(session):
    return {prompt: session.generate(prompt, max_new_tokens=24, chat=chat) for prompt, chat in CHAT.items()}


def drafts(session, tiny_model_dir):
    return {
        "prompt-lookup": PromptLookupDraft(ngram=3, max_tokens=6),
        "prompt-lookup-adaptive": PromptLookupDraft(ngram=2, max_tokens=8, adaptive=True),
        "layer-skip": LayerSkipDraft(12, gamma=3),
        "bf16": QuantizedDraft("bfloat16", gamma=4, confidence=0.0),
        "bf16-confidence": QuantizedDraft("bfloat16"),
        "model-self": ModelDraft(session, gamma=5),
        "model-tiny-folder": ModelDraft(str(tiny_model_dir), gamma=3, adaptive=True),
    }


KINDS = ["prompt-lookup", "prompt-lookup-adaptive", "layer-skip", "bf16", "bf16-confidence", "model-self",
         "model-tiny-folder"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prompt", [COPY, OPEN], ids=["copy", "open"])
def test_greedy_speculative_equals_plain_greedy(session, tiny_model_dir, plain, kind, prompt):
    draft = drafts(session, tiny_model_dir)[kind]
    trace = session.generate(prompt, max_new_tokens=24, chat=CHAT[prompt], speculative=draft)
    assert trace.token_ids == plain[prompt].token_ids
    assert trace.text == plain[prompt].text
    for a, b in zip(trace, plain[prompt], strict=True):  # the per-step metrics are the model's own, as in plain
        assert a.entropy_bits == pytest.approx(b.entropy_bits, abs=1e-3)
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
    stats = SpeculativeStats.of(trace)
    origins = [s.speculative["origin"] for s in trace]
    assert stats.tokens == len(trace) == 24
    assert stats.accepted == origins.count("accepted")
    assert stats.rounds == len(stats.gammas) == len({s.speculative["round"] for s in trace})
    assert stats.drafted == sum(stats.gammas)
    assert stats.rounds == 24 - stats.accepted  # every round ends with exactly one target-drawn token


def test_the_copy_prompt_is_mostly_drafted_by_prompt_lookup(session):
    stats = SpeculativeStats.of(session.generate(COPY, max_new_tokens=24, chat=True, speculative=PromptLookupDraft()))
    assert stats.alpha > 0.5 and stats.tokens_per_round > 2


def test_after_a_rejection_the_next_logits_equal_a_plain_pass(session, tiny_model_dir):
    """The tiny random draft is rejected nearly always, so the cache is cropped nearly every round; each step's
    logits must equal a teacher-forced pass over prompt + generated tokens (an independent computation)."""
    trace = session.generate(OPEN, max_new_tokens=12, capture=["logits"],
                             speculative=ModelDraft(str(tiny_model_dir), gamma=3))
    assert any(s.speculative["origin"] == "resampled" for s in trace[:-1])
    ids = torch.tensor([trace.prompt_ids + trace.token_ids])
    with torch.inference_mode():
        reference = session.model(input_ids=ids).logits[0].float()  # (T + n, V)
    start = len(trace.prompt_ids) - 1
    for s in trace:
        torch.testing.assert_close(s.captures["logits"], reference[start + s.index], atol=2e-4, rtol=1e-4)


def test_sampled_speculative_follows_the_samplers_distribution(session):
    """First token of 200 seeded runs (a bf16 draft, γ = 1, Classic top-k 4 at T = 1.5) against the target's
    sampler distribution computed directly; a run must have both accepted and resampled tokens."""
    prompt = "My favourite colour is"
    sampler = Classic(temperature=1.5, top_k=4)
    draft = QuantizedDraft("bfloat16", gamma=1)
    d = session.next_token(prompt)
    probs = torch.softmax(sampler(None, d.logprobs[None]), -1)[0]
    support = probs.nonzero()[:, 0].tolist()
    firsts, origins = [], set()
    for seed in range(200):
        trace = session.generate(prompt, max_new_tokens=2, sampler=sampler, seed=seed, speculative=draft)
        firsts.append(trace.token_ids[0])
        origins.add(trace[0].speculative["origin"])
        assert trace[0].speculative["p"] == pytest.approx(float(probs[trace.token_ids[0]]), abs=1e-3)
    assert {"accepted", "resampled"} <= origins
    counts = torch.tensor([firsts.count(t) for t in support], dtype=torch.float64)
    assert counts.sum() == 200
    expected = probs[support].double()
    assert chisquare(counts, expected / expected.sum() * 200).pvalue > 0.001


def test_stop_rules_and_max_new_tokens_inside_a_round(session, plain):
    n = 7  # not a multiple of γ + 1
    trace = session.generate(COPY, max_new_tokens=n, chat=True, speculative=PromptLookupDraft(max_tokens=10))
    assert trace.token_ids == plain[COPY].token_ids[:n] and trace.stop_reason == "max_new_tokens"
    stopped = session.generate(COPY, max_new_tokens=24, chat=True, stop="bridge", speculative=PromptLookupDraft())
    reference = session.generate(COPY, max_new_tokens=24, chat=True, stop="bridge")
    assert stopped.token_ids == reference.token_ids and stopped.stop_reason == "stop_string"


def test_token_interventions_apply_to_every_verified_position(session):
    suppress = Suppress(" bridge")
    reference = session.generate(COPY, max_new_tokens=24, chat=True, interventions=[suppress])
    trace = session.generate(COPY, max_new_tokens=24, chat=True, interventions=[suppress],
                             speculative=PromptLookupDraft())
    assert trace.token_ids == reference.token_ids
    assert session.tokenizer.encode(" bridge")[0] not in trace.token_ids
    assert any(s.interventions for s in trace)


def test_trace_records_rounds_and_saves_them(session, tmp_path):
    trace = session.generate(COPY, max_new_tokens=16, chat=True, speculative=PromptLookupDraft())
    first = trace[0].speculative
    assert first["round"] == 0 and isinstance(first["drafted"], list)
    for s in trace:
        assert s.speculative["origin"] in ("accepted", "resampled", "bonus", "target")
        if s.speculative["origin"] == "resampled":
            assert s.speculative["rejected"]["token_id"] != s.token_id
    for suffix in (".json", ".parquet"):
        back = Trace.load(trace.save(tmp_path / f"t{suffix}"))
        assert [s.speculative for s in back] == [s.speculative for s in trace]
        assert back.meta.speculative == trace.meta.speculative
    assert "speculative.origin" in trace.to_pandas().columns


def test_measure_reports_a_speedup_against_plain_decoding(session):
    m = evaluate(session, COPY, PromptLookupDraft(), repeats=1, max_new_tokens=12, chat=True)
    assert m.identical and m.trace.meta.speculative
    plain_ms = m.plain_ms_per_token
    assert plain_ms > 0 and m.speculative_ms_per_token > 0  # real timings; their ratio is tested with known ones below


class _TimedTrace:
    """A trace stand-in with 4 steps of ``ms`` each (what ``evaluate`` reads: steps, length, token ids, meta)."""

    def __init__(self, ms, speculative):
        from types import SimpleNamespace

        self.steps = [SimpleNamespace(time_ms=ms)] * 4
        self.token_ids = [1, 2, 3, 4]
        self.meta = SimpleNamespace(speculative={"draft": {"name": "fake"}, "rounds": 2, "tokens": 4}
                                    if speculative else {})

    def __iter__(self):
        return iter(self.steps)

    def __len__(self):
        return len(self.steps)


def test_measure_computes_its_speedup_from_the_step_timings_as_medians():
    """A stand-in session whose runs take known times: plain 10, 30, 12 ms/token; speculative 4, 9, 5 ms/token."""

    class TimedSession:
        plain, spec = iter([10.0, 30.0, 12.0]), iter([4.0, 9.0, 5.0])

        def generate(self, prompt, speculative=None, **kw):
            return _TimedTrace(next(self.spec if speculative else self.plain), speculative is not None)

    m = evaluate(TimedSession(), "p", PromptLookupDraft(), repeats=3)
    assert m.plain_ms_per_token == 12.0 and m.speculative_ms_per_token == 5.0  # medians: the 30 ms outlier ignored
    assert m.speedup == pytest.approx(2.4)
    assert m.stats.measured_speedup == pytest.approx(2.4)
    assert m.identical


def test_bad_speculative_settings_fail_clearly(session, tiny_model_dir, tmp_path):
    with pytest.raises(InvalidArgument, match="keeps state"):
        session.generate(OPEN, max_new_tokens=2, sampler=Mirostat(), speculative=PromptLookupDraft())
    with pytest.raises(InvalidArgument, match="keeps state or reads attention"):
        session.generate(OPEN, max_new_tokens=2, sampler=Entropix(), speculative=PromptLookupDraft())
    with pytest.raises(InvalidArgument, match="capture"):
        session.generate(OPEN, max_new_tokens=2, capture=["attention"], speculative=PromptLookupDraft())
    with pytest.raises(InvalidArgument, match=r"n_layers must be in \[1, 29\]"):
        session.generate(OPEN, max_new_tokens=2, speculative=LayerSkipDraft(30))
    with pytest.raises(InvalidArgument, match="gamma"):
        ModelDraft(session, gamma=0)
    with pytest.raises(InvalidArgument, match="speculative must be"):
        session.generate(OPEN, max_new_tokens=2, speculative="prompt-lookup")
    # a draft whose tokenizer differs (one added token)
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model_dir, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<labkit-extra>"])
    tok.save_pretrained(other)
    with pytest.raises(InvalidArgument, match="needs the target's tokenizer"):
        session.generate(OPEN, max_new_tokens=2, speculative=ModelDraft(str(other)))
    assert len(session.generate(OPEN, max_new_tokens=2)) == 2  # the session is still usable


@pytest.mark.parametrize("spec, kind, settings", [
    ("prompt-lookup", PromptLookupDraft, {"ngram": 3, "gamma": 10}),
    ("prompt-lookup:ngram=2,max_tokens=5", PromptLookupDraft, {"ngram": 2, "gamma": 5}),
    ("layer-skip:8", LayerSkipDraft, {"n_layers": 8, "gamma": 10, "confidence": 0.4}),
    ("bf16:confidence=0", QuantizedDraft, {"confidence": 0.0, "gamma": 10}),
    ("layer-skip:8,gamma=3,adaptive=1", LayerSkipDraft, {"n_layers": 8, "gamma": 3, "adaptive": True}),
    ("bf16", QuantizedDraft, {"dtype": "bfloat16", "quantization": None}),
    ("8bit:gamma=2", QuantizedDraft, {"dtype": None, "quantization": "8bit", "gamma": 2}),
    ("model:/some/folder", ModelDraft, {"source": "/some/folder"}),
])
def test_draft_specs(spec, kind, settings):
    draft = parse_draft(spec)
    assert type(draft) is kind
    for k, v in settings.items():
        assert getattr(draft, k) == v


@pytest.mark.parametrize("spec", ["", "layer-skip", "layer-skip:x", "lookup", "bf16:gamma=0", "prompt-lookup:n=2"])
def test_bad_draft_specs(spec):
    with pytest.raises(InvalidArgument):
        parse_draft(spec)


def test_stop_takes_effect_inside_a_round(session):
    def on_step(step):
        if step.index == 2:
            session.stop()

    trace = session.generate(COPY, max_new_tokens=24, chat=True, on_step=on_step, speculative=PromptLookupDraft())
    assert len(trace) == 3 and trace.stop_reason == "stopped"
    assert SpeculativeStats.of(trace).tokens == 3
    assert len(session.generate(OPEN, max_new_tokens=2)) == 2


def test_confidence_ends_drafting_after_an_unsure_token(session, tiny_model_dir):
    """The tiny random draft gives every token a raw probability near 1/V: with confidence 0.5 every round drafts
    exactly one token; with confidence 0 it drafts gamma."""
    unsure = SpeculativeStats.of(session.generate(OPEN, max_new_tokens=8, speculative=ModelDraft(
        str(tiny_model_dir), gamma=4, confidence=0.5)))
    assert set(unsure.gammas[:-1]) == {1}
    full = SpeculativeStats.of(session.generate(OPEN, max_new_tokens=8, speculative=ModelDraft(
        str(tiny_model_dir), gamma=4, confidence=0.0)))
    assert full.gammas[0] == 4
    with pytest.raises(InvalidArgument, match="confidence must be a number in"):
        ModelDraft(session, confidence=1.0)


def test_drafting_ends_at_a_stop_token(session):
    """Nothing after EOS or a stop token is kept, so no draft proposes past one (transformers' assistant stops
    there too): every round's drafted tokens contain a stop id only as their last token."""
    eos = {session.tokenizer.decode([i]) for i in session.eos_ids}  # Step.speculative["drafted"] holds texts
    assert eos == {"<|im_end|>"}
    trace = session.generate("What is the capital of France? Answer in one word.", max_new_tokens=40, chat=True,
                             speculative=QuantizedDraft("bfloat16", gamma=20, confidence=0.0))
    assert trace.stop_reason == "eos"
    rounds = [step.speculative["drafted"] for step in trace if "drafted" in step.speculative]
    assert rounds and all(token not in eos for drafted in rounds for token in drafted[:-1])
    assert rounds[-1][-1] in eos  # the bf16 copy drafted the EOS itself and stopped there
    assert SpeculativeStats.of(trace).drafted == sum(len(drafted) for drafted in rounds)
    # prompt lookup copies up to (and including) the first stop token after an earlier match
    ids = torch.tensor([[5, 6, 7, 2, 8, 9, 5, 6, 7]])
    assert PromptLookupDraft(ngram=3).propose(ids, 10, None, None, None).tokens == [2, 8, 9, 5, 6, 7]
    assert PromptLookupDraft(ngram=3).propose(ids, 10, None, None, None, frozenset({2})).tokens == [2]
    assert PromptLookupDraft(ngram=3).propose(ids, 10, None, None, None, frozenset({9})).tokens == [2, 8, 9]
