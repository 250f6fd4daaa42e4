"""THE decoding loop: one token per iteration with a KV cache, per-step metrics, sampler, stop conditions.

Every generation in labkit (``Session.generate``, ``Session.stream``, and what later features build on them)
runs through :func:`decode`. Metrics are computed from the raw logits, before the sampler; the sampler's own
record of what it did is stored beside them in the Step.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from labkit import attention
from labkit.activations import SiteRecorder
from labkit.cache import forward_cached, new_cache
from labkit.errors import InvalidArgument
from labkit.hooks import sites_of
from labkit.info import StepMeasures, metric, step_measures
from labkit.interventions.base import TokenIntervention, apply_rows
from labkit.kv import cache_bytes, needs_attention, place
from labkit.sampling.base import Sampler
from labkit.sampling.measure import SamplingInfo, sampling_infos
from labkit.speculative.drafts import NOTHING, Proposal
from labkit.speculative.speculator import Speculator
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


class PlainRounds:
    """The round of plain decoding: propose nothing, draw the sampler's token, nothing to settle. A
    :class:`~labkit.speculative.speculator.Speculator` is the other kind of round (same three methods)."""

    def propose(self, ids: torch.Tensor, cache: Any, limit: int, sampler: Sampler,
                generator: torch.Generator | None) -> Proposal:
        """No draft: every round verifies nothing and makes one token."""
        return NOTHING

    def choose(self, proposal: Proposal, i: int, scores: torch.Tensor, log_q: torch.Tensor, sampler: Sampler,
               generator: torch.Generator | None, token_text: TokenTexts) -> tuple[int, dict[str, Any]]:
        """The sampler's draw from this position's scores (no draft to judge)."""
        return int(sampler.draw(scores, generator)), {}

    def end_round(self, proposal: Proposal, records: list[dict[str, Any]], cache: Any, target_ms: float,
                  length: int) -> None:
        """Nothing to account for after a plain round."""
        pass


def make_step(i: int, index: int, position: int, token_id: int, spec: dict[str, Any], m: StepMeasures,
              sampler_record: dict[str, Any], changed: list[str], metrics: dict[str, float],
              token_text: TokenTexts) -> Step:
    """The Step of row ``i`` of a round's measures ``m`` (``time_ms`` is set when the Step is handed out)."""
    top = [(token_text(j), j, pr) for j, pr in zip(m.top_ids[i].tolist(), m.top_probs[i].tolist(), strict=True)]
    return Step(index=index, position=position, token_id=token_id, token=token_text(token_id),
                logprob=float(m.logprobs[i, token_id]), entropy_bits=float(m.entropy_bits[i]),
                varentropy_bits=float(m.varentropy_bits[i]), top=top, time_ms=0.0, sampler=sampler_record,
                interventions=changed, speculative=spec, metrics=metrics)


@dataclass
class _Row:
    """One sequence of a (possibly batched) generation: its Trace, sampler, random stream and tokens so far."""

    trace: Trace
    sampler: Sampler
    generator: torch.Generator | None
    ids: torch.Tensor
    """Shape (1, T + steps so far)."""
    unseen: torch.Tensor
    """Shape (1, t): the tokens the cache has not seen (the prompt before the prefill, then the newest token)."""
    reason: str = ""
    """Why this row ended ("" while it runs)."""


