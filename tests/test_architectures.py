"""The parity matrix: every layer-hooking feature on every mainstream decoder-only architecture, each against an
independent answer — transformers' own forward, ``generate`` and eager ``output_attentions``, or a hand-written
PyTorch hook on the module path written out here (not taken from labkit's adapters).

Models are tiny and randomly initialised from transformers config classes (2–3 layers, hidden size 64), saved
as local folders with the default model's tokenizer; nothing is downloaded. One test id per feature × architecture.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

import labkit
from labkit.interventions import AblateHead, ActivationHook, Patch, Steer
from labkit.interventions.activation import head_importance
from labkit.measures import information as info
from labkit.model import models
from labkit.speculative import LayerSkipDraft, PromptLookupDraft

V = 49152  # the default tokenizer's vocabulary
SMALL = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=2, max_position_embeddings=128)
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, **SMALL)
WINDOW = 8  # sliding window of the *_window models: shorter than the prompt


@dataclass(frozen=True)
class Arch:
    """A tiny model of one architecture and where its parts are (written out by hand, for the oracles)."""

    make: Callable[[], Any]
    block: str  # module path of decoder block {L}
    out_proj: str  # module path of block {L}'s attention output projection (input = heads concatenated)
    window: int | None = None  # sliding window, when shorter than the sequences the tests use
    norm: str = "model.norm"  # module path of the final norm (what the unembedding reads is its output)


LLAMA_PATHS = dict(block="model.layers.{L}", out_proj="model.layers.{L}.self_attn.o_proj")
ARCHS: dict[str, Arch] = {
    "llama": Arch(lambda: tf.LlamaConfig(**LLAMA_LIKE), **LLAMA_PATHS),
    "gpt2": Arch(lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=V,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=2),
                 block="transformer.h.{L}", out_proj="transformer.h.{L}.attn.c_proj", norm="transformer.ln_f"),
    "gpt_neox": Arch(lambda: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, **SMALL),
                     block="gpt_neox.layers.{L}", out_proj="gpt_neox.layers.{L}.attention.dense",
                     norm="gpt_neox.final_layer_norm"),
    "opt": Arch(lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                     word_embed_proj_dim=64, **SMALL),
                block="model.decoder.layers.{L}", out_proj="model.decoder.layers.{L}.self_attn.out_proj",
                norm="model.decoder.final_layer_norm"),
    "qwen2": Arch(lambda: tf.Qwen2Config(**LLAMA_LIKE), **LLAMA_PATHS),
    "qwen3": Arch(lambda: tf.Qwen3Config(head_dim=24, **LLAMA_LIKE), **LLAMA_PATHS),  # head_dim ≠ hidden / heads
    # softcapping made strong (0.5) so that skipping it would change every number; window crossed by the tests
    "gemma2": Arch(lambda: tf.Gemma2Config(head_dim=16, sliding_window=WINDOW, final_logit_softcapping=0.5,
                                           attn_logit_softcapping=0.5, **LLAMA_LIKE), **LLAMA_PATHS, window=WINDOW),
    "gemma3_text": Arch(lambda: tf.Gemma3TextConfig(head_dim=16, **LLAMA_LIKE), **LLAMA_PATHS),
    "phi3": Arch(lambda: tf.Phi3Config(**LLAMA_LIKE), **LLAMA_PATHS),
    "mistral": Arch(lambda: tf.MistralConfig(**LLAMA_LIKE), **LLAMA_PATHS),
    "mistral_window": Arch(lambda: tf.MistralConfig(**{**LLAMA_LIKE, "sliding_window": WINDOW}), **LLAMA_PATHS,
                           window=WINDOW),
    "gemma3_window": Arch(lambda: tf.Gemma3TextConfig(  # mixed sliding and full layers
        head_dim=16, sliding_window=WINDOW, **{**LLAMA_LIKE, "num_hidden_layers": 3},
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]), **LLAMA_PATHS, window=WINDOW),
}
NAMES = list(ARCHS)
PROMPT = "The old lighthouse keeper climbed the stairs every night"  # 11 tokens: longer than WINDOW
REPEAT = "one two three four five one two three four five one two three"  # prompt lookup finds n-grams here
NEW = 12


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return models.prepare_default_model(progress=False)


@pytest.fixture(scope="module")  # freed after this module
def tiny(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Callable[[str], Path]:
    """``tiny(name)``: the folder of that architecture's tiny random model (built once per run)."""
    folders: dict[str, Path] = {}
    tokenizer = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)

    def build(name: str) -> Path:
        if name not in folders:
            folder = tmp_path_factory.mktemp(name)
            torch.manual_seed(0)
            cfg = ARCHS[name].make()
            cfg.initializer_range = 0.1  # peaked enough that greedy choices are not near-ties
            tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
            folders[name] = folder
        return folders[name]

    return build


