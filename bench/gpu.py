"""The GPU proof, as one prepared script: run it whenever a CUDA machine is at hand (``python bench/gpu.py``, a few
minutes on one GPU). Each check compares labkit on CUDA with an independent answer and writes its figures to
bench/results/gpu.json; the script exits 1 when a check fails.

Checks (default model; the 1B shape of bench/scale.py where a larger model matters):

1. dtypes — bfloat16 and float16 sessions: next-token log-probabilities against transformers' own forward in the same
   dtype, greedy tokens against ``model.generate``; ms/token ratio against ``model.generate``.
2. bitsandbytes — 8-bit and 4-bit sessions load, predict " Paris" after "The capital of France is", generate,
   and report ms/token and the weights' memory.
3. attention backends — SDPA, eager and xformers: the captured attention rows against eager ``output_attentions``;
   ms/token of each.
4. device_map across GPU and CPU — half the blocks on cuda:0, half on the CPU (float32): next-token log-probs,
   greedy tokens, captured attention, head ablation, DLA and IG against the single-GPU session (1e-4).
5. speculative decoding — prompt lookup on a copy-heavy prompt: same greedy tokens as plain decoding, speedup.
6. attribution — IG (default settings) on a 256-token text: completeness error, points used, seconds; saliency.
7. KV cache — a 4-bit quantised cache against the full one: bytes and greedy agreement over 64 tokens.
8. memory — full attention maps of 4,096 tokens in float16: labkit's estimate against the CUDA peak measured.

``--only WORD`` runs the checks whose name contains WORD (e.g. ``--only attribution``).
``python bench/gpu.py --cpu`` runs the same script on the CPU, to check the script itself on a machine without a GPU
(xformers and the CUDA memory peak are left out; the split puts half the blocks on disk instead of the GPU); its
figures go to bench/results/gpu-cpu-dry-run.json.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _results
from _timing import interleaved, long_prompt, summary

import labkit
from labkit.interventions import AblateHead
from labkit.speculative import PromptLookupDraft

PROMPT = "The capital of France is"
STORY = "Once upon a time, in a village by the sea, there lived"
COPY = ("Rewrite this sentence exactly: The river runs past the old mill, under the stone bridge and out into the "
        "fields, where the farmers bring their cattle to drink in the long summer evenings. Rewritten: The river runs")
NEW = 32
CHECKS: list[tuple[str, bool, Callable[[str], dict[str, Any]]]] = []  # (name, needs CUDA, function), in order


def check(name: str, needs_cuda: bool = False) -> Callable[[Callable[[str], dict[str, Any]]], Any]:
    """Register the decorated function as a check; :func:`main` runs them in order."""

    def register(fn: Callable[[str], dict[str, Any]]) -> Callable[[str], dict[str, Any]]:
        CHECKS.append((name, needs_cuda, fn))
        return fn

    return register


def run_checks(device: str, only: str | None = None) -> list[dict[str, Any]]:
    """Run every check on ``device`` (those whose name contains ``only``, when given); a failing check is recorded
    (with its error) and the others still run."""
    results = []
    for name, needs_cuda, fn in CHECKS:
        if only is not None and only not in name:
            continue
        if needs_cuda and device != "cuda":
            results.append({"check": name, "status": "skipped: needs CUDA"})
            print(f"-- {name}: skipped (needs CUDA)")
            continue
        t0 = time.perf_counter()
        try:
            figures = fn(device)
            results.append({"check": name, "status": "ok", "seconds": round(time.perf_counter() - t0, 1), **figures})
            print(f"ok {name}: {figures}")
        except Exception as e:
            results.append({"check": name, "status": f"FAILED: {type(e).__name__}: {e}"})
            print(f"FAILED {name}:\n{traceback.format_exc()}")
    return results


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> float:
    diff = float((a.float().cpu() - b.float().cpu()).abs().max())
    if diff > atol:
        raise AssertionError(f"max difference {diff:.3g} > {atol}")
    return diff


def _own_logprobs(s: labkit.Session, prompt: str) -> torch.Tensor:
    """The model's own last-position log-probabilities (transformers alone, the same logits_to_keep as labkit)."""
    with torch.no_grad():
        logits = s.model(input_ids=s.encode(prompt), logits_to_keep=1).logits[0, -1].float()
    return torch.log_softmax(logits, -1).cpu()


