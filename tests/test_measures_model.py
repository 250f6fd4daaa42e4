"""Measures on the real default model: score, compare, attention capture vs eager, full maps, logit lens."""

from __future__ import annotations

import pytest
import torch

from labkit.core.errors import InvalidArgument
from labkit.measures import attention
from labkit.measures.attention import attn_implementation
from labkit.measures.transfer_entropy import influential_tokens, token_influence
from labkit.records import imaging
from labkit.sampling import Classic

TEXT = "The capital of France is Paris. It is a large city on the Seine."


def test_score_equals_the_models_own_loss(session):
    sc = session.score(TEXT)
    ids = session.tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = torch.exp(session.model(ids, labels=ids).loss).item()
    assert sc.perplexity == pytest.approx(ref, rel=1e-4)
    assert len(sc.logprobs) == len(sc.token_ids) - 1 == len(sc.to_pandas())
    paris = sc.tokens.index(" Paris")
    assert sc.rank[paris - 1] == 1  # " Paris" is the top prediction after "The capital of France is"
    assert sc.surprisal_bits[paris - 1] == pytest.approx(-torch.tensor(0.7725).log2().item(), abs=0.03)
    with pytest.raises(InvalidArgument, match="at least 2 tokens"):
        session.score("Hi")


def test_compare_token_probabilities(session):
    df = session.token_probabilities(["The capital of France is", "Paris is the capital of"], " Paris")
    assert df["prob"][0] == pytest.approx(session.next_token("The capital of France is").prob(" Paris"))
    assert df["rank"][0] == 1 and df["rank"][1] > 1
    assert session.compare_token_probabilities(["The capital of France is"], " Paris")["prob"][0] == df["prob"][0]


