"""Beam search on the batch dimension: transformers' algorithm step for step, every hypothesis measured, the tree kept.

``s.generate(prompt, beam=BeamSearch(num_beams=4))`` (or ``beam=4``) keeps ``num_beams`` running hypotheses as the
rows of one batched forward pass. Each round scores every continuation of every row, keeps the best
``2·num_beams``, sends the best ``num_beams`` that do not end to the next round (the cache reordered to their
parents) and offers the ending ones among the best ``num_beams`` to the finished set, scored
``Σ log p / length ** length_penalty`` — transformers'
``generate(num_beams=..., do_sample=False)`` (``_beam_search`` in transformers 5), including its ``early_stopping``
rules (``True``, ``False``, ``"never"``). It is written out here, not called, because transformers' loop has no
place for per-step measurement, labkit's token-level interventions or the tree of hypotheses.

With ``entropy_coef`` λ ≠ 0 a hypothesis' running score is ``Σ_t log p_t (nats) + λ · Σ_t H_t (bits)``, H_t the
entropy of the distribution its token t was chosen from: λ < 0 prefers paths through confident steps (the seed's
"beam search with entropy"), λ > 0 rewards exploring uncertain ones; λ = 0 is plain beam search.

The returned Trace holds the best finished hypothesis' Steps (made from its own rows' logits, so each Step's
probability, entropy and alternatives are those of the distribution its token came from) and, in
``trace.meta.beam``, the tree: every candidate that was kept at some round, its parent, score and fate.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from labkit.decoding.kv import cache_bytes
from labkit.decoding.settings import Run
from labkit.decoding.steps import RoundMeasures, make_step, measure
from labkit.interventions.base import apply_rows
from labkit.model.cache import forward_cached, new_cache
from labkit.records.beam_tree import BeamNode, BeamTree, path_ids
from labkit.records.trace import Step
from labkit.sampling.beam import BeamSearch

__all__ = ["BeamNode", "BeamSearch", "BeamTree", "search"]

_NEG = -1.0e9  # transformers' "impossible" score (kept equal so ties and masks behave as there)


def search(run: Run) -> Iterator[Step]:
    """Run beam search (``run.settings.beam``) from ``run.prompt_ids`` (1, T); at the end append the returned
    hypothesis' Steps to the run's Trace and yield them (nothing is yielded while hypotheses are still being ranked).
    The stop rules decide which candidates end; ``max_new_tokens`` ends every hypothesis. Stop / KeyboardInterrupt
    end the search early with the best hypothesis so far (finished if there is one, else the best running one).
    ``capture=["logits"]`` keeps each Step's logits after the token-level interventions (V,); a kv policy records
    ``Step.kv`` (the full cache: one hypothesis' share of the bytes, every row holding as many positions)."""
    beams = _Beams(run)
    try:
        with torch.inference_mode():
            for index in range(run.settings.max_new_tokens):
                if run.stop_event.is_set():
                    break
                if beams.round(index):
                    beams.reason = ""
                    break
            else:
                beams.reason = ""
    except KeyboardInterrupt:
        beams.reason = "interrupted"
    out = beams.result()
    try:
        for step in out:
            run.traces[0].steps.append(step)
            yield step
    finally:
        beams.finish(out)


class _Beams:
    """The state of one beam search: the candidates' nodes and Steps, the running and finished hypotheses."""

    def __init__(self, run: Run) -> None:
        self.run, self.config = run, run.settings.beam
        nb = self.nb = self.config.num_beams
        self.keep = max(2, 1 + len(run.rules.eos_ids | run.rules.stop_ids)) * nb  # kept per round, as transformers
        self.top_mask = torch.arange(self.keep) < nb
        self.cache = new_cache()
        self.nodes: list[BeamNode] = []
        self.steps: dict[int, Step] = {}  # node id -> its Step
        self.running = [-1] * nb  # node id of each row's last token (−1: the prompt)
        self.running_scores = torch.full((nb,), _NEG)
        self.running_scores[0] = 0.0  # the rows start identical: only row 0's continuations count at first
        self.finished = [-1] * nb
        self.finished_scores = torch.full((nb,), _NEG)
        self.finished_on = torch.zeros(nb, dtype=torch.bool)
        self.improvable = True
        self.inputs = run.prompt_ids.expand(nb, -1)  # (nb, T): the prompt in every row, as transformers prefills
        self.reason = "stopped"

    def round(self, index: int) -> bool:
        """One round: score every continuation, keep the best, update running and finished; True to stop."""
        t0 = time.perf_counter()
        histories = [self._tokens(node) for node in self.running]  # each row's tokens so far, once per round
        log_probs, edited, m = self._scores(index, histories)
        top_scores, parents, tokens, ends = self._top_continuations(index, log_probs, m, histories)
        made = self._record(index, log_probs, edited, m, top_scores, parents, tokens,
                            (time.perf_counter() - t0) * 1e3 / self.nb)
        order = torch.topk(top_scores + ends.float() * _NEG, k=self.nb).indices.tolist()  # best nb that go on
        self._update_finished(index, top_scores, ends, made)
        self._next_running(order, made, top_scores, parents, tokens)
        return self._early_stop(index, ends)

    def _scores(self, index: int, histories: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, RoundMeasures]:
        """Every row's log-probabilities (nb, V) nats after the token-level interventions, the edited logits and
        the measures of the raw logits."""
        run = self.run
        raw = forward_cached(run.model, self.inputs, self.cache, 1)[:, -1].float()  # (nb, V) raw logits
        edited = torch.cat([apply_rows(raw[b:b + 1], index, history, [], run.traces[0].prompt_ids, run.session,
                                       run.interventions)[0] for b, history in enumerate(histories)])  # (nb, V)
        log_probs = self.config(self.inputs, edited)  # (nb, V) nats
        return log_probs, edited, measure(raw, log_probs, log_probs, run.settings.top_k, run.settings.metrics)

    def _top_continuations(self, index: int, log_probs: torch.Tensor, m: RoundMeasures,
                           histories: list[list[int]]) -> tuple[torch.Tensor, list[int], list[int], torch.Tensor]:
        """The best ``keep`` continuations over all rows: their running scores, parent rows, tokens and whether
        each ends (a stop rule, or the last step)."""
        acc = log_probs + self.running_scores[:, None]
        if self.config.entropy_coef:
            acc = acc + self.config.entropy_coef * m.step.entropy_bits[:, None]
        vocab = acc.shape[-1]
        top_scores, top_index = torch.topk(acc.reshape(-1), k=self.keep)  # (keep,)
        parents, tokens = (top_index // vocab).tolist(), (top_index % vocab).tolist()
        rules, last = self.run.rules, index + 1 >= self.run.settings.max_new_tokens
        ends = torch.tensor([last or bool(rules.reason(tok, [*histories[p], tok], self.run.tokenizer.decode))
                             for p, tok in zip(parents, tokens, strict=True)])
        return top_scores, parents, tokens, ends

    def _record(self, index: int, log_probs: torch.Tensor, edited: torch.Tensor, m: RoundMeasures,
                top_scores: torch.Tensor, parents: list[int], tokens: list[int], ms: float) -> list[int]:
        """A node and a Step for each kept candidate; their node ids."""
        run, made = self.run, []
        for j, (p, tok) in enumerate(zip(parents, tokens, strict=True)):
            node = BeamNode(len(self.nodes), self.running[p], index, tok, run.token_text(tok),
                            float(log_probs[p, tok]), float(top_scores[j]), ended_at=index)
            self.nodes.append(node)
            made.append(node.id)
            step = make_step(p, index, run.prompt_ids.shape[1] + index, tok, {}, m,
                             self.config.record(log_probs[p:p + 1]), [], run.token_text)
            step.sampler.update(beam_row=p, beam_score=node.score)
            step.time_ms = ms
            if "logits" in run.settings.capture:
                step.captures["logits"] = edited[p]
            if run.settings.kv is not None:
                step.kv = {"policy": "full", "bytes": cache_bytes(self.cache) // self.nb}
            self.steps[node.id] = step
        return made

    def _update_finished(self, index: int, top_scores: torch.Tensor, ends: torch.Tensor, made: list[int]) -> None:
        """Offer the ending candidates among the best nb to the finished set, scored Σ log p / length^penalty."""
        lp, early = self.config.length_penalty, self.config.early_stopping
        normed = top_scores / float(index + 1) ** lp
        full = bool(self.finished_on.all()) and early is True
        normed = normed + (_NEG if full else 0.0) + (0.0 if self.improvable else _NEG)
        normed = normed + (~(ends & self.top_mask)).float() * _NEG
        for j in torch.nonzero(ends & self.top_mask).flatten().tolist():
            self.nodes[made[j]].final_score = float(top_scores[j]) / float(index + 1) ** lp
        merged_scores = torch.cat([self.finished_scores, normed])
        merged_nodes = self.finished + made
        merged_on = torch.cat([self.finished_on, ends & self.top_mask])
        best = torch.topk(merged_scores, k=self.nb).indices.tolist()
        kept = [merged_nodes[i] for i in best]
        for node_id in set(self.finished) - set(kept) - {-1}:
            self.nodes[node_id].status, self.nodes[node_id].ended_at = "pruned", index  # pushed out by better ones
        self.finished, self.finished_scores, self.finished_on = kept, merged_scores[best], merged_on[best]
        for node_id, on in zip(self.finished, self.finished_on.tolist(), strict=True):
            if on:
                self.nodes[node_id].status = "finished"

    def _next_running(self, order: list[int], made: list[int], top_scores: torch.Tensor, parents: list[int],
                      tokens: list[int]) -> None:
        """The next round's rows: candidates ``order``; the cache reordered to their parents."""
        for b in set(self.running) - {-1}:
            expanded = any(self.nodes[made[j]].parent == b for j in order)
            self.nodes[b].status = "expanded" if expanded else "pruned"
        self.running = [made[j] for j in order]
        for node_id in self.running:
            self.nodes[node_id].status = "running"
        self.running_scores = top_scores[order]
        device = self.run.prompt_ids.device
        self.cache.reorder_cache(torch.tensor([parents[j] for j in order], device=device))
        self.inputs = torch.tensor([[tokens[j]] for j in order], device=device)  # (nb, 1)

    def _early_stop(self, index: int, ends: torch.Tensor) -> bool:
        """transformers' early-stop heuristic, after the round."""
        lp, early = self.config.length_penalty, self.config.early_stopping
        hypothetical = self.run.settings.max_new_tokens if early == "never" and lp > 0.0 else index + 1
        best_running = float(self.running_scores[0]) / float(hypothetical) ** lp
        worst_finished = float(self.finished_scores.min()) if bool(self.finished_on.all()) else _NEG
        self.improvable = self.improvable and best_running > worst_finished
        return not self.improvable or (bool(self.finished_on.all()) and early is True) or bool(ends.all())

    def result(self) -> list[Step]:
        """The returned hypothesis' Steps (the best finished one, else the best running one); the tree recorded."""
        chosen = self.finished[0] if bool(self.finished_on[0]) else self.running[0]
        for node in self.nodes:
            if node.status == "running":
                node.status = "pruned"  # the search ended: running hypotheses that did not finish
        if chosen >= 0:
            self.nodes[chosen].status = "returned"
        self.run.traces[0].meta.beam = BeamTree(self.nodes, chosen, self.config.config()).as_dict()
        return [self.steps[n] for n in path_ids(self.nodes, chosen)]

    def finish(self, out: list[Step]) -> None:
        """The Trace's stop reason and text."""
        trace, rules, tokenizer = self.run.traces[0], self.run.rules, self.run.tokenizer
        last = out[-1].token_id if out else None
        generated = [s.token_id for s in out]
        trace.stop_reason = self.reason or (rules.reason(last, generated, tokenizer.decode) if last is not None
                                            else "")
        if not trace.stop_reason:
            trace.stop_reason = "max_new_tokens"
        trace.text = tokenizer.decode(trace.token_ids, skip_special_tokens=True)

    def _tokens(self, node: int) -> list[int]:
        return [self.nodes[n].token_id for n in path_ids(self.nodes, node)]

