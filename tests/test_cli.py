"""The `labkit` command line, through click's runner (same process, shared model cache)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from labkit import Trace
from labkit.ui.cli import main


@pytest.fixture(scope="module")
def run():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, list(args), catch_exceptions=False)

    return invoke


def test_next_prints_top_tokens(run):
    r = run("next", "The capital of France is", "--top", "3", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "' Paris'" in r.stdout.splitlines()[2] and "entropy" in r.output
    data = json.loads(run("next", "The capital of France is", "--top", "2", "--json").stdout)
    assert data["top"][0]["token"] == " Paris" and data["top"][0]["prob"] == pytest.approx(0.7725, abs=0.01)


def test_generate_show_steps_and_save(run, tmp_path):
    path = tmp_path / "t.json"
    r = run("generate", "The capital of France is", "--max-new-tokens", "4", "--show-steps", "--save", str(path))
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert "token" in lines[0] and "H bits" in lines[0]
    assert "' Paris'" in lines[1] and "0.77" in lines[1]
    t = Trace.load(path)
    assert len(t) == 4 and t.steps[0].token == " Paris"
    assert r.stdout.endswith("The capital of France is" + t.text + "\n")


def test_generate_with_sampling_options_is_seeded(run):
    a = run("generate", "Once upon a time", "--max-new-tokens", "6", "--temperature", "1.2", "--seed", "5").output
    b = run("generate", "Once upon a time", "--max-new-tokens", "6", "--temperature", "1.2", "--seed", "5").output
    assert a == b


def test_info(run):
    r = run("info")
    assert r.exit_code == 0, r.output
    for key in ("model", "device", "dtype", "cache folder", "torch", "transformers", "labkit"):
        assert f"{key}:" in r.output


@pytest.mark.parametrize("args, match", [
    (["generate", "x", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer; got 0"),
    (["generate", "x", "--temperature", "-1"], "temperature must be > 0"),
    (["generate", "x", "--save", "t.csv"], "must end in .json or .parquet"),
    (["next", ""], "prompt must not be empty"),
    (["next", "x", "--dtype", "float8"], "dtype must be one of"),
    (["next", "x", "--device", "cuda"] , "CUDA is not available"),
    (["next", "x", "--attn", "xformers", "--device", "cpu"], "attn='xformers' runs only on CUDA"),
    (["next", "x", "--top", "0"], "Invalid value for '--top'"),
    (["generate"], "Missing argument 'PROMPT'"),
    (["compare", "x", "--sampler", "nucleus"], "sampler 'nucleus' is unknown; choose from"),
    (["compare", "x", "--sampler", "classic:top_p=2"], "top_p must be in (0, 1]; got 2"),
    (["generate", "x", "--sampler", "entropix", "--top-k", "3"], "--sampler cannot be combined"),
])
def test_bad_arguments_exit_2_with_one_line(args, match):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert match in r.output
    if match.startswith(("max_new", "temperature", "must end", "prompt", "dtype", "CUDA", "attn", "sampler", "top_p",
                         "--sampler")):
        assert len(r.output.strip().splitlines()) == 1


def test_unknown_model_folder_exits_1(tmp_path):
    r = CliRunner().invoke(main, ["next", "x", "--model", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.output and r.output.count("\n") == 1


def test_compare_shows_each_sampler_and_entropix_branches(run):
    r = run("compare", "The capital of France is", "--max-new-tokens", "6", "--sampler", "greedy",
            "--sampler", "classic:temperature=0.7,top_p=0.9", "--sampler", "entropix", "--seed", "0", "--show-steps")
    out = r.stdout
    for name in ("== greedy ==", "== classic:temperature=0.7,top_p=0.9 ==", "== entropix =="):
        assert name in out
    table = out[out.index("sampler "):].splitlines()
    assert [row.split()[0] for row in table[1:]] == ["greedy", "classic:temperature=0.7,top_p=0.9", "entropix"]
    branches = table[3].split()[4:]  # "LEHV 4 ADAPTIVE 2"-style pairs that add up to the tokens
    assert sum(int(n) for n in branches[1::2]) == int(table[3].split()[1]) == 6
    assert "branch" in out  # the --show-steps table of entropix has its branch column
    one = run("compare", "Once upon a time", "--max-new-tokens", "5", "--sampler", "entropix").stdout
    assert one == run("compare", "Once upon a time", "--max-new-tokens", "5", "--sampler", "entropix").stdout  # seed 0


def test_generate_takes_any_sampler_spec(run):
    r = run("generate", "The capital of France is", "--max-new-tokens", "5", "--sampler", "mirostat:tau=3",
            "--seed", "1", "--show-steps")
    assert r.exit_code == 0 and r.stdout.count("\n") > 6


def test_generate_with_interventions(run):
    r = run("generate", "The capital of France is", "--max-new-tokens", "4", "--suppress", " Paris",
            "--force", "2= Rome", "--ablate", "3:1", "--boost", " the=2", "--show-steps")
    rows = r.stdout.splitlines()[1:5]
    assert all(row.split()[0].endswith("*") for row in rows)  # every step's logits were edited
    assert " Paris" not in r.stdout.splitlines()[-1] and "' Rome'" in rows[2]
    r = run("generate", "The capital of France is", "--max-new-tokens", "3", "--recipe", "suppress-word:word=Paris")
    assert "Paris" not in r.stdout.replace("The capital of France is", "")
    assert "suppress-word" in run("recipes").stdout


@pytest.mark.parametrize("args, match", [
    (["--boost", " science"], "--boost must look like TOKEN=FACTOR"),
    (["--boost", " science=-1"], "factor must be a finite number > 0"),
    (["--force", "x= Rome"], "--force must look like STEP=TOKEN"),
    (["--ablate", "3"], "--ablate must look like LAYER:HEAD"),
    (["--ablate", "99:0"], "layer must be an integer in [0, 30)"),
    (["--suppress", " Parisians and"], "is not a single token"),
    (["--recipe", "nope"], "recipe 'nope' is unknown"),
])
def test_bad_intervention_options_exit_2(args, match):
    r = CliRunner().invoke(main, ["generate", "The capital of France is", "--max-new-tokens", "2", *args])
    assert r.exit_code == 2, r.output
    assert match in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("spec", ["prompt-lookup", "layer-skip:8", "bf16"])
def test_generate_speculative_show_steps(run, spec):
    prompt = "Repeat this sentence exactly: The cat sat on the mat and looked at the dog."
    plain = run("generate", prompt, "--chat", "--max-new-tokens", "10")
    r = run("generate", prompt, "--chat", "--max-new-tokens", "10", "--speculative", spec, "--show-steps")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert "round origin" in lines[0]
    rows = [ln for ln in lines[1:] if ln[:4].strip().isdigit()]
    assert rows and all(any(o in ln for o in ("accepted", "resampled", "bonus", "target")) for ln in rows)
    assert r.stdout.endswith(plain.stdout)  # greedy: the same text as plain decoding
    assert "tokens/round" in r.stderr and "α=" in r.stderr


def test_generate_speculative_baseline_reports_a_measured_speedup(run):
    r = run("generate", "Say hello", "--max-new-tokens", "4", "--speculative", "prompt-lookup", "--baseline")
    assert r.exit_code == 0, r.output
    assert "measured" in r.stderr and "measured n/a" not in r.stderr


@pytest.mark.parametrize("args, match", [
    (["--speculative", "layer-skip"], "speculative spec must be one of"),
    (["--speculative", "layer-skip:99"], "n_layers must be in [1, 29]"),
    (["--baseline"], "--baseline needs --speculative"),
    (["--speculative", "prompt-lookup", "--sampler", "mirostat"], "exact only for samplers"),
])
def test_bad_speculative_options_exit_2(args, match):
    r = CliRunner().invoke(main, ["generate", "The capital of France is", "--max-new-tokens", "2", *args])
    assert r.exit_code == 2, r.output
    assert match in r.output and len(r.output.strip().splitlines()) == 1


def test_attribute_prints_the_same_scores_and_heads_as_the_python_calls(run, session):
    args = ("attribute", "The capital of France is", "--target", " Paris", "--foil", " Rome", "--method",
            "input_x_gradient", "--heads", "3", "--device", "cpu", "--dtype", "float32")
    data = json.loads(run(*args, "--json").stdout)
    a = session.attribute("The capital of France is", target=" Paris", foil=" Rome", method="input_x_gradient")
    la = session.logit_attribution("The capital of France is", token=" Paris", foil=" Rome")
    assert data["attribution"]["tokens"] == a.tokens
    assert data["attribution"]["scores"] == pytest.approx(a.scores, abs=1e-6)
    assert [(h["layer"], h["head"]) for h in data["logit_attribution"]["top_heads"]] == \
        [(layer, head) for layer, head, _ in la.top_heads(3)]
    text = run(*args).stdout
    assert "' capital'" in text and "layer  23 head   4" in text
    r = run("attribute", "The capital of France is", "--target", " Par is")
    assert r.exit_code != 0 and "not a single token" in r.output
