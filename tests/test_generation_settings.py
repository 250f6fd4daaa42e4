"""Issue 29's architecture, checked: one validated GenerationSettings picks the driver; beam search is a strategy
(the old spelling warns and gives the same tokens); parameters are declared once and the Lab's sliders, checks and
defaults come from them; registries are open (a sampler, a KV policy and an attribution method registered by the
user work in the Lab, the command line, specs and sweeps); the generation path is made of short functions; old
import paths and names still work with a DeprecationWarning; the five bugs stay fixed."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import warnings
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from click.testing import CliRunner

import labkit
from labkit.core.errors import InvalidArgument
from labkit.decoding import kv
from labkit.decoding.settings import GenerationSettings
from labkit.sampling import SAMPLERS, BeamSearch, Classic, Mirostat, Param, Sampler, parse_sampler, register
from labkit.sampling.registry import name_of
from labkit.why import attribution

PROMPT = "The capital of France is"
ROOT = Path(__file__).resolve().parents[1] / "labkit"


# -- one settings object -----------------------------------------------------------------------------------------
def test_settings_are_checked_when_made_and_name_the_parameter():
    with pytest.raises(InvalidArgument, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(InvalidArgument, match="seed as a list"):
        GenerationSettings(seed=[1, 2], n=3)
    with pytest.raises(InvalidArgument, match="beam search runs its beams as the batch"):
        GenerationSettings(beam=2, n=2)
    with pytest.raises(InvalidArgument, match="capture must be a list"):
        GenerationSettings(capture="attention")
    with pytest.raises(InvalidArgument, match="beam must be"):
        GenerationSettings(beam="four")
    s = GenerationSettings(seed=7, n=3, kv="full")
    assert s.seeds == (7, 8, 9) and s.rows == 3 and isinstance(s.kv, kv.Full) and s.batched
    assert s.strategy == "plain" and GenerationSettings(beam=3).strategy == "beam"
    assert GenerationSettings(beam=3).beam.num_beams == 3


def test_a_settings_object_gives_what_the_same_keywords_give_and_keywords_override_it(session):
    settings = GenerationSettings(max_new_tokens=5, sampler=Classic(temperature=0.9), seed=3)
    by_object = session.generate(PROMPT, settings=settings)
    by_keywords = session.generate(PROMPT, max_new_tokens=5, sampler=Classic(temperature=0.9), seed=3)
    assert by_object.token_ids == by_keywords.token_ids and len(by_object) == 5
    assert len(session.generate(PROMPT, settings=settings, max_new_tokens=2)) == 2  # a keyword overrides a field
    by_spec = session.generate(PROMPT, max_new_tokens=5, sampler="classic:temperature=0.9", seed=3)
    assert by_spec.token_ids == by_object.token_ids  # a spec string is the sampler it names
    with pytest.raises(InvalidArgument, match="settings must be"):
        session.generate(PROMPT, settings={"max_new_tokens": 2})
    unseeded = GenerationSettings(max_new_tokens=2, sampler=Classic())
    seeds = {session.generate(PROMPT, settings=unseeded).meta.seed for _ in range(3)}
    assert len(seeds) == 3  # like seed=None in keywords: a fresh seed each generation, recorded


def test_beam_is_a_strategy_and_the_old_sampler_spelling_warns_and_gives_the_same_tokens(session):
    new = session.generate(PROMPT, max_new_tokens=5, beam=BeamSearch(3))
    with pytest.warns(DeprecationWarning, match="beam=BeamSearch"):
        old = session.generate(PROMPT, max_new_tokens=5, sampler=BeamSearch(3))
    assert old.token_ids == new.token_ids == session.generate(PROMPT, max_new_tokens=5, beam=3).token_ids
    assert new.meta.beam is not None and new.meta.sampler["name"] == "beam"
    assert not isinstance(BeamSearch(2), Sampler)  # not a sampler: it selects jointly across rows


# -- the five bugs ------------------------------------------------------------------------------------------------
def test_a_failing_on_step_in_a_batch_keeps_the_eos_of_rows_that_had_ended(session):
    from labkit.interventions.base import TokenIntervention

    eos = next(iter(session.eos_ids))
    hot = dict(max_new_tokens=6, n=3, seed=0, sampler=Classic(temperature=3.0))
    firsts = [t.token_ids[0] for t in session.generate(PROMPT, **hot)]
    row = next(b for b, tok in enumerate(firsts) if firsts.count(tok) == 1)  # a row whose first token is its own

    class EndThatRow(TokenIntervention):  # EOS at step 1 for that row only: it ends, the others run on
        def apply(self, logits, ctx):
            if ctx.token_ids == [firsts[row]]:
                logits = torch.full_like(logits, -1e9)
                logits[..., eos] = 0.0
            return logits

    calls = []

    def fail_on_the_seventh(step):  # 3 rows × 2 rounds, then a third round's first step
        calls.append(step)
        if len(calls) == 7:
            raise RuntimeError("callback failed")

    seeds = [row, *(b for b in range(3) if b != row)]  # that row first: session.last_trace is row 0
    again = dict(max_new_tokens=6, seed=seeds, sampler=Classic(temperature=3.0), interventions=[EndThatRow()])
    with pytest.raises(RuntimeError, match="callback failed"):
        session.generate(PROMPT, **again, on_step=fail_on_the_seventh)
    assert [c.token_id for c in calls[:4:3]] == [firsts[row], eos]  # row 0's two steps: its token, then EOS
    assert session.last_trace.stop_reason == "eos"  # it had ended before the callback raised: not "error"
    assert session.last_trace.token_ids == [firsts[row], eos]


def test_the_lab_runs_mirostat_and_a_user_sampler_it_did_not_know(session):
    from labkit.ui.panels import Lab

    lab = Lab(session, chat=False, prompt=PROMPT, max_new_tokens=3, sampler=Mirostat(tau=3.0))
    try:
        assert lab.controls.kind.value == "mirostat" and set(lab.controls.sliders) >= {"tau", "eta", "temperature"}
        lab.run()
        lab.wait(60)
        assert lab.message.value == "" and len(lab.trace) == 3 and lab.trace.meta.sampler["name"] == "mirostat"
    finally:
        lab.close()

    class Coldest(Sampler):  # never registered: the Lab offers it as it is
        name = "coldest"

        def __call__(self, input_ids, scores):
            return scores * 100.0

    lab = Lab(session, chat=False, prompt=PROMPT, max_new_tokens=2, sampler=Coldest())
    try:
        assert "coldest" in lab.controls.kind.options
        lab.run()
        lab.wait(60)
        assert lab.trace.token_ids == session.generate(PROMPT, max_new_tokens=2).token_ids  # ×100: argmax
    finally:
        lab.close()


# -- parameters declared once -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_each_registered_class_declares_its_parameters_once_and_its_defaults_agree(name):
    cls = SAMPLERS[name]
    made = cls()
    for key, param in cls.params.items():
        assert isinstance(param, Param)
        assert getattr(made, key) == param.default, f"{name}.{key}: the object's default is not the declared one"
        default = inspect.signature(cls).parameters.get(key)
        if default is not None:  # a constructor argument of the same name starts at the declared default
            assert default.default == param.default, f"{name}({key}=...) default differs from its Param"
        if param.slider is not None:
            lo, hi, _ = param.slider
            param.check(key, param.kind(lo) if param.lo is None or lo > param.lo or not param.open_lo else hi)


def test_a_declared_range_refuses_with_the_parameter_the_value_and_the_range():
    with pytest.raises(InvalidArgument, match=r"top_p must be in \(0, 1\]; got 1.5"):
        Classic(top_p=1.5)
    with pytest.raises(InvalidArgument, match=r"tau must be > 0 bits; got -1"):
        Mirostat(tau=-1)
    with pytest.raises(InvalidArgument, match=r"early_stopping must be one of True, False, 'never'; got 1"):
        BeamSearch(early_stopping=1)
    s = Classic()
    with pytest.raises(InvalidArgument, match="temperature"):
        s.temperature = 0.0
    assert s.temperature == 1.0  # the session's sampler is left as it was


def test_the_labs_sliders_come_from_the_declarations():
    from labkit.ui.panels import SamplerControls

    controls = SamplerControls(Mirostat())
    slider = controls.sliders["tau"]
    assert (slider.min, slider.max, slider.step) == Mirostat.params["tau"].slider
    assert set(controls.sliders) == {k for k, p in Mirostat.params.items() if p.slider is not None}


# -- open registries ----------------------------------------------------------------------------------------------
class Hottest(Sampler):
    """A user's sampler: divides the logits by a large temperature."""

    name = "hottest"
    params: ClassVar[dict[str, Param]] = {"heat": Param(3.0, lo=1.0, slider=(1.0, 10.0, 0.5), help="the divisor")}

    def __init__(self, heat: float = 3.0) -> None:
        self.heat = heat

    def __call__(self, input_ids, scores):
        return scores / self.heat


