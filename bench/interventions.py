"""Intervention cost: ms/token of plain `Session.generate` vs with one Suppress, one AblateHead, one Steer
(same model, one process, greedy, 48 new tokens after a short prompt, interleaved runs, best of 7 and median).
Target: each ≤ 1.05 × plain.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _results
from _timing import interleaved, summary

import labkit
from labkit.interventions import AblateHead, Steer, Suppress

NEW_TOKENS = 48
PROMPT = "The old lighthouse keeper looked at the storm and"
TARGET = 1.05


def main() -> None:
    session = labkit.Session(device="cpu", dtype="float32", progress=False)
    vector = torch.randn(session.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    cases = {"plain": [], "Suppress": [Suppress(" the")], "AblateHead": [AblateHead(10, 3)],
             "Steer": [Steer(15, vector, 0.5)]}

    def run(interventions):
        def once() -> int:
            return len(session.generate(PROMPT, max_new_tokens=NEW_TOKENS, interventions=interventions))
        return once

    result = summary(interleaved({name: run(items) for name, items in cases.items()}), "plain")
    for name, r in result.items():
        print(f"{name:>12}: {r['ms_per_token']:7.2f} ms/token | ratio {r['ratio']:.3f} (median {r['median_ratio']:.3f};"
              f" target ≤ {TARGET})")
    _results.write("interventions", {"target_ratio": TARGET, "prompt": PROMPT, "new_tokens": NEW_TOKENS,
                                     "cases": result})


if __name__ == "__main__":
    main()
