"""The course: graded exercises whose checks fail on blank answers and pass on the solutions, a student copy
without the solutions, and core notebooks that state objectives and time and hold three exercises each."""

import re
from pathlib import Path

import nbformat
import pytest
from click.testing import CliRunner
from nbclient import NotebookClient

from labkit.core.errors import InvalidArgument
from labkit.teach import teaching
from labkit.ui.cli import main

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CORE = ["01_warmup", "02_next_token", "03_observe", "04_interventions", "05_sweeps", "06_capstone"]


def tags(cell):
    return set(cell.get("metadata", {}).get("tags", []))


def read(path):
    return nbformat.read(path, as_version=4)


def test_check_prints_a_tick_and_raises_on_blank_or_wrong_answers(capsys):
    teaching.check("Exercise 9.9", answer=1.0, ok=True)
    assert capsys.readouterr().out.strip() == "✓ Exercise 9.9"
    with pytest.raises(teaching.ExerciseFailed, match="fill in answer first"):
        teaching.check("Exercise 9.9", answer=None, ok=True)
    with pytest.raises(teaching.ExerciseFailed, match=r"not yet\. use bits"):
        teaching.check("Exercise 9.9", answer=2.0, ok=False, hint="use bits")
    assert teaching.close(1.0, 1.00001) and not teaching.close(None, 1.0) and not teaching.close(float("nan"), 1.0)


def test_every_solution_sits_between_its_exercise_cell_and_its_check_cell():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        cells = read(path).cells
        for i, cell in enumerate(cells):
            if teaching.SOLUTION_TAG in tags(cell):
                assert teaching.EXERCISE_TAG in tags(cells[i - 1]), f"{path.name} cell {i}: no exercise cell before"
                assert teaching.CHECK_TAG in tags(cells[i + 1]), f"{path.name} cell {i}: no check cell after"


def test_student_copy_has_no_solution_code_no_outputs_and_keeps_every_blank_and_check(tmp_path):
    written = teaching.student_copy(NOTEBOOKS, tmp_path / "students")
    assert {p.name for p in written} == {p.name for p in NOTEBOOKS.glob("*.ipynb")}
    for path in written:
        teacher = read(NOTEBOOKS / path.name).cells
        student = read(path).cells
        text = "\n".join(c.source for c in student)
        solutions = [c.source for c in teacher if teaching.SOLUTION_TAG in tags(c)]
        for source in solutions:
            assert source not in text, f"{path.name}: a solution is in the student copy"
        assert not any(teaching.SOLUTION_TAG in tags(c) for c in student)
        assert read(path).metadata.kernelspec.name == "labkit"  # the workshop kernel, not python3
        reveals = [c for c in student if teaching.REVEAL_TAG in tags(c)]
        assert len(reveals) == len(solutions)  # each solution is there on request, and only on request
        for cell, source in zip(reveals, solutions, strict=True):
            blob = re.search(r"reveal\('([^']+)'\)", cell.source).group(1)
            assert teaching.reveal(blob) == source
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in student if c.cell_type == "code")
        for tag in (teaching.EXERCISE_TAG, teaching.CHECK_TAG):
            assert sum(tag in tags(c) for c in student) == sum(tag in tags(c) for c in teacher) == len(solutions)
    assert all(teaching.SOLUTION_TAG in tags(c) for c in read(NOTEBOOKS / "01_warmup.ipynb").cells
               if "torch.exp(z) / torch.exp(z).sum()" in c.source)  # the teacher keeps the solutions


def test_core_notebooks_state_objectives_and_time_hold_three_exercises_and_fit_the_slot():
    minutes = {"pre-work": 0, "in the room": 0, "homework": 0}
    for name in CORE:
        cells = read(NOTEBOOKS / f"{name}.ipynb").cells
        header = cells[0].source
        found = re.search(r"Core track · (pre-work|in the room|homework) · about (\d+) minutes · (\d+) (graded )?"
                          r"exercises", header)
        assert found and "By the end you can" in header, f"{name}: no objectives or time estimate"
        n = sum(teaching.SOLUTION_TAG in tags(c) for c in cells)
        assert n >= 3 and n == int(found.group(3)), f"{name}: {n} exercises, header says {found.group(3)}"
        minutes[found.group(1)] += int(found.group(2))
        exercise_minutes = sum(int(m) for c in cells if c.cell_type == "markdown"
                               for m in re.findall(r"### Exercise .*about (\d+) min", c.source))
        assert exercise_minutes <= int(found.group(2)) * 0.75, f"{name}: exercises leave no time to read"
        for i, cell in enumerate(cells[1:], 1):  # every code cell follows prose saying why (or is part of an exercise)
            if cell.cell_type == "code" and not tags(cell) & {teaching.SOLUTION_TAG, teaching.CHECK_TAG}:
                assert cells[i - 1].cell_type == "markdown", f"{name} cell {i} has no explanation before it"
    assert minutes["in the room"] <= 150, minutes  # a 180-minute slot with 30 minutes of slack; the rest at home


