"""THE decoding loop: one token per iteration with a KV cache, per-step metrics, sampler, stop conditions.

Every generation in labkit (``Session.generate``, ``Session.stream``, and what later features build on them)
runs through :func:`decode`. Metrics are computed from the raw logits, before the sampler; the sampler's own
record of what it did is stored beside them in the Step.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from labkit import attention, info
from labkit.interventions.base import InterventionContext, TokenIntervention, apply_all
from labkit.models import forward_cached, new_cache
from labkit.sampling.base import Sampler
from labkit.sampling.measure import sampling_infos
from labkit.speculative import NOTHING, Speculator, crop
from labkit.tokens import TokenTexts
from labkit.trace import Step, Trace


@dataclass(frozen=True)
class StopRules:
    """When to end a generation (besides ``max_new_tokens`` and the stop event)."""

    max_new_tokens: int
    eos_ids: frozenset[int] = frozenset()
    """Token ids that end generation as end-of-sequence (the EOS token is kept as the last Step)."""
    stop_ids: frozenset[int] = frozenset()
    """User-given token ids that end generation (kept as the last Step)."""
    stop_strings: tuple[str, ...] = ()
    """Strings that end generation once the generated text contains one (kept in the text)."""
    _tail: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        # a stop string ending at the newest token lies within the last len(s) tokens (+ slack for partial bytes)
        object.__setattr__(self, "_tail", max((len(s) for s in self.stop_strings), default=0) + 4)

    def reason(self, token_id: int, generated: list[int], decode: Callable[[list[int]], str]) -> str:
        """The stop reason after ``token_id`` was generated, or "" to go on."""
        if token_id in self.eos_ids:
            return "eos"
        if token_id in self.stop_ids:
            return "stop_token"
        if self.stop_strings:
            tail = decode(generated[-self._tail:])
            if any(s in tail for s in self.stop_strings):
                return "stop_string"
        return ""


def decode(model: Any, tokenizer: Any, prompt_ids: torch.Tensor, trace: Trace, sampler: Sampler,
           rules: StopRules, *, generator: torch.Generator | None = None,
           stop_event: threading.Event | None = None, top_k: int = 10,
           token_text: TokenTexts | None = None, capture: Sequence[str] = (),
           interventions: Sequence[TokenIntervention] = (), session: Any = None,
           speculator: Speculator | None = None) -> Iterator[Step]:
    """Generate from ``prompt_ids`` (shape (1, T)), appending each Step to ``trace`` and yielding it.

    ``capture=["attention"]`` records each step's current query row in every layer and head (AttentionRow in
    ``Step.captures``) and its summary metrics (``Step.attention``). Captures the sampler ``needs`` are switched
    on too and handed to ``sampler.observe``; they are stored in the Step only when asked for in ``capture``.
    ``Step.sampler`` holds the sampler's record and the SamplingInfo of the step (entropy before/after, bits).
    Token-level ``interventions`` edit each step's logits in order, after the metrics and before the sampler
    (their context holds ``session``); ``capture=["logits"]`` keeps those edited logits, shape (V,), per Step.

    Each iteration is one *round*: one target forward pass over the newest token plus the tokens a
    ``speculator`` drafted (none in plain decoding), then one Step per kept position, verified exactly
    (:mod:`labkit.speculative`); the cache is cropped back to the kept tokens. ``Step.speculative`` records the
    round and the token's origin; ``trace.meta.speculative`` the run's SpeculativeStats.

    Ends on a stop rule, ``max_new_tokens``, ``stop_event`` being set (checked before each round), or
    KeyboardInterrupt; in every case ``trace`` keeps the steps done, with ``stop_reason`` and ``text`` set.
    """
    token_text = token_text or TokenTexts(tokenizer)
    stop_event = stop_event or threading.Event()
    sampler.reset(tokenizer)
    active = set(capture) | set(sampler.needs)
    cache = new_cache()
    ids = prompt_ids  # (1, T + steps so far)
    inputs = prompt_ids  # (1, T) for the prefill, then (1, 1): what the cache has not seen
    reason = "stopped"  # if the consumer closes the iterator early
    outside = torch.is_inference_mode_enabled()  # the consumer's own mode, restored while it holds a Step
    if speculator is not None:
        speculator.start(prompt_ids)
    try:
        with torch.inference_mode(), contextlib.ExitStack() as scope:
            recorder = scope.enter_context(attention.capturing(model)) if "attention" in active else None
            while True:
                index = len(trace.steps)
                if index >= rules.max_new_tokens:
                    reason = "max_new_tokens"
                    break
                if stop_event.is_set():
                    reason = "stopped"
                    break
                t_mark = time.perf_counter()
                proposal = (speculator.propose(ids, cache, rules.max_new_tokens - index - 1, sampler, generator)
                            if speculator is not None else NOTHING)
                gamma = len(proposal.tokens)
                if gamma:
                    inputs = torch.cat([inputs, torch.tensor([proposal.tokens], device=ids.device)], dim=1)
                t_target = time.perf_counter()
                raw = forward_cached(model, inputs, cache, gamma + 1)[0].float()  # (n, V) raw logits, n = γ + 1
                target_ms = (time.perf_counter() - t_target) * 1e3
                # every position at once; row i assumes drafted[:i] were kept (it is used only if they were)
                captured = {"attention": recorder.take()} if recorder is not None else {}  # (L, H, T + index)
                edited, changed = raw, [[] for _ in range(gamma + 1)]
                if interventions:
                    rows = []
                    for i in range(gamma + 1):
                        row = raw[i:i + 1]  # (1, V)
                        ctx = InterventionContext(index + i, trace.token_ids + proposal.tokens[:i], trace.prompt_ids,
                                                  session)
                        row, changed[i] = apply_all(row, ctx, interventions)
                        rows.append(row)
                    edited = torch.cat(rows)  # (n, V)
                if sampler.needs:
                    sampler.observe({k: captured[k] for k in sampler.needs})
                scores = sampler(ids.expand(gamma + 1, -1), edited)  # (n, V); stateless when n > 1
                # choose the tokens first (up to the first rejection or stop), then measure only the kept rows
                chosen: list[tuple[int, dict[str, Any]]] = []
                logq: list[torch.Tensor] = []  # (V,) nats per chosen row: log_softmax of what the sampler draws from
                ended = ""
                for i in range(gamma + 1):
                    logq.append(torch.log_softmax(scores[i].float(), dim=-1))
                    if speculator is None:
                        tid, spec = int(sampler.draw(scores[i:i + 1], generator)), {}
                    else:
                        tid, spec = speculator.choose(proposal, i, scores[i:i + 1], info.probs(logq[i]), sampler,
                                                      generator, token_text)
                    chosen.append((tid, spec))
                    ended = rules.reason(tid, trace.token_ids + [t for t, _ in chosen], tokenizer.decode)
                    if ended or spec.get("origin") == "resampled":
                        break
                m = len(chosen)
                logp = info.log_probs(raw[:m])  # (m, V) nats
                entropy, varentropy = info.entropy_and_varentropy(logp, "bits")  # (m,), (m,)
                top_lp, top_ids = logp.topk(top_k, dim=-1)  # (m, k)
                top_probs = top_lp.exp()  # (m, k)
                infos = sampling_infos(scores[:m], entropy, top_probs[:, 0], torch.stack(logq))[0]  # m SamplingInfo
                h_bits, vh_bits, top_p, top_i = entropy.tolist(), varentropy.tolist(), top_probs.tolist(), \
                    top_ids.tolist()
                for i, (tid, spec) in enumerate(chosen):
                    step = Step(
                        index=index, position=ids.shape[1], token_id=tid, token=token_text(tid),
                        logprob=float(logp[i, tid]), entropy_bits=h_bits[i], varentropy_bits=vh_bits[i],
                        top=[(token_text(j), j, pr) for j, pr in zip(top_i[i], top_p[i], strict=True)],
                        time_ms=0.0, sampler={**sampler.record(scores[i:i + 1]), **infos[i].as_dict()},
                        interventions=changed[i], speculative=spec,
                    )
                    if "logits" in capture:
                        step.captures["logits"] = edited[i]
                    if "attention" in capture:
                        step.captures["attention"] = captured["attention"]
                        step.attention = attention.step_metrics(captured["attention"]).summary()
                    inputs = torch.tensor([[tid]], device=ids.device)  # (1, 1)
                    ids = torch.cat([ids, inputs], dim=1)  # (1, T + index + 1)
                    step.time_ms = (time.perf_counter() - t_mark) * 1e3
                    trace.steps.append(step)
                    with torch.inference_mode(outside):  # the consumer's code runs as it would without labkit
                        yield step
                    t_mark = time.perf_counter()
                    index += 1
                    if i == m - 1:
                        reason = ended
                    elif stop_event.is_set():
                        reason = "stopped"  # within a round too: Stop ends generation after the current token
                        break
                if speculator is not None:
                    crop(cache, ids.shape[1] - 1)  # drop the rejected drafted tokens' entries
                    kept = sum(sp.get("origin") == "accepted" for _, sp in chosen[:i + 1])  # of the i + 1 made
                    speculator.settle(proposal, kept, i + 1, target_ms, ids.shape[1] - 1)
                if reason:
                    break
    except KeyboardInterrupt:
        reason = "interrupted"
    except Exception:
        reason = "error"
        raise
    finally:
        trace.stop_reason = reason or "stopped"  # "" only if the consumer closed the iterator mid-way
        trace.text = tokenizer.decode(trace.token_ids, skip_special_tokens=True)
        if speculator is not None:
            speculator.stats.total_ms = sum(s.time_ms for s in trace.steps)
            trace.meta.speculative = speculator.stats.as_dict()