@pytest.fixture(scope="module")  # freed after this module
def sessions(tiny: Callable[[str], Path]) -> Callable[[str], labkit.Session]:
    cache: dict[str, labkit.Session] = {}

    def get(name: str) -> labkit.Session:
        if name not in cache:
            cache[name] = labkit.Session(tiny(name), device="cpu", dtype="float32", progress=False)
        return cache[name]

    return get


@pytest.fixture(scope="module")  # freed after this module
def eager_models(tiny: Callable[[str], Path]) -> Callable[[str], Any]:
    """The same weights loaded by transformers alone with eager attention: the reference."""
    cache: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            cache[name] = tf.AutoModelForCausalLM.from_pretrained(
                str(tiny(name)), local_files_only=True, attn_implementation="eager", dtype=torch.float32).eval()
        return cache[name]

    return get


def _logprobs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)  # (V,)


def _module(model: Any, path: str, layer: int) -> torch.nn.Module:
    return model.get_submodule(path.format(L=layer))


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@pytest.mark.parametrize("arch", NAMES)
def test_auto_attention_is_what_the_architecture_supports(arch, sessions):
    s = sessions(arch)
    assert s.info.attn == ("eager" if arch == "gemma2" else "sdpa")  # Gemma 2 has no SDPA (softcapping)


@pytest.mark.parametrize("arch", NAMES)
def test_next_token_logprobs_equal_a_plain_eager_forward(arch, sessions, eager_models):
    s = sessions(arch)
    ids = s.encode(PROMPT)
    torch.testing.assert_close(s.next_token(PROMPT).logprobs, _logprobs(eager_models(arch), ids), atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", NAMES)
def test_greedy_generation_equals_model_generate(arch, sessions):
    s = sessions(arch)
    ids = s.encode(PROMPT)
    with torch.no_grad():
        ref = s.model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=2)[0, ids.shape[1]:].tolist()
    assert s.generate(PROMPT, max_new_tokens=NEW).token_ids == ref


