"""Trace/Step/Distribution: validation, tables, lossless JSON and Parquet round trips, clear errors."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from labkit.core.errors import InvalidArgument, TraceFormatError
from labkit.records import results as results_mod
from labkit.records.trace import Alternative, Step, Trace, TraceMeta


def make_trace(n: int = 3) -> Trace:
    steps = [
        Step(index=i, position=5 + i, token_id=100 + i, token=["é", " tab\t", "🙂"][i % 3], logprob=-0.1 * i - 1e-17,
             entropy_bits=1.0 / 3 + i, varentropy_bits=0.1 + i / 7, top=[("a", 1, 0.5), ("b", 2, 1 / 3)],
             time_ms=12.345678901234, sampler={"name": "classic", "temperature": 0.7, "kept": 12, "nested": [1, None]},
             attention={"entropy_bits": 1.25 + i, "agreement": 0.1}, interventions=["Suppress([' é'])"] * (i % 2),
             captures={"attention": object()})
        for i in range(n)
    ]
    meta = TraceMeta(model="m", dtype="float32", device="cpu", sampler={"name": "classic", "temperature": 0.7},
                     seed=123456789012345678, max_new_tokens=10, chat=True, stop=["\n", 2], labkit_version="0.1.0",
                     created="2026-11-24T00:00:00+00:00")
    return Trace(prompt="Hi \"there\"", prompt_ids=[1, 2, 3, 4, 5], steps=steps, meta=meta, text="é tab\t🙂",
                 stop_reason="eos")


@pytest.mark.parametrize("suffix", [".json", ".parquet"])
@pytest.mark.parametrize("n", [0, 1, 3])
def test_round_trip_is_lossless(tmp_path, suffix, n):
    t = make_trace(n)
    path = t.save(tmp_path / f"run{suffix}")
    back = Trace.load(path)
    assert back == t
    assert all(isinstance(a, Alternative) for s in back.steps for a in s.top)
    assert [s.time_ms for s in back.steps] == [s.time_ms for s in t.steps]  # exact floats
    assert [s.attention for s in back.steps] == [s.attention for s in t.steps]
    assert all(s.captures == {} for s in back.steps)  # raw captured tensors are not saved
    assert [s.interventions for s in back.steps] == [s.interventions for s in t.steps]


def test_parquet_has_one_column_per_step_field_except_the_raw_captures(tmp_path):
    import pyarrow.parquet as pq

    path = make_trace(2).save(tmp_path / "run.parquet")
    columns = set(pq.read_schema(path).names)
    fields = {f.name for f in dataclasses.fields(Step)}
    assert columns == fields - {"captures"}  # listed here, not read from the module's own constant


def test_every_step_field_but_captures_survives_a_parquet_round_trip(tmp_path):
    t = make_trace(3)
    back = Trace.load(t.save(tmp_path / "run.parquet"))
    for name in {f.name for f in dataclasses.fields(Step)} - {"captures"}:
        assert [getattr(s, name) for s in back.steps] == [getattr(s, name) for s in t.steps], name


def test_to_pandas_has_one_row_per_step_with_units_in_names():
    df = make_trace(3).to_pandas()
    assert len(df) == 3
    for col in ("token", "prob", "logprob", "surprisal_bits", "entropy_bits", "varentropy_bits", "top", "time_ms"):
        assert col in df.columns
    assert df["prob"].tolist() == pytest.approx([math.exp(-0.1 * i) for i in range(3)])
    assert df["surprisal_bits"][1] == pytest.approx(0.1 / math.log(2))
    assert len(make_trace(0).to_pandas().columns) > 5


def test_step_invariants_are_checked():
    base = dataclasses.asdict(make_trace(1).steps[0])
    with pytest.raises(InvalidArgument, match="logprob"):
        Step(**{**base, "logprob": 0.5})
    with pytest.raises(InvalidArgument, match="entropy"):
        Step(**{**base, "entropy_bits": -1.0})
    with pytest.raises(InvalidArgument, match="index"):
        Step(**{**base, "index": 9, "position": 3})


@pytest.mark.parametrize("content, match", [
    ("{not json", "not a readable labkit trace"),
    ("[1, 2]", "top level is not an object"),
    ('{"format": "something.else", "version": 1}', "not a labkit trace"),
    ('{"format": "labkit.trace", "version": 99}', "version 99"),
    ('{"format": "labkit.trace", "version": 1, "prompt": "x"}', "'steps' must be a list"),
    ('{"format": "labkit.trace", "version": 1, "prompt": "x", "steps": []}', "not a readable labkit trace: KeyError"),
    ('{"format": "labkit.trace", "version": 1, "steps": [{"index": 0}], "prompt": "", "prompt_ids": [], '
     '"meta": {}, "text": "", "stop_reason": ""}', "not a readable labkit trace: TypeError"),
])
def test_malformed_or_foreign_json_gets_a_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TraceFormatError, match=match):
        Trace.load(path)


def test_foreign_parquet_and_bad_paths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "other.parquet")
    with pytest.raises(TraceFormatError, match="not a labkit trace"):
        Trace.load(tmp_path / "other.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 nonsense")
    with pytest.raises(TraceFormatError, match="not a readable labkit trace"):
        Trace.load(tmp_path / "junk.parquet")
    with pytest.raises(TraceFormatError, match="no trace file"):
        Trace.load(tmp_path / "missing.json")
    with pytest.raises(InvalidArgument, match=r"must end in \.json or \.parquet"):
        make_trace().save(tmp_path / "run.csv")


def test_saved_json_is_plain_and_versioned(tmp_path):
    data = json.loads(make_trace(2).save(tmp_path / "t.json").read_text())
    assert data["format"] == "labkit.trace" and data["version"] == 1
    assert data["steps"][0]["top"][0] == ["a", 1, 0.5]


def test_distribution_checks_shape():
    with pytest.raises(InvalidArgument, match=r"shape \(V,\)"):
        results_mod.Distribution(logprobs=torch.zeros(2, 3), tokenizer=None)


def test_a_json_trace_loads_under_a_non_utf8_locale(tmp_path):
    import os
    import subprocess
    import sys

    path = make_trace(3).save(tmp_path / "run.json")  # é, 🙂 and a tab: UTF-8 on disk
    env = {**os.environ, "PYTHONUTF8": "0", "LC_ALL": "C", "LANG": "C"}
    code = ("import json, locale, sys; from labkit.records.trace import Trace; t = Trace.load(sys.argv[1]); "
            "print(json.dumps([t.text, len(t.steps), locale.getpreferredencoding(False)]))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                          encoding="utf-8")
    assert done.returncode == 0, done.stderr[-500:]
    text, steps, encoding = json.loads(done.stdout)
    assert (text, steps) == ("é tab\t🙂", 3)
    assert encoding.lower().replace("-", "") in ("ascii", "ansi_x3.41968")  # the locale really is not UTF-8
