"""Layers 3–4: the generation settings, THE decoding loop, beam search, KV-cache policies."""
