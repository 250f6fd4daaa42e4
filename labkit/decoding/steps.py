"""A round's measures and the Steps made from them: shared by the decoding loop and beam search, so a Step means the
same whichever driver made it. Measures come from the raw logits, before interventions and the sampler; the
sampler's record of what it did is stored beside them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from labkit.core.tokens import TokenTexts
from labkit.measures import attention
from labkit.measures.information import StepMeasures, metric, step_measures
from labkit.records.trace import Step
from labkit.sampling.measure import SamplingInfo, sampling_infos


@dataclass(frozen=True)
class RoundMeasures:
    """The measures of a round's kept positions (m rows)."""

    step: StepMeasures
    """Of the raw logits (m rows)."""
    sampling: list[SamplingInfo]
    """Of the sampler's output against the raw distribution, one per row."""
    registered: dict[str, list[float]]
    """Each requested registered metric of the raw logits, one value per row."""

    def metrics(self, i: int) -> dict[str, float]:
        """Row ``i``'s registered metrics by name."""
        return {name: values[i] for name, values in self.registered.items()}


def measure(raw: torch.Tensor, scores: torch.Tensor, log_q: torch.Tensor, top_k: int,
            metrics: Sequence[str]) -> RoundMeasures:
    """Shape (m, V) raw logits, sampler scores and their log_softmax (nats) of the kept rows -> their measures."""
    step = step_measures(raw, top_k)
    registered = {name: metric(name).fn(raw).double().reshape(-1).tolist() for name in metrics}
    infos = sampling_infos(scores, step.entropy_bits, step.top_probs[:, 0], log_q)[0]
    return RoundMeasures(step, infos, registered)


def make_step(i: int, index: int, position: int, token_id: int, spec: dict[str, Any], m: RoundMeasures,
              sampler_record: dict[str, Any], changed: list[str], token_text: TokenTexts) -> Step:
    """The Step of row ``i`` of a round's measures ``m``: its token, probability, entropy and varentropy (bits), the
    top alternatives, the sampler's record joined with row i's SamplingInfo, the interventions that ``changed`` it,
    ``spec`` (Step.speculative) and the registered metrics (``time_ms`` is set when the Step is handed out)."""
    s = m.step
    top = [(token_text(j), j, pr) for j, pr in zip(s.top_ids[i].tolist(), s.top_probs[i].tolist(), strict=True)]
    return Step(index=index, position=position, token_id=token_id, token=token_text(token_id),
                logprob=float(s.logprobs[i, token_id]), entropy_bits=float(s.entropy_bits[i]),
                varentropy_bits=float(s.varentropy_bits[i]), top=top, time_ms=0.0,
                sampler={**sampler_record, **m.sampling[i].as_dict()}, interventions=changed, speculative=spec,
                metrics=m.metrics(i))


def keep_captures(step: Step, capture: Sequence[str], edited: torch.Tensor, captured: dict[str, Any]) -> None:
    """Store what ``capture`` asked for in ``step``: the edited logits (V,), the attention row and its summary."""
    if "logits" in capture:
        step.captures["logits"] = edited
    if "attention" in capture:
        step.captures["attention"] = captured["attention"]
        step.attention = attention.step_metrics(captured["attention"]).summary()
