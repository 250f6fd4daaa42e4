"""VLM sessions on tiny random-weight models of three families (LLaVA, Qwen2-VL, Gemma 3; tests/tiny_vlms.py),
each checked against transformers' own forward, generate and eager attention, and against edits made by hand."""

from __future__ import annotations

import json

import pytest
import tiny_vlms
import torch
from transformers import LlavaProcessor

import labkit
from labkit.core.errors import InvalidArgument
from labkit.interventions.image import AblatePatches
from labkit.measures.attention import attn_implementation
from labkit.records.figures import problems
from labkit.records.trace import Trace
from labkit.why.vision import alignment, grounding, image_lens

PROMPT = "Describe <image> in one word:"
FAMILIES = list(tiny_vlms.BUILDERS)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_vlms.tokenizer()


@pytest.fixture(scope="module")
def sessions(tokenizer) -> dict[str, labkit.Session]:
    out = {}
    for family in FAMILIES:
        model, processor, tok = tiny_vlms.build(family)
        out[family] = labkit.Session.from_model(model, tok, image_processor=processor)
    return out


PICTURE = tiny_vlms.images((40, 60))


def _own_inputs(s: labkit.Session, prompt: str = PROMPT, images=PICTURE) -> dict[str, torch.Tensor]:
    """The model's inputs made outside the Session's passes: ids, the image processor's pixels, the family's
    token-type ids."""
    made = s.vision.prompt(prompt, images)
    return {"input_ids": made.ids, **made.pixels, **s.vision.per_pass(made.ids)}


