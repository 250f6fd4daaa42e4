"""Sweep throughput: the 48-cell examples/sweep.yaml locally (one process, torch's default threads) vs on Ray with
2 single-threaded worker actors, on this machine. Reports cells/s once started (from the arrival times of the rows:
after each worker's first cell) and the start-up cost (ray.init, actors loading their Session, first cells).
Target: Ray with 2 workers ≥ 1.3 × local once started. Rows must be identical to a local run with one thread.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _results

import labkit
from labkit.studies.experiments import Sweep, load_config

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "sweep.yaml"
TARGET = 1.3
WORKERS = 2


def timed(run) -> tuple[object, list[float], float]:
    """(rows, arrival time of each row after the start, total seconds)."""
    arrivals: list[float] = []
    t0 = time.perf_counter()
    rows = run(lambda _row: arrivals.append(time.perf_counter() - t0))
    return rows, arrivals, time.perf_counter() - t0


def steady(arrivals: list[float], skip: int) -> float:
    """Cells per second after the first ``skip`` rows (each worker's first cell)."""
    return (len(arrivals) - skip) / (arrivals[-1] - arrivals[skip - 1])


def main() -> None:
    sweep = Sweep.from_config(load_config(CONFIG))
    session = labkit.Session(device="cpu", dtype="float32", progress=False)
    threads = torch.get_num_threads()
    local, t_local, total_local = timed(lambda cb: sweep.run(session, progress=False, on_row=cb))
    ray_rows, t_ray, total_ray = timed(lambda cb: sweep.run(executor="ray", workers=WORKERS, progress=False,
                                                            on_row=cb))
    torch.set_num_threads(1)
    one_thread = sweep.run(session, progress=False)
    torch.set_num_threads(threads)
    columns = [c for c in local.columns if c != "worker"]
    identical = ray_rows[columns].equals(one_thread[columns])
    rate_local, rate_ray = steady(t_local, 1), steady(t_ray, WORKERS)
    startup = t_ray[WORKERS - 1] - WORKERS / rate_ray  # time to the workers' first rows beyond a steady cell each
    figures = {
        "cells": len(sweep), "workers": WORKERS, "local_torch_threads": threads, "ray_torch_threads_per_worker": 1,
        "local_cells_per_s": round(rate_local, 3), "ray_cells_per_s": round(rate_ray, 3),
        "ratio_once_started": round(rate_ray / rate_local, 3), "target_ratio": TARGET,
        "local_total_s": round(total_local, 2), "ray_total_s": round(total_ray, 2),
        "ray_startup_s": round(startup, 2), "ray_rows_identical_to_local_one_thread": identical,
        "local_rows_identical_to_ray_text": local["text"].tolist() == ray_rows["text"].tolist(),
    }
    for k, v in figures.items():
        print(f"{k:>40}: {v}")
    _results.write("sweep", figures)


if __name__ == "__main__":
    main()
