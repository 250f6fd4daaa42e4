"""Attention capture cost: plain `model.generate` vs `Session.generate(capture=["attention"])` (current query row of
every layer and head captured, per-head metrics computed every step) vs HF `generate(output_attentions=True)`
in eager mode. Greedy, 48 new tokens, short and ~1,000-token prompts, float32, one process, interleaved runs;
best of 7 (and median) reported.
Target: labkit ≤ 1.05 × plain at both prompt lengths.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _results
from _timing import interleaved, long_prompt, summary

import labkit
from labkit.measures.attention import attn_implementation

NEW_TOKENS = 48


def run_case(session: labkit.Session, prompt: str) -> dict:
    ids = session.encode(prompt)
    kw = {"do_sample": False, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS,
          "pad_token_id": session.tokenizer.eos_token_id}

    def plain() -> int:
        with torch.inference_mode():
            return session.model.generate(ids, **kw).shape[1] - ids.shape[1]

    def hf_eager_attentions() -> int:
        with torch.inference_mode(), attn_implementation(session.model, "eager"):
            out = session.model.generate(ids, output_attentions=True, return_dict_in_generate=True, **kw)
        return out.sequences.shape[1] - ids.shape[1]

    def labkit_capture() -> int:
        trace = session.generate(prompt, max_new_tokens=NEW_TOKENS, capture=["attention"])
        assert trace.steps[-1].attention, "attention metrics missing"
        return len(trace)

    # Two interleaved groups, each with its own plain baseline: HF eager + output_attentions allocates the full
    # (layers, heads, T, T) maps (about 1 GB at 1,000 tokens) and freeing them slows whatever runs next.
    lab = summary(interleaved({"model.generate": plain, "labkit capture": labkit_capture}), "model.generate")
    hf = summary(interleaved({"model.generate": plain, "HF eager output_attentions": hf_eager_attentions}),
                 "model.generate")
    return {"prompt_tokens": ids.shape[1], "new_tokens": NEW_TOKENS, **lab,
            "HF eager output_attentions": hf["HF eager output_attentions"],
            "model.generate (HF group)": hf["model.generate"]}


def main() -> None:
    s = labkit.Session(device="cpu", dtype="float32", progress=False)
    cases = {"short prompt": run_case(s, "Once upon a time"),
             "1000-token prompt": run_case(s, long_prompt(s.tokenizer))}
    for name, c in cases.items():
        lab, hf = c["labkit capture"], c["HF eager output_attentions"]
        print(f"{name:>18}: plain {c['model.generate']['ms_per_token']:7.2f} ms/token | labkit capture "
              f"{lab['ms_per_token']:7.2f} ({lab['ratio']:.3f}×, median {lab['median_ratio']:.3f}×; target ≤ 1.05)"
              f" | HF eager+attentions {hf['ms_per_token']:7.2f} ({hf['ratio']:.3f}×)")
    _results.write("attention", {"target_ratio": 1.05, "cases": cases})


if __name__ == "__main__":
    main()
