"""Where a speculative run's time goes, labkit vs transformers on the same draft kind: the copy-paragraph prompt
of bench/speculative.py, greedy, prompt lookup and the bf16 copy, the two libraries alternating in one process.
For each run: wall ms, the target's (and the draft's) forward passes — count, positions fed, ms — and the rest
(each library's own work: sampling, metrics, bookkeeping). Ratio: labkit wall ÷ transformers wall (median).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _results
from speculative import PROMPTS

import labkit
from labkit.speculative import PromptLookupDraft, QuantizedDraft

REPEATS = 5
NEW_TOKENS = 96


class Forwards:
    """Counts and times a model's forward calls (positions fed, ms)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = self.positions = 0
        self.ms = 0.0
        inner = model.forward

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            self.ms += (time.perf_counter() - t0) * 1e3
            self.calls += 1
            self.positions += (kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]).shape[1]
            return out

        model.forward = timed

    def take(self) -> dict[str, float]:
        out = {"calls": self.calls, "positions": self.positions, "ms": round(self.ms, 1)}
        self.calls = self.positions = 0
        self.ms = 0.0
        return out


def main() -> None:
    session = labkit.Session()
    tok = session.tokenizer
    bf16 = QuantizedDraft("bfloat16", gamma=20, confidence=0.4)  # transformers' assistant defaults
    bf16.bind(session)
    target, draft = Forwards(session.model), Forwards(bf16._model)
    prompt = PROMPTS["copy-paragraph"]
    ids = session.encode(prompt, chat=True)
    kinds = {"prompt-lookup": (PromptLookupDraft(), {"prompt_lookup_num_tokens": 10, "max_matching_ngram_size": 3}),
             "bf16": (bf16, {"assistant_model": bf16._model})}

    def labkit_run(speculative) -> int:
        return len(session.generate(prompt, max_new_tokens=NEW_TOKENS, chat=True, speculative=speculative))

    def hf_run(extra) -> int:
        with torch.inference_mode():
            out = session.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                         pad_token_id=tok.eos_token_id, do_sample=False, top_k=None, **extra)
        return out.shape[1] - ids.shape[1]

    figures = {}
    for kind, (ours, theirs) in kinds.items():
        runs = {"labkit": lambda ours=ours: labkit_run(ours), "transformers": lambda theirs=theirs: hf_run(theirs)}
        for fn in runs.values():  # warm-up
            fn()
        target.take(), draft.take()
        rows: dict[str, list[dict]] = {name: [] for name in runs}
        for _ in range(REPEATS):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                tokens = fn()
                wall = (time.perf_counter() - t0) * 1e3
                t, d = target.take(), draft.take()
                rows[name].append({"tokens": tokens, "wall_ms": round(wall, 1), "target": t, "draft": d,
                                   "own_ms": round(wall - t["ms"] - d["ms"], 1)})
        med = {name: statistics.median(r["wall_ms"] for r in rs) for name, rs in rows.items()}
        figures[kind] = {"median_wall_ms": med, "ratio_labkit_to_transformers": round(med["labkit"] /
                                                                                       med["transformers"], 3),
                         "runs": rows}
        print(f"== {kind}: median wall labkit {med['labkit']:.0f} ms, transformers {med['transformers']:.0f} ms "
              f"→ ratio {figures[kind]['ratio_labkit_to_transformers']:.3f}")
        for name, rs in rows.items():
            r = rs[len(rs) // 2]
            print(f"   {name:>12}: {r['tokens']} tokens; target {r['target']['calls']} passes, "
                  f"{r['target']['positions']} positions, {r['target']['ms']:.0f} ms; draft {r['draft']['calls']} "
                  f"passes, {r['draft']['ms']:.0f} ms; own work {r['own_ms']:.0f} ms")
    _results.write("speculative_split", {"prompt": "copy-paragraph", "decoding": "greedy", "repeats": REPEATS,
                                         "new_tokens": NEW_TOKENS, "kinds": figures})


if __name__ == "__main__":
    main()
