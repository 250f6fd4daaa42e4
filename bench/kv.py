"""KV-cache policies on long prompts (default model, CPU, float32, greedy, 32 new tokens; one run per cell):
cache memory as a fraction of the full cache, mean and max KL(policy ‖ full) in bits per step, top-1 agreement and
ms/token against the full cache measured in the same run (``labkit.decoding.kv.evaluate``), at about 2k and 6k tokens.
Goal: 4-bit with a 128-token full-precision window at ≤ 0.3 × the full cache's memory at 6k tokens with mean KL
≤ 0.05 bits/step; eviction policies at a fixed memory whatever the length.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _results
from _timing import long_prompt

import labkit
from labkit.decoding import kv

NEW_TOKENS = 32
LENGTHS = (2000, 6000)
POLICIES = ["full", "quant:bits=8,residual=128", "quant:bits=4,residual=128", "quant:bits=4,residual=128,int8=512",
            "window:sinks=4,window=508", "h2o:budget=384,recent=128"]
GOAL = {"policy": "quant:bits=4,residual=128,int8=0,group=32", "length": 6000, "max_ratio": 0.3, "max_mean_kl": 0.05}


def main() -> None:
    s = labkit.Session(device="cpu", dtype="float32", progress=False)
    figures: dict[str, list[dict[str, float | str]]] = {}
    for n in LENGTHS:
        prompt = long_prompt(s.tokenizer, n)
        table = kv.evaluate(s, [prompt], POLICIES, max_new_tokens=NEW_TOKENS).summary()
        full_ms = float(table.loc[table.policy == "full", "ms_per_token"].iloc[0])
        table["ms_vs_full"] = table["ms_per_token"] / full_ms
        figures[str(n)] = table.round(5).to_dict("records")
        print(f"== {n} prompt tokens")
        print(table[["policy", "cache_mib", "ratio_to_full", "mean_kl_bits", "max_kl_bits", "top1_agreement",
                     "ms_per_token", "ms_vs_full"]].round(4).to_string(index=False))
    goal_row = next(r for r in figures[str(GOAL["length"])] if r["policy"] == GOAL["policy"])
    met = goal_row["ratio_to_full"] <= GOAL["max_ratio"] and goal_row["mean_kl_bits"] <= GOAL["max_mean_kl"]
    print(f"goal ({GOAL['policy']} at {GOAL['length']} tokens: ratio ≤ {GOAL['max_ratio']}, mean KL ≤ "
          f"{GOAL['max_mean_kl']} bits): ratio {goal_row['ratio_to_full']:.3f}, mean KL {goal_row['mean_kl_bits']:.4f}"
          f" -> {'met' if met else 'NOT met'}")
    _results.write("kv", {"new_tokens": NEW_TOKENS, "policies": POLICIES, "by_length": figures, "goal": GOAL,
                          "goal_met": met})


if __name__ == "__main__":
    main()