@pytest.mark.parametrize("family", FAMILIES)
def test_next_token_and_greedy_generation_with_an_image_equal_transformers(family, sessions):
    s = sessions[family]
    inputs = _own_inputs(s)
    with torch.no_grad():
        own = torch.log_softmax(s.model(**inputs).logits[0, -1].float(), -1)
        reference = s.model.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]), max_new_tokens=8,
                                     min_new_tokens=8, do_sample=False)
    torch.testing.assert_close(s.next_token(PROMPT, images=PICTURE).logprobs, own, atol=1e-5, rtol=0)
    trace = s.generate(PROMPT, images=PICTURE, max_new_tokens=8, stop=[])
    assert trace.token_ids == reference[0, inputs["input_ids"].shape[1]:].tolist()
    layout = s.vision.prompt(PROMPT, PICTURE).layout
    assert trace.images == layout.as_dict() and len(trace.images["positions"]) == len(layout) > 0
    # a text prompt after an image prompt is the model's text forward (no position offset left behind)
    text = s.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = s.model.generate(text, attention_mask=torch.ones_like(text), max_new_tokens=4, min_new_tokens=4,
                                 do_sample=False)
    assert s.generate("The capital of France is", max_new_tokens=4, stop=[]).token_ids == plain[0, -4:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_attention_and_grounding_equal_eager_attention_on_the_image(family, sessions):
    s = sessions[family]
    trace = s.generate(PROMPT, images=PICTURE, max_new_tokens=3, capture=["attention"], stop=[])
    inputs = _own_inputs(s)
    ids = torch.cat([inputs["input_ids"], torch.tensor([trace.token_ids[:-1]])], dim=1)
    inputs.update(input_ids=ids, **s.vision.per_pass(ids))
    if family == "paligemma":  # the generated tokens are the causal suffix after the bidirectional prompt
        inputs["token_type_ids"][:, len(trace.prompt_ids):] = 1
    with torch.no_grad(), attn_implementation(s.model, "eager"):
        eager = torch.stack(s.model(**inputs, output_attentions=True).attentions)[:, 0]  # (L, H, T, T)
    length = len(trace.prompt_ids)
    g = grounding(trace)
    layout = s.vision.prompt(PROMPT, PICTURE).layout
    for i, step in enumerate(trace.steps):
        row = eager[:, :, length - 1 + i, :length + i]  # (L, H, T + i)
        torch.testing.assert_close(step.captures["attention"].probs, row, atol=1e-5, rtol=0)
        torch.testing.assert_close(g.mass[i], row[..., layout.positions], atol=1e-5, rtol=0)
        for view in (0, 1) if layout.view is not None else (0,):  # Idefics3: the tiles, then the thumbnail
            mine = layout.mask(0, view)
            cells = g.map(i, reduce="mean", view=view)
            want = row[..., layout.positions[mine]].mean((0, 1))
            torch.testing.assert_close(cells[layout.row[mine], layout.col[mine]], want, atol=1e-5, rtol=0)
            assert not torch.isnan(cells).any()  # every cell of the grid has its token
    assert 0 < float(g.on_image().max()) <= 1
    assert problems(g.plot(0, PICTURE[0])) == []  # axes, colour bar with its unit


def _by_hand(s: labkit.Session, cells_zeroed: list[int]) -> torch.Tensor:
    """Next-token log-probs with the image tokens at ``cells_zeroed`` (indices among them) set to 0 where they
    enter the language model, written without labkit: the merged input embeddings edited, then inputs_embeds."""
    inputs = _own_inputs(s)
    seen = {}
    lm = _language_model(s)

    def keep(module, args, kwargs):
        seen.update(kwargs)  # the merged embeddings, and the positions and masks the model made for them
        seen.pop("past_key_values", None), seen.pop("cache", None)  # a cache filled by this pass is not reused

    handle = lm.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        s.model(**inputs)
    handle.remove()
    layout = s.vision.prompt(PROMPT, PICTURE).layout
    embeds = seen.pop("inputs_embeds").clone()
    embeds[0, layout.positions[cells_zeroed]] = 0.0
    with torch.no_grad():
        out = lm(inputs_embeds=embeds, **seen)
        logits = s.model.lm_head(out.last_hidden_state[:, -1])
    return torch.log_softmax(logits[0].float(), -1)


def _language_model(s: labkit.Session):
    inner = s.model.model
    return inner.text_model if hasattr(inner, "text_model") else inner.language_model  # Idefics3 | the others


@pytest.mark.parametrize("family", ["llava", "llava_next", "gemma3", "idefics3", "paligemma"])  # Qwen2-VL: next
def test_a_patch_ablation_equals_zeroing_those_positions_by_hand(family, sessions):
    s = sessions[family]
    layout = s.vision.prompt(PROMPT, PICTURE).layout
    cells = [(0, 0), (1, 1)]
    index = [k for k, (rc, on_grid) in enumerate(zip(zip(layout.row.tolist(), layout.col.tolist(), strict=True),
                                                     layout.mask(0, 0).tolist(), strict=True))
             if rc in cells and on_grid]  # view 0 (Idefics3's thumbnail repeats the cells: view 1)
    with s.intervene(AblatePatches(cells)):
        ablated = s.next_token(PROMPT, images=PICTURE).logprobs
    torch.testing.assert_close(ablated, _by_hand(s, index), atol=1e-5, rtol=0)
    plain = s.next_token(PROMPT, images=PICTURE).logprobs
    assert float((plain - ablated).abs().max()) > 1e-4  # the edit reached the output


def test_qwen2_vl_patch_ablation_equals_zeroing_the_merged_features_by_hand(sessions):
    s = sessions["qwen2_vl"]
    inputs = _own_inputs(s)
    layout = s.vision.prompt(PROMPT, PICTURE).layout

    def zero_two(module, args, output):  # the merger's output rows are the image tokens, in prompt order
        output = output.clone()
        output[[0, 4]] = 0.0
        return output

    handle = s.model.model.visual.merger.register_forward_hook(zero_two)
    with torch.no_grad():
        own = torch.log_softmax(s.model(**inputs).logits[0, -1].float(), -1)
    handle.remove()
    cells = [(int(layout.row[k]), int(layout.col[k])) for k in (0, 4)]
    with s.intervene(AblatePatches(cells)):
        torch.testing.assert_close(s.next_token(PROMPT, images=PICTURE).logprobs, own, atol=1e-5, rtol=0)


def test_mean_and_other_image_ablations_and_their_refusals(sessions):
    s = sessions["llava"]
    other = tiny_vlms.images((40, 60), seed=5)
    with s.intervene(AblatePatches(mode="image", source=other)):
        swapped = s.next_token(PROMPT, images=PICTURE).logprobs
    torch.testing.assert_close(swapped, s.next_token(PROMPT, images=other).logprobs, atol=1e-5, rtol=0)
    with s.intervene(AblatePatches(mode="mean")):
        mean = s.next_token(PROMPT, images=PICTURE).logprobs
    assert float((mean - s.next_token(PROMPT, images=PICTURE).logprobs).abs().max()) > 1e-4
    with pytest.raises(InvalidArgument, match="outside image 0's 3 × 3 grid"), s.intervene(AblatePatches([(5, 0)])):
        s.next_token(PROMPT, images=PICTURE)
    with pytest.raises(InvalidArgument, match="mode must be one of"):
        AblatePatches(mode="blur")


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_and_projector_sites_equal_the_towers_own_outputs(family, sessions):
    s = sessions[family]
    names = [n for n in s.sites.names() if n.startswith("vision.") or n == "projector"]
    assert names[-1] == "projector" and len(names) == 3
    acts = s.activations(PROMPT, names, images=PICTURE)
    pixels = s.vision.prompt(PROMPT, PICTURE).pixels
    with torch.no_grad():
        features = s.model.model.get_image_features(**pixels)
    merged = features.pooler_output if hasattr(features, "pooler_output") else features
    merged = torch.cat(list(merged)) if isinstance(merged, (tuple, list)) else merged
    rows, want = acts["projector"].reshape(-1, merged.shape[-1]), merged.reshape(-1, merged.shape[-1])
    if family == "llava_next":  # the projector sees every tile whole; the model packs (unpads, adds row ends) after
        with torch.no_grad():
            tiles = s.model.model.multi_modal_projector(
                s.model.model.vision_tower(pixels["pixel_values"][0], output_hidden_states=True)
                .hidden_states[s.model.config.vision_feature_layer][:, 1:])
        want = tiles.reshape(-1, merged.shape[-1])
    elif family == "qwen2_5_vl":  # its merger runs in the tower's window order; the model restores raster order after
        order = torch.cdist(want, rows).argmin(-1)
        assert sorted(order.tolist()) == list(range(len(rows)))
        rows = rows[order]
    torch.testing.assert_close(rows, want)
    layout = s.vision.prompt(PROMPT, PICTURE).layout
    entering = s.activations(PROMPT, ["blocks.0.resid_pre"], images=PICTURE)["blocks.0.resid_pre"]
    torch.testing.assert_close(entering[layout.positions], merged.reshape(-1, merged.shape[-1]))  # what the LM reads


def test_llava_prompts_equal_the_llava_processors_own(tokenizer, sessions):
    s = sessions["llava"]
    tok = tiny_vlms.tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tok.convert_tokens_to_ids("<image>") == tiny_vlms.IMAGE - 1  # the next free id
    processor = LlavaProcessor(image_processor=s.vision.image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>")
    theirs = processor(text="Compare <image> with <image> please", images=PICTURE * 2, return_tensors="pt")
    mine = s.vision.prompt("Compare <image> with <image> please", PICTURE * 2)
    mapped = theirs.input_ids.clone()
    mapped[mapped == tiny_vlms.IMAGE - 1] = tiny_vlms.IMAGE  # the same token under the tiny model's id
    assert mine.ids.tolist() == mapped.tolist()
    torch.testing.assert_close(mine.pixels["pixel_values"], theirs.pixel_values)


def test_alignment_and_image_lens_equal_the_computation_by_hand(sessions):
    s = sessions["llava"]
    a = alignment(s, PROMPT, PICTURE, k=3)
    layout = s.vision.prompt(PROMPT, PICTURE).layout
    entering = s.activations(PROMPT, ["blocks.0.resid_pre"], images=PICTURE)["blocks.0.resid_pre"]
    table = s.model.get_input_embeddings().weight.detach()
    sims = torch.nn.functional.cosine_similarity(entering[layout.positions][:, None], table[None], dim=-1)
    torch.testing.assert_close(a.cosine, sims.topk(3, dim=-1).values, atol=1e-5, rtol=0)
    assert list(a.to_pandas().columns[:4]) == ["image", "row", "col", "nearest"] and len(a.to_pandas()) == 9
    top, lay = image_lens(s, PROMPT, PICTURE)
    last = s.activations(PROMPT, ["final_norm"], images=PICTURE)["final_norm"][lay.positions]
    assert top[-1].tolist() == s.model.lm_head(last).argmax(-1).tolist()


def test_image_traces_save_and_load_and_image_mistakes_are_refused(sessions, tmp_path):
    s = sessions["gemma3"]
    trace = s.generate(PROMPT, images=PICTURE, max_new_tokens=2, stop=[])
    back = Trace.load(trace.save(tmp_path / "t.json"))
    assert back.images == trace.images and back.images["grids"] == [[2, 2]]
    with pytest.raises(InvalidArgument, match="has 2 '<image>' marks for 1 images"):
        s.next_token("<image> and <image>", images=PICTURE)
    with pytest.raises(InvalidArgument, match=r"images\[0\] must be a PIL image"):
        s.next_token(PROMPT, images=[3])
    with pytest.raises(InvalidArgument, match="recomputing a step needs them"):
        s.logit_attribution_step(trace, 0)
    maps = s.attention(PROMPT, images=PICTURE)
    assert maps.image_block == trace.images["positions"] and maps.tokens[trace.images["positions"][0]] == "<img 0:0,0>"
    picture = maps.plot(0, 1)
    assert problems(picture) == [] and "image tokens' block" in picture.title


def test_a_saved_vlm_folder_loads_and_the_cli_takes_images(tmp_path, tokenizer):
    from click.testing import CliRunner

    from labkit.ui.cli import main

    model, processor, _ = tiny_vlms.build("llava")
    folder = tmp_path / "tiny-llava"
    model.save_pretrained(folder)  # safetensors
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    s = labkit.Session(str(folder))
    assert type(s.model).__name__ == "LlavaForConditionalGeneration" and s.vision.family == "llava"
    reference = labkit.Session.from_model(model, tokenizer, image_processor=processor)
    torch.testing.assert_close(s.next_token(PROMPT, images=PICTURE).logprobs,
                               reference.next_token(PROMPT, images=PICTURE).logprobs, atol=1e-5, rtol=0)
    path = tmp_path / "picture.png"
    PICTURE[0].save(path)
    out = CliRunner().invoke(main, ["next", PROMPT, "--model", str(folder), "--image", str(path), "--json",
                                    "--top", "3"])
    assert out.exit_code == 0, out.output
    top = json.loads(out.output)["top"]
    want = reference.next_token(PROMPT, images=[path]).top(3)
    assert [row["token_id"] for row in top] == [i for _, i, _ in want]
    out = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(folder), "--image", str(path),
                                    "--max-new-tokens", "4", "--stop", "."])
    assert out.exit_code == 0, out.output
    assert reference.generate(PROMPT, images=[path], max_new_tokens=4, stop=["."]).text in out.output


