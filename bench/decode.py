"""Decoding speed: plain `model.generate` vs `Session.generate` with full per-step instrumentation.

Same process, same model and dtype, greedy, 48 new tokens. Runs are interleaved (baseline, labkit, baseline, ...)
and the median of each is reported, in ms per generated token, with the ratio labkit / baseline
(target: ≤ 1.03). Cases: a short prompt, a ~1,000-token prompt, and bfloat16.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _results

import labkit

NEW_TOKENS = 48
REPEATS = 5
SHORT = "Once upon a time"
LONG_SEED = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
             "grain, salt and cloth. Over the centuries it grew into a market town and then a capital. ")


def long_prompt(session: labkit.Session, n_tokens: int = 1000) -> str:
    text = LONG_SEED
    while len(session.tokenizer(text).input_ids) < n_tokens:
        text += LONG_SEED
    ids = session.tokenizer(text).input_ids[:n_tokens]
    return session.tokenizer.decode(ids)


def run_case(session: labkit.Session, prompt: str) -> dict[str, float]:
    ids = session.encode(prompt)
    model = session.model

    def baseline() -> tuple[float, int]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 pad_token_id=session.tokenizer.eos_token_id)
        return time.perf_counter() - t0, out.shape[1] - ids.shape[1]

    def instrumented() -> tuple[float, int]:
        t0 = time.perf_counter()
        trace = session.generate(prompt, max_new_tokens=NEW_TOKENS, top_k=10)
        trace.to_pandas()  # building the table is part of what a user pays for
        return time.perf_counter() - t0, len(trace)

    baseline(), instrumented()  # warm-up
    base_ms, lab_ms = [], []
    for _ in range(REPEATS):
        for fn, sink in ((baseline, base_ms), (instrumented, lab_ms)):
            seconds, n = fn()
            sink.append(seconds * 1e3 / n)
    b, lab = statistics.median(base_ms), statistics.median(lab_ms)
    return {"prompt_tokens": ids.shape[1], "new_tokens": NEW_TOKENS, "baseline_ms_per_token": round(b, 2),
            "labkit_ms_per_token": round(lab, 2), "ratio": round(lab / b, 4),
            "baseline_runs_ms": [round(x, 2) for x in base_ms], "labkit_runs_ms": [round(x, 2) for x in lab_ms]}


def main() -> None:
    cases = {}
    fp32 = labkit.Session(device="cpu", dtype="float32", progress=False)
    cases["float32 short prompt"] = run_case(fp32, SHORT)
    cases["float32 1000-token prompt"] = run_case(fp32, long_prompt(fp32))
    del fp32
    bf16 = labkit.Session(device="cpu", dtype="bfloat16", progress=False)
    cases["bfloat16 short prompt"] = run_case(bf16, SHORT)
    for name, c in cases.items():
        print(f"{name:>28}: model.generate {c['baseline_ms_per_token']:7.2f} ms/token | labkit "
              f"{c['labkit_ms_per_token']:7.2f} ms/token | ratio {c['ratio']:.3f} (target ≤ 1.03)")
    _results.write("decode", {"target_ratio": 1.03, "cases": cases})


if __name__ == "__main__":
    main()