def _ms_per_token(s: labkit.Session, prompt: str = STORY) -> dict[str, Any]:
    ids = s.encode(prompt)

    def plain() -> int:
        with torch.inference_mode():
            out = s.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                                   do_sample=False, pad_token_id=s.tokenizer.eos_token_id)
        _sync()
        return out.shape[1] - ids.shape[1]

    def ours() -> int:
        n = len(s.generate(prompt, max_new_tokens=NEW, stop=[]))
        _sync()
        return n

    return summary(interleaved({"transformers": plain, "labkit": ours}, repeats=3), "transformers")


@check("dtypes: bfloat16 and float16 against transformers")
def _dtypes(device: str) -> dict[str, Any]:
    out = {}
    for dtype in ("bfloat16", "float16"):
        s = labkit.Session(device=device, dtype=dtype, progress=False)
        diff = _close(s.next_token(PROMPT).logprobs, _own_logprobs(s, PROMPT), 1e-5)
        ids = s.encode(STORY)
        with torch.inference_mode():
            ref = s.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                   pad_token_id=s.tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
        got = s.generate(STORY, max_new_tokens=NEW).token_ids
        assert got == ref[:len(got)], f"{dtype}: greedy tokens differ from model.generate"
        out[dtype] = {"max_logprob_diff": diff, "greedy_tokens_equal": len(got), "speed": _ms_per_token(s)}
        del s
    return out


@check("bitsandbytes 8-bit and 4-bit")
def _bnb(device: str) -> dict[str, Any]:
    out = {}
    for q in ("8bit", "4bit"):
        s = labkit.Session(device=device, quantization=q, progress=False)
        top = s.next_token(PROMPT).top(1)
        assert " Paris" in str(top), f"{q}: top token {top}"
        out[q] = {"weights_bytes": s.model.get_memory_footprint(), "speed": _ms_per_token(s)}
        del s
    return out


@check("attention backends: sdpa, eager, xformers (CUDA only)")
def _backends(device: str) -> dict[str, Any]:
    from labkit.measures.attention import attn_implementation

    out = {}
    for attn in ("sdpa", "eager", "xformers") if device == "cuda" else ("sdpa", "eager"):
        s = labkit.Session(device=device, dtype="float32", attn=attn, progress=False)
        if attn != "xformers":
            t = s.generate(PROMPT, max_new_tokens=1, capture=["attention"])
            ids = s.encode(PROMPT)
            with torch.no_grad(), attn_implementation(s.model, "eager"):
                ref = torch.stack([a[0, :, -1] for a in s.model(input_ids=ids, output_attentions=True).attentions])
            diff = _close(t.steps[0].captures["attention"].probs.cpu(), ref.cpu(), 1e-5)
        else:
            diff = None  # capture runs beside SDPA or eager only; xformers is checked on its outputs
            ref_s = labkit.Session(device=device, dtype="float32", attn="sdpa", progress=False)
            _close(s.next_token(PROMPT).logprobs.cpu(), ref_s.next_token(PROMPT).logprobs.cpu(), 1e-4)
        out[attn] = {"capture_max_diff": diff, "speed": _ms_per_token(s)}
    return out


