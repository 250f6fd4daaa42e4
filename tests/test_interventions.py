"""Interventions on the default model: closed forms, manual recomputations, scoping and hook removal."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import hooks_on

from labkit.core.errors import InvalidArgument, TokenizationError
from labkit.interventions import (
    AblateHead,
    ActivationHook,
    Boost,
    Conditional,
    Custom,
    EntropyMaximize,
    EntropyTarget,
    ForceTokens,
    Patch,
    Steer,
    Suppress,
    evaluate,
    patching_sweep,
    recipe,
    steering_vector,
)
from labkit.measures import information as info
from labkit.sampling import Entropix

FRANCE = "The capital of France is"




def first_logits(session, *interventions, prompt=FRANCE) -> torch.Tensor:
    """Shape (V,): the logits the sampler saw at the first step."""
    t = session.generate(prompt, max_new_tokens=1, interventions=list(interventions), capture=["logits"])
    return t.steps[0].captures["logits"]


def tid(session, text: str) -> int:
    return session.tokenizer.encode(text, add_special_tokens=False)[0]


def test_suppress_makes_a_token_impossible_and_the_top_token_changes(session):
    paris = tid(session, " Paris")
    t = session.generate(FRANCE, max_new_tokens=3, interventions=[Suppress(" Paris")], capture=["logits"])
    assert torch.softmax(t.steps[0].captures["logits"], -1)[paris].item() == 0.0
    assert t.steps[0].top[0].token == " Paris"  # the recorded metrics stay the model's own
    assert t.steps[0].token != " Paris" and paris not in t.token_ids
    assert t.steps[0].interventions == ["Suppress([' Paris'])"]


def test_boost_matches_the_closed_form(session):
    paris = tid(session, " the")
    p = session.next_token(FRANCE).prob(" the")
    for f in (3.0, 0.25):
        q = torch.softmax(first_logits(session, Boost(" the", factor=f)), -1)[paris].item()
        assert q == pytest.approx(p * f / (p * f + 1 - p), rel=1e-4)


def test_force_tokens_then_the_model_continues_greedily(session):
    t = session.generate(FRANCE, max_new_tokens=6, interventions=[ForceTokens({0: " Rome", 3: " and"})])
    assert t.steps[0].token == " Rome" and t.steps[3].token == " and"
    assert t.steps[0].logprob == pytest.approx(session.next_token(FRANCE).logprobs[tid(session, " Rome")].item(),
                                               abs=1e-4)  # the model's own probability of the forced token
    ids = torch.tensor([t.prompt_ids + t.token_ids])
    with torch.no_grad():
        greedy = session.model(ids).logits[0, len(t.prompt_ids) - 1:-1].argmax(-1).tolist()
    assert [t.token_ids[i] == greedy[i] for i in (1, 2, 4, 5)] == [True] * 4  # unforced steps: the model's argmax
    assert ForceTokens([" a", " b"]).tokens == {0: " a", 1: " b"}


def test_entropy_target_and_maximize(session):
    for bits in (0.5, 3.0, 9.0):
        h = info.entropy(first_logits(session, EntropyTarget(bits)), "bits").item()
        assert h == pytest.approx(bits, abs=1e-3)
    flat = first_logits(session, EntropyMaximize())
    assert info.entropy(flat, "bits").item() == pytest.approx(math.log2(session.info.vocab_size), abs=1e-4)
    capped = first_logits(session, Suppress(list(range(100, session.info.vocab_size))), EntropyMaximize())
    assert info.entropy(capped, "bits").item() == pytest.approx(math.log2(100), abs=1e-4)  # in the given order


def test_conditional_and_custom_see_the_step_context(session):
    seen = []

    def spy(logits, step, ctx):
        seen.append((step, list(ctx.token_ids), ctx.text))
        return logits

    force = Conditional(lambda step, ctx: step % 2 == 1, ForceTokens({1: " X", 3: " X"}))
    t = session.generate(FRANCE, max_new_tokens=4, interventions=[Custom(spy), force])
    assert [s for s, _, _ in seen] == [0, 1, 2, 3]
    assert seen[2][1] == t.token_ids[:2] and seen[2][2] == session.tokenizer.decode(t.token_ids[:2])
    assert t.steps[1].token == " X" and t.steps[3].token == " X"
    with pytest.raises(InvalidArgument, match="must return a tensor of shape"):
        session.generate(FRANCE, max_new_tokens=1, interventions=[Custom(lambda lg, s, c: lg[:, :5])])
    with pytest.raises(InvalidArgument, match="if_true must hold token-level interventions"):
        Conditional(lambda s, c: True, AblateHead(0, 0))


def test_token_text_must_be_one_token_and_the_session_stays_usable(session):
    with pytest.raises(TokenizationError, match="tokenizes as"):
        session.generate(FRANCE, max_new_tokens=1, interventions=[Suppress(" Parisians and")])
    with pytest.raises(InvalidArgument, match="factor must be a finite number > 0"):
        Boost(" Paris", factor=0)
    assert len(session.generate(FRANCE, max_new_tokens=2)) == 2


def test_ablate_head_equals_removing_its_slice_before_o_proj(session):
    layer, head = 4, 3
    d = session.model.config.hidden_size // session.model.config.num_attention_heads
    o_proj = session.model.model.layers[layer].self_attn.o_proj
    seen = {}
    handles = [o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach().clone())),
               o_proj.register_forward_hook(lambda m, a, out: seen.setdefault("out", []).append(out.detach()))]
    try:
        before = session.next_token(FRANCE).logprobs
        with session.intervene(AblateHead(layer, head)):
            ablated = session.next_token(FRANCE).logprobs
    finally:
        for h in handles:
            h.remove()
    x, (plain_out, ablated_out) = seen["x"], seen["out"]
    sl = slice(head * d, (head + 1) * d)
    with torch.no_grad():
        manual = plain_out - x[..., sl] @ o_proj.weight[:, sl].T  # the head's contribution, removed by hand
    torch.testing.assert_close(ablated_out, manual, rtol=1e-5, atol=1e-5)
    assert not torch.equal(before, ablated)
    assert torch.equal(session.next_token(FRANCE).logprobs, before)  # scope closed: bit-identical


def test_mean_ablation_uses_the_reference_mean(session):
    mean = AblateHead(2, 1, mode="mean", reference="A short reference text about the sea.")
    zero = AblateHead(2, 1)
    a, b = first_logits(session, mean), first_logits(session, zero)
    assert not torch.equal(a, b) and torch.isfinite(a).all()


@pytest.mark.parametrize("make, match", [
    (lambda: AblateHead(30, 0), r"layer must be an integer in \[0, 30\).*this model has 30 layers; got 30"),
    (lambda: AblateHead(0, 9), r"head must be an integer in \[0, 9\): each layer has 9 heads; got 9"),
    (lambda: AblateHead(0, 0, mode="max"), "mode must be 'zero' or 'mean'"),
    (lambda: Steer(0, torch.zeros(100)), "vector must have the model's hidden size 576; got 100"),
    (lambda: Patch("Hello", 0, [50]), r"positions \[50\] are outside the source prompt's"),
    (lambda: ActivationHook("model.layers.3.self_atn", lambda m, i, o: o), "no module 'model.layers.3.self_atn'; "
                                                                           "did you mean"),
])
def test_bad_activation_arguments_name_what_exists(session, make, match):
    with pytest.raises(InvalidArgument, match=match), session.intervene(make()):
        pass
    assert hooks_on(session.model) == 0


def test_steer_scale_zero_is_a_no_op_and_a_real_scale_moves_the_distribution(session):
    vec = steering_vector(session, "I love this, it is wonderful.", "I hate this, it is awful.", 12)
    assert vec.shape == (session.model.config.hidden_size,)
    base = first_logits(session)
    assert torch.equal(first_logits(session, Steer(12, vec, 0.0)), base)
    moved = first_logits(session, Steer(12, vec, 4.0))
    assert info.kl_divergence(moved, base, "bits").item() > 0.01


def test_patch_with_the_same_prompt_is_a_no_op(session):
    base = first_logits(session)
    torch.testing.assert_close(first_logits(session, Patch(FRANCE, 10, [0, 2, -1])), base, rtol=0, atol=1e-5)
    italy = first_logits(session, Patch("The capital of Italy is", 10, [3]))
    assert info.kl_divergence(italy, base, "bits").item() > 0.01


def test_patching_sweep_recovers_everything_at_the_last_layer_and_position(session):
    sweep = patching_sweep(session, FRANCE, "The capital of Italy is", " Paris", other_token=" Rome")
    assert sweep.recovered.shape == (session.info.n_layers, 5)
    assert sweep.recovered[-1, -1].item() == pytest.approx(1.0, abs=1e-3)
    assert sweep.recovered[0, 3].item() > 0.5  # early layers: the country token carries the answer
    assert sweep.clean > sweep.corrupt
    assert len(sweep.to_pandas()) == session.info.n_layers
    ax = sweep.image().figure.axes[0]
    assert ax.get_ylabel().startswith("layer") and ax.get_xlabel().startswith("position")
    assert [t.get_text() for t in ax.get_xticklabels()] == [repr(t) for t in sweep.tokens]
    with pytest.raises(InvalidArgument, match="same number of tokens"):
        patching_sweep(session, FRANCE, "The capital city of Italy is", " Paris")


def test_hooks_are_removed_when_the_body_raises(session):
    before_hooks, before = hooks_on(session.model), session.next_token(FRANCE).logprobs
    vec = torch.ones(session.model.config.hidden_size)
    with pytest.raises(RuntimeError, match="boom"), session.intervene(AblateHead(1, 1), Steer(3, vec, 2.0)):
        assert hooks_on(session.model) > before_hooks  # both interventions hooked (a site hook is 2 handles)
        raise RuntimeError("boom")
    assert hooks_on(session.model) == before_hooks
    assert torch.equal(session.next_token(FRANCE).logprobs, before)


def test_scopes_compose_and_per_call_interventions_come_after(session):
    paris = tid(session, " Paris")
    with session.intervene(Boost(" Paris", 100.0)):
        boosted = first_logits(session)
        both = first_logits(session, Suppress(" Paris"))
        assert session.generate(FRANCE, max_new_tokens=1).token_ids == [paris]
    assert torch.softmax(boosted, -1)[paris] > 0.99 and torch.softmax(both, -1)[paris] == 0.0
    assert session._scoped == []


def test_stream_applies_interventions_step_by_step(session):
    steps = list(session.stream(FRANCE, max_new_tokens=3, interventions=[ForceTokens({1: " and"})]))
    assert steps[1].token == " and" and steps[1].interventions and not steps[0].interventions


def test_interventions_with_entropix_and_attention_capture(session):
    t = session.generate(FRANCE, max_new_tokens=5, sampler=Entropix(), seed=0, capture=["attention"],
                         interventions=[Suppress(" Paris"), AblateHead(5, 0)])
    assert tid(session, " Paris") not in t.token_ids
    assert all(s.attention and s.sampler["branch"] for s in t.steps)
    assert t.steps[0].captures["attention"].scores.shape[:2] == (30, 9)
    assert hooks_on(session.model) == 0 and session.model.config._attn_implementation == "sdpa"


def test_effects_are_measured_against_the_unmodified_model(session):
    eff = evaluate(session, FRANCE, [Suppress(" Paris")], samples=2, max_new_tokens=5)
    assert len(eff.samples) == 2 and eff.summary["samples"] == 2
    assert (eff.table["kl_bits"] >= -1e-6).all()
    first = eff.table[eff.table["step"] == 0]
    p = session.next_token(FRANCE).prob(" Paris")
    assert first["kl_bits"].iloc[0] == pytest.approx(-math.log2(1 - p), rel=1e-3)  # KL of a renormalised cut
    assert list(eff.samples["first_divergence"]) == [0, 0]  # greedy says " Paris" first, the intervention cannot
    t = session.generate(FRANCE, max_new_tokens=5)
    assert eff.samples["baseline_perplexity"][0] == pytest.approx(math.exp(-sum(s.logprob for s in t.steps) / 5))
    fig = eff.plot()
    assert len(fig.data) == 2 and list(fig.data[0].x) == [0, 1, 2, 3, 4]
    with pytest.raises(InvalidArgument, match="at least one intervention"):
        evaluate(session, FRANCE, [])


def test_recipes(session):
    (sup,) = recipe(session, "suppress-word:word=Paris")
    assert tid(session, " Paris") in sup.ids
    heads = recipe(session, "ablate-top-heads:n=2")
    assert len(heads) == 2 and all(isinstance(h, AblateHead) for h in heads)
    (steer,) = recipe(session, "steer-sentiment:direction=negative,scale=2")
    assert steer.scale == -2.0 and steer.layer == 15
    with pytest.raises(InvalidArgument, match="recipe 'explode' is unknown"):
        recipe(session, "explode")
    with pytest.raises(InvalidArgument, match="does not take"):
        recipe(session, "suppress-word:wrd=Paris")
