"""Measure what interventions do: baseline and intervened generations with the same seeds, compared against the
unmodified model. Divergences and entropies in bits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from labkit.core.errors import InvalidArgument, check_int, deprecated
from labkit.interventions.base import check_interventions
from labkit.measures import information as info


@dataclass
class Effect:
    """Result of :func:`evaluate`."""

    table: Any
    """DataFrame, one row per (sample, step) of the intervened runs: token, baseline_token (same step of the
    baseline run), kl_bits = KL(intervened ‖ unmodified model) on the intervened prefix, entropy_change_bits =
    H(intervened) − H(unmodified) on that prefix."""
    samples: Any
    """DataFrame, one row per sample: seed, both texts, the perplexity of each output under the unmodified model,
    first_divergence (first step whose tokens differ; None if none)."""
    summary: dict[str, float] = field(default_factory=dict)

    def plot(self) -> Any:
        """A :class:`labkit.records.figures.Chart` (plotly, with a static PNG): mean KL and mean entropy change per step
        (bits), over samples."""
        from labkit.records.figures import Chart

        per_step = self.table.groupby("step")[["kl_bits", "entropy_change_bits"]].mean()
        fig = Chart()
        fig.add_scatter(x=per_step.index, y=per_step["kl_bits"], mode="lines+markers",
                        name="KL(intervened ‖ unmodified) bits")
        fig.add_scatter(x=per_step.index, y=per_step["entropy_change_bits"], mode="lines+markers",
                        name="entropy change bits")
        fig.update_layout(title="what the intervention changed, per step", xaxis_title="generated step",
                          yaxis_title="bits", height=320, margin={"t": 40, "b": 40},
                          legend={"orientation": "h"})
        return fig


@torch.no_grad()
def unmodified_logits(session: Any, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """Shape (k, V): the unmodified model's logits before each of the k generated tokens (teacher forcing)."""
    ids = torch.tensor([prompt_ids + token_ids], device=session.model.device)
    logits = session.model(ids).logits[0].float().cpu()  # (T + k, V)
    n = len(prompt_ids)
    return logits[n - 1:n - 1 + len(token_ids)]


def evaluate(session: Any, prompt: str, interventions: Any, samples: int = 5, seed: int = 0,
                                 max_new_tokens: int = 24, sampler: Any = None, chat: bool = False) -> Effect:
    """Generate ``samples`` times without and with ``interventions`` (seeds ``seed``, ``seed + 1``, ...; the same
    seed for both runs of a sample) and compare (see :class:`Effect`). Run it outside ``intervene`` scopes: the
    "unmodified" model is the session's model as it is when called."""
    import pandas as pd

    items = check_interventions(interventions)
    if not items:
        raise InvalidArgument("interventions must hold at least one intervention")
    check_int("samples", samples, 1)
    rows, per_sample = [], []
    for i in range(samples):
        kw = {"max_new_tokens": max_new_tokens, "sampler": sampler, "seed": seed + i, "chat": chat}
        base = session.generate(prompt, **kw)
        inter = session.generate(prompt, interventions=items, capture=["logits"], **kw)
        p = unmodified_logits(session, inter.prompt_ids, inter.token_ids)  # (k, V)
        q = torch.stack([s.captures["logits"].float().cpu() for s in inter.steps])  # (k, V)
        kl = info.kl_divergence(q, p, "bits").tolist() if len(inter) else []
        dh = (info.entropy(q, "bits") - info.entropy(p, "bits")).tolist() if len(inter) else []
        chosen = info.log_probs(p).gather(-1, torch.tensor(inter.token_ids)[:, None])[:, 0] if len(inter) else []
        first = next((j for j, (a, b) in enumerate(zip(base.token_ids, inter.token_ids, strict=False)) if a != b),
                     None if len(base) == len(inter) else min(len(base), len(inter)))
        for s, k, h in zip(inter.steps, kl, dh, strict=True):
            rows.append({"sample": i, "step": s.index, "token": s.token,
                         "baseline_token": base.steps[s.index].token if s.index < len(base) else None,
                         "kl_bits": k, "entropy_change_bits": h, "interventions": ", ".join(s.interventions)})
        per_sample.append({
            "sample": i, "seed": seed + i, "baseline_text": base.text, "intervened_text": inter.text,
            "baseline_perplexity": _ppl(torch.tensor([s.logprob for s in base.steps])),
            "intervened_perplexity": _ppl(torch.as_tensor(chosen)), "first_divergence": first})
    table, sample_df = pd.DataFrame(rows), pd.DataFrame(per_sample)
    summary = {
        "mean_kl_bits": float(table["kl_bits"].mean()) if len(table) else 0.0,
        "max_kl_bits": float(table["kl_bits"].max()) if len(table) else 0.0,
        "mean_entropy_change_bits": float(table["entropy_change_bits"].mean()) if len(table) else 0.0,
        "baseline_perplexity": float(sample_df["baseline_perplexity"].mean()),
        "intervened_perplexity": float(sample_df["intervened_perplexity"].mean()),
        "diverged_samples": int(sample_df["first_divergence"].notna().sum()), "samples": samples,
    }
    return Effect(table, sample_df, summary)


def _ppl(logprobs: torch.Tensor) -> float:
    """info.perplexity of one output's log-probabilities (nats); nan for an empty output."""
    return float(info.perplexity(logprobs)) if logprobs.numel() else float("nan")


def analyze_intervention_effects(*args: Any, **kwargs: Any) -> Effect:
    """Deprecated name of :func:`evaluate` (a variant against a baseline is ``evaluate`` everywhere)."""
    deprecated("analyze_intervention_effects is now labkit.interventions.evaluate")
    return evaluate(*args, **kwargs)