@pytest.mark.parametrize("family", FAMILIES)
def test_image_token_attribution_ig_is_complete_and_saliency_is_the_gradient_by_hand(family, sessions):
    from labkit.why.vision import attribute_image

    s = sessions[family]
    ig = attribute_image(s, PROMPT, PICTURE, quantity="logprob", steps=16)
    a = ig.attribution
    assert a.completeness_error < 0.01 and a.target_id == int(s.next_token(PROMPT, images=PICTURE).logprobs.argmax())
    assert a.value == pytest.approx(float(s.next_token(PROMPT, images=PICTURE).logprobs[a.target_id]), abs=1e-5)
    layout = ig.layout
    text = torch.ones(len(a.scores), dtype=torch.bool)
    text[layout.positions] = False
    assert torch.tensor(a.scores)[text].abs().max() == 0  # the black baseline changes the image tokens only
    assert sum(a.scores) == pytest.approx(a.value - a.baseline_value, rel=0.01)
    cells = ig.map(0)
    assert cells.shape == layout.grids[0] and not torch.isnan(cells).any()
    # saliency by hand: the gradient of log p(target) with respect to the merged input embeddings
    inputs = _own_inputs(s)
    lm = _language_model(s)
    seen = {}

    def keep(module, args, kwargs):
        seen.update(kwargs)
        seen.pop("past_key_values", None), seen.pop("cache", None)  # a cache filled by this pass is not reused

    handle = lm.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        s.model(**inputs)
    handle.remove()
    embeds = seen.pop("inputs_embeds").detach().clone().requires_grad_()
    out = lm(inputs_embeds=embeds, **seen)
    logp = torch.log_softmax(s.model.lm_head(out.last_hidden_state[:, -1]).float(), -1)[0, a.target_id]
    (grad,) = torch.autograd.grad(logp, embeds)
    sal = attribute_image(s, PROMPT, PICTURE, method="saliency", quantity="logprob")
    torch.testing.assert_close(torch.tensor(sal.attribution.scores), grad[0].norm(dim=-1), atol=1e-5, rtol=1e-4)


