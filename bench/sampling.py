"""Sampler cost: ms/token of labkit's greedy vs Classic vs Mirostat vs EntropyGuided vs Entropix on the default
model, one process, 48 new tokens after a short prompt, interleaved runs, best of 7 (and median).
Target: Entropix ≤ 1.10 × greedy (its attention capture, metrics and 5 candidates cost only vocabulary-sized work).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _results
from _timing import interleaved, summary

import labkit
from labkit.sampling import Classic, Entropix, EntropyGuided, Mirostat

NEW_TOKENS = 48
PROMPT = "The old lighthouse keeper looked at the storm and"
TARGET = 1.10


def main() -> None:
    session = labkit.Session(device="cpu", dtype="float32", progress=False)
    samplers = {"greedy": lambda: None, "classic T=0.8 top_p=0.95": lambda: Classic(temperature=0.8, top_p=0.95),
                "mirostat": Mirostat, "entropy_guided": EntropyGuided.preset, "entropix": Entropix}

    def run(make):
        def once() -> int:  # ms per generated token, so an early EOS does not favour a sampler
            return len(session.generate(PROMPT, max_new_tokens=NEW_TOKENS, sampler=make(), seed=0))
        return once

    times = interleaved({name: run(make) for name, make in samplers.items()})
    result = summary(times, "greedy")
    for name, r in result.items():
        print(f"{name:>26}: {r['ms_per_token']:7.2f} ms/token | ratio to greedy {r['ratio']:.3f} "
              f"(median {r['median_ratio']:.3f})" + (f"; target ≤ {TARGET}" if name == "entropix" else ""))
    _results.write("sampling", {"target_ratio": TARGET, "prompt": PROMPT, "new_tokens": NEW_TOKENS,
                                "cases": result})


if __name__ == "__main__":
    main()