@dataclasses.dataclass(frozen=True)
class Recent(kv.Window):
    """A user's policy: a window with no sinks by default, under its own name."""

    sinks: int = 0
    window: int = 8
    name = "recent"


def _squared_gradient(f, embeds):
    embeds.grad = None
    f(embeds).sum().backward()
    return embeds.grad[0].float().square().sum(-1)


@pytest.fixture
def registered():
    register(Hottest)
    kv.register(Recent)
    attribution.register_method("squared_gradient", _squared_gradient)
    yield
    SAMPLERS.pop("hottest")
    kv.POLICIES.pop("recent")
    attribution.GRADIENT_METHODS.pop("squared_gradient")


def test_a_registered_sampler_policy_and_method_work_everywhere_the_built_in_ones_do(session, registered, tmp_path):
    from labkit.studies.experiments import Sweep
    from labkit.ui.cli import main
    from labkit.ui.panels import SamplerControls

    # specs and generate
    hot = parse_sampler("hottest:heat=2.5")
    assert isinstance(hot, Hottest) and hot.heat == 2.5 and name_of(hot) == "hottest"
    a = session.generate(PROMPT, max_new_tokens=4, sampler=hot, seed=1, kv="recent:window=6")
    assert a.meta.sampler == {"name": "hottest", "heat": 2.5} and a.steps[-1].kv["policy"] == "recent:sinks=0,window=6"
    # the Lab's sampler box and sliders
    controls = SamplerControls()
    assert "hottest" in controls.kind.options
    controls.kind.value = "hottest"
    assert isinstance(controls.sampler, Hottest) and set(controls.sliders) == {"heat"}
    from labkit.ui.panels.lab import kv_choices

    assert "recent:sinks=0,window=8" in kv_choices()  # the Lab's KV box suggests the registered policy
    # a sweep
    frame = Sweep([PROMPT], samplers={"hot": "hottest:heat=2.5"}, seeds=[1], max_new_tokens=4,
                  kv={"recent": "recent:window=6"}).run(session)
    assert frame["text"][0] == a.text
    # the command line (same process: the registry is the one the plugin filled)
    out = CliRunner().invoke(main, ["generate", PROMPT, "--max-new-tokens", "4", "--seed", "1", "--sampler",
                                    "hottest:heat=2.5", "--kv", "recent:window=6"], catch_exceptions=False)
    assert out.exit_code == 0 and a.text in out.output
    # the attribution method, in Python and on the command line
    got = session.attribute(PROMPT, target=" Paris", method="squared_gradient")
    ids = session.encode(PROMPT)
    embeds = session.sites.embed(ids).detach().clone().requires_grad_()
    from labkit.why.attribution import target_function

    f = target_function(session.sites, ids.shape[1] - 1, ids.shape[1], got.target_id, None, "prob")
    with torch.enable_grad():
        expected = _squared_gradient(f, embeds)
    assert got.scores == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-12)
    out = CliRunner().invoke(main, ["attribute", PROMPT, "--target", " Paris", "--method", "squared_gradient",
                                    "--heads", "0"], catch_exceptions=False)
    assert out.exit_code == 0 and "squared_gradient attribution" in out.output