def test_pixel_attribution_is_complete_and_refused_where_pixels_are_patches(sessions):
    from labkit.why.vision import attribute_image

    s = sessions["llava"]
    ig = attribute_image(s, PROMPT, PICTURE, to="pixels", quantity="logprob", steps=16)
    assert ig.pixels.shape == (1, 42, 42) and ig.attribution.completeness_error < 0.01
    assert float(ig.pixels.sum()) == pytest.approx(ig.attribution.value - ig.attribution.baseline_value, rel=0.01)
    made = s.vision.prompt(PROMPT, PICTURE)
    view = s.vision.view(made)
    assert view.size == (42, 42)  # what the model saw: the centre crop, resized
    assert problems(ig.plot(view)) == []
    with pytest.raises(InvalidArgument, match="flattens patches"):
        attribute_image(sessions["qwen2_vl"], PROMPT, PICTURE, to="pixels")


def test_the_lab_shows_the_image_and_the_hovered_tokens_attention_on_it(sessions):
    pytest.importorskip("anywidget")
    from labkit.ui.panels import Lab

    s = sessions["llava"]
    lab = Lab(s, chat=False, prompt=PROMPT, max_new_tokens=3, images=PICTURE)
    try:
        lab.run()
        lab.wait(60)
        assert len(lab.trace) == 3 and lab.trace.images["grids"] == [[3, 3]]
        same = s.generate(PROMPT, images=PICTURE, max_new_tokens=3, sampler=lab.controls.sampler, seed=0)
        assert lab.trace.token_ids == same.token_ids
        assert lab._prompt_maps.image_block == lab.trace.images["positions"]  # the attention image has the image
        plain = lab.picture.value
        assert plain[:4] == b"\x89PNG" and "hover a token" in lab.picture_label.value
        lab.stream.hovered = 2  # what the view sets when the pointer enters a token
        assert lab.picture.value != plain and lab.picture_label.value.startswith("step 2 ")
        lab.stream.selected = 1
        lab.wait_why()
        assert lab.picture_label.value.startswith("step 1 ")
    finally:
        lab.close()
    with pytest.raises(InvalidArgument, match="needs a vision-language model"):
        Lab(labkit.Session.from_model(*_text_model()), images=PICTURE)


