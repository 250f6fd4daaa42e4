"""Panel cost: the same generation headless vs with the Lab panel attached, its widget messages serialised to JSON
and sent to a comm with no browser (one process, default model, Classic T=0.8 seed 0, 64 new tokens, interleaved
runs, best of 7 and median).

Cases: ``headless`` = `Session.generate` as a script would call it; ``headless+attention`` = the same with
``capture=["attention"]`` (what the panel asks for, to draw the live attention image); ``lab`` = `Lab.run()` +
`wait()`: the prompt's attention maps and head patterns, the generation in the panel's thread, the token stream,
the probability charts and the attention image updated in batches. Target: lab ≤ 1.15 × headless.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import comm
from comm.base_comm import BaseComm

sys.path.insert(0, str(Path(__file__).parent))
import _results
from _timing import interleaved, summary

import labkit
from labkit.sampling import Classic
from labkit.ui.panels import Lab

NEW_TOKENS = 64
PROMPT = "Once upon a time"  # runs the full 64 tokens (the lighthouse prompt stops at EOS after 33)
TARGET = 1.15


class SerialisingComm(BaseComm):
    """A comm with no front end: every message is JSON-encoded (as the kernel would) and counted, then dropped."""

    messages = 0
    bytes_sent = 0

    def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
        payload = json.dumps({"type": msg_type, "data": data, "metadata": metadata}, default=str)
        SerialisingComm.messages += 1
        SerialisingComm.bytes_sent += len(payload) + sum(len(memoryview(b).cast("B")) for b in buffers or ())


def main() -> None:
    comm.create_comm = SerialisingComm  # ipywidgets opens every widget's comm through this factory
    session = labkit.Session(device="cpu", dtype="float32", progress=False)
    lab = Lab(session, prompt=PROMPT, max_new_tokens=NEW_TOKENS, sampler=Classic(temperature=0.8), seed=0)
    counts = {}

    def headless(capture):
        def once() -> int:
            return len(session.generate(PROMPT, max_new_tokens=NEW_TOKENS, sampler=Classic(temperature=0.8), seed=0,
                                        capture=capture))
        return once

    def panel() -> int:
        before = SerialisingComm.messages, SerialisingComm.bytes_sent
        lab.run()
        lab.wait()
        assert lab.message.value == "", lab.message.value
        counts["messages_per_run"] = SerialisingComm.messages - before[0]
        counts["kib_per_run"] = round((SerialisingComm.bytes_sent - before[1]) / 1024, 1)
        return len(lab.trace)

    runs = {"headless": headless(()), "headless+attention": headless(["attention"]), "lab": panel}
    result = summary(interleaved(runs), "headless")
    for name, r in result.items():
        print(f"{name:>20}: {r['ms_per_token']:7.2f} ms/token | ratio {r['ratio']:.3f} "
              f"(median {r['median_ratio']:.3f})")
    print(f"lab: {counts['messages_per_run']} widget messages, {counts['kib_per_run']} KiB per run of {NEW_TOKENS} "
          f"tokens; target lab ≤ {TARGET} × headless")
    _results.write("panel", {"target_ratio": TARGET, "prompt": PROMPT, "new_tokens": NEW_TOKENS, **counts,
                             "results": result})


if __name__ == "__main__":
    main()
