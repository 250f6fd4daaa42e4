"""The bad-input suite: every case gets one labkit error whose message names the parameter (or the path), and leaves the
Session as it was — its greedy output and next-token log-probs are checked unchanged after every case.

Table-driven: (case id, a call on the default Session, the expected error type, a fragment of the message)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import labkit
from labkit.core.errors import InvalidArgument, LabkitError, ModelLoadError, SaveError, TraceFormatError
from labkit.interventions import (
    AblateHead,
    ActivationHook,
    Boost,
    Custom,
    EntropyTarget,
    ForceTokens,
    Patch,
    Steer,
    Suppress,
)
from labkit.sampling import Classic, Entropix, EntropyGuided, Mirostat
from labkit.ui.cli import main

PROMPT = "The capital of France is"
NAN = float("nan")
INF = float("inf")


@pytest.fixture(scope="module")
def baseline(session):
    return session.generate(PROMPT, max_new_tokens=4).token_ids, session.next_token(PROMPT).logprobs


def _gen(session, **kw):
    return session.generate(PROMPT, **({"max_new_tokens": 3} | kw))


def _vector(session, fill):
    return torch.full((session.sites.d_model,), fill)


SESSION_CASES = [
    # generate / stream arguments
    ("max_new_tokens=0", lambda s: _gen(s, max_new_tokens=0), InvalidArgument, "max_new_tokens must be"),
    ("max_new_tokens=1e9", lambda s: _gen(s, max_new_tokens=10**9), InvalidArgument, "max_new_tokens must be below"),
    ("max_new_tokens=2.5", lambda s: _gen(s, max_new_tokens=2.5), InvalidArgument, "max_new_tokens must be"),
    ("seed=2**70", lambda s: _gen(s, seed=2**70), InvalidArgument, "seed must be an integer in [0, 2**63)"),
    ("seed=-1", lambda s: _gen(s, seed=-1), InvalidArgument, "seed must be"),
    ("seed='0'", lambda s: _gen(s, seed="0"), InvalidArgument, "seed must be"),
    ("stop=10**6", lambda s: _gen(s, stop=10**6), InvalidArgument, "stop token ids must be in [0, 49152)"),
    ("stop=-1", lambda s: _gen(s, stop=-1), InvalidArgument, "stop token ids must be in"),
    ("stop=''", lambda s: _gen(s, stop=""), InvalidArgument, "stop strings must not be empty"),
    ("stop=[1.5]", lambda s: _gen(s, stop=[1.5]), InvalidArgument, "stop must hold strings and token ids"),
    ("top_k=0", lambda s: _gen(s, top_k=0), InvalidArgument, "top_k must be an integer"),
    ("capture=str", lambda s: _gen(s, capture="attention"), InvalidArgument, "capture must be a list"),
    ("sampler=int", lambda s: _gen(s, sampler=3), InvalidArgument, "sampler must be a labkit sampler"),
    ("sampler=bad spec", lambda s: _gen(s, sampler="hotter"), InvalidArgument, "sampler 'hotter' is unknown"),
    ("on_step=1", lambda s: _gen(s, on_step=1), InvalidArgument, "on_step must be a callable"),
    ("interventions=[1]", lambda s: _gen(s, interventions=[1]), InvalidArgument, "interventions must be labkit"),
    # prompts
    ("prompt=None", lambda s: s.next_token(None), InvalidArgument, "prompt must be a str"),
    ("prompt=''", lambda s: s.generate("", max_new_tokens=2), InvalidArgument, "prompt must not be empty"),
    ("prompt lone surrogate (generate)", lambda s: s.generate("Hi \ud800", max_new_tokens=2), InvalidArgument,
     "prompt must be valid Unicode text"),
    ("prompt lone surrogate (next_token)", lambda s: s.next_token("\udcff"), InvalidArgument,
     "prompt must be valid Unicode text"),
    ("prompt too long", lambda s: s.next_token("word " * 9000), InvalidArgument, "the model's context is 8192"),
    ("score one token", lambda s: s.score("Hi"), InvalidArgument, "text must be at least 2 tokens"),
    ("compare prompts=str", lambda s: s.token_probabilities("abc", " Paris"), InvalidArgument,
     "prompts must be a non-empty list"),
    ("compare multi-token", lambda s: s.token_probabilities([PROMPT], " Parisian capital"), InvalidArgument,
     "is not a single token"),
    ("lens k=0", lambda s: s.lens(PROMPT, k=0), InvalidArgument, "k must be an integer in [1, 49152]"),
    ("lens k=True", lambda s: s.lens(PROMPT, k=True), InvalidArgument, "k must be an integer"),
    # samplers (constructors and live assignment)
    ("Classic temperature=inf", lambda s: Classic(temperature=INF), InvalidArgument, "temperature must be a finite"),
    ("Classic temperature=0", lambda s: Classic(temperature=0), InvalidArgument, "temperature must be > 0"),
    ("Classic top_p=1.5", lambda s: Classic(top_p=1.5), InvalidArgument, "top_p must be in (0, 1]"),
    ("Classic top_k=-1", lambda s: Classic(top_k=-1), InvalidArgument, "top_k must be an integer ≥ 0"),
    ("Classic min_p=nan", lambda s: Classic(min_p=NAN), InvalidArgument, "min_p must be a finite number"),
    ("Mirostat tau=inf", lambda s: Mirostat(tau=INF), InvalidArgument, "tau must be a finite number"),
    ("Mirostat eta=0", lambda s: Mirostat(eta=0), InvalidArgument, "eta must be in (0, 1]"),
    ("EntropyGuided weight=2", lambda s: EntropyGuided(entropy_weight=2), InvalidArgument, "entropy_weight must be"),
    ("Entropix low_ent=-1", lambda s: Entropix(low_ent=-1.0), InvalidArgument, "low_ent must be ≥ 0"),
    ("Entropix hehv_top_p_min=2", lambda s: Entropix(hehv_top_p_min=2.0), InvalidArgument,
     "hehv_top_p_min must be in [0, 1]"),
    ("Entropix ada_top_k_max=0", lambda s: Entropix(ada_top_k_max=0), InvalidArgument, "ada_top_k_max must be an"),
    ("Entropix thresholds out of order", lambda s: _gen(s, sampler=Entropix(med_ent=9.0)), InvalidArgument,
     "med_ent=9.0 ≤ high_ent=5.0"),
    ("Entropix unknown setting", lambda s: Entropix(nonsense=1.0), InvalidArgument, "no setting 'nonsense'"),
    # token-level interventions
    ("Suppress multi-token", lambda s: _gen(s, interventions=[Suppress(" Parisian capital")]), InvalidArgument,
     "is not a single token"),
    ("Boost factor=0", lambda s: Boost(" Paris", 0.0), InvalidArgument, "factor must be a finite number > 0"),
    ("EntropyTarget bits=-1", lambda s: EntropyTarget(-1.0), InvalidArgument, "bits must be a finite number ≥ 0"),
    ("ForceTokens beyond max_new_tokens", lambda s: _gen(s, interventions=[ForceTokens({5: " Rome"})]),
     InvalidArgument, "forces steps [5], but max_new_tokens=3"),
    ("Custom returns NaN", lambda s: _gen(s, interventions=[Custom(lambda x, i, c: x * NAN, name="nan")]),
     InvalidArgument, "Custom(nan) returned logits with NaN"),
    ("Custom returns all -inf", lambda s: _gen(s, interventions=[Custom(lambda x, i, c: x - INF, name="ninf")]),
     InvalidArgument, "Custom(ninf) returned logits with NaN or no finite value"),
    ("Custom wrong shape", lambda s: _gen(s, interventions=[Custom(lambda x, i, c: x[:, :5], name="cut")]),
     InvalidArgument, "Custom(cut) must return a tensor of shape (1, 49152)"),
    ("Custom not callable", lambda s: Custom(3), InvalidArgument, "fn must be a callable"),
    # activation-level interventions
    ("AblateHead layer=99", lambda s: _gen(s, interventions=[AblateHead(99, 0)]), InvalidArgument,
     "layer must be an integer in [0, 30)"),
    ("AblateHead head=9", lambda s: _gen(s, interventions=[AblateHead(0, 9)]), InvalidArgument,
     "head must be an integer in [0, 9)"),
    ("AblateHead mode", lambda s: AblateHead(0, 0, mode="half"), InvalidArgument, "mode must be 'zero' or 'mean'"),
    ("Steer NaN vector", lambda s: Steer(3, _vector(s, NAN)), InvalidArgument, "Steer vector must be finite"),
    ("Steer inf vector", lambda s: Steer(3, _vector(s, INF)), InvalidArgument, "Steer vector must be finite"),
    ("Steer wrong size", lambda s: _gen(s, interventions=[Steer(3, torch.ones(5))]), InvalidArgument,
     "vector must have the model's hidden size 576"),
    ("Steer scale=inf", lambda s: Steer(3, _vector(s, 1.0), INF), InvalidArgument, "scale must be a finite number"),
    ("Patch positions outside", lambda s: _gen(s, interventions=[Patch("Hi", 0, [40])]), InvalidArgument,
     "positions [40] are outside"),
    ("Patch empty source", lambda s: Patch("", 0, 1), InvalidArgument, "source_prompt must be a non-empty string"),
    ("ActivationHook unknown site", lambda s: _gen(s, interventions=[ActivationHook("blocks.1.resid_pots", print)]),
     InvalidArgument, "unknown site 'blocks.1.resid_pots'"),
    ("ActivationHook site out of range", lambda s: _gen(s, interventions=[ActivationHook("blocks.40.mlp_out",
                                                                                         print)]),
     InvalidArgument, "block index must be an integer in [0, 30)"),
    ("ActivationHook returns wrong type", lambda s: _gen(s, interventions=[ActivationHook("blocks.2.mlp_out",
                                                                                          lambda v, p: "x")]),
     InvalidArgument, "the function at site 'blocks.2.mlp_out' must return None or a tensor of shape"),
    ("ActivationHook unknown module", lambda s: _gen(s, interventions=[ActivationHook("model.layers.3.mlpp", print)]),
     InvalidArgument, "no module 'model.layers.3.mlpp'"),
    # sites
    ("sites unknown name", lambda s: s.sites.resolve("resid"), InvalidArgument, "unknown site 'resid'"),
    ("sites name not str", lambda s: s.sites.resolve(3), InvalidArgument, "site must be a site name"),
    # traces
    ("Trace.load(None)", lambda s: labkit.Trace.load(None), InvalidArgument, "path must be a file path"),
    ("Trace.load(123)", lambda s: labkit.Trace.load(123), InvalidArgument, "path must be a file path"),
    ("Trace.load missing", lambda s: labkit.Trace.load("/nonexistent/run.json"), TraceFormatError,
     "no trace file at '/nonexistent/run.json'"),
    ("Trace.load .txt", lambda s: labkit.Trace.load("run.txt"), InvalidArgument, "must end in .json or .parquet"),
    ("trace.save(None)", lambda s: _gen(s).save(None), InvalidArgument, "path must be a file path"),
]


@pytest.mark.parametrize(("case", "call", "error", "fragment"), SESSION_CASES, ids=[c[0] for c in SESSION_CASES])
def test_bad_input_gets_one_clear_error_and_the_session_is_unchanged(session, baseline, case, call, error,
                                                                     fragment):
    with pytest.raises(error) as caught:
        call(session)
    assert fragment in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value)
    tokens, logprobs = baseline
    assert session.generate(PROMPT, max_new_tokens=4).token_ids == tokens
    assert torch.equal(session.next_token(PROMPT).logprobs, logprobs)


def test_a_scope_covers_next_token_and_says_so(session):
    with session.intervene(Suppress(" Paris")):
        d = session.next_token(PROMPT)
    assert d.prob(" Paris") == 0.0 and d.interventions == ["Suppress([' Paris'])"]
    assert session.next_token(PROMPT).prob(" Paris") > 0.5 and session.next_token(PROMPT).interventions == []


def test_non_finite_logits_keep_the_partial_trace(session):
    bad = Custom(lambda x, i, c: x * NAN if i == 2 else x, name="late")
    with pytest.raises(InvalidArgument, match="at step 2"):
        session.generate(PROMPT, max_new_tokens=5, interventions=[bad])
    assert len(session.last_trace.steps) == 2 and session.last_trace.stop_reason == "error"


# -- files -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trace(session):
    return session.generate(PROMPT, max_new_tokens=3)


@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_a_save_that_fails_part_way_leaves_the_old_file_and_no_partial_one(trace, tmp_path, suffix):
    target = tmp_path / f"run{suffix}"
    trace.save(target)
    good = target.read_bytes()
    script = (f"import resource, sys; from labkit.records.trace import Trace; t = Trace.load({str(target)!r}); "
              f"t.steps = t.steps * 2000; resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000)); "
              f"t.save({str(target)!r})")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         preexec_fn=lambda: __import__("signal").signal(__import__("signal").SIGXFSZ,
                                                                       __import__("signal").SIG_IGN))
    assert out.returncode != 0 and "SaveError" in out.stderr and str(target) in out.stderr, out.stderr[-500:]
    assert target.read_bytes() == good  # the previous file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no partial file


def test_save_targets_that_cannot_be_files_are_refused(trace, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InvalidArgument, match="is a folder"):
        trace.save(tmp_path)
    with pytest.raises(InvalidArgument, match="which is a file, not a folder"):
        trace.save(tmp_path / "a_file" / "run.json")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.geteuid() != 0:  # root writes anywhere
            with pytest.raises(SaveError, match="cannot write"):
                trace.save(locked / "run.json")
    finally:
        locked.chmod(0o700)
    trace.steps[0].sampler["object"] = object()
    try:
        with pytest.raises(TraceFormatError, match="not JSON-serialisable"):
            trace.save(tmp_path / "run.json")
    finally:
        del trace.steps[0].sampler["object"]
    assert not (tmp_path / "run.json").exists()


@pytest.mark.parametrize(("field", "value"), [("token_id", "x"), ("time_ms", "slow"), ("logprob", None),
                                              ("top", 3), ("sampler", []), ("unknown_field", 1)])
def test_trace_load_checks_field_types(trace, tmp_path, field, value):
    path = trace.save(tmp_path / "run.json")
    data = json.loads(path.read_text())
    data["steps"][0][field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(TraceFormatError, match=f"'{field}'" if field != "unknown_field" else "unknown fields"):
        labkit.Trace.load(path)


def test_garbage_safetensors_is_a_model_load_error_in_one_line(tiny_model_dir, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for p in Path(tiny_model_dir).iterdir():
        (folder / p.name).write_bytes(p.read_bytes() if p.suffix != ".safetensors" else b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError) as caught:
        labkit.Session(folder, device="cpu", progress=False)
    assert "could not load a causal language model" in str(caught.value) and "\n" not in str(caught.value)


def test_loads_are_offline_even_when_the_environment_says_otherwise(monkeypatch):
    import huggingface_hub.constants as hub

    from labkit.model import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    with models.offline():
        assert hub.is_offline_mode() and os.environ["HF_HUB_OFFLINE"] == "1"
    assert not hub.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "0"


# -- the command line: exit 2 and one line ------------------------------------------------------------------------

CLI_CASES = [
    (["generate", PROMPT, "--max-new-tokens", "abc"], "'abc' is not a valid integer"),
    (["generate", PROMPT, "--nonsense"], "No such option '--nonsense'"),
    (["next", "x", "--model", "/nonexistent"], "does not exist"),
    (["generate", PROMPT, "--max-new-tokens", "2", "--save", "{file}/x.json"], "which is a file, not a folder"),
    (["generate", PROMPT, "--max-new-tokens", "2", "--save", "{dir}"], "is a folder"),
    (["generate", "Hi \udcff", "--max-new-tokens", "2"], "prompt must be valid Unicode text"),
    (["sweep", "{bad_yaml}"], "is not valid YAML at line"),
    (["sweep", "{prompts_5}"], "prompts must be a non-empty list"),
]


@pytest.mark.parametrize(("args", "fragment"), CLI_CASES, ids=[" ".join(a)[:40] for a, _ in CLI_CASES])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, fragment):
    (tmp_path / "file").write_text("x")
    (tmp_path / "bad.yaml").write_text("prompts: [unclosed\n")
    (tmp_path / "p5.yaml").write_text("prompts: 5\n")
    args = [a.format(file=tmp_path / "file", dir=tmp_path, bad_yaml=tmp_path / "bad.yaml",
                     prompts_5=tmp_path / "p5.yaml") for a in args]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("labkit: error:") and fragment in lines[0], r.output


def test_every_error_type_is_a_labkit_error():
    for error in (InvalidArgument, ModelLoadError, SaveError, TraceFormatError):
        assert issubclass(error, LabkitError)
    assert resource.RLIMIT_FSIZE  # the fault injection above relies on it (POSIX)