def _text_model():
    import transformers as tf

    config = tf.LlamaConfig(**{k: v for k, v in tiny_vlms.TEXT.items()})
    return tf.LlamaForCausalLM(config).eval(), tiny_vlms.tokenizer()


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])  # M-RoPE offsets; tiles
def test_image_prompts_through_beams_batches_speculative_rounds_and_kv_policies(family, sessions):
    from labkit.sampling import Classic
    from labkit.sampling.beam import BeamSearch
    from labkit.speculative import PromptLookupDraft

    s = sessions[family]
    inputs = _own_inputs(s)
    plain = s.generate(PROMPT, images=PICTURE, max_new_tokens=6, stop=[])
    with torch.no_grad():
        beams = s.model.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]), num_beams=3,
                                 max_new_tokens=5, min_new_tokens=5, do_sample=False, early_stopping=True)
    ours = s.generate(PROMPT, images=PICTURE, max_new_tokens=5, beam=BeamSearch(num_beams=3), stop=[])
    assert ours.token_ids == beams[0, inputs["input_ids"].shape[1]:].tolist()
    fast = s.generate(PROMPT, images=PICTURE, max_new_tokens=6, stop=[], speculative=PromptLookupDraft(ngram=1))
    assert fast.token_ids == plain.token_ids
    rows = s.generate(PROMPT, images=PICTURE, max_new_tokens=4, n=3, seed=7, sampler=Classic(temperature=1.5))
    for b, trace in enumerate(rows):  # row b of the batch is the single run with seed 7 + b
        alone = s.generate(PROMPT, images=PICTURE, max_new_tokens=4, seed=7 + b, sampler=Classic(temperature=1.5))
        assert trace.token_ids == alone.token_ids
    kept = s.generate(PROMPT, images=PICTURE, max_new_tokens=6, stop=[], kv="quant:bits=8,residual=64,group=16")
    assert kept.token_ids == plain.token_ids and kept.steps[-1].kv["bytes"] > 0  # residual holds every position


