"""The course's compute time on one core per student: each core-track notebook executed top to bottom (nbconvert)
with one thread (``OMP_NUM_THREADS=1``, pinned to one CPU with ``taskset`` where it exists), as a student's
workshop kernel runs it. Prints seconds per notebook and its slowest cells; the per-notebook minutes in
docs/notebooks.md are reading and exercise time plus these. Not a timed test: the machine is shared and noisy.

    .venv/bin/python bench/course_time.py [01_warmup 02_next_token ...]
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _results

ROOT = Path(__file__).resolve().parents[1]
CORE = ("01_warmup", "02_next_token", "03_observe", "04_interventions", "05_sweeps", "06_capstone")


def cell_seconds(cell: dict) -> float:
    """Seconds one executed cell took (nbconvert's execution timestamps)."""
    ex = cell.get("metadata", {}).get("execution", {})
    start, end = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
    if not (start and end):
        return 0.0
    parse = dt.datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


def run(name: str) -> dict:
    """Execute notebook ``name`` on one thread; its wall seconds, summed cell seconds and three slowest cells."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / f"{name}.ipynb"
        shutil.copy(ROOT / "notebooks" / f"{name}.ipynb", copy)
        for extra in (ROOT / "notebooks").iterdir():  # data files the notebooks read beside them
            if extra.suffix != ".ipynb" and extra.is_file():
                shutil.copy(extra, Path(tmp) / extra.name)
        pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
        cmd = [*pin, str(Path(sys.executable).parent / "jupyter"), "nbconvert", "--to", "notebook", "--execute",
               "--inplace", "--ExecutePreprocessor.timeout=1800", str(copy)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=tmp, capture_output=True)
        wall = time.perf_counter() - start
        cells = json.loads(copy.read_text())["cells"]
    timed = sorted(((cell_seconds(c), i) for i, c in enumerate(cells) if c["cell_type"] == "code"), reverse=True)
    return {"wall_s": round(wall, 1), "cells_s": round(sum(t for t, _ in timed), 1),
            "slowest": [{"cell": i, "s": round(t, 1)} for t, i in timed[:3]]}


def main(names: list[str]) -> None:
    figures = {}
    for name in names or CORE:
        figures[name] = run(name)
        print(name, figures[name], flush=True)
    _results.write("course_time", {"threads": 1, "notebooks": figures})


if __name__ == "__main__":
    main(sys.argv[1:])