def _eager_attentions(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Shape (L, H, N, N): transformers' eager ``output_attentions`` over the whole sequence."""
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    return torch.stack([a[0].float() for a in out.attentions])


@pytest.mark.parametrize("arch", NAMES)
def test_captured_attention_rows_equal_eager_output_attentions(arch, sessions, eager_models):
    s = sessions(arch)
    trace = s.generate(PROMPT, max_new_tokens=NEW, capture=["attention"])
    full = torch.tensor([trace.prompt_ids + trace.token_ids[:-1]])  # every query the run computed
    eager = _eager_attentions(eager_models(arch), full)  # (L, H, N, N)
    t = len(trace.prompt_ids)
    for i, step in enumerate(trace.steps):
        row = step.captures["attention"]  # (L, H, T + i): every key position of the sequence
        q = t - 1 + i
        assert row.scores.shape[-1] == q + 1
        torch.testing.assert_close(row.probs, eager[:, :, q, : q + 1], atol=2e-5, rtol=0)
        assert torch.equal(row.outside_window, (eager[:, :, q, : q + 1] == 0).all(dim=1))
    last = trace.steps[-1].captures["attention"]
    if ARCHS[arch].window:  # keys outside the window are there, at weight 0, and marked
        assert bool(last.outside_window.any()) and float(last.probs[last.outside_window[:, None].expand_as(
            last.probs)].abs().max()) == 0.0
    else:
        assert not bool(last.outside_window.any())


@pytest.mark.parametrize("arch", NAMES)
def test_lab_attention_image_equals_an_eager_pass(arch, sessions, eager_models):
    from labkit.ui.panels.attention_view import grow

    s = sessions(arch)
    maps = s.attention(PROMPT)  # what the Lab shows first
    trace = s.generate(PROMPT, max_new_tokens=NEW, capture=["attention"])
    grown = grow(maps.probs, [st.captures["attention"] for st in trace.steps])  # (L, H, N, N)
    full = torch.tensor([trace.prompt_ids + trace.token_ids[:-1]])
    torch.testing.assert_close(grown, _eager_attentions(eager_models(arch), full), atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", NAMES)
def test_head_ablation_equals_zeroing_the_heads_slice_by_hand(arch, sessions):
    s, layer, head = sessions(arch), 1, 2
    ids = s.encode(PROMPT)
    d = s.sites.head_dim

    def zero(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0].clone()
        x[..., head * d:(head + 1) * d] = 0.0
        return (x, *args[1:])

    handle = _module(s.model, ARCHS[arch].out_proj, layer).register_forward_pre_hook(zero)
    try:
        expected = _logprobs(s.model, ids)
    finally:
        handle.remove()
    with s.intervene(AblateHead(layer, head)):
        got = s.next_token(PROMPT).logprobs
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert info.kl_divergence(got, s.next_token(PROMPT).logprobs, "bits").item() > 1e-6  # the head mattered


@pytest.mark.parametrize("arch", NAMES)
def test_head_importance_equals_each_heads_slice_through_the_projection_by_hand(arch, sessions):
    s, layer = sessions(arch), 1
    ids = s.encode(labkit.interventions.activation.DEFAULT_REFERENCE)
    proj = _module(s.model, ARCHS[arch].out_proj, layer)
    seen: list[torch.Tensor] = []
    handle = proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].detach()))
    try:
        with torch.no_grad():
            s.model(input_ids=ids)
    finally:
        handle.remove()
    x, d = seen[0], s.sites.head_dim  # (T, H·D)
    w = proj.weight.T if isinstance(proj, torch.nn.Linear) else proj.weight  # (H·D, d_model); Conv1D is (in, out)
    expected = torch.stack([(x[:, h * d:(h + 1) * d] @ w[h * d:(h + 1) * d]).norm(dim=-1).mean()
                            for h in range(s.sites.n_heads)])
    torch.testing.assert_close(head_importance(s)[layer], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", NAMES)
def test_steering_equals_a_hand_written_hook(arch, sessions):
    s, layer = sessions(arch), 0
    vec = torch.linspace(-1, 1, s.sites.d_model)
    handle = _module(s.model, ARCHS[arch].block, layer).register_forward_hook(
        lambda m, a, out: _with_hidden(out, _hidden(out) + 2.0 * vec))
    try:
        expected = _logprobs(s.model, s.encode(PROMPT))
    finally:
        handle.remove()
    with s.intervene(Steer(layer, vec, 2.0)):
        torch.testing.assert_close(s.next_token(PROMPT).logprobs, expected, atol=1e-5, rtol=0)
    with s.intervene(ActivationHook(f"blocks.{layer}.resid_post", lambda v, pos: v + 2.0 * vec)):  # by site name
        torch.testing.assert_close(s.next_token(PROMPT).logprobs, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", NAMES)
def test_patching_equals_a_hand_written_hook(arch, sessions):
    s, layer, pos = sessions(arch), 0, 3  # layer 0: the patch reaches the last position through layer 1
    source = "A young lighthouse keeper walked the stairs every morning"
    block = _module(s.model, ARCHS[arch].block, layer)
    kept: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda m, a, out: kept.append(_hidden(out).detach()))
    try:
        with torch.no_grad():
            s.model(input_ids=s.encode(source))
    finally:
        handle.remove()

    def patch(m: Any, a: Any, out: Any) -> Any:
        hidden = _hidden(out).clone()
        hidden[:, pos] = kept[0][:, pos]
        return _with_hidden(out, hidden)

    handle = block.register_forward_hook(patch)
    try:
        expected = _logprobs(s.model, s.encode(PROMPT))
    finally:
        handle.remove()
    with s.intervene(Patch(source, layer, [pos])):
        got = s.next_token(PROMPT).logprobs
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert info.kl_divergence(got, s.next_token(PROMPT).logprobs, "bits").item() > 1e-7


@pytest.mark.parametrize("arch", NAMES)
def test_kv_policies_that_drop_nothing_generate_what_the_full_cache_does(arch, sessions):
    s = sessions(arch)
    plain = s.generate(PROMPT, max_new_tokens=NEW)
    policies = [f"quant:bits=4,residual=4096,group={s.sites.head_dim}"]
    if ARCHS[arch].window is None and not getattr(s.model.config, "sliding_window", None):
        policies += ["window:sinks=2,window=4096", "h2o:budget=4096,recent=4"]
    else:  # an evicting cache cannot give a sliding-window mask its positions: refused before the first token
        with pytest.raises(labkit.errors.InvalidArgument, match="sliding-window"):
            s.generate(PROMPT, max_new_tokens=2, kv="window:sinks=2,window=4096")
    for spec in policies:
        assert s.generate(PROMPT, max_new_tokens=NEW, kv=spec).token_ids == plain.token_ids, spec
    group = s.sites.head_dim // 2
    lossy = s.generate(PROMPT, max_new_tokens=NEW, kv=f"quant:bits=8,residual=0,group={group}")
    # a 1-byte code per element and a float32 min and scale per group, against 4 bytes per float32 element
    assert lossy.steps[-1].kv["bytes"] == pytest.approx((1 + 8 / group) / 4 * kv_full_bytes(s, lossy))


def kv_full_bytes(s: labkit.Session, trace: Any) -> int:
    from labkit.decoding.kv import full_cache_bytes

    return full_cache_bytes(s.model.config, len(trace.prompt_ids) + len(trace) - 1, torch.float32)


def _final_logits(model: Any, x: torch.Tensor, arch: str) -> torch.Tensor:
    """By hand: the final norm at ARCHS' path, the unembedding, the final softcapping written out (Gemma 2)."""
    logits = model.get_output_embeddings()(model.get_submodule(ARCHS[arch].norm)(x))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@pytest.mark.parametrize("arch", NAMES)
def test_cached_last_block_output_through_the_final_norm_and_unembedding_equals_the_logits(arch, sessions,
                                                                                        eager_models):
    s = sessions(arch)
    last = f"blocks.{s.sites.n_layers - 1}.resid_post"
    acts = s.activations(PROMPT, [last, "blocks.0.attn.z"])
    assert acts["blocks.0.attn.z"].shape == (len(acts.tokens), s.sites.n_heads, s.sites.head_dim)
    eager = eager_models(arch)
    with torch.no_grad():
        torch.testing.assert_close(_final_logits(eager, acts[last], arch),
                                   eager(input_ids=s.encode(PROMPT)).logits[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", NAMES)
def test_logit_attribution_parts_sum_to_the_eager_models_logit_difference(arch, sessions, eager_models):
    s, eager = sessions(arch), eager_models(arch)
    ids = s.encode(PROMPT)
    with torch.no_grad():
        logits = eager(input_ids=ids).logits[0, -1]
        token, against = (int(i) for i in logits.topk(2).indices)
        cap = getattr(eager.config, "final_logit_softcapping", None)
        eager.config.final_logit_softcapping = None  # the decomposition is of the logits before softcapping
        try:
            raw = eager(input_ids=ids).logits[0, -1]
        finally:
            eager.config.final_logit_softcapping = cap
    la = s.logit_attribution(PROMPT, token=token, foil=against)
    assert la.logit == pytest.approx(float(logits[token] - logits[against]), abs=2e-5)
    assert sum(v for *_, v in la.parts()) == pytest.approx(float(raw[token] - raw[against]), abs=1e-4)
    for layer in range(s.sites.n_layers):
        assert sum(la.heads[layer]) + la.attn_bias[layer] == pytest.approx(la.attn[layer], abs=1e-5)
    assert (cap is not None) == (la.softcap is not None)


@pytest.mark.parametrize("arch", NAMES)
def test_gradient_attribution_methods_against_autograd_on_the_eager_model(arch, sessions, eager_models):
    s, eager = sessions(arch), eager_models(arch)
    ids = s.encode(PROMPT)
    a = s.attribute(PROMPT, method="input_x_gradient", quantity="logit")
    x = eager.get_input_embeddings()(ids).detach().requires_grad_()
    (grad,) = torch.autograd.grad(eager(inputs_embeds=x).logits[0, -1, a.target_id], x)
    torch.testing.assert_close(torch.tensor(a.scores), (x * grad)[0].sum(-1).detach(), atol=1e-5, rtol=1e-3)
    # IG at the default settings (the "unk" baseline, points doubled while the error exceeds 1 %): completeness
    # checked here from the eager model's own f(input) − f(baseline), not from labkit's numbers
    for quantity in ("prob", "logit"):
        ig = s.attribute(PROMPT, method="ig", quantity=quantity)
        unk = s.tokenizer.unk_token_id
        base_ids = torch.where(ids == s.tokenizer.eos_token_id, ids, torch.full_like(ids, unk))
        with torch.no_grad():
            ends = eager(input_ids=torch.cat([ids, base_ids])).logits[:, -1].float()  # (2, V)
            f = ends.softmax(-1)[:, ig.target_id] if quantity == "prob" else ends[:, ig.target_id]
        gap = float(f[0] - f[1])
        assert abs(sum(ig.scores) - gap) <= 0.01 * abs(gap), (quantity, ig.completeness_error, ig.steps)
        assert ig.completeness_error <= 0.01 and ig.baseline == "unk"
    hidden = s.attribute(PROMPT, method="saliency", position=4)  # tokens 5.. are later than the prediction
    assert all(v == 0.0 for v in hidden.scores[5:]) and all(v > 0.0 for v in hidden.scores[:5])
    assert sum(s.attribute(PROMPT, method="rollout").scores) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("arch", NAMES)
def test_lens_last_layer_equals_the_models_logits(arch, sessions, eager_models):
    s = sessions(arch)
    lens = s.lens(PROMPT)
    assert lens.logprobs.shape == (s.sites.n_layers, V)
    torch.testing.assert_close(lens.logprobs[-1], _logprobs(eager_models(arch), s.encode(PROMPT)), atol=2e-5,
                               rtol=0)


@pytest.mark.parametrize("arch", NAMES)
@pytest.mark.parametrize("draft", ["prompt-lookup", "layer-skip"])
def test_speculative_greedy_equals_plain_greedy(arch, draft, sessions):
    s = sessions(arch)
    plain = s.generate(REPEAT, max_new_tokens=NEW)
    drafter = PromptLookupDraft(ngram=2, max_tokens=4) if draft == "prompt-lookup" else LayerSkipDraft(1, gamma=3)
    spec = s.generate(REPEAT, max_new_tokens=NEW, speculative=drafter)
    assert spec.token_ids == plain.token_ids
    assert spec.meta.speculative["drafted"] > 0  # verification ran on drafted tokens, past the window too


@pytest.mark.parametrize("arch", NAMES)
def test_8bit_loading_matches_float32(arch, tiny, sessions):
    pytest.importorskip("bitsandbytes")
    s8 = labkit.Session(tiny(arch), device="cpu", quantization="8bit", progress=False)
    ref = sessions(arch).next_token(PROMPT).logprobs
    got = s8.next_token(PROMPT).logprobs
    assert info.kl_divergence(ref, got, "bits").item() < 0.05
    with s8.intervene(AblateHead(1, 2)):  # hooks work through the quantized projection
        assert not torch.equal(s8.next_token(PROMPT).logprobs, got)
    torch.testing.assert_close(head_importance(s8), head_importance(sessions(arch)), atol=0.05, rtol=0.1)


@pytest.mark.parametrize("arch", NAMES)
def test_lab_generates_what_session_generate_gives_and_its_image_equals_eager(arch, sessions, eager_models):
    from labkit.ui.panels import Lab

    s = sessions(arch)
    lab = Lab(s, chat=False, prompt=PROMPT, max_new_tokens=NEW)
    try:
        lab.controls.kind.value = "greedy"
        lab.buttons["Generate"].click()
        lab.wait(60)
        assert lab.message.value == ""
        assert lab.trace.token_ids == s.generate(PROMPT, max_new_tokens=NEW).token_ids
        lab._refresh(force=True)
        shown = lab.attention._probs  # (L, H, N, N): what the image is drawn from
        full = torch.tensor([lab.trace.prompt_ids + lab.trace.token_ids[:-1]])
        torch.testing.assert_close(shown, _eager_attentions(eager_models(arch), full), atol=2e-5, rtol=0)
    finally:
        lab.close()


@pytest.mark.parametrize("arch", ["gemma2", "gpt2", "gemma3_window"])
def test_entropix_decides_on_the_eager_models_numbers(arch, sessions, eager_models):
    from labkit.sampling import Entropix

    s = sessions(arch)
    trace = s.generate(PROMPT, max_new_tokens=6, sampler=Entropix(), seed=0)
    assert len(trace.steps) == 6
    full = torch.tensor([trace.prompt_ids + trace.token_ids])
    with torch.no_grad():  # eager reference: the raw logits and the last layer's attention at each step
        out = eager_models(arch)(input_ids=full, output_attentions=True)
    t = len(trace.prompt_ids)
    for i, step in enumerate(trace.steps):
        row = out.attentions[-1][0, :, t - 1 + i, : t + i].float()  # (H, T_k) eager probabilities
        attn_entropy = float((torch.special.entr(row).sum(-1) / math.log(2)).mean())  # bits
        logp = torch.log_softmax(out.logits[0, t - 1 + i].float(), dim=-1)
        entropy = float(-(logp.exp() * logp).sum() / math.log(2))  # bits
        assert step.sampler["attn_entropy"] == pytest.approx(attn_entropy, abs=1e-4)
        assert step.sampler["entropy"] == pytest.approx(entropy, abs=1e-4)


# -- the site layer itself ---------------------------------------------------------------------------------------

def test_site_names_are_listed_in_forward_order_and_resolve(sessions):
    s = sessions("gpt2")
    names = list(s.sites)
    assert names[0] == "embed" and names[-1] == "final_norm"
    assert names[1:7] == ["blocks.0.resid_pre", "blocks.0.attn.z", "blocks.0.attn_out", "blocks.0.mlp_in",
                          "blocks.0.mlp_out", "blocks.0.resid_post"]
    assert len(names) == 2 + 6 * 2 and "blocks.-1.resid_post" in s.sites
    assert list(s.sites.table()["name"])[:2] == ["embed", "blocks.L.resid_pre"]
    with pytest.raises(labkit.errors.InvalidArgument, match=r"unknown site 'blocks.0.resid_pots'; did you mean "
                                                             r"\['blocks.0.resid_post'"):
        s.sites.resolve("blocks.0.resid_pots")
    with pytest.raises(labkit.errors.InvalidArgument, match=r"block index must be an integer in \[0, 2\)"):
        s.sites.resolve("blocks.7.mlp_out")


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gemma2"])
def test_read_sites_match_the_modules_by_hand_and_chain(arch, sessions):
    s = sessions(arch)
    ids = s.encode(PROMPT)
    block = _module(s.model, ARCHS[arch].block, 1)
    by_hand: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda m, a, out: by_hand.append(_hidden(out)))
    try:
        with torch.no_grad(), s.sites.read(["blocks.1.resid_post", "blocks.1.resid_pre", "blocks.0.resid_post",
                                            "final_norm", "blocks.1.attn.z"]) as seen:
            logits = s.model(input_ids=ids).logits
    finally:
        handle.remove()
    assert torch.equal(seen["blocks.1.resid_post"][0], by_hand[0])
    assert torch.equal(seen["blocks.1.resid_pre"][0], seen["blocks.0.resid_post"][0])  # the residual stream chains
    assert seen["blocks.1.attn.z"][0].shape == (1, ids.shape[1], s.sites.n_heads, s.sites.head_dim)
    torch.testing.assert_close(s.sites.logits(seen["final_norm"][0], normed=True), logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.sites.logits(by_hand[0]), logits, atol=1e-5, rtol=0)  # final norm + softcap


def test_site_hooks_are_removed_after_an_error_and_logits_are_bit_identical(sessions):
    s = sessions("gpt_neox")
    before = s.next_token(PROMPT).logprobs
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in s.model.modules())
    with pytest.raises(RuntimeError, match="boom"), s.sites.edit({"blocks.0.mlp_out": lambda v, p: v * 0,
                                                                 "blocks.1.attn.z": lambda v, p: v + 1}):
        assert not torch.equal(s.next_token(PROMPT).logprobs, before)
        raise RuntimeError("boom")
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in s.model.modules()) == hooks
    assert torch.equal(s.next_token(PROMPT).logprobs, before)


