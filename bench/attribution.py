"""Attribution cost on the default model (CPU, float32, one process, interleaved runs, best of N and median):

- saliency and input × gradient as a multiple of one forward pass over the same prompt;
- IG at 32 steps batched (one pass of 32 points) vs 32 separate passes, and vs captum's own IntegratedGradients
  called directly on the same function and inputs with ``return_convergence_delta=True`` (the completeness labkit
  reports; labkit also checks its embedding path with one forward pass) — target: labkit no slower than captum;
- activation capture during generation: ms/token of ``generate(capture=[3 sites])`` vs plain (target ≤ 1.05×).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _results
from _timing import best_ms, interleaved, summary

import labkit
from labkit.core.tokens import token_id
from labkit.why.attribution import target_function

PROMPT = "When Mary and John went to the store, John gave a drink to"
STEPS = 32
REPEATS = 5
NEW_TOKENS = 48
SITES = ["blocks.5.resid_post", "blocks.15.attn_out", "blocks.25.mlp_out"]


def _best(fn: Callable[[], object], repeats: int = REPEATS) -> tuple[float, float]:
    return best_ms(fn, repeats)


def main() -> None:
    from captum.attr import IntegratedGradients

    s = labkit.Session(device="cpu", dtype="float32", progress=False)
    ids = s.encode(PROMPT)
    target = token_id(s.tokenizer, " Mary")
    length = ids.shape[1]
    f = target_function(s.sites, length - 1, length, target, None, "prob")
    embeds = s.sites.embed(ids).detach()
    unk = s.sites.embed(torch.full_like(ids, s.tokenizer.unk_token_id)).detach()  # labkit's default baseline

    def forward() -> None:
        with torch.no_grad():
            s.model(input_ids=ids, use_cache=False)

    def ig_separate() -> None:  # the same integral, one point per forward/backward pass
        IntegratedGradients(f).attribute(embeds.clone().requires_grad_(), baselines=unk,
                                         n_steps=STEPS, method="gausslegendre", internal_batch_size=1)

    def captum_direct() -> None:  # the same outputs labkit returns: attributions and their completeness
        IntegratedGradients(f).attribute(embeds.clone().requires_grad_(), baselines=unk,
                                         n_steps=STEPS, method="gausslegendre", return_convergence_delta=True)

    runs = {"forward": forward,
            "saliency": lambda: s.attribute(PROMPT, target=" Mary", method="saliency"),
            "input_x_gradient": lambda: s.attribute(PROMPT, target=" Mary", method="input_x_gradient"),
            # the same fixed rule as captum's (max_steps = steps: no refinement), then the adaptive default
            "ig_batched": lambda: s.attribute(PROMPT, target=" Mary", method="ig", steps=STEPS, max_steps=STEPS,
                                              batch=STEPS),
            "ig_adaptive_default": lambda: s.attribute(PROMPT, target=" Mary"),
            "ig_separate": ig_separate, "captum_ig": captum_direct,
            "logit_attribution": lambda: s.logit_attribution(PROMPT, token=" Mary", against=" John")}
    ms = {name: _best(fn) for name, fn in runs.items()}
    fwd = ms["forward"][0]
    figures = {name: {"best_ms": round(b, 2), "median_ms": round(m, 2), "x_forward": round(b / fwd, 2)}
               for name, (b, m) in ms.items()}
    figures["ig_batched_vs_separate"] = round(ms["ig_batched"][0] / ms["ig_separate"][0], 3)
    figures["ig_labkit_vs_captum"] = round(ms["ig_batched"][0] / ms["captum_ig"][0], 3)
    adaptive = s.attribute(PROMPT, target=" Mary")
    fixed = s.attribute(PROMPT, target=" Mary", steps=STEPS, max_steps=STEPS)
    figures["ig_adaptive_default_points"] = adaptive.steps
    figures["ig_adaptive_default_completeness_error"] = adaptive.completeness_error
    figures["ig_fixed_completeness_error"] = fixed.completeness_error
    for name, (b, m) in ms.items():
        print(f"{name:>18}: {b:8.1f} ms (median {m:8.1f}) = {b / fwd:6.2f} × one forward pass")
    print(f"IG {STEPS} steps batched / separate: {figures['ig_batched_vs_separate']:.3f}; labkit / captum direct: "
          f"{figures['ig_labkit_vs_captum']:.3f} (target ≤ 1, labkit's includes a check forward pass); the adaptive "
          f"default used {adaptive.steps} points for completeness error {adaptive.completeness_error:.2%} (fixed "
          f"{STEPS}-point rule: {fixed.completeness_error:.2%})")

    def generate(capture: list[str]) -> Callable[[], int]:
        return lambda: len(s.generate(PROMPT, max_new_tokens=NEW_TOKENS, capture=capture))

    capture = summary(interleaved({"plain": generate([]), "capture_3_sites": generate(SITES)}, repeats=5), "plain")
    ratio = capture["capture_3_sites"]["ratio"]
    print(f"capture of {len(SITES)} sites during generation: {ratio:.3f} × plain ms/token "
          f"(median {capture['capture_3_sites']['median_ratio']:.3f}; target ≤ 1.05)")
    _results.write("attribution", {"prompt": PROMPT, "tokens": length, "ig_steps": STEPS, "methods": figures,
                                   "capture_sites": SITES, "capture": capture, "capture_target_ratio": 1.05})


if __name__ == "__main__":
    main()
