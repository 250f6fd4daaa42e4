"""Sparse autoencoders and transcoders: SAELens' on-disk format written by hand here (known weights), features
against the formulas computed by hand on a manual hook, splicing and feature interventions against edits by hand,
training on planted features, and the trainer on the default model (saved, reloaded, through the CLI)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file

import labkit
from labkit.core.errors import InvalidArgument
from labkit.features import load_sae, splice_report
from labkit.features.reading import spliced
from labkit.features.sae import site_of
from labkit.features.train import fit, held_out_metrics, train_sae
from labkit.interventions.features import AblateFeature, ClampFeature, SteerFeature
from labkit.model import models

PROMPT = "The capital of France is"
D, N = 64, 48  # the tiny model's width, the SAEs' features


@pytest.fixture(scope="module")
def tiny() -> labkit.Session:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=49152, hidden_size=D, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    tok = tf.AutoTokenizer.from_pretrained(str(models.prepare_default_model(progress=False)))
    return labkit.Session.from_model(tf.LlamaForCausalLM(config).eval(), tok)


def _write(folder, cfg: dict, tensors: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return str(folder)


def _weights(d_in: int = D, d_out: int = D, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d_in, N, generator=g) / d_in ** 0.5, "b_enc": torch.randn(N, generator=g) * 0.1,
            "W_dec": torch.randn(N, d_out, generator=g) / d_in ** 0.5, "b_dec": torch.randn(d_out, generator=g) * 0.1}


def _site_value(s: labkit.Session, path: str, pre: bool = False) -> torch.Tensor:
    """(T, d) at a module path, by a plain PyTorch hook (its output, or with ``pre`` its input)."""
    module, seen = s.model.get_submodule(path), {}
    if pre:
        handle = module.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0][0].detach().clone()))
    else:
        handle = module.register_forward_hook(lambda m, a, o: seen.__setitem__("x", (o[0] if isinstance(o, tuple)
                                                                                         else o)[0].detach().clone()))
    try:
        with torch.no_grad():
            s.model(input_ids=s.encode(PROMPT))
    finally:
        handle.remove()
    return seen["x"]


def _hooked_logprobs(s: labkit.Session, module: torch.nn.Module, hook, pre: bool = False) -> torch.Tensor:
    """Next-token log-probs (nats) of PROMPT with a plain PyTorch hook on ``module`` (removed after)."""
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return torch.log_softmax(s.model(input_ids=s.encode(PROMPT)).logits[0, -1].float(), -1)
    finally:
        handle.remove()


def _out(output):
    return output[0] if isinstance(output, tuple) else output


ARCHITECTURES = {  # architecture -> (extra config, extra tensors, the encoder by hand on x̃ = x − b_dec)
    "standard": ({}, {}, lambda w, x: torch.relu(x @ w["W_enc"] + w["b_enc"])),
    "jumprelu": ({}, {"threshold": torch.full((N,), 0.2)},
                 lambda w, x: torch.relu(h := x @ w["W_enc"] + w["b_enc"]) * (h > 0.2)),
    "topk": ({"k": 5}, {}, lambda w, x: torch.zeros(x.shape[0], N).scatter(
        -1, (x @ w["W_enc"] + w["b_enc"]).topk(5).indices, torch.relu((x @ w["W_enc"] + w["b_enc"]).topk(5).values))),
    "gated": ({}, {"b_gate": torch.linspace(-0.5, 0.5, N), "r_mag": torch.linspace(-0.2, 0.2, N),
                   "b_mag": torch.full((N,), 0.05)},
              lambda w, x: ((x @ w["W_enc"] + torch.linspace(-0.5, 0.5, N)) > 0)
              * torch.relu(x @ (w["W_enc"] * torch.linspace(-0.2, 0.2, N).exp()) + 0.05)),
}


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_a_saelens_folder_written_by_hand_gives_the_features_computed_by_hand(architecture, tiny, tmp_path):
    extra_cfg, extra, encoder = ARCHITECTURES[architecture]
    w = _weights()
    cfg = {"architecture": architecture, "d_in": D, "d_sae": N, "dtype": "float32", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": {"hook_name": "blocks.1.hook_resid_post"}, **extra_cfg}
    sae = load_sae(_write(tmp_path / architecture, cfg, {**w, **extra}), tiny)
    assert sae.site == "blocks.1.resid_post" and sae.architecture == architecture
    x = _site_value(tiny, "model.layers.1")  # (T, D): the block's output
    want = encoder(w, x - w["b_dec"])
    got = tiny.features(PROMPT, sae)
    torch.testing.assert_close(got.acts, want, atol=1e-5, rtol=1e-5)
    recon = want @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(got.reconstruction_error, ((x - recon) ** 2).sum(-1) / (x ** 2).sum(-1))
    assert list(got.top(3).columns) == ["position", "token", "rank", "feature", "activation"]


def test_saelens_v5_configs_normalisation_and_hook_names(tiny, tmp_path):
    w = _weights()
    v5 = {"d_in": D, "d_sae": N, "hook_name": "blocks.0.hook_mlp_out", "activation_fn_str": "topk",
          "activation_fn_kwargs": {"k": 4}, "apply_b_dec_to_input": False, "normalize_activations":
          "constant_norm_rescale"}
    sae = load_sae(_write(tmp_path / "v5", v5, w), tiny)
    assert (sae.architecture, sae.k, sae.site) == ("topk", 4, "blocks.0.mlp_out")
    x = _site_value(tiny, "model.layers.0.mlp")
    scaled = x * D ** 0.5 / x.norm(dim=-1, keepdim=True)
    h = scaled @ w["W_enc"] + w["b_enc"]
    want = torch.zeros_like(h).scatter(-1, h.topk(4).indices, torch.relu(h.topk(4).values))
    torch.testing.assert_close(tiny.features(PROMPT, sae).acts, want, atol=1e-5, rtol=1e-5)
    recon, _ = sae.reconstruct(x)
    torch.testing.assert_close(recon, (want @ w["W_dec"] + w["b_dec"]) / (D ** 0.5 / x.norm(dim=-1, keepdim=True)))
    assert site_of("blocks.3.attn.hook_z") == "blocks.3.attn.z" and site_of("hook_embed") == "embed"
    with pytest.raises(InvalidArgument, match="has no labkit site"):
        site_of("blocks.3.hook_resid_mid")
    with pytest.raises(InvalidArgument, match="width 32; this model's is 64"):
        load_sae(_write(tmp_path / "narrow", {"d_in": 32, "d_sae": N, "hook_name": "blocks.0.hook_resid_pre"},
                        _weights(d_in=32, d_out=32)), tiny)
    with pytest.raises(InvalidArgument, match="does not have"):
        load_sae(_write(tmp_path / "deep", {"d_in": D, "d_sae": N, "hook_name": "blocks.9.hook_resid_pre"}, w), tiny)
    with pytest.raises(InvalidArgument, match="no SAE at"):
        load_sae(tmp_path / "nothing", tiny)


def test_an_unedited_splice_keeps_the_logits_and_ablating_subtracts_the_decoder_contribution(tiny, tmp_path):
    w = _weights(seed=1)
    sae = load_sae(_write(tmp_path / "s", {"d_in": D, "d_sae": N, "hook_name": "blocks.0.hook_resid_post"}, w), tiny)
    ids = tiny.encode(PROMPT)
    with torch.no_grad():
        plain = tiny.model(input_ids=ids).logits
        with spliced(tiny.sites, sae, error_term=True):  # reconstruction + its error: the value itself
            assert torch.equal(tiny.model(input_ids=ids).logits, plain)
    base = tiny.next_token(PROMPT).logprobs
    with tiny.intervene(ClampFeature(sae, 7, 1.0, positions=[999])):  # no position edited
        assert torch.equal(tiny.next_token(PROMPT).logprobs, base)
    x = _site_value(tiny, "model.layers.0")
    f = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    feature = int(f[-1].argmax())
    layer = tiny.model.model.layers[0]
    expected = _hooked_logprobs(tiny, layer, lambda m, a, o: _out(o) - f[:, feature, None] * w["W_dec"][feature])
    with tiny.intervene(AblateFeature(sae, feature)):
        torch.testing.assert_close(tiny.next_token(PROMPT).logprobs, expected, atol=1e-5, rtol=0)
    steered = _hooked_logprobs(tiny, layer, lambda m, a, o: _out(o) + 3.0 * w["W_dec"][feature])
    with tiny.intervene(SteerFeature(sae, feature, 3.0)):
        torch.testing.assert_close(tiny.next_token(PROMPT).logprobs, steered, atol=1e-5, rtol=0)
    with pytest.raises(InvalidArgument, match="feature must be an integer in"), tiny.intervene(AblateFeature(sae, N)):
        pass


def test_a_transcoder_reads_the_mlp_input_and_writes_the_mlp_output(tiny, tmp_path):
    w = _weights(seed=2)
    cfg = {"architecture": "transcoder", "d_in": D, "d_sae": N, "d_out": D,
           "metadata": {"hook_name": "blocks.1.ln2.hook_normalized"}, "hook_name_out": "blocks.1.hook_mlp_out"}
    tc = load_sae(_write(tmp_path / "tc", cfg, w), tiny)
    assert tc.is_transcoder and (tc.site, tc.site_out) == ("blocks.1.mlp_in", "blocks.1.mlp_out")
    x = _site_value(tiny, "model.layers.1.mlp", pre=True)  # the MLP's input
    f = torch.relu(x @ w["W_enc"] + w["b_enc"])  # no b_dec subtracted: it lives in the output space
    torch.testing.assert_close(tiny.features(PROMPT, tc).acts, f, atol=1e-5, rtol=1e-5)
    ids = tiny.encode(PROMPT)
    handle = tiny.model.model.layers[1].mlp.register_forward_hook(  # replaced after the first position
        lambda m, a, o: torch.cat([o[:, :1], (f @ w["W_dec"] + w["b_dec"])[None, 1:]], dim=1))
    try:
        with torch.no_grad():
            replaced = tiny.model(input_ids=ids).logits
    finally:
        handle.remove()
    with torch.no_grad(), spliced(tiny.sites, tc):
        torch.testing.assert_close(tiny.model(input_ids=ids).logits, replaced, atol=1e-5, rtol=0)
    feature = int(f[-1].argmax())
    expected = _hooked_logprobs(tiny, tiny.model.model.layers[1].mlp,
                                lambda m, a, o: o - f[:, feature, None] * w["W_dec"][feature])
    with tiny.intervene(AblateFeature(tc, feature)):
        torch.testing.assert_close(tiny.next_token(PROMPT).logprobs, expected, atol=1e-5, rtol=0)


def test_generation_captures_each_tokens_top_features_and_the_splice_report(tiny, tmp_path):
    w = _weights(seed=3)
    sae = load_sae(_write(tmp_path / "g", {"d_in": D, "d_sae": N, "hook_name": "blocks.1.hook_resid_post"}, w), tiny)
    trace = tiny.generate(PROMPT, max_new_tokens=4, capture=[sae])
    for step in trace.steps:
        f = sae.encode(step.captures["blocks.1.resid_post"])
        top = step.captures["features:g"]
        assert top["features"] == f.topk(10).indices[f.topk(10).values > 0].tolist()
        torch.testing.assert_close(torch.tensor(top["activations"]), f.topk(10).values[f.topk(10).values > 0])
    report = splice_report(tiny, [PROMPT, "Once upon a time there was a cat"], sae)
    assert report.kl_bits > 0 and report.loss_nats > 0 and report.tokens == 11  # 13, the first of each text kept
    assert report.l0 == pytest.approx(float((tiny.features(PROMPT, sae).acts > 0).sum(-1).float().mean()), rel=0.5)


def test_a_topk_sae_trained_on_planted_features_recovers_them():
    g = torch.Generator().manual_seed(0)
    truth = torch.nn.functional.normalize(torch.randn(32, 24, generator=g), dim=-1)  # 32 features in 24 dims
    n = 6000
    active = torch.rand(n, 32, generator=g).argsort(-1)[:, :3]  # 3 features per vector
    coeff = torch.zeros(n, 32).scatter(-1, active, 1.0 + torch.rand(n, 3, generator=g))
    acts = coeff @ truth
    sae = fit(acts, 64, "topk", k=3, steps=1500, batch=256, seed=0)
    cos = torch.nn.functional.normalize(sae.W_dec, dim=-1) @ truth.T  # (64, 32)
    assert float(cos.max(0).values.mean()) >= 0.9
    l0, fve, dead = held_out_metrics(sae, acts[:500])
    assert l0 <= 3 and fve > 0.9 and dead < 0.5


def test_train_sae_on_the_default_model_saves_saelens_format_and_the_cli_runs(tmp_path):
    from click.testing import CliRunner

    from labkit.ui.cli import main

    s = labkit.Session(progress=False)
    texts = ["The capital of France is Paris. The capital of Spain is Madrid. " * 4,
             "Once upon a time a small cat lived in a quiet village by the sea. " * 4,
             "Water boils at one hundred degrees. Ice melts at zero degrees. " * 4]
    sae, report = train_sae(s, "blocks.10.resid_post", texts, d_sae=256, k=8, steps=60, max_tokens=600,
                            progress=False, save=tmp_path / "sae")
    assert report.d_in == 576 and report.tokens > 0 and 0 < report.l0 <= 8
    assert report.splice["kl_bits"] >= 0 and report.fraction_of_variance_explained <= 1
    back = load_sae(tmp_path / "sae", s)
    assert back.architecture == "topk" and back.k == 8 and back.site == "blocks.10.resid_post"
    torch.testing.assert_close(s.features(PROMPT, back).acts, s.features(PROMPT, sae).acts)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(texts[0] + texts[1])
    out = CliRunner().invoke(main, ["train-sae", "--site", "blocks.3.resid_post", "--text", str(tmp_path / "texts"),
                                    "--d-sae", "128", "--k", "4", "--steps", "20", "--max-tokens", "200",
                                    "--out", str(tmp_path / "cli-sae")])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "cli-sae" / "cfg.json").read_text())["k"] == 4 and "l0" in out.output


def test_the_labs_feature_strip_shows_top_features_where_one_fires_and_regenerates_with_it_ablated(tiny, tmp_path):
    pytest.importorskip("anywidget")
    from labkit.sampling import Classic
    from labkit.ui.panels import Lab

    w = _weights(seed=4)
    sae = load_sae(_write(tmp_path / "lab", {"d_in": D, "d_sae": N, "hook_name": "blocks.1.hook_resid_post"}, w),
                   tiny)
    lab = Lab(tiny, chat=False, prompt=PROMPT, max_new_tokens=3, sae=sae, sampler=Classic(temperature=0.7))
    try:
        lab.run()
        lab.wait(60)
        lab.stream.hovered = 1
        step = lab.trace.steps[1]
        shown = [b.description for b in lab.features.top.children]
        top = step.captures["features:lab"]
        assert shown == [f"{f}: {a:.2f}" for f, a in zip(top["features"], top["activations"], strict=True)]
        feature = top["features"][0]
        lab.features.top.children[0].click()  # where it fires: one span per prompt and generated token
        assert lab.features.where.value.count("<span") == len(lab.trace.prompt_ids) + 3
        assert f"feature {feature}:" in lab.features.where.value
        first = lab.trace
        lab.features.ablate.click()
        lab.wait(60)
        assert len(lab.traces) == 2 and lab.trace is not first
        same = tiny.generate(PROMPT, max_new_tokens=3, sampler=Classic(temperature=0.7), seed=0,
                             interventions=[AblateFeature(sae, feature)])
        assert lab.trace.token_ids == same.token_ids
        assert "AblateFeature" in lab.features.status.value
    finally:
        lab.close()


def test_an_attention_output_sae_reads_the_heads_concatenated_and_its_edits_land_there(tiny, tmp_path):
    w = _weights(seed=5)  # 4 heads × 16 = 64: the o_proj input
    sae = load_sae(_write(tmp_path / "z", {"d_in": D, "d_sae": N, "hook_name": "blocks.0.attn.hook_z"}, w), tiny)
    assert sae.site == "blocks.0.attn.z"
    z = _site_value(tiny, "model.layers.0.self_attn.o_proj", pre=True)  # (T, H·d_head)
    f = torch.relu((z - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(tiny.features(PROMPT, sae).acts, f, atol=1e-5, rtol=1e-5)
    feature = int(f[-1].argmax())
    expected = _hooked_logprobs(tiny, tiny.model.model.layers[0].self_attn.o_proj,
                                lambda m, a: (a[0] - f[:, feature, None] * w["W_dec"][feature],), pre=True)
    with tiny.intervene(AblateFeature(sae, feature)):
        torch.testing.assert_close(tiny.next_token(PROMPT).logprobs, expected, atol=1e-5, rtol=0)


def test_training_text_sampled_from_the_model_when_none_is_given(tiny):
    from labkit.features.train import sample_texts

    texts = sample_texts(tiny, 2, max_new_tokens=8, seed=1)
    assert len(texts) == 2 and texts == sample_texts(tiny, 2, max_new_tokens=8, seed=1)  # seeded
    sae, report = train_sae(tiny, "blocks.0.resid_post", None, sample=3, d_sae=32, k=4, steps=5, progress=False)
    assert sae.d_sae == 32 and report.tokens > 0
    with pytest.raises(InvalidArgument, match="architecture must be one of"):
        fit(torch.randn(10, D), 8, architecture="gated")