def test_positions_given_to_site_functions_count_the_kv_cache(sessions):
    s = sessions("opt")
    seen: list[list[int]] = []
    with s.intervene(ActivationHook("blocks.0.resid_post", lambda v, pos: seen.append(pos.tolist()))):
        trace = s.generate(PROMPT, max_new_tokens=3)
    t = len(trace.prompt_ids)
    assert seen == [list(range(t)), [t], [t + 1]]


class _Odd(torch.nn.Module):
    """A causal LM whose layout no adapter knows."""

    def __init__(self) -> None:
        super().__init__()
        self.config = tf.PretrainedConfig()
        self.config.model_type = "oddlm"
        self.config.num_attention_heads, self.config.hidden_size = 2, 8
        self.backbone = torch.nn.Module()
        self.backbone.tok = torch.nn.Embedding(10, 8)
        self.backbone.stack = torch.nn.ModuleList([torch.nn.Module()])
        self.backbone.stack[0].mix, self.backbone.stack[0].ffn = torch.nn.Module(), torch.nn.Linear(8, 8)
        self.backbone.stack[0].mix.proj = torch.nn.Linear(8, 8)
        self.backbone.norm, self.head = torch.nn.LayerNorm(8), torch.nn.Linear(8, 10)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head


def test_an_unknown_architecture_is_refused_with_what_is_missing_then_declared_in_a_few_lines():
    from labkit.model import hooks

    model = _Odd()
    with pytest.raises(labkit.errors.UnsupportedArchitecture, match=r"no hook-site adapter for _Odd \(model_type "
                                                                    r"'oddlm'\).*llama: no list of decoder blocks "
                                                                    r"at model.layers.*register_adapter"):
        hooks.sites_of(model)
    try:
        hooks.register_adapter(hooks.Adapter("oddlm", ("oddlm",), blocks="backbone.stack", embed="backbone.tok",
                                             final=("backbone.norm",), attn="mix", out_proj="mix.proj", mlp="ffn"))
        sites = hooks.sites_of(model)
        assert sites.n_layers == 1 and sites.head_dim == 4 and sites.final == [model.backbone.norm]
        with pytest.raises(labkit.errors.InvalidArgument, match="already registered"):
            hooks.register_adapter(hooks.ADAPTERS["oddlm"])
    finally:
        hooks.ADAPTERS.pop("oddlm", None)


