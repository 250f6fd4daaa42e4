"""The KV cache of one generation: a new cache, a cached forward pass, and cropping back (speculative rollback).

The decoding loop and the drafts use these three and nothing else of transformers' cache classes.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


def forward_cached(model: Any, input_ids: torch.Tensor, cache: Any, logits_to_keep: int = 1) -> torch.Tensor:
    """One causal-LM forward pass that extends ``cache`` in place; returns the last ``logits_to_keep`` positions'
    raw logits (1, logits_to_keep, V). transformers ≥ 5.24 names the cache argument ``cache`` (``past_key_values``
    is deprecated); older 5.x releases accept only ``past_key_values``."""
    key = _cache_argument(type(model))
    return model(input_ids=input_ids, use_cache=True, logits_to_keep=logits_to_keep, **{key: cache}).logits


def new_cache() -> Any:
    """An empty KV cache for one generation: a transformers ``DynamicCache`` that keeps every position in every
    layer. Deliberately built without the model's config: with it, sliding-window layers keep only their last
    window − 1 keys, so captured attention rows would no longer line up with positions and ``crop`` (speculative
    rollback) fails once the window is reached. Without it the sliding window is applied by the attention mask
    alone (transformers builds the mask from ``config.sliding_window``), which gives the same attention: exact,
    at the memory cost of a full cache."""
    from transformers import DynamicCache

    return DynamicCache()


@functools.cache
def _cache_argument(model_type: type) -> str:
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def crop(cache: Any, length: int) -> None:
    """Cut every layer of a transformers cache to its first ``length`` positions (layers may differ in length)."""
    for layer in cache.layers:
        extra = layer.get_seq_length() - length
        if extra > 0:
            layer.crop(-extra)
