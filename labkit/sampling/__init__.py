"""Samplers: transformers-style logits processors with a seeded draw, and tools to compare them."""

from labkit.sampling.base import Classic, Greedy, Sampler, TopNSigmaLogitsWarper
from labkit.sampling.entropix import Entropix, EntropixConfig
from labkit.sampling.guided import EntropyGuided
from labkit.sampling.measure import SamplingInfo, sampling_info, sampling_info_of
from labkit.sampling.mirostat import Mirostat

__all__ = ["Classic", "Entropix", "EntropixConfig", "EntropyGuided", "Greedy", "Mirostat", "Sampler",
           "SamplingInfo", "TopNSigmaLogitsWarper", "sampling_info", "sampling_info_of"]

from labkit.sampling.beam import BeamSearch
from labkit.sampling.compare import distinct_n, evaluate, repetition_rate, summarize
from labkit.sampling.contrastive import ContrastiveDecoding, ContrastiveSearch, DoLa
from labkit.sampling.params import Param, Tunable, describe
from labkit.sampling.registry import SAMPLERS, check_param, label, name_of, parse_sampler, register

__all__ += ["SAMPLERS", "BeamSearch", "Param", "Tunable", "check_param", "describe", "distinct_n", "evaluate", "label",
            "name_of", "parse_sampler", "register", "repetition_rate", "summarize"]
__all__ += ["ContrastiveDecoding", "ContrastiveSearch", "DoLa"]