def test_a_declared_model_type_whose_layout_differs_is_refused():
    from labkit.model import hooks

    model = _Odd()
    model.config.model_type = "gpt2"
    with pytest.raises(labkit.errors.UnsupportedArchitecture, match=r"does not have the layout of labkit's 'gpt2' "
                                                                    r"adapter: no list of decoder blocks at "
                                                                    r"transformer.h"):
        hooks.sites_of(model)


@pytest.mark.parametrize("arch", ["mistral_window", "gemma2", "gemma3_text"])
def test_xformers_backend_refuses_what_it_cannot_compute(arch):
    with pytest.raises(labkit.errors.InvalidArgument, match=r"attn='xformers' applies a plain causal mask only, but "
                                                            r"this model has (sliding_window|attn_logit_softcapping)"):
        models.check_xformers_fits(ARCHS[arch].make())
    models.check_xformers_fits(ARCHS["llama"].make())  # no window, no softcap: allowed


@pytest.mark.parametrize("arch", NAMES)
def test_batched_rows_equal_single_runs_and_beam_search_equals_transformers(arch, sessions):
    from labkit.decoding.beam import BeamSearch
    from labkit.sampling import Classic, ContrastiveDecoding, ContrastiveSearch

    s = sessions(arch)
    rows = s.generate(PROMPT, max_new_tokens=NEW, sampler=Classic(temperature=1.0), seed=0, n=3)
    assert [t.token_ids for t in rows] == [s.generate(PROMPT, max_new_tokens=NEW, sampler=Classic(temperature=1.0),
                                                      seed=b).token_ids for b in range(3)]
    ids = s.encode(PROMPT)
    with torch.no_grad():
        ref = s.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                               num_beams=3, pad_token_id=2)[0, ids.shape[1]:].tolist()
    assert s.generate(PROMPT, max_new_tokens=NEW, beam=BeamSearch(3)).token_ids == ref
    greedy = s.generate(PROMPT, max_new_tokens=NEW).token_ids
    assert s.generate(PROMPT, max_new_tokens=NEW, sampler=ContrastiveSearch(0.0, 3)).token_ids == greedy
    assert s.generate(PROMPT, max_new_tokens=NEW, sampler=ContrastiveDecoding(beta=0.0, amateur="layers:1")
                      ).token_ids == greedy


