"""Graded exercises in the teaching notebooks, and the student copy that hides their solutions.

An exercise is three code cells, marked with cell tags (JupyterLab: the property inspector's "Cell tags"):

- ``exercise`` — what the student fills in: the answer variables set to ``None`` (``p_paris = None  # your answer``);
- ``solution`` — the teacher's worked answer, which assigns the same variables;
- ``check`` — recomputes the answer independently (from the model's raw logits or a closed form, never through the
  call the solution used) and calls :func:`check`, which prints ✓ or raises :class:`ExerciseFailed` with a hint.

The teacher's notebook runs all three (under nbval too: every check passes). :func:`student_copy` removes the
``solution`` cells with nbconvert's ``TagRemovePreprocessor`` and clears every output with its
``ClearOutputPreprocessor``, so students get blank answers whose checks fail until they solve them.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labkit.core.errors import InvalidArgument, LabkitError
from labkit.core.extras import require
from labkit.core.files import atomic_path

SOLUTION_TAG, EXERCISE_TAG, CHECK_TAG = "solution", "exercise", "check"


class ExerciseFailed(LabkitError, AssertionError):
    """An exercise's check did not pass: the answer is missing or differs from the recomputed one."""


def check(exercise: str, *, ok: bool | Callable[[], bool] | None = None, hint: str = "", **answers: Any) -> None:
    """Print "✓ exercise" when every answer in ``answers`` is filled in (not None) and ``ok`` is true; otherwise
    raise :class:`ExerciseFailed` naming the blank answers or giving ``hint``. ``ok`` may be a function of no
    arguments (``ok=lambda: ...``): it then runs only once every answer is filled in, and an answer of the wrong
    kind (a string for a number, a number for a pair...) is reported as such instead of crashing the cell."""
    blank = [name for name, value in answers.items() if value is None]
    if blank:
        raise ExerciseFailed(f"✗ {exercise}: fill in {', '.join(blank)} first (it is still None)")
    if callable(ok):
        try:
            ok = ok()
        except (TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
            kinds = ", ".join(f"{name} is {type(value).__name__}" for name, value in answers.items())
            raise ExerciseFailed(f"✗ {exercise}: your answer cannot be checked ({kinds}: {type(e).__name__}: {e}). "
                                 f"{hint}".rstrip()) from None
    if not ok:
        raise ExerciseFailed(f"✗ {exercise}: not yet. {hint}".rstrip())
    print(f"✓ {exercise}")


def close(a: Any, b: Any, tol: float = 1e-4) -> bool:
    """``a`` and ``b`` are finite numbers within ``tol`` (absolute) of each other; False for anything else."""
    try:
        return math.isfinite(float(a)) and math.isfinite(float(b)) and abs(float(a) - float(b)) <= tol
    except (TypeError, ValueError):
        return False


def _exporter() -> Any:
    require("lab", "the student copy", "nbconvert")
    from nbconvert.exporters import NotebookExporter
    from nbconvert.preprocessors import ClearOutputPreprocessor, TagRemovePreprocessor

    exporter = NotebookExporter()
    exporter.register_preprocessor(TagRemovePreprocessor(remove_cell_tags={SOLUTION_TAG}, enabled=True), True)
    exporter.register_preprocessor(ClearOutputPreprocessor(enabled=True), True)
    return exporter


def student_notebook(path: str | os.PathLike[str]) -> str:
    """The student version of one notebook as .ipynb text: ``solution`` cells removed, outputs cleared."""
    body, _ = _exporter().from_filename(str(path))
    return body


def student_copy(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> list[Path]:
    """Copy the folder ``source`` to ``target`` for students: every notebook through :func:`student_notebook`
    (written atomically), every other file as it is, checkpoints left out. ``target`` must not be ``source`` or
    inside it. Returns the notebooks written."""
    src, dst = Path(source).resolve(), Path(target).resolve()
    if not src.is_dir():
        raise InvalidArgument(f"source {str(source)!r} is not a folder of notebooks")
    if dst == src or src in dst.parents:
        raise InvalidArgument(f"target {str(target)!r} must be outside source {str(source)!r} (the teacher's copy "
                              "keeps the solutions)")
    written = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if ".ipynb_checkpoints" in rel.parts or path.is_dir():
            continue
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".ipynb":
            with atomic_path(out, "target") as tmp:
                tmp.write_text(student_notebook(path), encoding="utf-8")
            written.append(out)
        else:
            shutil.copy2(path, out)
    if not written:
        raise InvalidArgument(f"source {str(source)!r} holds no notebooks")
    return written
