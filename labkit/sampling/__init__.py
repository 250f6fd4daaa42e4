"""Samplers: transformers-style logits processors with a seeded draw."""

from labkit.sampling.base import Classic, Greedy, Sampler

__all__ = ["Classic", "Greedy", "Sampler"]