@pytest.mark.parametrize("arch", NAMES)
def test_sae_features_and_feature_ablation_equal_the_computation_by_hand(arch, sessions):
    from labkit.features import SAE
    from labkit.interventions.features import AblateFeature, SteerFeature

    s, layer = sessions(arch), 1
    d = s.sites.d_model
    gen = torch.Generator().manual_seed(3)
    w_enc, w_dec = torch.randn(d, 32, generator=gen) / d ** 0.5, torch.randn(32, d, generator=gen) / d ** 0.5
    sae = SAE(W_enc=w_enc, b_enc=torch.full((32,), -0.1), W_dec=w_dec, b_dec=torch.randn(d, generator=gen) * 0.1,
              site=f"blocks.{layer}.resid_post")
    block = _module(s.model, ARCHS[arch].block, layer)
    seen = {}

    def keep(module: Any, args: Any, out: Any) -> None:
        seen["x"] = _hidden(out)[0].detach().clone()

    handle = block.register_forward_hook(keep)
    try:
        _logprobs(s.model, s.encode(PROMPT))
    finally:
        handle.remove()
    by_hand = torch.relu((seen["x"] - sae.b_dec) @ w_enc + sae.b_enc)  # (T, 32): the standard SAE's encoder
    torch.testing.assert_close(s.features(PROMPT, sae).acts, by_hand, atol=1e-5, rtol=1e-5)
    feature = int(by_hand[-1].argmax())
    handle = block.register_forward_hook(lambda m, a, out: _with_hidden(
        out, _hidden(out) - by_hand[:, feature, None] * w_dec[feature]))  # its decoder contribution taken away
    try:
        expected = _logprobs(s.model, s.encode(PROMPT))
    finally:
        handle.remove()
    with s.intervene(AblateFeature(sae, feature)):
        torch.testing.assert_close(s.next_token(PROMPT).logprobs, expected, atol=1e-5, rtol=0)
    plain = s.next_token(PROMPT).logprobs
    with s.intervene(SteerFeature(sae, feature, 0.0)):  # an edit that changes nothing: the model's output exactly
        assert torch.equal(s.next_token(PROMPT).logprobs, plain)


