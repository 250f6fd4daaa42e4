"""Adaptive γ on this CPU: prompt lookup with a fixed γ = 10 vs `adaptive=True` (γ from the running acceptance rate
and the measured growth of the verification pass, 0 when no γ is expected to pay), against plain decoding, greedy,
on bench/speculative.py's prompts; interleaved, best of 3. Reports speedups and the γ chosen per round.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _results
from _timing import interleaved, summary
from speculative import NEW_TOKENS, PROMPTS

import labkit
from labkit.speculative import PromptLookupDraft, SpeculativeStats

REPEATS = 3


def main() -> None:
    session = labkit.Session()
    drafts = {"plain": None, "fixed": PromptLookupDraft(max_tokens=10),
              "adaptive": PromptLookupDraft(max_tokens=10, adaptive=True)}
    figures = {}
    for name, prompt in PROMPTS.items():
        traces: dict[str, labkit.Trace] = {}

        def run(key, draft, prompt=prompt, traces=traces):
            def once() -> int:
                traces[key] = session.generate(prompt, max_new_tokens=NEW_TOKENS, chat=True, speculative=draft)
                return len(traces[key])
            return once

        times = summary(interleaved({k: run(k, d) for k, d in drafts.items()}, repeats=REPEATS), "plain")
        row = {}
        for key in ("fixed", "adaptive"):
            stats = SpeculativeStats.of(traces[key])
            row[key] = {"speedup": round(1 / times[key]["ratio"], 3),
                        "median_speedup": round(1 / times[key]["median_ratio"], 3),
                        "alpha": round(stats.alpha, 3), "rounds": stats.rounds, "gammas": stats.gammas,
                        "identical_to_plain": traces[key].token_ids == traces["plain"].token_ids}
        figures[name] = {"plain_ms_per_token": times["plain"]["ms_per_token"], **row}
        print(f"== {name}: fixed γ=10 {row['fixed']['speedup']:.2f}× (median {row['fixed']['median_speedup']:.2f}×), "
              f"adaptive {row['adaptive']['speedup']:.2f}× (median {row['adaptive']['median_speedup']:.2f}×); "
              f"adaptive γ per round {row['adaptive']['gammas'][:24]}")
    _results.write("speculative_adaptive", {"new_tokens": NEW_TOKENS, "repeats": REPEATS, "decoding": "greedy",
                                            "draft": "prompt lookup", "prompts": figures})


if __name__ == "__main__":
    main()
