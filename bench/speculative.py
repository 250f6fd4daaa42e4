"""Speculative decoding: ms/token of plain decoding vs each labkit draft kind vs transformers' own speculative
modes, on the same prompts, in one process (default model, fp32 target on CPU, greedy and sampled).

labkit: plain `Session.generate` vs `speculative=PromptLookupDraft()`, `LayerSkipDraft(24)`, `QuantizedDraft()`
(bf16). transformers: plain `model.generate` vs `prompt_lookup_num_tokens=10`, `assistant_model=<bf16 copy>` and
`assistant_early_exit=24` (its layer-skip). Speedups are each library's speculative run against its own plain run
(best of the interleaved repeats, medians beside). Prompts: a copy-heavy paragraph edit and code edit, and an
open-ended story (all with the chat template). Greedy outputs must equal plain greedy token for token.

`python bench/speculative.py greedy/open-ended sampled/open-ended` runs only the named cases and keeps the other
cases' recorded figures in bench/results/speculative.json; LABKIT_BENCH_REPEATS=5 repeats each variant 5 times.

Targets (issue 7): ≥ 1.5× on the copy-heavy prompt with identical greedy output, and at least transformers' speedup
for the same draft kind.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _results
from _timing import interleaved, summary

import labkit
from labkit.sampling import Classic
from labkit.speculative import LayerSkipDraft, PromptLookupDraft, QuantizedDraft, SpeculativeStats

NEW_TOKENS = 96
REPEATS = int(os.environ.get("LABKIT_BENCH_REPEATS", "3"))  # interleaved repeats per variant
EXIT_LAYER = 24
PARAGRAPH = ("The river runs past the old mill, under the stone bridge and out into the fields, where the farmers "
             "bring their cattle to drink in the long summer evenings. In winter the water rises and the children "
             "watch from the bridge as branches and leaves are carried away towards the sea. Nobody in the village "
             "remembers a year when the river froze, although the old miller says his grandfather once walked "
             "across it to the church.")
CODE = ("def mean(values):\n    total = 0\n    count = 0\n    for value in values:\n        total = total + value\n"
        "        count = count + 1\n    return total / count\n\n\ndef spread(values):\n    low = min(values)\n"
        "    high = max(values)\n    return high - low\n")
PROMPTS = {
    "copy-paragraph": "Repeat this paragraph exactly, changing 'river' to 'stream':\n\n" + PARAGRAPH,
    "copy-code": "Repeat this code exactly, adding a docstring to each function:\n\n```python\n" + CODE + "```",
    "open-ended": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}
SAMPLED = {"temperature": 0.7, "top_p": 0.95}
MODES = {"greedy": ["copy-paragraph", "copy-code", "open-ended"], "sampled": ["copy-paragraph", "open-ended"]}


def main() -> None:
    session = labkit.Session(device="cpu", dtype="float32", progress=False)
    model, tok = session.model, session.tokenizer
    bf16 = QuantizedDraft("bfloat16", gamma=20, confidence=0.4)  # transformers' assistant defaults: 20 tokens, 0.4
    bf16.bind(session)  # load once; its model is also transformers' assistant
    assistant = bf16._model
    drafts = {"prompt-lookup": PromptLookupDraft(ngram=3, max_tokens=10), f"layer-skip:{EXIT_LAYER}":
              LayerSkipDraft(EXIT_LAYER, gamma=20, confidence=0.4), "bf16": bf16}
    hf_modes = {"prompt-lookup": {"prompt_lookup_num_tokens": 10, "max_matching_ngram_size": 3},
                f"layer-skip:{EXIT_LAYER}": {"assistant_early_exit": EXIT_LAYER},
                "bf16": {"assistant_model": assistant}}
    only = set(sys.argv[1:])  # e.g. "greedy/open-ended": run these cases only, keep the others' recorded figures
    table: dict[str, dict] = _recorded() if only else {}
    for mode, names in MODES.items():
        sampler = Classic(**SAMPLED) if mode == "sampled" else None
        hf_sampling = {"do_sample": True, **SAMPLED} if mode == "sampled" else {"do_sample": False}
        for name in names:
            if only and f"{mode}/{name}" not in only:
                continue
            prompt = PROMPTS[name]
            ids = session.encode(prompt, chat=True)
            traces: dict[str, labkit.Trace] = {}
            hf_out: dict[str, list[int]] = {}

            def labkit_run(key, draft, prompt=prompt, sampler=sampler, traces=traces):
                def once() -> int:
                    traces[key] = session.generate(prompt, max_new_tokens=NEW_TOKENS, chat=True, sampler=sampler,
                                                   seed=0, speculative=draft)
                    return len(traces[key])
                return once

            def hf_run(key, extra, ids=ids, hf_sampling=hf_sampling, hf_out=hf_out):
                def once() -> int:
                    torch.manual_seed(0)
                    with torch.inference_mode():
                        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                             pad_token_id=tok.eos_token_id, top_k=None, **hf_sampling, **extra)
                    hf_out[key] = out[0, ids.shape[1]:].tolist()
                    return len(hf_out[key])
                return once

            runs = {"labkit plain": labkit_run("plain", None)}
            runs |= {f"labkit {k}": labkit_run(k, d) for k, d in drafts.items()}
            runs["transformers plain"] = hf_run("plain", {})
            runs |= {f"transformers {k}": hf_run(k, extra) for k, extra in hf_modes.items()}
            times = interleaved(runs, repeats=REPEATS)
            lab = summary({k: v for k, v in times.items() if k.startswith("labkit")}, "labkit plain")
            hf = summary({k: v for k, v in times.items() if k.startswith("transformers")}, "transformers plain")
            rows = {}
            for kind in drafts:
                stats = SpeculativeStats.of(traces[kind])
                a, b = lab[f"labkit {kind}"], hf[f"transformers {kind}"]
                rows[kind] = {
                    "labkit_ms_per_token": a["ms_per_token"], "labkit_speedup": round(1 / a["ratio"], 3),
                    "labkit_median_speedup": round(1 / a["median_ratio"], 3),
                    "alpha": round(stats.alpha, 3), "tokens_per_round": round(stats.tokens_per_round, 2),
                    "cost_ratio": round(stats.cost_ratio, 3) if stats.drafted else None,
                    "expected_speedup": round(stats.expected_speedup, 3) if stats.drafted else None,
                    "labkit_identical_to_plain": traces[kind].token_ids == traces["plain"].token_ids,
                    "transformers_ms_per_token": b["ms_per_token"], "transformers_speedup": round(1 / b["ratio"], 3),
                    "transformers_median_speedup": round(1 / b["median_ratio"], 3),
                    "transformers_identical_to_plain": hf_out[kind] == hf_out["plain"],
                }
            table[f"{mode}/{name}"] = {"labkit_plain_ms_per_token": lab["labkit plain"]["ms_per_token"],
                                       "transformers_plain_ms_per_token": hf["transformers plain"]["ms_per_token"],
                                       "tokens": len(traces["plain"]), "repeats": REPEATS, "drafts": rows,
                                       "raw": {"labkit": lab, "transformers": hf}}
            print(f"== {mode} / {name}: labkit plain {lab['labkit plain']['ms_per_token']:.1f} ms/token, "
                  f"transformers plain {hf['transformers plain']['ms_per_token']:.1f} ms/token")
            write(table)  # after every case, so an interrupted run keeps what it measured
            for kind, r in rows.items():
                print(f"  {kind:>14}: labkit {r['labkit_speedup']:.2f}× (median {r['labkit_median_speedup']:.2f}×, "
                      f"α={r['alpha']}, {r['tokens_per_round']} tok/round, identical={r['labkit_identical_to_plain']})"
                      f" | transformers {r['transformers_speedup']:.2f}× (median "
                      f"{r['transformers_median_speedup']:.2f}×, identical={r['transformers_identical_to_plain']})")
    write(table)


def _recorded() -> dict:
    path = Path(__file__).parent / "results" / "speculative.json"
    return json.loads(path.read_text())["cases"] if path.exists() else {}


def write(table: dict) -> None:
    _results.write("speculative", {"new_tokens": NEW_TOKENS, "sampled": SAMPLED,
                                   "targets": "copy-heavy greedy ≥ 1.5× with identical output; ≥ transformers' "
                                              "speedup for the same draft kind", "cases": table})


if __name__ == "__main__":
    main()