def test_captured_rows_equal_eager_output_attentions(session):
    t = session.generate("Once upon a time", max_new_tokens=6, capture=["attention"])
    assert session.model.config._attn_implementation == "sdpa"  # switched back
    ids = torch.tensor([t.prompt_ids + t.token_ids])
    with torch.no_grad(), attn_implementation(session.model, "eager"):
        out = session.model(ids, output_attentions=True)
    for s in t.steps:
        n = s.position  # the step's query is the token at position n − 1
        eager = torch.stack([a[0, :, n - 1, :n] for a in out.attentions])  # (L, H, n)
        row = s.captures["attention"]
        assert row.probs.shape == (session.info.n_layers, session.info.n_heads, n)
        torch.testing.assert_close(row.probs, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(row.probs, torch.softmax(row.scores, -1))
        assert set(s.attention) == {"entropy_bits", "varentropy_bits", "agreement", "interaction_strength"}
    # capture does not change what is generated
    assert t.token_ids == session.generate("Once upon a time", max_new_tokens=6).token_ids


def test_step_metrics_follow_the_entropix_definitions(session):
    t = session.generate("Once upon a time", max_new_tokens=2, capture=["attention"])
    row = t.steps[1].captures["attention"]
    p = row.probs.double()
    ent = -(p * torch.log2(p.clamp_min(1e-30))).sum(-1)  # (L, H)
    m = attention.step_metrics(row)
    torch.testing.assert_close(m.entropy_bits.double(), ent, rtol=1e-5, atol=1e-5)
    assert m.varentropy_bits == pytest.approx(ent.var(-1, unbiased=False).mean().item(), rel=1e-4)
    assert m.agreement == pytest.approx((p - p.mean(1, keepdim=True)).abs().mean().item(), rel=1e-4)
    assert m.interaction_strength == pytest.approx(row.scores.double().abs().mean().item(), rel=1e-4)
    rep = attention.report(t.steps)
    assert rep.entropy.count == 2 and rep.entropy.unit == "bits"


def test_full_attention_maps(session):
    maps = session.attention(TEXT)
    t = len(session.tokenizer(TEXT).input_ids)
    assert maps.probs.shape == (session.info.n_layers, session.info.n_heads, t, t)
    torch.testing.assert_close(maps.probs.sum(-1), torch.ones(maps.probs.shape[:-1]), rtol=1e-4, atol=1e-4)
    assert torch.triu(maps.probs, diagonal=1).abs().max() == 0  # causal
    assert session.model.config._attn_implementation == "sdpa"
    labels = imaging.classify_heads(maps.probs)
    assert len(labels) == session.info.n_layers and {h.label for row in labels for h in row} >= {
        imaging.Pattern.SINK}
    with pytest.raises(InvalidArgument, match=r"layer must be one of the layers held, \[0, 30\)"):
        maps.head(30, 0)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_logit_lens_last_layer_reproduces_the_model(session):
    hooks_before = _hook_count(session.model)
    lens = session.lens("The capital of France is")
    d = session.next_token("The capital of France is")
    assert lens.logprobs.shape == (session.info.n_layers, session.info.vocab_size)
    torch.testing.assert_close(lens.logprobs[-1], d.logprobs, rtol=1e-4, atol=1e-4)
    assert lens.top[-1][0].token == " Paris" and lens.kl_to_final_bits[-1].item() == pytest.approx(0, abs=1e-4)
    assert lens.kl_to_final_bits[0] > lens.kl_to_final_bits[-2]
    assert _hook_count(session.model) == hooks_before  # the lens's hooks are removed
    assert len(lens.to_pandas()) == session.info.n_layers


def test_token_influence_on_a_real_generation(session):
    t = session.generate("The old lighthouse keeper looked at the storm and", max_new_tokens=24,
                         capture=["attention"], sampler=Classic(temperature=0.9), seed=1)
    ti = token_influence(t, session.tokenizer, surrogates=20)
    p = len(t.prompt_ids)
    assert ti.matrix.shape == (p, p) and ti.tokens[2] == " lighthouse"
    assert (ti.matrix >= 0).all() and (ti.p_values > 0).all() and (ti.p_values <= 1).all()
    assert len(ti.influential_tokens(3)) == 3
    top = influential_tokens(t, top=3, tokenizer=session.tokenizer, surrogates=20)
    assert top == ti.influential_tokens(3)  # same seeds: the module function is the method on a fresh analysis
    assert [b for _, _, b, _ in top] == sorted((b for _, _, b, _ in top), reverse=True)
    with pytest.raises(InvalidArgument, match="top must be a positive integer; got 0"):
        influential_tokens(t, top=0)
    with pytest.raises(InvalidArgument, match="capture=\\['attention'\\]"):
        token_influence(session.generate("Hi there", max_new_tokens=5))


class _Boom(Exception):
    pass


def test_lens_hooks_are_removed_after_an_error(session, monkeypatch):
    hooks_before = _hook_count(session.model)
    norm = session.model.get_decoder().norm

    def fail(*args, **kwargs):
        raise _Boom

    monkeypatch.setattr(norm, "forward", fail)
    with pytest.raises(_Boom):
        session.lens("The capital of France is")
    monkeypatch.undo()
    assert _hook_count(session.model) == hooks_before
    assert session.next_token("The capital of France is").top(1)[0].token == " Paris"


def test_capture_is_switched_off_after_an_error(session):
    class Failing(Classic):
        def __call__(self, input_ids, scores):
            raise _Boom

    before = session.next_token(TEXT).logprobs
    with pytest.raises(_Boom):
        session.generate("Once upon a time", max_new_tokens=3, capture=["attention"], sampler=Failing())
    assert session.model.config._attn_implementation == "sdpa"
    assert attention._RECORDERS == {}
    assert torch.equal(session.next_token(TEXT).logprobs, before)  # bit-identical afterwards


def test_capture_on_an_eager_session_equals_the_sdpa_capture(session):
    import labkit

    eager = labkit.Session(device="cpu", attn="eager", progress=False)
    assert eager.info.attn == "eager"
    a = eager.generate("Once upon a time", max_new_tokens=4, capture=["attention"])
    b = session.generate("Once upon a time", max_new_tokens=4, capture=["attention"])
    assert a.token_ids == b.token_ids
    for sa, sb in zip(a.steps, b.steps, strict=True):
        torch.testing.assert_close(sa.captures["attention"].probs, sb.captures["attention"].probs, atol=1e-5, rtol=0)
    assert eager.model.config._attn_implementation == "eager"  # switched back after the run


def test_capture_refuses_a_backend_it_cannot_run_beside(session, monkeypatch):
    monkeypatch.setattr(session.model.config, "_attn_implementation", "flash_attention_2")
    with pytest.raises(InvalidArgument, match="capture=\\['attention'\\] needs the session's attn='sdpa' or 'eager'"):
        session.generate("Once upon a time", max_new_tokens=2, capture=["attention"])
