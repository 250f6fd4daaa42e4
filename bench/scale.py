"""labkit's overheads at a larger scale: a random-weight Llama of about 1B parameters built here (never in the tests;
nothing downloaded), beside the default model, each as ratios against plain transformers measured in the same run
(CPU, float32, interleaved runs, best of N):

- instrumented decode: ``Session.generate`` (greedy, per-step entropy, varentropy, top-k) vs ``model.generate``;
- attention capture: ``generate(capture=["attention"])`` vs ``model.generate``;
- activations: ``Session.activations`` of three sites vs one plain forward pass;
- IG: ``Session.attribute`` (16 points, one pass, no refinement) vs captum's ``IntegratedGradients`` on the same
  function, inputs and baseline with its convergence delta (labkit adds the embedding-path check and f at the
  intervals' ends).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).parent))
import _results
from _timing import best_ms, interleaved, summary

import labkit
from labkit.why.attribution import target_function

PROMPT = "The old lighthouse keeper climbed the stairs every night to light the lamp for the ships"
NEW_TOKENS = 12
STEPS = 16


def one_billion(tokenizer: object) -> tuple[object, int]:
    """A Llama-3.2-1B-like shape over the default tokenizer (49,152 tokens): 16 layers, d_model 2048, 32 heads (8 KV),
    MLP 8192 — about 1.17B parameters, random weights."""
    cfg = tf.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.02)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    return model, sum(p.numel() for p in model.parameters())


def _best_ms(fn: Callable[[], object], repeats: int) -> float:
    return best_ms(fn, repeats)[0]


def measure(s: labkit.Session, repeats: int) -> dict[str, object]:
    model, ids = s.model, s.encode(PROMPT)
    attention_mask = torch.ones_like(ids)

    def plain() -> int:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
        return out.shape[1] - ids.shape[1]

    def labkit_decode() -> int:
        return len(s.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop=[], top_k=10))

    def labkit_capture() -> int:
        return len(s.generate(PROMPT, max_new_tokens=NEW_TOKENS, capture=["attention"]))

    times = interleaved({"transformers": plain, "labkit": labkit_decode, "labkit_capture": labkit_capture},
                        repeats=repeats)
    sites = ["blocks.1.resid_post", f"blocks.{s.info.n_layers // 2}.attn_out", f"blocks.{s.info.n_layers - 1}.mlp_out"]

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    forward_ms = _best_ms(forward, repeats)
    activations_ms = _best_ms(lambda: s.activations(PROMPT, sites), repeats)

    from captum.attr import IntegratedGradients

    a = s.attribute(PROMPT, steps=STEPS, max_steps=STEPS, batch=STEPS)
    length = ids.shape[1]
    f = target_function(s.sites, length - 1, length, a.target_id, None, "prob")
    embeds = s.sites.embed(ids).detach()
    unk = torch.full_like(ids, s.tokenizer.unk_token_id)
    base = s.sites.embed(unk).detach()

    def captum_ig() -> None:
        IntegratedGradients(f).attribute(embeds.clone().requires_grad_(), baselines=base, n_steps=STEPS,
                                         method="gausslegendre", internal_batch_size=STEPS,
                                         return_convergence_delta=True)  # the completeness labkit reports

    ig_repeats = max(1, repeats // 2)
    captum_ms = _best_ms(captum_ig, ig_repeats)
    labkit_ig_ms = _best_ms(lambda: s.attribute(PROMPT, steps=STEPS, max_steps=STEPS, batch=STEPS), ig_repeats)
    return {"decode": summary(times, "transformers"),
            "activations": {"forward_ms": round(forward_ms, 1), "activations_ms": round(activations_ms, 1),
                            "ratio": round(activations_ms / forward_ms, 3)},
            "ig": {"captum_ms": round(captum_ms, 1), "labkit_ms": round(labkit_ig_ms, 1),
                   "ratio": round(labkit_ig_ms / captum_ms, 3), "completeness_error": a.completeness_error,
                   "steps": STEPS, "prompt_tokens": length}}


def main() -> None:
    small = labkit.Session(device="cpu", dtype="float32", progress=False)
    figures: dict[str, object] = {"new_tokens": NEW_TOKENS}
    figures["default"] = measure(small, repeats=5)
    print("default model:", figures["default"])
    big_model, n_params = one_billion(small.tokenizer)
    big = labkit.Session.from_model(big_model, small.tokenizer)
    figures["llama_1b_random"] = {"parameters": n_params, **measure(big, repeats=3)}
    print(f"random Llama, {n_params / 1e9:.2f}B parameters:", figures["llama_1b_random"])
    _results.write("scale", figures)


if __name__ == "__main__":
    main()
