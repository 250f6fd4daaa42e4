"""Logit lens: what each layer would predict if the model stopped there.

For every decoder block, its output residual stream at the last position goes through the model's final norm,
unembedding and final logit softcapping (Gemma 2), giving a next-token distribution per layer. The last layer
reproduces the model's own logits. Entropies and KL divergences are in bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from labkit.core.errors import InvalidArgument
from labkit.measures import information as info
from labkit.model.hooks import sites_of
from labkit.records.trace import Alternative


@dataclass
class LogitLens:
    """Per-layer next-token distributions after one prompt (last position)."""

    logprobs: torch.Tensor
    """Shape (L, V): natural-log next-token probabilities read from each layer's residual stream."""
    top: list[list[Alternative]]
    """Shape (L, k): the most probable tokens at each layer."""

    def __post_init__(self) -> None:
        if self.logprobs.ndim != 2 or len(self.top) != self.logprobs.shape[0]:
            raise InvalidArgument("LogitLens.logprobs must have shape (L, V) with one top list per layer")

    @property
    def entropy_bits(self) -> torch.Tensor:
        """Shape (L,): entropy of each layer's distribution (bits)."""
        return info.entropy(self.logprobs, "bits")

    @property
    def kl_to_final_bits(self) -> torch.Tensor:
        """Shape (L,): KL(final ‖ layer) in bits — how far each layer is from the model's own answer."""
        final = self.logprobs[-1].expand_as(self.logprobs)
        return info.kl_divergence(final, self.logprobs, "bits")

    def prob(self, token_id: int) -> torch.Tensor:
        """Shape (L,): probability of one token id at every layer."""
        return self.logprobs[:, token_id].exp()

    def to_pandas(self) -> Any:
        """One row per layer: top token, its probability, entropy (bits), KL to the final layer (bits)."""
        import pandas as pd

        return pd.DataFrame({"layer": range(len(self.top)), "top_token": [t[0].token for t in self.top],
                             "top_prob": [t[0].prob for t in self.top], "entropy_bits": self.entropy_bits.tolist(),
                             "kl_to_final_bits": self.kl_to_final_bits.tolist()})


def logit_lens(model: Any, ids: torch.Tensor, token_text: Any, k: int = 5) -> LogitLens:
    """Run ``ids`` (shape (1, T)) once, reading every block's output (site ``blocks.L.resid_post``) at the last
    position through the model's own final norm, unembedding and logit softcapping
    (:meth:`~labkit.model.hooks.Sites.logits`)."""
    sites = sites_of(model)
    names = [f"blocks.{layer}.resid_post" for layer in range(sites.n_layers)]
    with sites.read(names, last=True) as seen, torch.inference_mode():
        model(input_ids=ids, logits_to_keep=1)
        stream = torch.cat([seen[name][0] for name in names])  # (L, d_model)
        logprobs = torch.log_softmax(sites.logits(stream).float(), dim=-1).cpu()  # (L, V) nats
    values, index = logprobs.topk(k, dim=-1)  # (L, k)
    top = [[Alternative(token_text(i), i, float(v.exp())) for v, i in zip(vs, ix.tolist(), strict=True)]
           for vs, ix in zip(values, index, strict=True)]
    return LogitLens(logprobs=logprobs, top=top)