def test_the_cli_lists_the_registered_samplers_with_their_parameters(registered):
    from labkit.ui.cli import main

    out = CliRunner().invoke(main, ["samplers"], catch_exceptions=False)
    assert out.exit_code == 0
    assert "hottest" in out.output and "heat = 3.0: ≥ 1; the divisor" in out.output
    assert "temperature = 1.0: > 0 (use sampler=None for greedy)" in out.output


# -- a generation path the next engineer can read ----------------------------------------------------------------
def _functions(path: Path) -> list[ast.FunctionDef]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)]


def _body_lines(fn: ast.FunctionDef) -> int:
    """Lines of the body without the docstring."""
    documented = len(fn.body) > 1 and isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant)
    body = fn.body[1:] if documented else fn.body
    return body[-1].end_lineno - body[0].lineno + 1


def _depth(node: ast.AST, level: int = 0) -> int:
    blocks = (ast.For, ast.While, ast.If, ast.With, ast.Try)
    inner = [_depth(c, level + isinstance(c, blocks)) for c in ast.iter_child_nodes(node)]
    return max([level, *inner])


def test_the_loop_reads_like_a_page():
    decode = next(f for f in _functions(ROOT / "decoding" / "loop.py") if f.name == "decode")
    assert _body_lines(decode) <= 40
    assert _depth(decode) <= 3
    path = [*(ROOT / "decoding").glob("*.py"), ROOT / "session.py"]
    long = [f"{p.name}:{f.name} ({_body_lines(f)} lines)" for p in path for f in _functions(p) if _body_lines(f) > 60]
    assert not long


