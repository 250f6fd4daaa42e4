"""Tiny random-weight vision-language models of seven families, built from transformers config classes with the
default tokenizer (its vocabulary plus a few ids for the image tokens): LLaVA (CLIP tower, one token per patch),
LLaVA-NeXT (a thumbnail, then tiles of the best-fitting resolution unpadded, an end-of-row token per row),
Qwen2-VL and Qwen2.5-VL (merged 2 × 2 patches, M-RoPE; 2.5's tower attends in windows), Gemma 3 (SigLIP tower,
pooled tokens, bidirectional image blocks), PaliGemma (images first, the whole prompt a bidirectional prefix) and
Idefics3 / SmolVLM (images split into tiles plus a global thumbnail, pixel shuffle; its tags added to the
tokenizer as SmolVLM's tokenizer has them). Each builder returns (model, image processor, tokenizer)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import transformers as tf
from PIL import Image

from labkit.model import models

VOCAB = 49152  # the default tokenizer's vocabulary; ids from here on are the image tokens
IMAGE, BEGIN, END = VOCAB + 1, VOCAB + 2, VOCAB + 3
TEXT = dict(vocab_size=VOCAB + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def tokenizer() -> Any:
    return tf.AutoTokenizer.from_pretrained(str(models.prepare_default_model(progress=False)), local_files_only=True)


def images(*sizes: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]


def llava() -> tuple[Any, Any, Any]:
    config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**VISION, image_size=42, patch_size=14),
                            text_config=tf.LlamaConfig(**TEXT), image_token_index=IMAGE)
    processor = tf.CLIPImageProcessorPil(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42})
    return tf.LlavaForConditionalGeneration(config).eval(), processor, tokenizer()


PINPOINTS = [[28, 56], [56, 28], [56, 56]]


def llava_next() -> tuple[Any, Any, Any]:
    vision = tf.CLIPVisionConfig(**VISION, image_size=28, patch_size=14)  # 2 × 2 patches a tile
    config = tf.LlavaNextConfig(vision_config=vision, text_config=tf.LlamaConfig(**TEXT),
                                image_grid_pinpoints=PINPOINTS, image_token_index=IMAGE)
    processor = tf.LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                              image_grid_pinpoints=PINPOINTS)
    return tf.LlavaNextForConditionalGeneration(config).eval(), processor, tokenizer()


def qwen2_vl() -> tuple[Any, Any, Any]:
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = dict(TEXT, bos_token_id=1, eos_token_id=2, rope_parameters=rope)
    config = tf.Qwen2VLConfig(text_config=text, vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2,
                                                                    patch_size=14, spatial_merge_size=2,
                                                                    temporal_patch_size=2),
                              image_token_id=IMAGE, vision_start_token_id=BEGIN, vision_end_token_id=END)
    processor = tf.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                         temporal_patch_size=2)
    return tf.Qwen2VLForConditionalGeneration(config).eval(), processor, tokenizer()


def qwen2_5_vl() -> tuple[Any, Any, Any]:
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = dict(TEXT, bos_token_id=1, eos_token_id=2, rope_parameters=rope)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                 vision_start_token_id=BEGIN, vision_end_token_id=END)
    processor = tf.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                            temporal_patch_size=2)
    return tf.Qwen2_5_VLForConditionalGeneration(config).eval(), processor, tokenizer()


def gemma3() -> tuple[Any, Any, Any]:
    text = tf.Gemma3TextConfig(**TEXT, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
    config = tf.Gemma3Config(text_config=text, vision_config=tf.SiglipVisionConfig(**VISION, image_size=56,
                                                                                    patch_size=14),
                             mm_tokens_per_image=4, image_token_index=IMAGE, boi_token_index=BEGIN,
                             eoi_token_index=END)
    processor = tf.Gemma3ImageProcessorPil(size={"height": 56, "width": 56}, do_pan_and_scan=False)
    model = tf.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers initialises the projection at zero: every image would look the same
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.2)
    return model, processor, tokenizer()


IDEFICS3_TAGS = ["<image>", "<fake_token_around_image>", "<global-img>",
                 *(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))]


def idefics3() -> tuple[Any, Any, Any]:
    tok = tokenizer()
    tok.add_special_tokens({"additional_special_tokens": IDEFICS3_TAGS})  # ids 49152.. (SmolVLM's has them too)
    vision = tf.Idefics3VisionConfig(**VISION, image_size=56, patch_size=14)  # 4 × 4 patches, shuffled to 2 × 2
    config = tf.Idefics3Config(vision_config=vision, text_config=tf.LlamaConfig(**dict(TEXT, vocab_size=VOCAB + 48)),
                               scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
    processor = tf.Idefics3ImageProcessorPil(size={"longest_edge": 112}, max_image_size={"longest_edge": 56},
                                             do_image_splitting=True)
    return tf.Idefics3ForConditionalGeneration(config).eval(), processor, tok


def paligemma() -> tuple[Any, Any, Any]:
    text = tf.GemmaConfig(**dict(TEXT, head_dim=16))
    config = tf.PaliGemmaConfig(vision_config=tf.SiglipVisionConfig(**VISION, image_size=28, patch_size=14),
                                text_config=text, image_token_index=IMAGE, projection_dim=64)
    processor = tf.SiglipImageProcessorPil(size={"height": 28, "width": 28})
    processor.image_seq_length = 4  # what PaliGemmaProcessor reads
    return tf.PaliGemmaForConditionalGeneration(config).eval(), processor, tokenizer()


BUILDERS = {"llava": llava, "llava_next": llava_next, "qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl, "gemma3": gemma3,
            "idefics3": idefics3, "paligemma": paligemma}


def build(family: str, seed: int = 0) -> tuple[Any, Any, Any]:
    torch.manual_seed(seed)
    return BUILDERS[family]()
