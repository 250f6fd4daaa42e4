"""A student played through every exercise of the core track, in one kernel per notebook: each check is run with the
answers blank ("fill in", never a crash), with a wrong answer of the right kind (a message, never a crash) and with
the worked solution (✓). The wrong answer is made from the solution's own value (a number moved, a pair's first
element moved, a text changed; for code the student writes, the solution's function with every result it gives
moved the same way), so the check has to tell them apart."""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from labkit.teach import teaching

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CORE = ["01_warmup", "02_next_token", "03_observe", "04_interventions", "05_sweeps", "06_capstone"]

WRONG = '''
def _labkit_wrong(value):
    import torch
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 1.0
    if isinstance(value, str):
        return value + "?"
    if isinstance(value, (tuple, list)) and value:
        return type(value)([_labkit_wrong(value[0]), *value[1:]])
    if isinstance(value, torch.Tensor):
        return value + 1
    if callable(value):  # code the student wrote: every result it gives (a hook's output too) comes out wrong
        return lambda *args, **kwargs: _labkit_wrong(value(*args, **kwargs))
    return "a wrong answer"
'''


def _tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def _answers(exercise_source: str) -> list[str]:
    """The names an exercise cell sets to None (``p_paris = None  # your answer``) and the functions it asks the
    student to write (``def zero_head_hook(head): return None  # your code``)."""
    body = ast.parse(exercise_source).body
    return ([t.id for node in body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)]
            + [node.name for node in body if isinstance(node, ast.FunctionDef)])


def _marker(kind: str, exercise: int) -> str:
    return f"print('<<{kind} {exercise}>>')"


def played(name: str) -> tuple[nbformat.NotebookNode, int]:
    """The teacher's notebook rewritten as a student's session: at each check, blank answers, then (after the
    solution) wrong ones, then the solution's answers put back, the check run after each (errors allowed and
    recorded)."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    cells, exercise, number = [nbformat.v4.new_code_cell(WRONG)], [], 0
    pending_solution = None
    for cell in nb.cells:
        tags = _tags(cell)
        if teaching.EXERCISE_TAG in tags:
            exercise = _answers(cell.source)
            cells.append(nbformat.v4.new_code_cell(cell.source))
        elif teaching.SOLUTION_TAG in tags:
            pending_solution = cell  # run it after the blank and the wrong tries
        elif teaching.CHECK_TAG in tags and pending_solution is not None:
            number += 1
            check = cell.source
            cells.append(nbformat.v4.new_code_cell(f"{_marker('blank', number)}\n{check}"))
            saved = ", ".join(f"{a!r}: {a}" for a in exercise)
            wrong = "\n".join(f"{a} = _labkit_wrong({a})" for a in exercise)
            restore = "\n".join(f"{a} = _labkit_saved[{a!r}]" for a in exercise)
            cells.append(nbformat.v4.new_code_cell(pending_solution.source))
            cells.append(nbformat.v4.new_code_cell(f"_labkit_saved = {{{saved}}}\n{wrong}\n{_marker('wrong', number)}\n"
                                                   f"{check}"))
            cells.append(nbformat.v4.new_code_cell(f"{restore}\n{_marker('right', number)}\n{check}"))
            pending_solution = None
        elif cell.cell_type == "code":
            cells.append(nbformat.v4.new_code_cell(cell.source))
    nb.cells = cells
    return nb, number


@pytest.mark.parametrize("name", CORE)
def test_a_student_meets_a_message_for_blank_and_wrong_answers_and_a_tick_for_right_ones(name):
    nb, exercises = played(name)
    assert exercises >= 3
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    seen = {}
    for cell in nb.cells:
        text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")
        if "<<" not in text:
            continue
        kind, number = text.split("<<", 1)[1].split(">>", 1)[0].split()
        errors = [o for o in cell.outputs if o.output_type == "error"]
        seen[(kind, int(number))] = (errors[0].ename, errors[0].evalue) if errors else ("ok", text)
    for number in range(1, exercises + 1):
        blank, wrong, right = (seen[(k, number)] for k in ("blank", "wrong", "right"))
        assert blank[0] == "ExerciseFailed" and "fill in" in blank[1], (name, number, blank)
        assert wrong[0] == "ExerciseFailed", (name, number, wrong)  # a message, not a TypeError
        assert right[0] == "ok" and "✓" in right[1], (name, number, right)