def decode(model: Any, tokenizer: Any, prompt_ids: torch.Tensor, trace: Trace | Sequence[Trace], sampler: Sampler,
           rules: StopRules, *, generator: torch.Generator | Sequence[torch.Generator] | None = None,
           stop_event: threading.Event | None = None, top_k: int = 10,
           token_text: TokenTexts | None = None, capture: Sequence[str] = (),
           interventions: Sequence[TokenIntervention] = (), session: Any = None,
           speculator: Speculator | None = None, metrics: Sequence[str] = (), kv: Any = None) -> Iterator[Step]:
    """Generate from ``prompt_ids`` (shape (1, T)), appending each Step to ``trace`` and yielding it.

    ``trace`` may be a list of B Traces with ``generator`` a list of B generators: B sequences of the same prompt
    are then decoded together, one forward pass of shape (B, ·) per round (the batch dimension); each row has its
    own generator and, for a stateful sampler, its own copy of ``sampler`` (made at the start, so a parameter
    changed live reaches row 0 only; a stateless sampler is shared and reaches every row), so row b draws exactly
    what a single run with its generator draws. A row that meets a stop rule leaves the batch (its cache rows are
    dropped); Steps are yielded row by row within a round. Not with a ``speculator`` or a ``kv`` policy other than
    full (whose ``Step.kv`` bytes are then one row's share: every row holds as many positions).

    ``capture=["attention"]`` records each step's current query row in every layer and head (AttentionRow in
    ``Step.captures``) and its summary metrics (``Step.attention``). Captures the sampler ``needs`` are switched
    on too and handed to ``sampler.observe``; they are stored in the Step only when asked for in ``capture``.
    ``Step.sampler`` holds the sampler's record and the SamplingInfo of the step (entropy before/after, bits).
    Token-level ``interventions`` edit each step's logits in order, after the metrics and before the sampler
    (their context holds ``session``); ``capture=["logits"]`` keeps those edited logits, shape (V,), per Step.
    ``metrics`` names registered metrics (:func:`labkit.info.register`) computed on each step's raw logits into
    ``Step.metrics``. Hook-site names in ``capture`` (``"blocks.3.resid_post"``) keep that site's vector at the
    position that predicted the step's token in ``Step.captures[name]`` ((d_model,), or (H, d_head)); hook-site
    names in ``sampler.needs`` reach ``sampler.observe`` as the newest pass's whole tensor (t, d) for that row.

    Each iteration is one *round*: propose (a ``speculator`` drafts γ tokens; plain decoding, :class:`PlainRounds`,
    none) → one target forward pass over the newest token plus the drafted ones → choose one token per position,
    up to the first rejection or stop (verified exactly, :mod:`labkit.speculative`) → one Step per kept position →
    settle (the cache cropped back to the kept tokens). ``Step.speculative`` records the round and the token's
    origin; ``trace.meta.speculative`` the run's SpeculativeStats.

    ``kv`` is a cache policy (:mod:`labkit.kv`; None: the full cache): it builds the cache, and each Step records its
    spec and the bytes the cache holds (``Step.kv``).

    Ends on a stop rule, ``max_new_tokens``, ``stop_event`` being set (checked before each round and after each
    Step), or KeyboardInterrupt; in every case ``trace`` keeps the steps done, with ``stop_reason`` and ``text`` set.
    """
    token_text = token_text or TokenTexts(tokenizer)
    stop_event = stop_event or threading.Event()
    rounds = speculator if speculator is not None else PlainRounds()
    traces = [trace] if isinstance(trace, Trace) else list(trace)
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    if len(traces) != len(generators) or (len(traces) > 1 and (speculator is not None or
                                                               (kv is not None and kv.spec != "full"))):
        raise InvalidArgument("a batched decode takes one generator per trace, and no speculator or lossy kv policy")
    rows = [_Row(t, sampler if b == 0 or sampler.stateless else copy.deepcopy(sampler), g, prompt_ids, prompt_ids)
            for b, (t, g) in enumerate(zip(traces, generators, strict=True))]
    for row in rows:
        row.sampler.reset(tokenizer)
    active = set(capture) | set(sampler.needs) | ({"attention"} if kv is not None and needs_attention(kv) else set())
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    cache = kv.new_cache(n_layers) if kv is not None else new_cache()
    reason = ""  # why the whole generation ended early ("" while rows end by their own stop rules)
    outside = torch.is_inference_mode_enabled()  # the consumer's own mode, restored while it holds a Step
    if speculator is not None:
        speculator.start(prompt_ids)
    try:
        with torch.inference_mode(), contextlib.ExitStack() as scope:
            recorder = scope.enter_context(attention.capturing(model)) if "attention" in active else None
            site_names = [c for c in active if c not in ("attention", "logits", "lookahead")]
            sites = scope.enter_context(SiteRecorder(sites_of(model), site_names).recording()) if site_names else None
            while live := [row for row in rows if not row.reason]:
                index, t_round = len(live[0].trace.steps), time.perf_counter()
                if reason := _before_round(index, rules, stop_event):
                    break
                lead = live[0]
                proposal = rounds.propose(lead.ids, cache, rules.max_new_tokens - index - 1, lead.sampler,
                                          lead.generator)
                drafted = proposal.tokens  # (γ,) token ids; n = γ + 1 positions to judge
                tail = torch.tensor([drafted], dtype=lead.ids.dtype, device=lead.ids.device)
                inputs = torch.cat([torch.cat([row.unseen, tail], dim=1) for row in live])  # (B, t + γ)
                t_target = time.perf_counter()
                if sites is not None:
                    sites.clear()  # keep the target pass only (a layer-skip draft runs the same model)
                raw_all = forward_cached(model, inputs, cache, len(drafted) + 1).float()  # (B, n, V) raw logits
                target_ms = (time.perf_counter() - t_target) * 1e3
                rows_attention = recorder.take_rows() if recorder is not None else []  # B × (L, H, T + index)
                pass_sites = sites.newest() if sites is not None else {}  # {site: (B, t, ...)} of the target pass
                shared_s = (time.perf_counter() - t_round) / len(live)  # each row's share of the batched pass
                for b, row in enumerate(live):
                    t_mark = time.perf_counter() - shared_s
                    captured = {"attention": rows_attention[b]} if rows_attention else {}
                    if captured and kv is not None and kv.evicts:  # rows over every position; H2O scores its keys
                        captured["attention"] = place(captured["attention"], cache, row.ids.shape[1])
                    site_rows = [{k: v[b, i - len(drafted) - 1] for k, v in pass_sites.items() if k in capture}
                                 for i in range(len(drafted) + 1)]  # n × {site: (d,)}: the positions judged
                    raw = raw_all[b]  # (n, V)
                    edited, changed = apply_rows(raw, index, row.trace.token_ids, drafted, row.trace.prompt_ids,
                                                 session, interventions)  # (n, V): row i assumes drafted[:i] kept
                    if row.sampler.needs:
                        row.sampler.observe({k: captured[k] if k == "attention" else
                                             _lookahead(model, cache, b, len(live)) if k == "lookahead" else
                                             pass_sites[k][b] for k in row.sampler.needs})
                    scores = row.sampler(row.ids.expand(len(drafted) + 1, -1), edited)  # (n, V); stateless if n > 1
                    chosen, log_q, ended = _choose(rounds, proposal, scores, row.sampler, row.generator, token_text,
                                                   rules, row.trace.token_ids, tokenizer)  # [(id, spec)] × m ≤ n
                    m = _measure(raw[:len(chosen)], scores[:len(chosen)], log_q, top_k, metrics)  # kept rows only
                    made = 0  # Steps handed out in this round
                    for i, (tid, spec) in enumerate(chosen):
                        step = make_step(i, index + i, row.ids.shape[1], tid, spec, m.step,
                                         {**row.sampler.record(scores[i:i + 1]), **m.sampling[i].as_dict()},
                                         changed[i], {name: values[i] for name, values in m.registered.items()},
                                         token_text)
                        _keep_captures(step, capture, edited[i], captured)
                        step.captures.update(site_rows[i])
                        if kv is not None:
                            step.kv = {"policy": kv.spec, "bytes": cache_bytes(cache) // len(live)}  # rows alike
                        row.unseen = torch.tensor([[tid]], device=row.ids.device)  # (1, 1)
                        row.ids = torch.cat([row.ids, row.unseen], dim=1)  # (1, T + index + i + 1)
                        step.time_ms = (time.perf_counter() - t_mark) * 1e3
                        row.trace.steps.append(step)
                        with torch.inference_mode(outside):  # the consumer's code runs as it would without labkit
                            yield step
                        t_mark, made = time.perf_counter(), made + 1
                        if made == len(chosen):
                            row.reason = ended
                        elif stop_event.is_set():
                            reason = "stopped"  # within a round too: Stop ends generation after the current token
                            break
                    rounds.end_round(proposal, [spec for _, spec in chosen[:made]], cache, target_ms,
                                     row.ids.shape[1] - 1)
                    if reason:
                        break
                if reason:
                    break
                going = [b for b, row in enumerate(live) if not row.reason]
                if going and len(going) < len(live):  # rows that ended leave the batch
                    cache.batch_select_indices(torch.tensor(going, device=lead.ids.device))
    except KeyboardInterrupt:
        reason = "interrupted"
    except Exception:
        reason = "error"
        raise
    finally:
        for row in rows:
            row.trace.stop_reason = row.reason or reason or "stopped"
            row.trace.text = tokenizer.decode(row.trace.token_ids, skip_special_tokens=True)
        if speculator is not None:
            speculator.stats.total_ms = sum(s.time_ms for s in traces[0].steps)
            traces[0].meta.speculative = speculator.stats.as_dict()


def _lookahead(model: Any, cache: Any, batch_row: int, batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """For a sampler that looks one token ahead (contrastive search): candidate ids (k,) -> each candidate's
    final-norm hidden state (k, d_model) after row ``batch_row``'s context, from one pass of the k candidates on a
    copy of the cache (the loop's own cache is left as it is)."""
    def run(candidates: torch.Tensor) -> torch.Tensor:
        ahead = copy.deepcopy(cache)
        if batch > 1:
            ahead.batch_select_indices(torch.tensor([batch_row], device=candidates.device))
        ahead.batch_repeat_interleave(len(candidates))
        sites = sites_of(model)
        with sites.read(["final_norm"], last=True) as seen:
            forward_cached(model, candidates.reshape(-1, 1), ahead)
        return seen["final_norm"][-1]  # (k, d_model)

    return run


def _before_round(index: int, rules: StopRules, stop_event: threading.Event) -> str:
    """The stop reason before a round starts, or "" to run it."""
    if index >= rules.max_new_tokens:
        return "max_new_tokens"
    return "stopped" if stop_event.is_set() else ""


def _choose(rounds: Any, proposal: Proposal, scores: torch.Tensor, sampler: Sampler,
            generator: torch.Generator | None, token_text: TokenTexts, rules: StopRules, generated: list[int],
            tokenizer: Any) -> tuple[list[tuple[int, dict[str, Any]]], torch.Tensor, str]:
    """Choose a round's tokens position by position (``scores`` (n, V)), up to the first rejected draft or stop
    rule: the chosen (token id, Step.speculative) pairs, log_softmax of the chosen rows' scores (m, V) nats (what
    the sampler drew from; reused by the measures) and the stop reason ("" to go on)."""
    chosen: list[tuple[int, dict[str, Any]]] = []
    log_q: list[torch.Tensor] = []
    ended = ""
    for i in range(scores.shape[0]):
        log_q.append(torch.log_softmax(scores[i].float(), dim=-1))  # (V,)
        tid, spec = rounds.choose(proposal, i, scores[i:i + 1], log_q[i], sampler, generator, token_text)
        chosen.append((tid, spec))
        ended = rules.reason(tid, generated + [t for t, _ in chosen], tokenizer.decode)
        if ended or spec.get("origin") == "resampled":
            break
    return chosen, torch.stack(log_q), ended


@dataclass(frozen=True)
class _RoundMeasures:
    step: StepMeasures
    """Of the raw logits (m rows)."""
    sampling: list[SamplingInfo]
    """Of the sampler's output against the raw distribution, one per row."""
    registered: dict[str, list[float]]
    """Each requested registered metric of the raw logits, one value per row."""


def _measure(raw: torch.Tensor, scores: torch.Tensor, log_q: torch.Tensor, top_k: int,
             metrics: Sequence[str]) -> _RoundMeasures:
    """Shape (m, V) raw logits, sampler scores and their log_softmax of the kept rows -> their measures."""
    step = step_measures(raw, top_k)
    registered = {name: metric(name).fn(raw).double().reshape(-1).tolist() for name in metrics}
    infos = sampling_infos(scores, step.entropy_bits, step.top_probs[:, 0], log_q)[0]
    return _RoundMeasures(step, infos, registered)


def _keep_captures(step: Step, capture: Sequence[str], edited: torch.Tensor, captured: dict[str, Any]) -> None:
    """Store what ``capture`` asked for in ``step``: the edited logits (V,), the attention row and its summary."""
    if "logits" in capture:
        step.captures["logits"] = edited
    if "attention" in capture:
        step.captures["attention"] = captured["attention"]
        step.attention = attention.step_metrics(captured["attention"]).summary()