@check("device_map: half the blocks on the GPU (on disk with --cpu), half on the CPU")
def _split(device: str) -> dict[str, Any]:
    import tempfile

    one = labkit.Session(device=device, dtype="float32", progress=False)
    n = one.info.n_layers
    first = 0 if device == "cuda" else "disk"
    layout = {"model.embed_tokens": 0 if device == "cuda" else "cpu", "model.rotary_emb": 0 if device == "cuda"
              else "cpu", "model.norm": "cpu", "lm_head": "cpu",
              **{f"model.layers.{i}": first if i < n // 2 else "cpu" for i in range(n)}}
    two = labkit.Session(device_map=layout, dtype="float32", progress=False, offload_folder=tempfile.mkdtemp())
    figures: dict[str, Any] = {"device_map": f"blocks 0..{n // 2 - 1} on {first}, the rest and the head on cpu"}
    figures["next_token"] = _close(two.next_token(PROMPT).logprobs, one.next_token(PROMPT).logprobs, 1e-4)
    a, b = (x.generate(STORY, max_new_tokens=16, capture=["attention"]) for x in (one, two))
    assert a.token_ids == b.token_ids, "greedy tokens differ"
    figures["attention"] = max(_close(p.captures["attention"].probs, q.captures["attention"].probs, 1e-4)
                               for p, q in zip(a.steps, b.steps, strict=True))
    with one.intervene(AblateHead(n - 2, 1)), two.intervene(AblateHead(n - 2, 1)):
        figures["ablation"] = _close(two.next_token(PROMPT).logprobs, one.next_token(PROMPT).logprobs, 1e-4)
    la, lb = one.logit_attribution(PROMPT), two.logit_attribution(PROMPT)
    figures["dla_heads"] = _close(torch.tensor(lb.heads), torch.tensor(la.heads), 1e-3)
    ia, ib = (x.attribute(PROMPT, steps=16, max_steps=16) for x in (one, two))
    figures["ig"] = _close(torch.tensor(ib.scores), torch.tensor(ia.scores), 1e-4)
    return figures


@check("speculative decoding: prompt lookup on a copy-heavy prompt")
def _speculative(device: str) -> dict[str, Any]:
    s = labkit.Session(device=device, progress=False)
    plain = s.generate(COPY, max_new_tokens=48)
    fast = s.generate(COPY, max_new_tokens=48, speculative=PromptLookupDraft())
    assert fast.token_ids == plain.token_ids, "speculative greedy tokens differ from plain greedy"

    def run(spec: Any) -> Callable[[], int]:
        def go() -> int:
            n = len(s.generate(COPY, max_new_tokens=48, speculative=spec))
            _sync()
            return n
        return go

    times = interleaved({"plain": run(None), "prompt_lookup": run(PromptLookupDraft())}, repeats=3)
    return {"speed": summary(times, "plain"), "acceptance": fast.meta.speculative}


@check("attribution: IG at the default settings on a 256-token text")
def _attribution(device: str) -> dict[str, Any]:
    s = labkit.Session(device=device, dtype="float32", progress=False)
    text = long_prompt(s.tokenizer, 256)
    t0 = time.perf_counter()
    a = s.attribute(text)
    ig_s = time.perf_counter() - t0
    assert a.completeness_error <= 0.01, f"completeness error {a.completeness_error:.2%}"
    t0 = time.perf_counter()
    s.attribute(text, method="saliency")
    return {"tokens": len(a.tokens), "completeness_error": a.completeness_error, "points": a.steps,
            "ig_seconds": round(ig_s, 2), "saliency_seconds": round(time.perf_counter() - t0, 2)}


@check("KV cache: 4-bit quantised against full")
def _kv(device: str) -> dict[str, Any]:
    s = labkit.Session(device=device, progress=False)
    full = s.generate(STORY, max_new_tokens=64, kv="full")
    quant = s.generate(STORY, max_new_tokens=64, kv="quant:bits=4,residual=16,group=32")
    same = sum(a == b for a, b in zip(full.token_ids, quant.token_ids, strict=False))
    return {"full_bytes": full.steps[-1].kv["bytes"], "quant_bytes": quant.steps[-1].kv["bytes"],
            "greedy_agreement": same / len(full.token_ids)}


@check("memory: attention maps of 4,096 tokens, estimate against the CUDA peak", needs_cuda=True)
def _memory(device: str) -> dict[str, Any]:
    from labkit.core import memory

    s = labkit.Session(device=device, dtype="bfloat16", progress=False)
    text = long_prompt(s.tokenizer, 4096)
    shape = memory.Shape.of(s.model)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    maps = s.attention(text, dtype="float16")
    peak = torch.cuda.max_memory_allocated() - before
    t = maps.probs.shape[-1]
    rows = 3 * shape.n_heads * t * 4 * t  # attention_maps' per-row cost (scores, probabilities, a copy) × all rows
    return {"tokens": t, "maps_bytes_cpu": maps.probs.numel() * 2, "estimate_rows_bytes": rows,
            "estimate_transient_bytes": memory.forward_bytes(shape, t) + rows, "cuda_peak_bytes": peak}


def main() -> None:
    device = "cpu" if "--cpu" in sys.argv else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; nothing measured (python bench/gpu.py --cpu checks the script)")
        return  # make bench runs every script: a machine without a GPU skips this one
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    results = run_checks(device, only)
    name = "gpu" if device == "cuda" else "gpu-cpu-dry-run"
    previous = Path(__file__).parent / "results" / f"{name}.json"
    if only is not None and previous.is_file():  # keep the other checks' recorded figures
        fresh, order = {c["check"] for c in results}, [n for n, _, _ in CHECKS]
        kept = [c for c in json.loads(previous.read_text())["checks"] if c["check"] not in fresh
                and c["check"] in order]  # a check renamed since is dropped
        results = sorted([*kept, *results], key=lambda c: order.index(c["check"]))
    failed = [c for c in results if str(c["status"]).startswith("FAILED")]
    _results.write(name, {"device": device, "checks": results, "failed": len(failed)})
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
