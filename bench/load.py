"""Default-model load time: the cached safetensors copy vs reading the bundled GGUF directly (the baseline).

Each measurement runs in a fresh subprocess. Reported: the first ``Session()`` in a fresh process (this includes
transformers importing its Llama and loading modules, about a second here, paid once per process) and a second
``Session()`` in that process (the cache read itself). Target: cached load < 1 s.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _results

CACHED = """
import time, json, labkit
t0 = time.perf_counter(); s = labkit.Session(device="cpu", progress=False); first = time.perf_counter() - t0
assert s.next_token("The capital of France is").top(1)[0].token == " Paris"
t0 = time.perf_counter(); s = labkit.Session(device="cpu", progress=False); second = time.perf_counter() - t0
print(json.dumps([first, second]))
"""
GGUF = """
import time, json, labkit
from labkit.model import models
from transformers import AutoModelForCausalLM, AutoTokenizer
g = models.default_gguf()
t0 = time.perf_counter()
AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name, local_files_only=True)
AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, local_files_only=True)
print(json.dumps(time.perf_counter() - t0))
"""


def timed(code: str):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    timed(CACHED)  # make sure the cache exists (first run may convert)
    runs = [timed(CACHED) for _ in range(5)]
    first = statistics.median(r[0] for r in runs)
    cached = statistics.median(r[1] for r in runs)
    gguf = timed(GGUF)
    print(f"cached default-model load: {cached:.3f} s (median of 5; target < 1 s); first load in a fresh process "
          f"{first:.3f} s (includes transformers' module imports) | from GGUF: {gguf:.1f} s | "
          f"ratio cached/GGUF {cached / gguf:.4f}")
    _results.write("load", {"target_seconds": 1.0, "cached_load_s": round(cached, 3),
                            "first_load_in_fresh_process_s": round(first, 3),
                            "runs_first_and_cached_s": [[round(x, 3) for x in r] for r in runs],
                            "gguf_load_s": round(gguf, 2), "ratio_cached_over_gguf": round(cached / gguf, 4)})


if __name__ == "__main__":
    main()
