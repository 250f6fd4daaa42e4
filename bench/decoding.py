"""Decoding strategies on the default model (CPU, float32, one prompt, 32 new tokens; interleaved repeats):

1. batched sampling: ``generate(prompt, n=8, seed=0)`` vs 8 single runs with seeds 0..7 (aim ≥ 2.5 × faster);
2. beam search: labkit's ``BeamSearch(4)`` vs transformers' ``generate(num_beams=4, do_sample=False)`` on the same
   prompt, ms per generated token (aim ≤ 1.0 ×), after checking they return the same tokens;
3. contrastive decoding (early-exit amateur), DoLa and contrastive search: ms/token against greedy in the same run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _results
import torch
from _timing import interleaved, summary

import labkit
from labkit.decoding.beam import BeamSearch
from labkit.sampling import Classic, parse_sampler

PROMPT = "The history of the city begins with a small settlement on the river, where"
NEW_TOKENS = 32
N = 8


def main() -> None:
    s = labkit.Session(device="cpu", dtype="float32", progress=False)
    ids = s.encode(PROMPT)
    sampler = Classic(temperature=1.0)

    def batched() -> int:
        return sum(len(t) for t in s.generate(PROMPT, max_new_tokens=NEW_TOKENS, sampler=sampler, seed=0, n=N))

    def singles() -> int:
        return sum(len(s.generate(PROMPT, max_new_tokens=NEW_TOKENS, sampler=sampler, seed=b)) for b in range(N))

    batch = summary(interleaved({"singles": singles, "batched": batched}, repeats=3), "singles")
    speedup = batch["singles"]["ms_per_token"] / batch["batched"]["ms_per_token"]
    print(f"batched n={N}: {batch['batched']['ms_per_token']} ms/token vs {batch['singles']['ms_per_token']} "
          f"single runs: {speedup:.2f}x faster (aim >= 2.5x)")

    def hf_beam() -> int:
        with torch.no_grad():
            out = s.model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=4, do_sample=False,
                                   max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        return out.shape[1] - ids.shape[1]

    def lab_beam() -> int:
        return len(s.generate(PROMPT, max_new_tokens=NEW_TOKENS, beam=BeamSearch(4)))

    with torch.no_grad():
        ref = s.model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=4, do_sample=False,
                               max_new_tokens=NEW_TOKENS)[0, ids.shape[1]:].tolist()
    same = s.generate(PROMPT, max_new_tokens=NEW_TOKENS, beam=BeamSearch(4)).token_ids == ref
    beam = summary(interleaved({"transformers": hf_beam, "labkit": lab_beam}, repeats=3), "transformers")
    print(f"beam search (4 beams): labkit {beam['labkit']['ms_per_token']} ms/token vs transformers "
          f"{beam['transformers']['ms_per_token']}: {beam['labkit']['ratio']:.2f}x (aim <= 1.0x); same tokens: {same}")

    specs = ["greedy", "contrastive:alpha=0.1,beta=0.5,amateur=layers:8", "dola:layers=high",
             "contrastive-search:penalty_alpha=0.6,top_k=4"]

    def run(spec: str):
        return lambda: len(s.generate(PROMPT, max_new_tokens=NEW_TOKENS, sampler=parse_sampler(spec)))

    contrast = summary(interleaved({spec: run(spec) for spec in specs}, repeats=3), "greedy")
    for spec in specs:
        print(f"{spec:<48} {contrast[spec]['ms_per_token']:>7} ms/token  {contrast[spec]['ratio']:.2f}x greedy")
    _results.write("decoding", {"new_tokens": NEW_TOKENS, "batched": {"n": N, "speedup": round(speedup, 3), **batch},
                                "beam": {"num_beams": 4, "same_tokens": same, **beam}, "contrast": contrast})


if __name__ == "__main__":
    main()
