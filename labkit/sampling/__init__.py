"""Samplers: transformers-style logits processors with a seeded draw, and tools to compare them."""

from labkit.sampling.base import Classic, Greedy, Sampler, TopNSigmaLogitsWarper, check_param
from labkit.sampling.entropix import Entropix, EntropixConfig
from labkit.sampling.guided import EntropyGuided
from labkit.sampling.measure import SamplingInfo, sampling_info, sampling_info_of
from labkit.sampling.mirostat import Mirostat

__all__ = ["Classic", "Entropix", "EntropixConfig", "EntropyGuided", "Greedy", "Mirostat", "Sampler",
           "SamplingInfo", "TopNSigmaLogitsWarper", "check_param", "sampling_info", "sampling_info_of"]

from labkit.sampling.compare import distinct_n, evaluate, repetition_rate, summarize
from labkit.sampling.contrastive import ContrastiveDecoding, ContrastiveSearch, DoLa
from labkit.sampling.registry import SAMPLERS, label, parse_sampler

__all__ += ["SAMPLERS", "distinct_n", "evaluate", "label", "parse_sampler", "repetition_rate", "summarize"]
__all__ += ["ContrastiveDecoding", "ContrastiveSearch", "DoLa"]
