"""Beam search on the batch dimension: transformers' algorithm step for step, every hypothesis measured, the tree kept.

``s.generate(prompt, sampler=BeamSearch(num_beams=4))`` keeps ``num_beams`` running hypotheses as the rows of one
batched forward pass. Each round scores every continuation of every row, keeps the best ``2·num_beams``, sends the
best ``num_beams`` that do not end to the next round (the cache reordered to their parents) and offers the ending
ones among the best ``num_beams`` to the finished set, scored ``Σ log p / length ** length_penalty`` — transformers'
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

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from labkit.beam_tree import BeamNode, BeamTree, path_ids
from labkit.cache import forward_cached, new_cache
from labkit.decode import _measure, make_step
from labkit.interventions.base import TokenIntervention, apply_rows
from labkit.kv import cache_bytes
from labkit.sampling.beam import BeamSearch
from labkit.tokens import TokenTexts
from labkit.trace import Step, Trace

__all__ = ["BeamNode", "BeamSearch", "BeamTree", "search"]

_NEG = -1.0e9  # transformers' "impossible" score (kept equal so ties and masks behave as there)


def search(model: Any, tokenizer: Any, prompt_ids: torch.Tensor, trace: Trace, beams: BeamSearch, rules: Any, *,
           stop_event: threading.Event | None = None, top_k: int = 10, token_text: TokenTexts | None = None,
           interventions: Sequence[TokenIntervention] = (), session: Any = None,
           metrics: Sequence[str] = (), keep_logits: bool = False, record_kv: bool = False) -> Iterator[Step]:
    """Run beam search from ``prompt_ids`` (1, T); at the end append the returned hypothesis' Steps to ``trace``
    and yield them (nothing is yielded while hypotheses are still being ranked). ``rules`` (a StopRules) decide
    which candidates end; ``max_new_tokens`` ends every hypothesis. Stop / KeyboardInterrupt end the search early
    with the best hypothesis so far (finished if there is one, else the best running one). ``keep_logits`` keeps
    each Step's logits after the token-level interventions in ``Step.captures["logits"]`` (V,); ``record_kv`` its
    ``Step.kv`` (the full cache: one hypothesis' share of the bytes, every row holding as many positions)."""
    token_text = token_text or TokenTexts(tokenizer)
    stop_event = stop_event or threading.Event()
    nb, lp, coef, early = beams.num_beams, beams.length_penalty, beams.entropy_coef, beams.early_stopping
    keep = max(2, 1 + len(rules.eos_ids | rules.stop_ids)) * nb  # candidates kept per round, as transformers
    top_mask = torch.arange(keep) < nb
    device = prompt_ids.device
    cache = new_cache()
    nodes: list[BeamNode] = []
    steps: dict[int, Step] = {}  # node id -> its Step
    running = [-1] * nb  # node id of each row's last token (−1: the prompt)
    running_scores = torch.full((nb,), _NEG)
    running_scores[0] = 0.0  # the rows start identical: only row 0's continuations count at first
    finished = [-1] * nb
    finished_scores = torch.full((nb,), _NEG)
    finished_on = torch.zeros(nb, dtype=torch.bool)
    improvable = True
    inputs = prompt_ids.expand(nb, -1)  # (nb, T): the prompt in every row, as transformers prefills
    reason = "stopped"
    try:
        with torch.inference_mode():
            for index in range(rules.max_new_tokens):
                if stop_event.is_set():
                    break
                t0 = time.perf_counter()
                raw = forward_cached(model, inputs, cache, 1)[:, -1].float()  # (nb, V) raw logits
                histories = [_tokens(nodes, node) for node in running]
                edited = torch.cat([apply_rows(raw[b:b + 1], index, histories[b], [], trace.prompt_ids, session,
                                               interventions)[0] for b in range(nb)])  # (nb, V)
                log_probs = beams(inputs, edited)  # (nb, V) nats
                m = _measure(raw, log_probs, log_probs, top_k, metrics)
                acc = log_probs + running_scores[:, None]
                if coef:
                    acc = acc + coef * m.step.entropy_bits[:, None]
                vocab = acc.shape[-1]
                top_scores, top_index = torch.topk(acc.reshape(-1), k=keep)  # (keep,)
                parents, tokens = (top_index // vocab).tolist(), (top_index % vocab).tolist()
                last = index + 1 >= rules.max_new_tokens
                ends = torch.tensor([last or bool(rules.reason(tok, histories[p] + [tok], tokenizer.decode))
                                     for p, tok in zip(parents, tokens, strict=True)])
                ms = (time.perf_counter() - t0) * 1e3 / nb
                made = []
                for j, (p, tok) in enumerate(zip(parents, tokens, strict=True)):
                    node = BeamNode(len(nodes), running[p], index, tok, token_text(tok),
                                    float(log_probs[p, tok]), float(top_scores[j]), ended_at=index)
                    nodes.append(node)
                    made.append(node.id)
                    step = make_step(p, index, prompt_ids.shape[1] + index, tok, {}, m.step,
                                     {**beams.record(log_probs[p:p + 1]), **m.sampling[p].as_dict(),
                                      "beam_row": p, "beam_score": node.score}, [],
                                     {name: values[p] for name, values in m.registered.items()}, token_text)
                    step.time_ms = ms
                    if keep_logits:
                        step.captures["logits"] = edited[p]
                    if record_kv:
                        step.kv = {"policy": "full", "bytes": cache_bytes(cache) // nb}
                    steps[node.id] = step
                # the next running beams: the best nb candidates that do not end
                order = torch.topk(top_scores + ends.float() * _NEG, k=nb).indices.tolist()
                # finishing candidates among the best nb, offered to the finished set
                normed = top_scores / float(index + 1) ** lp
                full = bool(finished_on.all()) and early is True
                normed = normed + (_NEG if full else 0.0) + (0.0 if improvable else _NEG)
                normed = normed + (~(ends & top_mask)).float() * _NEG
                for j in torch.nonzero(ends & top_mask).flatten().tolist():
                    nodes[made[j]].final_score = float(top_scores[j]) / float(index + 1) ** lp
                merged_scores = torch.cat([finished_scores, normed])
                merged_nodes = finished + made
                merged_on = torch.cat([finished_on, ends & top_mask])
                best = torch.topk(merged_scores, k=nb).indices.tolist()
                kept = [merged_nodes[i] for i in best]
                for node_id in set(finished) - set(kept) - {-1}:
                    nodes[node_id].status, nodes[node_id].ended_at = "pruned", index  # pushed out by better ones
                finished, finished_scores, finished_on = kept, merged_scores[best], merged_on[best]
                for node_id, on in zip(finished, finished_on.tolist(), strict=True):
                    if on:
                        nodes[node_id].status = "finished"
                for b in set(running) - {-1}:
                    nodes[b].status = "expanded" if any(nodes[made[j]].parent == b for j in order) else "pruned"
                running = [made[j] for j in order]
                for node_id in running:
                    nodes[node_id].status = "running"
                running_scores = top_scores[order]
                cache.reorder_cache(torch.tensor([parents[j] for j in order], device=device))
                inputs = torch.tensor([[tokens[j]] for j in order], device=device)  # (nb, 1)
                # transformers' early-stop heuristic, after the round
                hypothetical = rules.max_new_tokens if early == "never" and lp > 0.0 else index + 1
                best_running = float(running_scores[0]) / float(hypothetical) ** lp
                worst_finished = float(finished_scores.min()) if bool(finished_on.all()) else _NEG
                improvable = improvable and best_running > worst_finished
                if not improvable or (bool(finished_on.all()) and early is True) or bool(ends.all()):
                    reason = ""
                    break
            else:
                reason = ""
    except KeyboardInterrupt:
        reason = "interrupted"
    chosen = finished[0] if bool(finished_on[0]) else running[0]  # no hypothesis finished: the best running one
    for node in nodes:
        if node.status == "running":
            node.status = "pruned"  # the search ended: running hypotheses that did not finish
    if chosen >= 0:
        nodes[chosen].status = "returned"
    path = path_ids(nodes, chosen)
    trace.meta.beam = BeamTree(nodes, chosen, beams.config()).as_dict()
    out = [steps[n] for n in path]
    try:
        for step in out:
            trace.steps.append(step)
            yield step
    finally:
        last = out[-1].token_id if out else None
        generated = [s.token_id for s in out]
        trace.stop_reason = reason or (rules.reason(last, generated, tokenizer.decode) if last is not None else "")
        if not trace.stop_reason:
            trace.stop_reason = "max_new_tokens"
        trace.text = tokenizer.decode(trace.token_ids, skip_special_tokens=True)


def _tokens(nodes: list[BeamNode], node: int) -> list[int]:
    return [nodes[n].token_id for n in path_ids(nodes, node)]