def execute(nb):
    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def check_results(nb):
    """One entry per check cell: "pass", or the exception name it raised."""
    out = []
    for cell in nb.cells:
        if teaching.CHECK_TAG in tags(cell):
            errors = [o for o in cell.outputs if o.output_type == "error"]
            out.append(errors[0].ename if errors else "pass")
    return out


def test_warmup_checks_fail_on_the_student_copy_and_pass_with_the_solutions_put_back(tmp_path):
    teaching.student_copy(NOTEBOOKS, tmp_path / "students")
    student = execute(read(tmp_path / "students" / "01_warmup.ipynb"))
    assert check_results(student) == ["ExerciseFailed"] * 3
    teacher = execute(read(NOTEBOOKS / "01_warmup.ipynb"))
    assert check_results(teacher) == ["pass"] * 3
    ticks = [o.text for c in teacher.cells if teaching.CHECK_TAG in tags(c) for o in c.outputs if "text" in o]
    assert ticks == ["✓ Exercise 1.1\n", "✓ Exercise 1.2\n", "✓ Exercise 1.3 (5 cases you had not seen)\n"]


def test_student_copy_command_and_its_refusals(tmp_path):
    result = CliRunner().invoke(main, ["student-copy", str(NOTEBOOKS), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "solutions removed" in result.output and (tmp_path / "out" / "06_capstone.ipynb").is_file()
    with pytest.raises(InvalidArgument, match="must be outside source"):
        teaching.student_copy(NOTEBOOKS, NOTEBOOKS / "students")
    with pytest.raises(InvalidArgument, match="is not a folder"):
        teaching.student_copy(tmp_path / "missing", tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgument, match="holds no notebooks"):
        teaching.student_copy(tmp_path / "empty", tmp_path / "y")


def test_a_lazy_check_waits_for_every_answer_and_reports_a_wrong_kind_instead_of_crashing():
    from labkit.teach.teaching import ExerciseFailed, check

    best = (23, 4)
    with pytest.raises(ExerciseFailed, match="fill in mover_drop first"):  # the comparison never runs on None
        check("C.2", mover=(23, 4), mover_drop=None, ok=lambda: tuple((23, 4)) == best and abs(None - 5.8) < 1e-3)
    with pytest.raises(ExerciseFailed, match=r"cannot be checked \(mover is int, mover_drop is float: TypeError"):
        check("C.2", mover=23, mover_drop=5.8, ok=lambda: tuple(23) == best, hint="a (layer, head) pair")
    mover = (1, 2)
    with pytest.raises(ExerciseFailed, match=r"not yet\. a hint"):
        check("C.2", mover=mover, ok=lambda: mover == best, hint="a hint")
    mover = (23, 4)
    check("C.2", mover=mover, ok=lambda: mover == best)  # ✓


def test_the_answer_key_holds_every_question_solution_and_check_and_stays_out_of_the_students_copy(tmp_path):
    key = tmp_path / "key.md"
    teaching.student_copy(NOTEBOOKS, tmp_path / "students", key=key)
    text = key.read_text()
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        for cell in read(path).cells:
            if teaching.SOLUTION_TAG in tags(cell) or teaching.CHECK_TAG in tags(cell):
                assert cell.source.strip() in text, f"{path.name}: a solution or check is missing from the key"
    assert "### Exercise 2.3 — suppress the answer" in text
    with pytest.raises(InvalidArgument, match=r"key .* must be outside target"):
        teaching.student_copy(NOTEBOOKS, tmp_path / "s2", key=tmp_path / "s2" / "key.md")
