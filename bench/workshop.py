"""Workshop capacity: measured memory of one student's kernel (the default model loaded, a few tokens generated)
in float32 and bfloat16, plus one idle JupyterLab server, and the total for a class of N students. Not a speed
benchmark: the figures behind the capacity table of docs/howto/workshop.md."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _results

from labkit.teach import workshop

CLASS_SIZES = (10, 30, 100)


def main() -> None:
    figures: dict[str, dict] = {}
    for dtype in ("float32", "bfloat16"):
        mem = workshop.per_student_memory(dtype)
        each = mem["steady"] + workshop.SERVER_MIB
        figures[dtype] = {"kernel_steady_mib": round(mem["steady"]), "kernel_peak_mib": round(mem["peak"]),
                          "server_mib": workshop.SERVER_MIB, "per_student_mib": round(each),
                          **{f"gib_for_{n}": round(n * each / 1024, 1) for n in CLASS_SIZES}}
        print(dtype, figures[dtype])
    _results.write("workshop", figures)


if __name__ == "__main__":
    main()
