"""Graded exercises in the teaching notebooks, and the student copy that hides their solutions.

An exercise is three code cells, marked with cell tags (JupyterLab: the property inspector's "Cell tags"):

- ``exercise`` — what the student fills in: the answer variables set to ``None`` (``p_paris = None  # your answer``);
- ``solution`` — the teacher's worked answer, which assigns the same variables;
- ``check`` — recomputes the answer independently (from the model's raw logits or a closed form, never through the
  call the solution used) and calls :func:`check`, which prints ✓ or raises :class:`ExerciseFailed` with a hint.

The teacher's notebook runs all three (under nbval too: every check passes). :func:`student_copy` replaces each
``solution`` cell by a ``reveal`` cell — the solution compressed and base64-encoded, so no solution text is in the
copy, and shown (not run) by :func:`reveal` only when the student runs that cell — and clears every output, so
students get blank answers whose checks fail until they solve them. :func:`answer_key` is the teacher's Markdown
key: each exercise's question, solution and check.
"""

from __future__ import annotations

import base64
import math
import os
import shutil
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from labkit.core.errors import InvalidArgument, LabkitError
from labkit.core.extras import require
from labkit.core.files import atomic_path

SOLUTION_TAG, EXERCISE_TAG, CHECK_TAG, REVEAL_TAG = "solution", "exercise", "check", "reveal"
STUDENT_KERNEL = {"name": "labkit", "display_name": "Python (labkit)", "language": "python"}
"""The kernel a student copy opens with (``labkit kernel install``; ``make lab`` and ``labkit workshop`` install
it): one CPU thread per student where several share a machine, offline, the magics loaded."""


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


def check_code(exercise: str, run: Callable[[Any], Any], cases: Sequence[Any], expected: Callable[[Any], Any], *,
               same: Callable[[Any, Any], bool] | None = None, hint: str = "", **answers: Any) -> None:
    """Check code the student wrote on ``cases`` they have not seen (another prompt, another head, random logits):
    ``run(case)`` applies the student's code to a case, ``expected(case)`` computes the answer independently, and
    ``same(got, want)`` compares them (default :func:`agree`: numbers, tensors and tuples of them within 1e-4).
    Prints ✓ when every case agrees; raises :class:`ExerciseFailed` when an answer in ``answers`` is None, when the
    student's code returns None ("fill in"), raises, or gives a different value — naming the case and both values."""
    same = same or agree
    if any(v is None for v in answers.values()):
        check(exercise, **answers)  # "fill in ..."
    for i, case in enumerate(cases, 1):
        try:
            got = run(case)
        except Exception as e:  # the student's code: its error, reported on the case it met
            raise ExerciseFailed(f"✗ {exercise}: your code raised {type(e).__name__} on case {i} ({_short(case)}): "
                                 f"{e}. {hint}".rstrip()) from None
        if got is None:
            raise ExerciseFailed(f"✗ {exercise}: fill in your code first (it returns None on case {i})")
        want = expected(case)
        if not same(got, want):
            raise ExerciseFailed(f"✗ {exercise}: on case {i} ({_short(case)}) your code gives {_short(got)}, "
                                 f"expected {_short(want)}. {hint}".rstrip())
    print(f"✓ {exercise} ({len(cases)} cases you had not seen)")


def agree(a: Any, b: Any, tol: float = 1e-4) -> bool:
    """``a`` and ``b`` are equal within ``tol``: numbers, tensors (same shape, max absolute difference) or tuples and
    lists of them, element by element; False for anything else."""
    import torch

    if isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and a.shape == b.shape
                and bool(torch.allclose(a.detach().double(), b.detach().double(), atol=tol, rtol=0)))
    if isinstance(b, (tuple, list)):
        return (isinstance(a, (tuple, list)) and len(a) == len(b)
                and all(agree(x, y, tol) for x, y in zip(a, b, strict=True)))
    return close(a, b, tol)


