"""THE decoding loop: one round per iteration with a KV cache, per-step measures, the sampler, stop conditions.

Every generation in labkit runs through :func:`generate`, which picks the driver from the settings' strategy:
:func:`decode` (plain rounds, or speculative ones) or beam search (:func:`labkit.decoding.beam.search`). Measures
come from the raw logits, before the sampler (:mod:`labkit.decoding.steps`); the sampler's own record of what it
did is stored beside them in the Step.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from labkit.core.tokens import TokenTexts
from labkit.decoding import beam
from labkit.decoding.kv import cache_bytes, needs_attention, place
from labkit.decoding.settings import Run, StopRules
from labkit.decoding.steps import keep_captures, make_step, measure
from labkit.interventions.base import apply_rows
from labkit.measures import attention
from labkit.model.cache import forward_cached, new_cache
from labkit.model.hooks import sites_of
from labkit.records.trace import Step
from labkit.sampling.base import Sampler
from labkit.speculative.drafts import NOTHING, Proposal
from labkit.speculative.speculator import Speculator
from labkit.why.activations import SiteRecorder

__all__ = ["PlainRounds", "StopRules", "decode", "generate"]


def generate(run: Run) -> Iterator[Step]:
    """The Steps of ``run``, from the driver its settings choose: beam search for ``strategy == "beam"``, else the
    decoding loop (plain or speculative rounds)."""
    return beam.search(run) if run.settings.strategy == "beam" else decode(run)


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


def decode(run: Run) -> Iterator[Step]:
    """Generate from ``run.prompt_ids`` (1, T), appending each Step to its row's Trace and yielding it.

    With B rows (``settings.n``) B sequences of the same prompt are decoded together, one forward pass of shape
    (B, ·) per round; each row has its own generator and, for a stateful sampler, its own copy of the sampler (made
    at the start, so a parameter changed live reaches row 0 only; a stateless sampler is shared), so row b draws
    exactly what a single run with its generator draws. A row that meets a stop rule leaves the batch (its cache
    rows are dropped); Steps are yielded row by row within a round.

    Each iteration is one *round* (``_Loop.round``): propose (a Speculator drafts γ tokens; :class:`PlainRounds`
    none) → one target forward pass over the newest token plus the drafted ones → edit (token-level interventions)
    → the sampler's scores → choose one token per position, up to the first rejection or stop → one Step per kept
    position → settle (the cache cropped back to the kept tokens). Captures: ``"attention"`` (each step's query
    row in every layer and head, and its summary), ``"logits"`` (the edited logits, (V,)), hook-site names (the
    site's vector at the position that predicted the token); the captures the sampler ``needs`` reach
    ``sampler.observe``. A kv policy builds the cache and each Step records its bytes (``Step.kv``).

    Ends on a stop rule, ``max_new_tokens``, the stop event (checked before each round and after each Step), or
    KeyboardInterrupt; in every case the Traces keep the steps done, with ``stop_reason`` and ``text`` set.
    """
    loop = _Loop(run)
    try:
        with torch.inference_mode(), loop.recording():
            yield from loop.run_rounds()
    except KeyboardInterrupt:
        loop.reason = "interrupted"
    except Exception:
        loop.reason = "error"
        raise
    finally:
        loop.finish()


@dataclass
class _Row:
    """One sequence of a (possibly batched) generation: its Trace, sampler, random stream and tokens so far."""

    trace: Any
    sampler: Sampler
    generator: torch.Generator | None
    ids: torch.Tensor
    """Shape (1, T + steps so far)."""
    unseen: torch.Tensor
    """Shape (1, t): the tokens the cache has not seen (the prompt before the prefill, then the newest token)."""
    reason: str = ""
    """Why this row ended ("" while it runs)."""


@dataclass
class _Pass:
    """One round's target forward pass over every live row."""

    index: int
    """The index of the round's first Step."""
    proposal: Proposal
    raw: torch.Tensor
    """Shape (B, n, V): raw logits, n = γ + 1 positions to judge."""
    attention_rows: list[Any]
    """B AttentionRows (L, H, T + index), or [] when attention is not captured."""
    sites: dict[str, torch.Tensor]
    """{site: (B, t, ...)} of the target pass."""
    target_ms: float
    share_s: float
    """Each row's share of the round's time so far (seconds)."""


class _Loop:
    """The state of one :func:`decode` run: rows, cache, round kind, captures, and why it ended."""

    def __init__(self, run: Run) -> None:
        s = run.settings
        self.run, self.settings, self.kv = run, s, s.kv
        self.rounds: Any = (Speculator(s.speculative, run.rules.eos_ids | run.rules.stop_ids)
                            if s.speculative is not None else PlainRounds())
        self.rows = [_Row(t, s.sampler if b == 0 or s.sampler.stateless else copy.deepcopy(s.sampler), g,
                          run.prompt_ids, run.prompt_ids)
                     for b, (t, g) in enumerate(zip(run.traces, run.generators, strict=True))]
        for row in self.rows:
            row.sampler.reset(run.tokenizer)
        self.active = (set(s.capture) | set(s.sampler.needs)
                       | ({"attention"} if self.kv is not None and needs_attention(self.kv) else set()))
        n_layers = run.model.config.get_text_config(decoder=True).num_hidden_layers
        self.cache = self.kv.new_cache(n_layers) if self.kv is not None else new_cache()
        self.reason = ""  # why the whole generation ended early ("" while rows end by their own stop rules)
        self.outside = torch.is_inference_mode_enabled()  # the consumer's own mode, restored while it holds a Step
        self.recorder: Any = None
        self.sites: Any = None
        if isinstance(self.rounds, Speculator):
            self.rounds.start(run.prompt_ids)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Attention and hook-site recorders on the model while the loop runs (removed however it ends)."""
        with contextlib.ExitStack() as scope:
            if "attention" in self.active:
                self.recorder = scope.enter_context(attention.capturing(self.run.model))
            names = [c for c in self.active if c not in ("attention", "logits", "lookahead")]
            if names:
                self.sites = scope.enter_context(SiteRecorder(sites_of(self.run.model), names).recording())
            yield

    def run_rounds(self) -> Iterator[Step]:
        """Round after round while a row runs, until a stop rule, ``max_new_tokens`` or the stop event."""
        while live := [row for row in self.rows if not row.reason]:
            if self.before_round(len(live[0].trace.steps)):
                return
            yield from self.round(live)
            if self.reason:
                return
            self.drop_ended(live)

    def before_round(self, index: int) -> bool:
        """Whether the generation ends before the round whose first Step is ``index`` (and why, in ``reason``)."""
        if index >= self.settings.max_new_tokens:
            self.reason = "max_new_tokens"
        elif self.run.stop_event.is_set():
            self.reason = "stopped"
        return bool(self.reason)

    def round(self, live: list[_Row]) -> Iterator[Step]:
        """One round: a forward pass over every live row, then each row's Steps in turn."""
        t_round = time.perf_counter()
        step_pass = self._forward(live, t_round)
        for b, row in enumerate(live):
            yield from self._row_steps(step_pass, b, row, len(live))
            if self.reason:
                return

    def _forward(self, live: list[_Row], t_round: float) -> _Pass:
        """Propose, then one target forward pass over each row's unseen tokens plus the drafted ones."""
        lead, index = live[0], len(live[0].trace.steps)
        proposal = self.rounds.propose(lead.ids, self.cache, self.settings.max_new_tokens - index - 1, lead.sampler,
                                       lead.generator)
        tail = torch.tensor([proposal.tokens], dtype=lead.ids.dtype, device=lead.ids.device)  # (1, γ)
        inputs = torch.cat([torch.cat([row.unseen, tail], dim=1) for row in live])  # (B, t + γ)
        t_target = time.perf_counter()
        if self.sites is not None:
            self.sites.clear()  # keep the target pass only (a layer-skip draft runs the same model)
        raw = forward_cached(self.run.model, inputs, self.cache, len(proposal.tokens) + 1).float()  # (B, n, V)
        target_ms = (time.perf_counter() - t_target) * 1e3
        rows = self.recorder.take_rows() if self.recorder is not None else []  # B × (L, H, T + index)
        sites = self.sites.newest() if self.sites is not None else {}
        return _Pass(index, proposal, raw, rows, sites, target_ms, (time.perf_counter() - t_round) / len(live))

    def _row_steps(self, p: _Pass, b: int, row: _Row, batch: int) -> Iterator[Step]:
        """Row ``b``'s choices in this round, one Step each (handed out as made), then the round settled."""
        t_mark = time.perf_counter() - p.share_s
        edited, changed, scores, captured = self._scores(p, b, row, batch)
        chosen, log_q, ended = _choose(self.rounds, p.proposal, scores, row, self.run)  # [(id, spec)] × m ≤ n
        m = measure(p.raw[b, :len(chosen)], scores[:len(chosen)], log_q, self.settings.top_k, self.settings.metrics)
        made = 0  # Steps handed out in this round
        for i, (tid, spec) in enumerate(chosen):
            step = make_step(i, p.index + i, row.ids.shape[1], tid, spec, m, row.sampler.record(scores[i:i + 1]),
                             changed[i], self.run.token_text)
            self._keep(step, i, edited[i], captured, p, b, batch)
            row.unseen = torch.tensor([[tid]], device=row.ids.device)  # (1, 1)
            row.ids = torch.cat([row.ids, row.unseen], dim=1)  # (1, T + index + i + 1)
            step.time_ms = (time.perf_counter() - t_mark) * 1e3
            row.trace.steps.append(step)
            with torch.inference_mode(self.outside):  # the consumer's code runs as it would without labkit
                yield step
            t_mark, made = time.perf_counter(), made + 1
            if made < len(chosen) and self.run.stop_event.is_set():
                self.reason = "stopped"  # within a round too: Stop ends generation after the current token
                break
        if made == len(chosen):
            row.reason = ended
        self.rounds.end_round(p.proposal, [spec for _, spec in chosen[:made]], self.cache, p.target_ms,
                              row.ids.shape[1] - 1)

    def _scores(self, p: _Pass, b: int, row: _Row, batch: int) -> tuple[torch.Tensor, list[list[str]], torch.Tensor,
                                                                          dict[str, Any]]:
        """Row ``b``'s logits after the token-level interventions (n, V), what changed them, the sampler's scores
        (n, V) and the captures handed to the Steps."""
        drafted = p.proposal.tokens
        captured = {"attention": p.attention_rows[b]} if p.attention_rows else {}
        if captured and self.kv is not None and self.kv.evicts:  # rows over every position; H2O scores its keys
            captured["attention"] = place(captured["attention"], self.cache, row.ids.shape[1])
        edited, changed = apply_rows(p.raw[b], p.index, row.trace.token_ids, drafted, row.trace.prompt_ids,
                                     self.run.session, self.run.interventions)  # row i assumes drafted[:i] kept
        if row.sampler.needs:
            row.sampler.observe({k: captured[k] if k == "attention" else
                                 _lookahead(self.run.model, self.cache, b, batch) if k == "lookahead" else
                                 p.sites[k][b] for k in row.sampler.needs})
        scores = row.sampler(row.ids.expand(len(drafted) + 1, -1), edited)  # (n, V); stateless if n > 1
        return edited, changed, scores, captured

    def _keep(self, step: Step, i: int, edited: torch.Tensor, captured: dict[str, Any], p: _Pass, b: int,
              batch: int) -> None:
        """What ``capture`` asked for, and the kv policy's bytes, stored in position ``i``'s Step."""
        capture = self.settings.capture
        keep_captures(step, capture, edited, captured)
        n = len(p.proposal.tokens) + 1
        step.captures.update({k: v[b, i - n] for k, v in p.sites.items() if k in capture})  # (d,) at position i
        if self.kv is not None:
            step.kv = {"policy": self.kv.spec, "bytes": cache_bytes(self.cache) // batch}  # rows alike

    def drop_ended(self, live: list[_Row]) -> None:
        """Rows that ended this round leave the batch (their cache rows are dropped)."""
        going = [b for b, row in enumerate(live) if not row.reason]
        if going and len(going) < len(live):
            self.cache.batch_select_indices(torch.tensor(going, device=live[0].ids.device))

    def finish(self) -> None:
        """Every Trace's stop reason and text; the speculative statistics."""
        for row in self.rows:
            row.trace.stop_reason = row.reason or self.reason or "stopped"
            row.trace.text = self.run.tokenizer.decode(row.trace.token_ids, skip_special_tokens=True)
        if isinstance(self.rounds, Speculator):
            self.rounds.stats.total_ms = sum(s.time_ms for s in self.run.traces[0].steps)
            self.run.traces[0].meta.speculative = self.rounds.stats.as_dict()


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


def _choose(rounds: Any, proposal: Proposal, scores: torch.Tensor, row: _Row,
            run: Run) -> tuple[list[tuple[int, dict[str, Any]]], torch.Tensor, str]:
    """Choose a round's tokens position by position (``scores`` (n, V)), up to the first rejected draft or stop
    rule: the chosen (token id, Step.speculative) pairs, log_softmax of the chosen rows' scores (m, V) nats (what
    the sampler drew from; reused by the measures) and the stop reason ("" to go on)."""
    chosen: list[tuple[int, dict[str, Any]]] = []
    log_q: list[torch.Tensor] = []
    ended = ""
    generated = row.trace.token_ids
    for i in range(scores.shape[0]):
        log_q.append(torch.log_softmax(scores[i].float(), dim=-1))  # (V,)
        tid, spec = rounds.choose(proposal, i, scores[i:i + 1], log_q[i], row.sampler, row.generator,
                                  run.token_text)
        chosen.append((tid, spec))
        ended = run.rules.reason(tid, generated + [t for t, _ in chosen], run.tokenizer.decode)
        if ended or spec.get("origin") == "resampled":
            break
    return chosen, torch.stack(log_q), ended