# -- old names ------------------------------------------------------------------------------------------------------
def test_old_import_paths_and_names_warn_and_give_the_same_objects(session):
    import importlib
    import sys

    for old, new in [("labkit.decode", "labkit.decoding.loop"), ("labkit.panels.lab", "labkit.ui.panels.lab")]:
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
            module = importlib.import_module(old)
        assert module is importlib.import_module(new)
    with pytest.warns(DeprecationWarning, match="labkit.info moved"):
        assert labkit.info.entropy is importlib.import_module("labkit.measures.information").entropy
    with pytest.warns(DeprecationWarning, match="token_probabilities"):
        old = session.compare([PROMPT], " Paris")
    assert old.equals(session.token_probabilities([PROMPT], " Paris"))
    with pytest.warns(DeprecationWarning, match="foil"):
        la = session.logit_attribution(PROMPT, token=" Paris", against=" Rome")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert la.label == session.logit_attribution(PROMPT, token=" Paris", foil=" Rome").label


def test_the_plugin_option_imports_the_module_that_registers(tmp_path, monkeypatch):
    from labkit.ui.cli import main

    (tmp_path / "labkit_test_plugin.py").write_text(
        "from labkit.sampling import Sampler, register\n\n"
        "@register\nclass Lukewarm(Sampler):\n    name = 'lukewarm'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        out = CliRunner().invoke(main, ["--plugin", "labkit_test_plugin", "samplers"], catch_exceptions=False)
        assert out.exit_code == 0 and "lukewarm" in out.output
        bad = CliRunner().invoke(main, ["--plugin", "no_such_labkit_plugin", "samplers"])
        assert bad.exit_code == 2 and "no_such_labkit_plugin" in bad.output
    finally:
        SAMPLERS.pop("lukewarm", None)
