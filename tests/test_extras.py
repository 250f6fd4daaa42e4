"""`pip install -e .` is the headless engine: with every package of the optional extras made unimportable, the
command line and `Session.generate` work on the default model, and each optional feature raises one MissingExtra
naming the extra that brings it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from labkit.core.errors import MissingExtra
from labkit.core.extras import EXTRAS, missing, require

# Every top-level module the optional extras install (their own packages and what only they pull in), the test
# tools of `dev`, and plotly (a core dependency, but ARCHITECTURE.md keeps the engine free of the UI's libraries):
# made None in sys.modules, so `import x` raises ModuleNotFoundError and find_spec finds nothing.
BLOCKED = sorted({m for modules in EXTRAS.values() for m in modules}
                 | {"ipykernel", "jupyter_server", "notebook", "nbformat", "nbclient", "widgetsnbextension",
                    "jupyterlab_widgets", "comm", "pytest", "nbval", "playwright", "myst_parser", "docutils",
                    "plotly"})

_CHILD = textwrap.dedent('''
    import io, json, os, sys, tempfile, contextlib
    for name in BLOCKED:
        sys.modules[name] = None
    import labkit
    from labkit.ui import cli
    from labkit.core.errors import MissingExtra
    out = {}

    def exit_code(args):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                cli.main(args)
            except SystemExit as e:
                return (e.code or 0), buf.getvalue()
        return 0, buf.getvalue()

    out["next"] = exit_code(["next", "The capital of France is", "--top", "3", "--json"])
    s = labkit.Session(progress=False)
    t = s.generate("Once upon a time", max_new_tokens=6)
    out["generate"] = {"ids": t.token_ids, "stop": t.stop_reason, "logprob": t.steps[0].logprob,
                       "html": t._repr_html_()}

    def refusal(fn):
        try:
            fn()
        except MissingExtra as e:
            return str(e)
        except Exception as e:  # anything else is a failure the test reports
            return f"WRONG {type(e).__name__}: {e}"
        return "WRONG: no error"

    def panels():
        import labkit.ui.panels
    def magics():
        import labkit.ui.magics
    def kernel():
        from labkit.teach import kernelspec
        kernelspec.install(prefix=tempfile.mkdtemp())
    def student_copy():
        from labkit.teach import teaching
        teaching.student_copy("notebooks", tempfile.mkdtemp() + "/students")
    def ray_sweep():
        from labkit.studies.experiments import Sweep
        Sweep(["Hi"], max_new_tokens=1).run(executor="ray", workers=1)
    def quantized():
        labkit.Session(quantization="8bit", progress=False)
    def quantized_draft():
        from labkit.speculative import QuantizedDraft
        QuantizedDraft(dtype=None, quantization="8bit")
    def xformers():
        from labkit.model import models
        models.register_xformers()
    def workshop():
        from labkit.teach import workshop
        workshop.prepare(tempfile.mkdtemp(), users=2)

    out["refusals"] = {name: refusal(fn) for name, fn in [
        ("panels", panels), ("lab attribute", lambda: labkit.ui.panels), ("magics", magics), ("kernel", kernel),
        ("student copy", student_copy), ("ray", ray_sweep), ("quantization", quantized),
        ("quantized draft", quantized_draft), ("xformers", xformers), ("workshop", workshop)]}
    out["cli kernel"] = exit_code(["kernel", "install", "--prefix", tempfile.mkdtemp()])
    out["still usable"] = s.generate("Once upon a time", max_new_tokens=6).token_ids
    out["imported"] = sorted(n for n in BLOCKED if sys.modules.get(n) is not None)
    print("RESULT" + json.dumps(out))
''')

EXPECTED_EXTRA = {"panels": "lab", "lab attribute": "lab", "magics": "lab", "kernel": "lab", "student copy": "lab",
                  "ray": "ray", "quantization": "quant", "quantized draft": "quant", "xformers": "gpu",
                  "workshop": "workshop"}


@pytest.fixture(scope="module")
def headless() -> dict:
    code = f"BLOCKED = {BLOCKED!r}\n" + _CHILD
    env_run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert env_run.returncode == 0, env_run.stderr[-3000:]
    line = next(ln for ln in env_run.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.mark.slow
def test_labkit_next_works_without_any_optional_extra(headless, session):
    code, text = headless["next"]
    assert code == 0, text
    top = json.loads(text)["top"]
    expected = session.next_token("The capital of France is").top(3)
    assert [row["token"] for row in top] == [tok for tok, _, _ in expected]


@pytest.mark.slow
def test_session_generate_without_any_optional_extra_equals_the_full_install(headless, session):
    plain = session.generate("Once upon a time", max_new_tokens=6)
    assert headless["generate"]["ids"] == plain.token_ids
    assert headless["generate"]["logprob"] == pytest.approx(plain.steps[0].logprob, abs=1e-4)
    assert headless["still usable"] == plain.token_ids  # after every refusal below


@pytest.mark.slow
def test_a_trace_renders_as_html_without_the_widget_and_chart_libraries(headless):
    html = headless["generate"]["html"]
    assert "<span" in html and "surprisal" in html


@pytest.mark.slow
@pytest.mark.parametrize("feature", sorted(EXPECTED_EXTRA))
def test_an_optional_feature_without_its_extra_names_the_extra_to_install(headless, feature):
    message = headless["refusals"][feature]
    extra = EXPECTED_EXTRA[feature]
    assert not message.startswith("WRONG"), message
    assert f"needs the {extra!r} extra" in message and f"pip install 'labkit[{extra}]'" in message, message


@pytest.mark.slow
def test_the_command_line_reports_a_missing_extra_in_one_line_with_exit_code_2(headless):
    code, text = headless["cli kernel"]
    assert code == 2
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("labkit: error:") and "'lab' extra" in lines[0], text


@pytest.mark.slow
def test_no_optional_package_was_imported_by_the_headless_engine(headless):
    assert headless["imported"] == []


def test_require_lists_every_missing_module_and_passes_when_all_are_there(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert missing("bitsandbytes", "json") == ["bitsandbytes"]
    with pytest.raises(MissingExtra, match=r"8-bit needs the 'quant' extra \(bitsandbytes is not installed\): "
                                           r"pip install 'labkit\[quant\]'"):
        require("quant", "8-bit")
    require("lab", "the Lab", "json")  # present: no error
    with pytest.raises(ValueError, match="unknown extra 'gui'"):
        require("gui", "x")