FEATURES = {  # column of docs/architectures.md -> the test of this module that checks it on every architecture
    "log-probs": test_next_token_logprobs_equal_a_plain_eager_forward,
    "greedy": test_greedy_generation_equals_model_generate,
    "attention rows": test_captured_attention_rows_equal_eager_output_attentions,
    "Lab": test_lab_generates_what_session_generate_gives_and_its_image_equals_eager,
    "head ablation": test_head_ablation_equals_zeroing_the_heads_slice_by_hand,
    "head importance": test_head_importance_equals_each_heads_slice_through_the_projection_by_hand,
    "steering": test_steering_equals_a_hand_written_hook,
    "patching": test_patching_equals_a_hand_written_hook,
    "lens": test_lens_last_layer_equals_the_models_logits,
    "prompt lookup": test_speculative_greedy_equals_plain_greedy,
    "layer skip": test_speculative_greedy_equals_plain_greedy,
    "8-bit": test_8bit_loading_matches_float32,
    "activations": test_cached_last_block_output_through_the_final_norm_and_unembedding_equals_the_logits,
    "gradient attribution": test_gradient_attribution_methods_against_autograd_on_the_eager_model,
    "logit attribution": test_logit_attribution_parts_sum_to_the_eager_models_logit_difference,
    "KV policies": test_kv_policies_that_drop_nothing_generate_what_the_full_cache_does,
    "batch and beams": test_batched_rows_equal_single_runs_and_beam_search_equals_transformers,
    "SAE features": test_sae_features_and_feature_ablation_equal_the_computation_by_hand,
}


def test_the_docs_architecture_table_is_the_matrix():
    page = (Path(__file__).parents[1] / "docs" / "architectures.md").read_text()
    table = page.split("<!-- architectures -->")[1].split("<!-- /architectures -->")[0].strip().splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    header, body = rows[0], rows[2:]
    assert header == ["architecture", *FEATURES]
    assert [r[0] for r in body] == NAMES
    assert all(cell == "✓" for r in body for cell in r[1:])
    for test in FEATURES.values():  # each column's test runs on every architecture of the table
        marks = [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize" and m.args[0] == "arch"]
        assert marks and list(marks[0].args[1]) == NAMES, test.__name__
