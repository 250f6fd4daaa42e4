"""Sweeps: cells, measures against independent computations, Parquet streaming and resume, Ray = local, a killed
Ray worker, the CLI."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from labkit.core.errors import InvalidArgument
from labkit.interventions import Suppress
from labkit.sampling import Classic
from labkit.studies.experiments import Sweep, read

BIN = Path(sys.executable).parent
PROMPTS = ["The capital of France is", "My favourite colour is"]
TEXT_COLUMNS = ["cell", "prompt", "sampler", "intervention", "seed", "text", "tokens", "stop_reason"]


def small(seeds=(0, 1), tokens=4) -> Sweep:
    return Sweep(PROMPTS, samplers={"greedy": None, "warm": Classic(temperature=0.8)},
                 interventions={"none": [], "no-paris": [Suppress(" Paris")]}, seeds=list(seeds),
                 max_new_tokens=tokens, metrics=["effective_vocab_size"])


@pytest.fixture(scope="module")
def local_rows(session):
    return small().run(session, progress=False)


def test_cells_are_the_cartesian_product_in_order(local_rows):
    sweep = small()
    assert len(sweep) == 16 and len(local_rows) == 16
    assert list(local_rows["cell"]) == [c.key for c in sweep.cells()]
    assert local_rows[["prompt", "sampler", "intervention", "seed"]].drop_duplicates().shape[0] == 16
    assert list(local_rows.columns[:16]) == ["cell", "prompt", "sampler", "intervention", "kv", "seed", "text",
                                             "tokens", "stop_reason", "kv_bytes", "mean_entropy_bits",
                                             "max_entropy_bits", "mean_varentropy_bits", "max_varentropy_bits",
                                             "perplexity", "kl_to_baseline_bits"]


def test_rows_match_generations_and_independent_measures(session, local_rows):
    for _, row in local_rows.iterrows():
        sampler = None if row["sampler"] == "greedy" else Classic(temperature=0.8)
        items = [Suppress(" Paris")] if row["intervention"] == "no-paris" else []
        trace = session.generate(row["prompt"], max_new_tokens=4, sampler=sampler, seed=int(row["seed"]),
                                 interventions=items)
        assert row["text"] == trace.text and row["tokens"] == len(trace)
        h = [s.entropy_bits for s in trace.steps]
        # a sweep batches the seeds of a cell: float sums of a batched pass differ from a single run's by ~1e-6
        assert row["mean_entropy_bits"] == pytest.approx(sum(h) / len(h), rel=1e-5)
        assert row["max_entropy_bits"] == pytest.approx(max(h), rel=1e-5)
        if row["intervention"] == "none":
            # no intervention: the output's own log-probs are the unmodified model's, so its perplexity follows
            assert row["perplexity"] == pytest.approx(math.exp(-sum(s.logprob for s in trace.steps) / len(trace)),
                                                      rel=1e-4)
            assert row["kl_to_baseline_bits"] == 0.0
        else:
            assert row["kl_to_baseline_bits"] > 0


def test_kl_of_a_suppression_is_its_closed_form(session):
    # one step: KL(q ‖ p) with q = p without ' Paris', renormalised, is −log2(1 − p(' Paris'))
    rows = Sweep(["The capital of France is"], interventions={"no-paris": [Suppress(" Paris")]},
                 max_new_tokens=1).run(session, progress=False)
    p = session.next_token("The capital of France is").prob(" Paris")
    assert rows.loc[0, "kl_to_baseline_bits"] == pytest.approx(-math.log2(1 - p), rel=1e-4)


def test_registered_metric_column(session, local_rows):
    row = local_rows.iloc[0]
    trace = session.generate(row["prompt"], max_new_tokens=4)
    logits = torch.stack([session.model(input_ids=torch.tensor([trace.prompt_ids + trace.token_ids[:i]]))
                          .logits[0, -1].float() for i in range(4)]).detach()
    p = torch.softmax(logits, -1)
    h = -(p * torch.log2(p.clamp_min(1e-45))).sum(-1)
    assert row["effective_vocab_size"] == pytest.approx(float((2 ** h).mean()), rel=1e-3)


def test_rows_stream_into_parquet_and_resume_without_duplicates(session, tmp_path, local_rows):
    out = tmp_path / "rows.parquet"
    seen = []

    def interrupt(row):
        seen.append(row["cell"])
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        small().run(session, out=out, progress=False, on_row=interrupt)
    kept = read(out)
    assert sorted(kept["cell"]) == sorted(seen)  # every finished row is on disk
    with pytest.raises(InvalidArgument, match="resume=True"):
        small().run(session, out=out, progress=False)
    again = []
    full = small().run(session, out=out, resume=True, progress=False, on_row=lambda r: again.append(r["cell"]))
    assert len(again) == 11 and not set(again) & set(seen)  # only the missing cells ran
    on_disk = read(out)
    assert len(on_disk) == 16 and on_disk["cell"].is_unique
    pd.testing.assert_frame_equal(full[TEXT_COLUMNS], local_rows[TEXT_COLUMNS])


@pytest.fixture(scope="module")
def local_rows_one_thread(session):
    """The local answers with one torch thread, as each Ray actor runs (float sums depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return small().run(session, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_ray_gives_the_local_answers_and_survives_a_killed_worker(local_rows_one_thread, tmp_path):
    killed = []

    def kill_first_worker(row):
        if not killed:
            killed.append(row["worker"])
            os.kill(int(row["worker"]), signal.SIGKILL)  # Ray restarts the actor and retries its cell

    out = tmp_path / "ray.parquet"
    rows = small().run(executor="ray", workers=2, out=out, progress=False, on_row=kill_first_worker)
    assert killed and killed[0] != os.getpid()
    assert len(rows) == 16 and rows["cell"].is_unique and len(read(out)) == 16
    assert rows["worker"].nunique() >= 2  # two actors (the restarted one has a new process id)
    columns = [c for c in rows.columns if c != "worker"]
    pd.testing.assert_frame_equal(rows[columns], local_rows_one_thread[columns], check_exact=True)  # identical


def test_bad_arguments(session):
    with pytest.raises(InvalidArgument, match="prompts"):
        Sweep("just one string")
    with pytest.raises(InvalidArgument, match="unknown metric 'wobble'"):
        Sweep(PROMPTS, metrics=["wobble"])
    with pytest.raises(InvalidArgument, match="seeds"):
        Sweep(PROMPTS, seeds=[-1])
    with pytest.raises(InvalidArgument, match="interventions\\['x'\\]"):
        Sweep(PROMPTS, interventions={"x": "suppress-word:word=Paris"})
    with pytest.raises(InvalidArgument, match="sampler 'hot' is unknown"):
        Sweep(PROMPTS, samplers={"h": "hot"})
    with pytest.raises(InvalidArgument, match="executor must be one of"):
        small().run(session, executor="spark")
    with pytest.raises(InvalidArgument, match="workers"):
        small().run(session, executor="ray", workers=0)
    with pytest.raises(InvalidArgument, match="unknown sweep settings"):
        Sweep.from_config({"prompts": PROMPTS, "temperature": 1})


def test_cli_sweep_runs_a_config(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text("prompts: ['The capital of France is']\nsamplers: {greedy: greedy}\n"
                      "interventions: {none: [], no-paris: ['suppress-word:word=Paris']}\nmax_new_tokens: 2\n")
    out = tmp_path / "out.parquet"
    r = subprocess.run([str(BIN / "labkit"), "sweep", str(config), "--out", str(out)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "no-paris" in r.stdout and "kl_to_baseline_bits" in r.stdout
    assert len(read(out)) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompts: ['x']\nwobble: 1\n")
    r = subprocess.run([str(BIN / "labkit"), "sweep", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown sweep settings ['wobble']" in r.stderr


def test_example_config_is_valid():
    from labkit.studies.experiments import load_config

    sweep = Sweep.from_config(load_config(Path(__file__).resolve().parents[1] / "examples" / "sweep.yaml"))
    assert len(sweep) == 48


def test_a_kv_axis_multiplies_the_cells_and_its_kl_is_the_caches_loss_against_the_full_model(session):
    from labkit.decoding import kv

    sweep = Sweep(["The history of the city begins with a small settlement on the river, where traders met"],
                  kv={"full": "full", "window": "window:sinks=2,window=6"}, max_new_tokens=6)
    assert len(sweep) == 2 and "2 KV policies" in repr(sweep)
    rows = sweep.run(session, progress=False).set_index("kv")
    assert rows.loc["full", "kl_to_baseline_bits"] == 0.0
    report = kv.evaluate(session, list(rows.prompt[:1]), ["window:sinks=2,window=6"], max_new_tokens=6)
    assert rows.loc["window", "kl_to_baseline_bits"] == pytest.approx(report.rows[0]["mean_kl_bits"], abs=1e-4)
    assert rows.loc["window", "kv_bytes"] == 2 * 30 * 3 * 64 * 8 * 4  # 2 sinks + 6 recent positions, float32
    plain = Sweep(list(rows.prompt[:1]), max_new_tokens=6)  # written before the kv axis: the same cell key
    assert rows.loc["full", "cell"] == sweep.cells()[0].key == plain.cells()[0].key
    with pytest.raises(InvalidArgument, match="not one of"):
        Sweep(["x"], kv={"bad": "lossy"})
