"""The IPython extension (%labkit) and the workshop kernelspec "Python (labkit)"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from labkit.teach import kernelspec
from labkit.ui.panels import Lab, TokenStream

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def shell():
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "labkit")
    yield ip
    InteractiveShell.clear_instance()


def test_next_magic_returns_the_distribution(shell, session):
    d = shell.run_line_magic("labkit", "next The capital of France is")
    expected = session.next_token("The capital of France is")
    assert [a.token_id for a in d.top(5)] == [a.token_id for a in expected.top(5)]
    assert d.entropy("bits") == pytest.approx(expected.entropy("bits"), abs=1e-5)


def test_generate_cell_magic_shows_a_token_stream(shell, session, monkeypatch):
    shown = []
    monkeypatch.setattr("labkit.ui.magics.display", shown.append)
    shell.run_cell_magic("labkit", "generate --max-new-tokens 5 --sampler classic:temperature=0.7 --seed 3",
                         "Once upon a time\n")
    trace = shell.user_ns["labkit_trace"]
    assert len(trace) == 5 and trace.meta.seed == 3 and trace.meta.sampler["temperature"] == 0.7
    assert isinstance(shown[0], TokenStream) and [s["id"] for s in shown[0].shown] == trace.token_ids
    from labkit.sampling import Classic

    assert trace.token_ids == session.generate("Once upon a time", max_new_tokens=5,
                                               sampler=Classic(temperature=0.7), seed=3).token_ids


def test_lab_magic_opens_the_panel_on_the_shared_session(shell):
    panel = shell.run_line_magic("labkit", "lab")
    assert isinstance(panel, Lab)
    assert panel.session is shell.run_line_magic("labkit", "session")


@pytest.mark.parametrize(("line", "cell", "message"), [
    ("", None, "usage"),
    ("fly", None, "unknown verb 'fly'"),
    ("next", None, "needs a prompt"),
    ("generate --max-new-tokens x", "hi", "invalid int value"),
    ("generate --sampler warm", "hi", "sampler"),
    ("next hi", "body", "only 'generate' takes a cell body"),
])
def test_magic_errors_are_one_usage_line(shell, line, cell, message):
    with pytest.raises(UsageError, match=message):
        if cell is None:
            shell.run_line_magic("labkit", line)
        else:
            shell.run_cell_magic("labkit", line, cell)


def test_kernelspec_installs_lists_runs_a_notebook_and_removes(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    env = {**os.environ, "JUPYTER_PATH": str(tmp_path / "share" / "jupyter")}
    monkeypatch.setenv("JUPYTER_PATH", env["JUPYTER_PATH"])
    out = subprocess.run([str(BIN / "labkit"), "kernel", "install", "--prefix", str(tmp_path), "--threads", "1"],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert "installed kernelspec 'labkit'" in out
    listed = subprocess.run([str(BIN / "jupyter"), "kernelspec", "list", "--json"], capture_output=True, text=True,
                            env=env, check=True).stdout
    specs = json.loads(listed)["kernelspecs"]
    assert specs["labkit"]["spec"]["display_name"] == "Python (labkit)"
    assert specs["labkit"]["resource_dir"].startswith(str(tmp_path))
    assert Path(specs["labkit"]["spec"]["argv"][0]).parent == BIN  # this environment's interpreter

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os\nprint(os.environ['HF_HUB_OFFLINE'], "
                                          "os.environ['OMP_NUM_THREADS'])"),
                nbformat.v4.new_code_cell("%labkit next The capital of France is")]  # no %load_ext: preloaded
    NotebookClient(nb, kernel_name="labkit", timeout=180).execute()
    assert nb.cells[0].outputs[0]["text"].strip() == "1 1"
    assert "' Paris'" in nb.cells[1].outputs[0]["data"]["text/plain"]

    removed = subprocess.run([str(BIN / "labkit"), "kernel", "remove"], capture_output=True, text=True, env=env,
                             check=True).stdout
    assert "removed" in removed
    after = json.loads(subprocess.run([str(BIN / "jupyter"), "kernelspec", "list", "--json"], capture_output=True,
                                      text=True, env=env, check=True).stdout)["kernelspecs"]
    # gone from the prefix (one installed by `make lab` into this environment may still be listed)
    assert not after.get("labkit", {}).get("resource_dir", "").startswith(str(tmp_path))
    assert not (tmp_path / "share" / "jupyter" / "kernels" / "labkit").exists()


def test_kernelspec_rejects_bad_threads():
    from labkit.core.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="threads"):
        kernelspec.spec(threads=0)
    assert kernelspec.spec(threads=3)["env"]["OMP_NUM_THREADS"] == "3"
