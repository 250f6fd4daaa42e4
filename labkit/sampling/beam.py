"""The beam-search sampler object: its parameters, validated (the search itself is
:func:`labkit.decoding.beam.search`)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from labkit.sampling.params import Param, Tunable


class BeamSearch(Tunable):
    """Beam search (pass it as ``sampler=``): ``num_beams`` ≥ 1 hypotheses; ``length_penalty`` the exponent of
    the length a finished score is divided by (> 0 favours longer outputs); ``early_stopping`` True (stop when
    ``num_beams`` hypotheses have finished), False (stop when no running beam can still beat the worst finished
    one at its current length) or ``"never"`` (... at the longest length it may reach); ``entropy_coef`` λ adds
    λ × each step's entropy in bits to the running score (0: transformers' beam search)."""

    name = "beam"
    params: ClassVar[dict[str, Param]] = {
        "num_beams": Param(4, int, lo=1, hi=64, slider=(1, 16, 1), help="hypotheses kept each step"),
        "length_penalty": Param(1.0, lo=-1e6, hi=1e6, slider=(-2.0, 3.0, 0.1),
                                help="a finished score is divided by length ** length_penalty"),
        "early_stopping": Param(False, object, choices=(True, False, "never"),
                                help="when the search ends (transformers' rule)"),
        "entropy_coef": Param(0.0, lo=-1e6, hi=1e6, slider=(-3.0, 3.0, 0.1), note="0: plain beam search",
                              help="λ: adds λ × each step's entropy (bits) to the running score"),
    }

    def __init__(self, num_beams: int = 4, length_penalty: float = 1.0, early_stopping: bool | str = False,
                 entropy_coef: float = 0.0) -> None:
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.entropy_coef = entropy_coef

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """The scores beams are ranked by: log_softmax of the logits (nats), as transformers ranks them."""
        return torch.log_softmax(scores.float(), dim=-1)

    def record(self, scores: torch.Tensor) -> dict[str, Any]:
        """Stored in each Step.sampler: the search's name and parameters."""
        return self.config()


def strategy_arguments(choice: Any) -> dict[str, Any]:
    """The ``generate`` keyword for a sampler or beam-search object (e.g. from a spec such as ``"beam:num_beams=4"``):
    ``{"beam": choice}`` for a BeamSearch, else ``{"sampler": choice}``."""
    return {"beam": choice} if isinstance(choice, BeamSearch) else {"sampler": choice}
