"""Write a benchmark's figures to bench/results/<name>.json with the machine they were measured on."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any


def write(name: str, figures: dict[str, Any]) -> Path:
    import torch
    import transformers

    import labkit

    out = Path(__file__).parent / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    machine = {
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "labkit": labkit.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    payload = {"benchmark": name, "measured": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
               "machine": machine, **figures}
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out}")
    return out