def _short(value: Any, width: int = 90) -> str:
    """A one-line description of a case or a value for a message."""
    import torch

    if isinstance(value, torch.Tensor):
        text = (f"tensor{tuple(value.shape)}" if value.numel() > 6
                else f"tensor({[round(float(x), 4) for x in value.flatten()]})")
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (tuple, list)):
        text = "(" + ", ".join(_short(v, width) for v in value) + ")"
    else:
        text = repr(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def close(a: Any, b: Any, tol: float = 1e-4) -> bool:
    """``a`` and ``b`` are finite numbers within ``tol`` (absolute) of each other; False for anything else."""
    try:
        return math.isfinite(float(a)) and math.isfinite(float(b)) and abs(float(a) - float(b)) <= tol
    except (TypeError, ValueError):
        return False


def encode_solution(source: str) -> str:
    """A solution's code as the opaque text a reveal cell holds (zlib, then base64): unreadable until revealed."""
    return base64.b64encode(zlib.compress(source.encode("utf-8"), 9)).decode("ascii")


def reveal(blob: str) -> str:
    """Show (never run) the worked solution a student copy's reveal cell holds; returns its code. The student asks
    for it by running the cell: the check's hint comes first, the solution only on request."""
    code = zlib.decompress(base64.b64decode(blob)).decode("utf-8")
    try:
        from IPython.display import Markdown, display

        display(Markdown(f"**Worked solution** (read it, then write your own answer in the cell above):\n\n"
                         f"```python\n{code}\n```"))
    except ImportError:
        print(code)
    return code


def _reveal_cell(cell: Any) -> Any:
    """The student copy's stand-in for a ``solution`` cell."""
    import nbformat

    source = ("# Stuck? The check's hint comes first. Run this cell to see the worked solution (shown, not run).\n"
              "from labkit.teach.teaching import reveal\n"
              f"reveal({encode_solution(cell.source)!r});")
    return nbformat.v4.new_code_cell(source, metadata={"tags": [REVEAL_TAG]})


def _exporter() -> Any:
    require("lab", "the student copy", "nbconvert")
    from nbconvert.exporters import NotebookExporter
    from nbconvert.preprocessors import ClearOutputPreprocessor, Preprocessor

    class HideSolutions(Preprocessor):  # nbconvert's way to rewrite cells: each solution becomes a reveal cell
        def preprocess(self, nb: Any, resources: Any) -> tuple[Any, Any]:
            nb.cells = [_reveal_cell(c) if SOLUTION_TAG in c.get("metadata", {}).get("tags", []) else c
                        for c in nb.cells]
            nb.metadata["kernelspec"] = STUDENT_KERNEL  # the workshop kernel: offline, threads capped per student
            return nb, resources

    exporter = NotebookExporter()
    exporter.register_preprocessor(HideSolutions(enabled=True), True)
    exporter.register_preprocessor(ClearOutputPreprocessor(enabled=True), True)
    return exporter


def student_notebook(path: str | os.PathLike[str]) -> str:
    """The student version of one notebook as .ipynb text: each ``solution`` cell replaced by a reveal cell (its
    code encoded), outputs cleared."""
    body, _ = _exporter().from_filename(str(path))
    return body


def answer_key(source: str | os.PathLike[str]) -> str:
    """The teacher's answer key (Markdown) for the notebooks in folder ``source``: per notebook, each exercise's
    question (its heading cell), the worked solution and the check that grades it."""
    import nbformat

    src = Path(source)
    parts = ["# Answer key\n", "Generated by `labkit student-copy`; for the teacher (not in the students' copy).\n"]
    for path in sorted(src.glob("*.ipynb")):
        cells = nbformat.read(path, as_version=4).cells
        question = ""
        entries = []
        for cell in cells:
            tags = cell.get("metadata", {}).get("tags", [])
            if cell.cell_type == "markdown" and cell.source.lstrip().startswith("### Exercise"):
                question = cell.source.strip()
            elif SOLUTION_TAG in tags:
                entries.append(f"{question}\n\n**Solution**\n\n```python\n{cell.source.strip()}\n```\n")
            elif CHECK_TAG in tags and entries:
                entries[-1] += f"\n**Check**\n\n```python\n{cell.source.strip()}\n```\n"
        if entries:
            parts.append(f"## {path.stem}\n")
            parts.extend(entries)
    return "\n".join(parts)


def student_copy(source: str | os.PathLike[str], target: str | os.PathLike[str],
                 key: str | os.PathLike[str] | None = None) -> list[Path]:
    """Copy the folder ``source`` to ``target`` for students: every notebook through :func:`student_notebook`
    (written atomically), every other file as it is, checkpoints left out. ``target`` must not be ``source`` or
    inside it; ``key`` (outside ``target``) receives the teacher's :func:`answer_key`. Returns the notebooks
    written."""
    src, dst = Path(source).resolve(), Path(target).resolve()
    if not src.is_dir():
        raise InvalidArgument(f"source {str(source)!r} is not a folder of notebooks")
    if dst == src or src in dst.parents:
        raise InvalidArgument(f"target {str(target)!r} must be outside source {str(source)!r} (the teacher's copy "
                              "keeps the solutions)")
    if key is not None and dst in Path(key).resolve().parents:
        raise InvalidArgument(f"key {str(key)!r} must be outside target {str(target)!r} (students would read it)")
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
    if key is not None:
        with atomic_path(Path(key), "key") as tmp:
            tmp.write_text(answer_key(src), encoding="utf-8")
    return written
