"""Why a token came out, on the default model, against known answers: IG's completeness law, a hand-written autograd
input × gradient and Gauss–Legendre IG, the causal mask (a later token's score is exactly 0), attention rollout from
eager attentions by hand, direct logit attribution summing to transformers' own logits, head terms against head
ablation, and activations through the model's own final norm and unembedding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import labkit
from labkit.core.errors import ActivationsFormatError, InvalidArgument
from labkit.core.tokens import token_id
from labkit.interventions import AblateHead
from labkit.why.activations import Activations

PROMPT = "The capital of France is"


def _prob_of(session: labkit.Session, embeds: torch.Tensor, target: int, foil: int | None = None) -> torch.Tensor:
    """By hand: the target's probability at the last position from ``inputs_embeds`` (B, T, d) -> (B,)."""
    p = torch.softmax(session.model(inputs_embeds=embeds).logits[:, -1].float(), dim=-1)
    return p[:, target] - (p[:, foil] if foil is not None else 0.0)


def _embeds(session: labkit.Session, text: str) -> torch.Tensor:
    ids = session.encode(text)
    with torch.no_grad():
        return session.model.get_input_embeddings()(ids).detach()  # (1, T, d)


def test_ig_scores_sum_to_the_change_of_the_probability_from_the_baseline_within_one_percent(session):
    a = session.attribute(PROMPT, target=" Paris", method="ig", steps=64)
    paris = token_id(session.tokenizer, " Paris")
    with torch.no_grad():
        x = _embeds(session, PROMPT)
        gap = float(_prob_of(session, x, paris)[0] - _prob_of(session, torch.zeros_like(x), paris)[0])
    assert abs(sum(a.scores) - gap) <= 0.01 * abs(gap)
    assert a.completeness_error <= 0.01
    assert a.value == pytest.approx(float(session.next_token(PROMPT).probs[paris]), abs=1e-5)


@pytest.mark.parametrize("baseline", ["unk", "zero"])
def test_ig_equals_a_hand_written_gauss_legendre_integral_of_autograd_gradients(session, baseline):
    rome, paris = (token_id(session.tokenizer, t) for t in (" Rome", " Paris"))
    a = session.attribute(PROMPT, target=" Paris", foil=" Rome", method="ig", steps=16, max_steps=16,
                          baseline=baseline)
    x = _embeds(session, PROMPT)
    if baseline == "unk":  # inseq's: every token but EOS replaced by the UNK token (<|endoftext|> here)
        ids = session.encode(PROMPT)
        assert session.tokenizer.unk_token == a.baseline_token == "<|endoftext|>"
        x0 = session.model.get_input_embeddings()(torch.full_like(ids, session.tokenizer.unk_token_id)).detach()
    else:
        x0 = torch.zeros_like(x)
    nodes, weights = np.polynomial.legendre.leggauss(8)  # on [-1, 1]; the composite rule: 8 points on each half
    alphas = np.concatenate([(nodes + 1) / 4, 0.5 + (nodes + 1) / 4])
    w = np.concatenate([weights / 4, weights / 4])
    total = torch.zeros_like(x)
    for alpha, weight in zip(alphas, w, strict=True):
        point = (x0 + float(alpha) * (x - x0)).requires_grad_()
        (grad,) = torch.autograd.grad(_prob_of(session, point, paris, rome).sum(), point)
        total += float(weight) * grad
    expected = ((x - x0) * total)[0].sum(-1)  # (T,): (x − x0) · ∫ gradient
    assert a.steps == 16
    torch.testing.assert_close(torch.tensor(a.scores), expected.float(), atol=1e-4, rtol=1e-3)


def test_input_x_gradient_equals_a_manual_autograd_computation(session):
    a = session.attribute(PROMPT, target=" Paris", method="input_x_gradient")
    x = _embeds(session, PROMPT).requires_grad_()
    (grad,) = torch.autograd.grad(_prob_of(session, x, token_id(session.tokenizer, " Paris")).sum(), x)
    # float32 sums of d_model products: 1.6e-5 apart at one torch thread (CPU kernels block differently), ≤ 1e-6 at two
    torch.testing.assert_close(torch.tensor(a.scores), (x * grad)[0].sum(-1).detach(), atol=5e-5, rtol=1e-3)


