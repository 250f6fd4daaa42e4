"""Image tokens of vision-language prompts mapped to (image, row, column), checked against each family's own layout
on tiny random VLMs built from transformers config classes (the default tokenizer plus the image tokens)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
)

from labkit.model import models
from labkit.model.vlm import UnsupportedVLM, image_positions

TEXT = dict(vocab_size=49160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def _tokenizer(*special: str):
    tok = AutoTokenizer.from_pretrained(str(models.prepare_default_model(progress=False)), local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": list(special)})
    return tok


def _images(*sizes: tuple[int, int]) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]


def test_llava_image_tokens_map_to_the_vision_towers_patches_row_by_row():
    torch.manual_seed(0)
    tok = _tokenizer("<image>")
    image_id = tok.convert_tokens_to_ids("<image>")
    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=2, image_size=42, patch_size=14),
                         text_config=LlamaConfig(**TEXT), image_token_index=image_id)
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 42},
                                                                  crop_size={"height": 42, "width": 42}),
                               tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, image_token="<image>")
    inputs = processor(text="Compare <image> with <image> please", images=_images((40, 60), (50, 30)),
                       return_tensors="pt")
    layout = image_positions(config, inputs.input_ids)
    assert len(layout) == 18 and layout.grids == ((3, 3), (3, 3))
    assert layout.image.tolist() == [0] * 9 + [1] * 9
    assert (inputs.input_ids[0, layout.positions] == image_id).all()
    # the language model receives image feature k of image i at position positions[9 i + k] ...
    seen = {}

    def keep(module, args, kwargs):
        seen["h"] = kwargs.get("hidden_states", args[0] if args else None)

    handle = model.model.language_model.layers[0].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
            features = model.model.get_image_features(pixel_values=inputs.pixel_values)
    finally:
        handle.remove()
    features = torch.cat(list(features.pooler_output if hasattr(features, "pooler_output") else features))
    torch.testing.assert_close(seen["h"][0, layout.positions], features.reshape(-1, features.shape[-1]))
    # ... and feature k comes from the patch at (row, col) = divmod(k, 3): the tower's token k + 1 (after CLS) is
    # the patch embedding of that cell of the image
    embeddings = model.model.vision_tower.embeddings
    with torch.no_grad():
        conv = embeddings.patch_embedding(inputs.pixel_values[:1])  # (1, C, 3, 3)
        tokens = embeddings(inputs.pixel_values[:1])[0, 1:] - embeddings.position_embedding.weight[1:]
    first = layout.image == 0
    for k, (row, col) in enumerate(zip(layout.row[first].tolist(), layout.col[first].tolist(), strict=True)):
        torch.testing.assert_close(tokens[k], conv[0, :, row, col])


def test_qwen2_vl_image_tokens_match_the_models_own_rope_grid():
    torch.manual_seed(0)
    tok = _tokenizer("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")
    pad, start, end = (tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
    config = Qwen2VLConfig(text_config=dict(**TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
                           vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14,
                                              spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
                           image_token_id=pad, vision_start_token_id=start, vision_end_token_id=end)
    model = Qwen2VLForConditionalGeneration(config).eval()
    pixels = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                   temporal_patch_size=2)(images=_images((60, 100), (110, 50)), return_tensors="pt")
    counts = (pixels.image_grid_thw.prod(-1) // 4).tolist()  # what Qwen2VLProcessor expands each pad into
    ids = tok("Look").input_ids
    for n in counts:
        ids += [start, *[pad] * n, end]
    ids = torch.tensor([ids + tok(" and say").input_ids])
    layout = image_positions(config, ids, pixels.image_grid_thw)
    assert len(layout) == sum(counts) and [r * c for r, c in layout.grids] == counts
    kinds = (ids == pad).int()  # text 0, image 1: what the processor returns as mm_token_type_ids
    with torch.no_grad():  # the model accepts the prompt (it checks that image tokens and features agree) ...
        model(input_ids=ids, pixel_values=pixels.pixel_values, image_grid_thw=pixels.image_grid_thw,
              mm_token_type_ids=kinds)
        rope, _ = model.model.get_rope_index(ids, kinds, pixels.image_grid_thw, None, torch.ones_like(ids))
    for i in range(len(counts)):  # the model's own (height, width) position ids of each image token
        mine = layout.image == i
        h, w = rope[1, 0, layout.positions[mine]], rope[2, 0, layout.positions[mine]]
        assert (h - h.min()).tolist() == layout.row[mine].tolist()
        assert (w - w.min()).tolist() == layout.col[mine].tolist()


def test_an_unsupported_vlm_family_is_refused_by_name():
    with pytest.raises(UnsupportedVLM, match="paligemma, qwen2_5_vl, qwen2_vl models; got model_type 'llama'"):
        image_positions(LlamaConfig(**TEXT), torch.tensor([1, 2, 3]))


def test_idefics3_tiles_and_thumbnail_match_the_processors_tags_and_the_pixel_shuffle():
    import tiny_vlms
    from transformers import Idefics3Processor

    from labkit.model.vlm import Vision

    model, image_processor, tok = tiny_vlms.build("idefics3")
    vision = Vision(model.config, tok, image_processor)
    pictures = tiny_vlms.images((40, 100), (90, 90))  # 1 × 2 and 2 × 2 tiles
    made = vision.prompt("Look <image> and <image> now", pictures)
    theirs = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4)(
        text="Look <image> and <image> now", images=pictures, return_tensors="pt")
    assert made.ids.tolist() == theirs.input_ids.tolist()  # the processor's own prompt, token for token
    torch.testing.assert_close(made.pixels["pixel_values"], theirs.pixel_values)
    lay = made.layout
    assert made.tiles == [(1, 2), (2, 2)] and lay.grids == ((2, 4), (4, 4)) and lay.thumbnail == (2, 2)
    # each tile's tokens follow its <row_r_col_c> tag: the cell's tile is (row // 2, col // 2)
    tags = {tok.convert_tokens_to_ids(f"<row_{r + 1}_col_{c + 1}>"): (r, c) for r in range(6) for c in range(6)}
    ids = made.ids[0].tolist()
    for p, row, col, view in zip(*(t.tolist() for t in (lay.positions, lay.row, lay.col, lay.view)), strict=True):
        tag = next(ids[q] for q in range(p, -1, -1) if ids[q] in tags or ids[q] == tok.convert_tokens_to_ids(
            "<global-img>"))
        assert tags.get(tag, "thumbnail") == ((row // 2, col // 2) if view == 0 else "thumbnail")
    # within a tile, the connector's token k is the 2 × 2 block of patches at (k // 2, k % 2): pixel shuffle
    connector = model.model.connector
    for k in range(4):
        r, c = divmod(k, 2)
        x = torch.zeros(1, 4, 4, 32)
        x[0, 2 * r:2 * r + 2, 2 * c:2 * c + 2] = 1.0
        with torch.no_grad():
            out = connector(x.reshape(1, 16, 32))[0]  # (4, d_model)
        assert out.abs().sum(-1).nonzero().flatten().tolist() == [k]


def test_llava_next_thumbnail_tiles_and_row_ends_match_the_processor_and_the_models_packing():
    import tiny_vlms
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
    )

    from labkit.model.vlm import Vision

    model, image_processor, tok = tiny_vlms.build("llava_next")
    vision = Vision(model.config, tok, image_processor)
    pictures = tiny_vlms.images((40, 100), (90, 50))  # wide: 1 × 2 tiles, rows cut; tall: 2 × 1, columns cut
    made = vision.prompt("Compare <image> with <image>", pictures)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    theirs = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                image_token="<image>")(text="Compare <image> with <image>", images=pictures,
                                                        return_tensors="pt")
    mapped = theirs.input_ids.clone()
    mapped[mapped == tok.convert_tokens_to_ids("<image>")] = tiny_vlms.IMAGE
    assert made.ids.tolist() == mapped.tolist()  # the processor's own count of image tokens, in place
    lay = made.layout
    # features that say where they come from: (image, tile, row, col) of the tower's grid, through the model's packing
    side = 2
    coded = []
    for i, size in enumerate(made.pixels["image_sizes"].tolist()):
        n = image_size_to_num_patches(size, model.config.image_grid_pinpoints, 28)  # thumbnail + this image's tiles
        tile, r, c = torch.meshgrid(torch.arange(n), torch.arange(side), torch.arange(side), indexing="ij")
        coded.append(torch.stack([torch.full_like(tile, i), tile, r, c], -1).reshape(n, side * side, 4).float())
    packed, _ = model.model.pack_image_features(coded, made.pixels["image_sizes"], "default",
                                                image_newline=torch.full((4,), -1.0))
    packed = torch.cat(packed)  # (image tokens, 4) in prompt order
    assert len(packed) == len(lay)
    for k in range(len(lay)):
        image, tile, r, c = packed[k].long().tolist()
        view = int(lay.view[k])
        if view == 2:  # the end-of-row vector
            assert packed[k].tolist() == [-1.0] * 4 and int(lay.col[k]) == lay.grids[int(lay.image[k])][1]
        elif view == 1:  # the thumbnail: the tower's first crop
            assert (image, tile, r, c) == (int(lay.image[k]), 0, int(lay.row[k]), int(lay.col[k]))
        else:  # a cell of the tiles' grid: its tile and place in it, the padding's offset taken off
            size = made.pixels["image_sizes"][image].tolist()
            _, cols = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, 28)
            assert image == int(lay.image[k])
            full_row, full_col = ((tile - 1) // cols) * side + r, ((tile - 1) % cols) * side + c
            offsets = {(full_row - int(lay.row[j]), full_col - int(lay.col[j])) for j in range(len(lay))
                       if int(lay.image[j]) == image and int(lay.view[j]) == 0}
            assert (full_row - int(lay.row[k]), full_col - int(lay.col[k])) in offsets


def test_paligemma_prompts_equal_the_paligemma_processors_own():
    import tiny_vlms
    from transformers import PaliGemmaProcessor

    from labkit.model.vlm import Vision

    model, image_processor, tok = tiny_vlms.build("paligemma")
    mine = Vision(model.config, tok, image_processor).prompt("<image>caption en", tiny_vlms.images((40, 60)))
    theirs_tok = tiny_vlms.tokenizer()  # the processor adds its own tokens to the tokenizer it is given
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=theirs_tok)
    theirs = processor(text="<image>caption en", images=tiny_vlms.images((40, 60)), return_tensors="pt")
    mapped = theirs.input_ids.clone()
    mapped[mapped == processor.image_token_id] = tiny_vlms.IMAGE
    assert mine.ids.tolist() == mapped.tolist()  # images first, then BOS, the text and "\n"
    assert (theirs.token_type_ids == 0).all()  # the whole prompt is the prefix: what labkit passes
    torch.testing.assert_close(mine.pixels["pixel_values"], theirs.pixel_values)
    assert mine.layout.grids == ((2, 2),) and mine.layout.positions.tolist() == [0, 1, 2, 3]