def test_tiled_images_views_and_thumbnail_ablation(sessions):
    wide = tiny_vlms.images((40, 100))
    s = sessions["idefics3"]
    made = s.vision.prompt(PROMPT, wide)
    assert made.tiles == [(1, 2)] and s.vision.view(made).size == (112, 56)  # two 56-pixel tiles side by side
    assert s.vision.view(made, view=1).size == (56, 56)  # the global thumbnail
    thumb = made.layout.mask(0, 1)
    index = thumb.nonzero().flatten()[[0, 3]].tolist()  # the thumbnail's cells (0, 0) and (1, 1)
    assert [(int(made.layout.row[k]), int(made.layout.col[k])) for k in index] == [(0, 0), (1, 1)]
    with s.intervene(AblatePatches([(0, 0), (1, 1)], view=1)):
        ablated = s.next_token(PROMPT, images=wide).logprobs
    inputs = {"input_ids": made.ids, **made.pixels}
    seen = {}

    def keep(module, args, kwargs):
        seen.update(kwargs)
        seen.pop("past_key_values", None), seen.pop("cache", None)

    lm = _language_model(s)
    handle = lm.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        s.model(**inputs)
    handle.remove()
    embeds = seen.pop("inputs_embeds").clone()
    embeds[0, made.layout.positions[index]] = 0.0
    with torch.no_grad():
        logits = s.model.lm_head(lm(inputs_embeds=embeds, **seen).last_hidden_state[:, -1])
    torch.testing.assert_close(ablated, torch.log_softmax(logits[0].float(), -1), atol=1e-5, rtol=0)
    with pytest.raises(InvalidArgument, match="view must be 0"):
        sessions["llava"].vision.prompt(PROMPT, PICTURE).layout.of_image(0, view=1)
    n = sessions["llava_next"]
    made = n.vision.prompt(PROMPT, wide)
    rows, cols = made.layout.grids[0]
    assert n.vision.view(made).size == (cols * 14, rows * 14)  # the tiles with the padding cut off, 14 px a cell
    assert n.vision.view(made, view=1).size == (28, 28)
    assert n.attention(PROMPT, images=wide).tokens.count("<img 0:end of row 0>") == 1


def test_paligemma_2s_gemma_2_language_model_gets_its_sandwich_norms_and_logit_attribution_adds_up():
    import transformers as tf

    torch.manual_seed(0)
    text = tf.Gemma2Config(**dict(tiny_vlms.TEXT, head_dim=16))
    config = tf.PaliGemmaConfig(vision_config=tf.SiglipVisionConfig(**tiny_vlms.VISION, image_size=28, patch_size=14),
                                text_config=text, image_token_index=tiny_vlms.IMAGE, projection_dim=64)
    processor = tf.SiglipImageProcessorPil(size={"height": 28, "width": 28})
    s = labkit.Session.from_model(tf.PaliGemmaForConditionalGeneration(config).eval(), tiny_vlms.tokenizer(),
                                  image_processor=processor)
    assert s.sites.adapter.attn_post == "post_attention_layernorm"
    ids = s.encode("The capital of France is")
    with torch.no_grad():
        logits = s.model(input_ids=ids).logits[0, -1].float()
    la = s.logit_attribution("The capital of France is")  # refuses unless its parts add up to the model's logit
    assert la.total == pytest.approx(float(logits[la.token_id]), abs=5e-4)  # float32 sums of every part
    inputs = _own_inputs(s)
    with torch.no_grad():
        own = torch.log_softmax(s.model(**inputs).logits[0, -1].float(), -1)
    torch.testing.assert_close(s.next_token(PROMPT, images=PICTURE).logprobs, own, atol=1e-5, rtol=0)