def test_saliency_is_the_gradient_norm_and_exactly_zero_for_tokens_the_target_cannot_see(session):
    text = "The capital of France is Paris and"
    for method in ("saliency", "input_x_gradient", "ig"):
        a = session.attribute(text, method=method, position=3, steps=8)  # predicts token 4 from tokens 0..3
        assert a.target_id == session.encode(text)[0, 4].item()
        assert all(score == 0.0 for score in a.scores[4:]), (method, a.scores)
        assert any(score != 0.0 for score in a.scores[:4])
    a = session.attribute(text, method="saliency", position=3)
    x = _embeds(session, text).requires_grad_()
    p = torch.softmax(session.model(inputs_embeds=x).logits[0, 3].float(), -1)[a.target_id]
    (grad,) = torch.autograd.grad(p, x)
    torch.testing.assert_close(torch.tensor(a.scores), grad[0].norm(dim=-1), atol=1e-6, rtol=1e-4)


def test_rollout_is_the_product_of_half_attention_half_identity_from_eager_attentions(session):
    a = session.attribute(PROMPT, method="rollout")
    probs = session.attention(PROMPT).probs  # (L, H, T, T) eager
    flow = np.eye(probs.shape[-1])
    for layer in probs.numpy():
        mixed = 0.5 * layer.mean(0) + 0.5 * np.eye(len(layer[0]))
        flow = (mixed / mixed.sum(1, keepdims=True)) @ flow
    np.testing.assert_allclose(a.scores, flow[-1], atol=1e-5)
    assert sum(a.scores) == pytest.approx(1.0, abs=1e-5)


def test_contrast_attribution_is_of_the_probability_difference(session):
    a = session.attribute(PROMPT, target=" Paris", foil=" Rome", method="input_x_gradient")
    d = session.next_token(PROMPT)
    paris, rome = (token_id(session.tokenizer, t) for t in (" Paris", " Rome"))
    assert a.value == pytest.approx(float(d.probs[paris] - d.probs[rome]), abs=1e-5)
    assert a.label == "prob(' Paris') − prob(' Rome') at position 4"


def test_attribution_tables_top_and_views(session):
    a = session.attribute(PROMPT, target=" Paris", method="saliency")
    frame = a.to_pandas()
    assert list(frame.columns) == ["position", "token", "token_id", "score"] and len(frame) == 5
    top = a.top(2)
    assert len(top) == 2 and top["score"].abs().tolist() == sorted(frame["score"].abs(), reverse=True)[:2]
    html = a.html()
    assert html.count('class="lk-attr"') == 5 and "Paris" in html
    assert a.image().png()[:8] == b"\x89PNG\r\n\x1a\n"
    assert a.as_dict()["method"] == "saliency"


