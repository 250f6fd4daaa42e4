"""Decoding speed: plain `model.generate` vs `Session.generate` with full per-step instrumentation.

Same process, same model and dtype, greedy, 48 new tokens. Runs are interleaved (baseline, labkit, baseline, ...)
and the best (and median) of each is reported, in ms per generated token, with the ratio labkit / baseline
(target: ≤ 1.03). Cases: a short prompt, a ~1,000-token prompt, and bfloat16.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _results
from _timing import interleaved, long_prompt, summary

import labkit

NEW_TOKENS = 48
SHORT = "Once upon a time"


def run_case(session: labkit.Session, prompt: str) -> dict:
    ids = session.encode(prompt)

    def plain() -> int:
        with torch.inference_mode():
            out = session.model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                         pad_token_id=session.tokenizer.eos_token_id)
        return out.shape[1] - ids.shape[1]

    def instrumented() -> int:
        trace = session.generate(prompt, max_new_tokens=NEW_TOKENS, top_k=10)
        trace.to_pandas()  # building the table is part of what a user pays for
        return len(trace)

    result = summary(interleaved({"model.generate": plain, "labkit": instrumented}), "model.generate")
    return {"prompt_tokens": ids.shape[1], "new_tokens": NEW_TOKENS, **result}


def main() -> None:
    cases = {}
    fp32 = labkit.Session(device="cpu", dtype="float32", progress=False)
    cases["float32 short prompt"] = run_case(fp32, SHORT)
    cases["float32 1000-token prompt"] = run_case(fp32, long_prompt(fp32.tokenizer))
    del fp32
    bf16 = labkit.Session(device="cpu", dtype="bfloat16", progress=False)
    cases["bfloat16 short prompt"] = run_case(bf16, SHORT)
    for name, c in cases.items():
        lab = c["labkit"]
        print(f"{name:>28}: model.generate {c['model.generate']['ms_per_token']:7.2f} ms/token | labkit "
              f"{lab['ms_per_token']:7.2f} ms/token | ratio {lab['ratio']:.3f} (median {lab['median_ratio']:.3f}; "
              "target ≤ 1.03)")
    _results.write("decode", {"target_ratio": 1.03, "cases": cases})


if __name__ == "__main__":
    main()
