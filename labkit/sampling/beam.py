"""The beam-search sampler object: its parameters, validated (the search itself is
:func:`labkit.decoding.beam.search`)."""

from __future__ import annotations

from typing import Any

import torch

from labkit.core.errors import InvalidArgument
from labkit.sampling.base import Sampler


class BeamSearch(Sampler):
    """Beam search (pass it as ``sampler=``): ``num_beams`` ≥ 1 hypotheses; ``length_penalty`` the exponent of
    the length a finished score is divided by (> 0 favours longer outputs); ``early_stopping`` True (stop when
    ``num_beams`` hypotheses have finished), False (stop when no running beam can still beat the worst finished
    one at its current length) or ``"never"`` (... at the longest length it may reach); ``entropy_coef`` λ adds
    λ × each step's entropy in bits to the running score (0: transformers' beam search)."""

    name = "beam"
    params = ("num_beams", "length_penalty", "early_stopping", "entropy_coef")

    def __init__(self, num_beams: int = 4, length_penalty: float = 1.0, early_stopping: bool | str = False,
                 entropy_coef: float = 0.0) -> None:
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.entropy_coef = entropy_coef

    def validate(self, key: str, value: Any) -> Any:
        if key == "early_stopping":
            if value not in (True, False, "never") or (isinstance(value, int) and not isinstance(value, bool)):
                raise InvalidArgument(f"early_stopping must be True, False or 'never'; got {value!r}")
            return value
        return super().validate(key, value)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """The scores beams are ranked by: log_softmax of the logits (nats), as transformers ranks them."""
        return torch.log_softmax(scores.float(), dim=-1)

    def draw(self, scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return scores.argmax(dim=-1)
