"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023), exact and instrumented.

A *draft* proposes γ tokens; the target verifies them all in one forward pass with its KV cache (THE decoding loop
in :mod:`labkit.decoding.loop` runs one round at a time through a :class:`~labkit.speculative.speculator.Speculator`);
rejected tokens' cache entries are cropped. Every Step records its round and whether its token was drafted and
accepted or drawn by the target.

Layers: :mod:`.rule` (the exact acceptance rule, nothing else), :mod:`.drafts` (what proposes), :mod:`.speculator`
(the loop's bookkeeping and :class:`~labkit.speculative.speculator.SpeculativeStats`), :mod:`.measure` (speed
against plain decoding, above the Session).
"""

from labkit.speculative.drafts import (
    DRAFT_SPECS,
    NOTHING,
    Draft,
    LayerSkipDraft,
    ModelDraft,
    PromptLookupDraft,
    Proposal,
    QuantizedDraft,
    parse_draft,
)
from labkit.speculative.measure import Measurement, evaluate, measure
from labkit.speculative.rule import ORIGINS, Verdict, accepts, expected_speedup, judge, residual, verify
from labkit.speculative.speculator import SpeculativeStats, Speculator, VerifyCost, check_speculative

__all__ = ["DRAFT_SPECS", "NOTHING", "ORIGINS", "Draft", "LayerSkipDraft", "Measurement", "ModelDraft",
           "PromptLookupDraft", "Proposal", "QuantizedDraft", "SpeculativeStats", "Speculator", "Verdict",
           "VerifyCost", "accepts", "check_speculative", "evaluate", "expected_speedup", "judge", "measure",
           "parse_draft",
           "residual", "verify"]