def test_trace_attribute_is_the_sessions_attribution_of_that_steps_context(session, tmp_path):
    trace = session.generate(PROMPT, max_new_tokens=3)
    via_trace = trace.attribute(2, method="input_x_gradient")
    context = session.tokenizer.decode([*trace.prompt_ids, *trace.token_ids[:2]])
    direct = session.attribute(context, target=trace.token_ids[2], method="input_x_gradient")
    assert via_trace.token_ids == direct.token_ids
    torch.testing.assert_close(torch.tensor(via_trace.scores), torch.tensor(direct.scores), atol=1e-6, rtol=1e-5)
    la = trace.logit_attribution(2)
    assert la.token_id == trace.token_ids[2]
    loaded = labkit.Trace.load(trace.save(tmp_path / "t.json"))
    with pytest.raises(InvalidArgument, match="pass session="):
        loaded.attribute(0)
    assert loaded.attribute(0, method="saliency", session=session).target_id == trace.token_ids[0]


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(method="lime"), "method"), (dict(quantity="odds"), "quantity"), (dict(baseline="pad"), "baseline"),
    (dict(target=" Paris", foil=" Paris"), "foil must differ"), (dict(position=9), "position"),
    (dict(steps=1), "steps"), (dict(target=" Par is"), "not a single token"),
])
def test_bad_attribution_arguments_are_refused_naming_the_parameter(session, kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        session.attribute(PROMPT, **kwargs)
    assert session.next_token(PROMPT).top(1)  # the session stays usable


# -- direct logit attribution ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dla(session):
    return session.logit_attribution(PROMPT, token=" Paris", foil=" Rome")


def test_logit_attribution_parts_sum_to_transformers_logit_difference(session, dla):
    with torch.no_grad():
        logits = session.model(input_ids=session.encode(PROMPT)).logits[0, -1].float()
    paris, rome = (token_id(session.tokenizer, t) for t in (" Paris", " Rome"))
    want = float(logits[paris] - logits[rome])
    frame = dla.to_pandas()
    assert frame[frame.kind.isin(["embed", "attn", "mlp", "bias"])].value.sum() == pytest.approx(want, abs=1e-4)
    assert sum(v for _, _, _, v in dla.parts()) == pytest.approx(want, abs=1e-4)
    assert dla.logit == pytest.approx(want, abs=1e-5) and dla.total == pytest.approx(want, abs=1e-4)
    assert dla.accumulated().value.iloc[-1] == pytest.approx(want, abs=1e-4)


def test_each_layers_head_terms_sum_to_its_attention_term_measured_by_a_hand_hook(session, dla):
    """The attention term by hand: o_proj's output at the last position (a plain torch hook), through the final
    norm with its scale frozen at the real last-block output (weights read here), dotted with the unembedding rows."""
    model = session.model
    outs: dict[int, torch.Tensor] = {}
    handles = [model.model.layers[i].self_attn.o_proj.register_forward_hook(
        lambda m, a, o, i=i: outs.__setitem__(i, o[0, -1].detach())) for i in range(len(model.model.layers))]
    try:
        with torch.no_grad():
            model(input_ids=session.encode(PROMPT))
    finally:
        for h in handles:
            h.remove()
    x = _last_block_output(model, session.encode(PROMPT))  # the last block's output, before the final norm
    norm = model.model.norm
    inv_sigma = torch.rsqrt(x.pow(2).mean() + norm.variance_epsilon)
    paris, rome = (token_id(session.tokenizer, t) for t in (" Paris", " Rome"))
    direction = model.lm_head.weight[paris] - model.lm_head.weight[rome]  # (d,)
    for layer, attn_out in outs.items():
        by_hand = float((attn_out * inv_sigma * norm.weight).detach() @ direction.detach())
        assert dla.attn[layer] == pytest.approx(by_hand, abs=1e-4)
        assert sum(dla.heads[layer]) + dla.attn_bias[layer] == pytest.approx(dla.attn[layer], abs=1e-5)
        assert dla.attn_bias[layer] == pytest.approx(0.0, abs=1e-5)  # Llama's o_proj has no bias


def _last_block_output(model, ids):
    kept = {}
    h = model.model.layers[-1].register_forward_hook(lambda m, a, o: kept.__setitem__("x", (o[0] if isinstance(
        o, tuple) else o)[0, -1].detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        h.remove()
    return kept["x"]


def test_ablating_the_top_head_lowers_the_logit_difference_in_the_terms_sign_and_order(session, dla):
    paris, rome = (token_id(session.tokenizer, t) for t in (" Paris", " Rome"))

    def difference() -> float:
        lp = session.next_token(PROMPT).logprobs
        return float(lp[paris] - lp[rome])

    base = difference()
    drops = []
    for layer, head, term in dla.top_heads(3):
        with session.intervene(AblateHead(layer, head)):
            drops.append((term, base - difference()))
    top_term, top_drop = drops[0]
    assert np.sign(top_drop) == np.sign(top_term) and abs(top_drop) >= 0.5 * abs(top_term)
    assert abs(top_drop) > max(abs(d) for _, d in drops[1:])  # the largest term is the largest drop


def test_logit_attribution_views(dla):
    assert dla.image().png()[:4] == b"\x89PNG"
    assert len(dla.plot().data) == 2
    heads = dla.top_heads(2)
    assert abs(heads[0][2]) >= abs(heads[1][2])
    assert dla.as_dict()["label"] == "logit(' Paris') − logit(' Rome')"
    assert isinstance(dla.to_pandas(), pd.DataFrame)


# -- activations ---------------------------------------------------------------------------------------------------

def test_last_blocks_cached_output_through_the_final_norm_and_unembedding_equals_the_logits(session):
    last = f"blocks.{session.info.n_layers - 1}.resid_post"
    acts = session.activations(PROMPT, [last, "blocks.3.attn.z", "embed"])
    assert acts[last].shape == (5, session.model.config.hidden_size)
    assert acts["blocks.3.attn.z"].shape == (5, session.info.n_heads, session.info.head_dim)
    with torch.no_grad():
        logits = session.model(input_ids=session.encode(PROMPT)).logits[0]
        by_hand = session.model.lm_head(session.model.model.norm(acts[last]))
    torch.testing.assert_close(by_hand, logits, atol=1e-5, rtol=0)
    frame = acts.to_pandas()
    z_rows = frame[frame.site == "blocks.3.attn.z"]
    assert len(frame) == 15 and z_rows.norm.iloc[0] == pytest.approx(float(acts["blocks.3.attn.z"][0].norm()))


def test_saved_and_loaded_activations_are_bit_identical(session, tmp_path):
    acts = session.activations(PROMPT, ["blocks.0.resid_pre", "blocks.5.mlp_out", "final_norm"])
    back = Activations.load(acts.save(tmp_path / "acts.safetensors"))
    assert list(back) == list(acts) and back.tokens == acts.tokens and back.prompt == PROMPT
    for name in acts:
        assert torch.equal(back[name], acts[name]) and back[name].dtype == acts[name].dtype
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ActivationsFormatError):
        Activations.load(tmp_path / "bad.safetensors")


def test_generation_captures_each_steps_site_vector_at_the_predicting_position(session):
    sites = ["blocks.4.resid_post", "blocks.2.attn.z"]
    trace = session.generate(PROMPT, max_new_tokens=4, capture=sites)
    full = session.tokenizer.decode([*trace.prompt_ids, *trace.token_ids[:-1]])
    acts = session.activations(full, sites)
    assert acts.token_ids == [*trace.prompt_ids, *trace.token_ids[:-1]]
    for step in trace.steps:
        for name in sites:
            torch.testing.assert_close(step.captures[name], acts[name][step.position - 1], atol=1e-5, rtol=1e-4)


def test_bad_site_names_are_refused_with_the_close_names(session):
    with pytest.raises(InvalidArgument, match="did you mean"):
        session.activations(PROMPT, ["blocks.3.resid_pots"])
    with pytest.raises(InvalidArgument, match="capture"):
        session.generate(PROMPT, max_new_tokens=1, capture=["hidden"])
    with pytest.raises(InvalidArgument, match="twice"):
        session.activations(PROMPT, ["embed", "embed"])


def test_adaptive_ig_resolves_a_steep_step_on_the_path_against_the_closed_form():
    """f(e) = sigmoid(k·(w·e − c)) jumps within 0.2 % of the straight path; for f = g(w·e) IG has a closed form:
    IG_i = (x_i − x0_i)·w_i·(g(w·x) − g(w·x0)) / (w·(x − x0)). A fixed 16-point rule misses the step; the adaptive
    composite rule halves the intervals whose own completeness residual is large and lands within 1 %."""
    from labkit.why.attribution import adaptive_ig

    torch.manual_seed(0)
    w = torch.randn(1, 3, 4, dtype=torch.float64)
    x0, x = torch.zeros(1, 3, 4, dtype=torch.float64), torch.randn(1, 3, 4, dtype=torch.float64)
    s_end = float((w * x).sum())
    c = 0.613 * s_end  # the step sits at α = 0.613 of the path, between Gauss–Legendre nodes

    def f(e: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(2000.0 / abs(s_end) * ((w * e).sum(dim=(1, 2)) - c))

    g = torch.sigmoid(torch.tensor(2000.0 / abs(s_end) * (s_end - c))) - torch.sigmoid(
        torch.tensor(-2000.0 / abs(s_end) * c))
    closed = ((x - x0) * w * g / s_end)[0].sum(-1)  # (T,)
    fixed, _ = adaptive_ig(f, x, x0, steps=16, max_steps=16, tolerance=0.01, batch=16)
    assert float((fixed.double() - closed).abs().max()) > 0.05 * float(closed.abs().max())
    scores, used = adaptive_ig(f, x, x0, steps=16, max_steps=1024, tolerance=0.01, batch=16)
    assert 16 < used <= 1024
    torch.testing.assert_close(scores.double(), closed, atol=0.01 * float(closed.abs().max()), rtol=0)
    assert abs(float(scores.sum()) - float(g)) <= 0.01 * abs(float(g))


def test_ig_on_one_interval_equals_captums_integrated_gradients(session):
    from captum.attr import IntegratedGradients

    from labkit.why.attribution import target_function

    ids = session.encode(PROMPT)
    paris = token_id(session.tokenizer, " Paris")
    a = session.attribute(PROMPT, target=" Paris", steps=8, max_steps=8)  # one interval of 8 points
    x = _embeds(session, PROMPT)
    x0 = session.model.get_input_embeddings()(torch.full_like(ids, session.tokenizer.unk_token_id)).detach()
    f = target_function(session.sites, ids.shape[1] - 1, ids.shape[1], paris, None, "prob")
    expected = IntegratedGradients(f).attribute(x.clone().requires_grad_(), baselines=x0, n_steps=8,
                                                method="gausslegendre")[0].sum(-1)
    assert a.steps == 8
    torch.testing.assert_close(torch.tensor(a.scores), expected.detach().float(), atol=1e-5, rtol=1e-4)
