"""The decoding loop's pure parts, tested on tiny inputs against closed forms: the step measures, applying
interventions to a round's rows, registered metrics per Step, the one text parser for interventions, and the colour
scales shared by the static HTML and the live view."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from labkit.core.errors import InvalidArgument
from labkit.interventions import AblateHead, Boost, ForceTokens, Suppress
from labkit.interventions.base import apply_rows
from labkit.interventions.specs import from_text, parse
from labkit.measures import information as info
from labkit.records import render
from labkit.records.trace import Trace


def test_step_measures_match_the_closed_forms_on_two_tiny_rows():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(4.0), 0.0, 0.0, float("-inf")]])
    m = info.step_measures(logits, top_k=2)
    assert m.entropy_bits.tolist() == pytest.approx([2.0, -(4 / 6) * math.log2(4 / 6) - 2 * (1 / 6) * math.log2(1 / 6)])
    assert m.varentropy_bits[0].item() == pytest.approx(0.0, abs=1e-9)  # uniform: every surprisal is 2 bits
    p = torch.tensor([4 / 6, 1 / 6, 1 / 6])
    h = float(-(p * p.log2()).sum())
    assert m.varentropy_bits[1].item() == pytest.approx(float((p * (-p.log2() - h) ** 2).sum()), abs=1e-6)
    assert m.top_ids[1].tolist()[0] == 0 and m.top_probs[1].tolist() == pytest.approx([4 / 6, 1 / 6])
    assert m.logprobs.shape == (2, 4) and m.logprobs[1, 3] == float("-inf")


class _Session:
    class tokenizer:  # what InterventionContext.text reads
        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return " ".join(map(str, ids))


def test_apply_rows_edits_each_row_in_its_own_context_and_names_what_changed():
    raw = torch.zeros(3, 5)  # a round of γ = 2 drafted tokens: rows for steps 4, 5, 6
    force = ForceTokens({5: 2})
    edited, changed = apply_rows(raw, 4, [7, 7, 7, 7], [1, 3], [0], _Session(), [Suppress([4]), force])
    assert torch.isneginf(edited[:, 4]).all()  # Suppress applies to every row
    assert edited[1].argmax().item() == 2 and torch.isneginf(edited[1, [0, 1, 3]]).all()  # step 5 forced
    assert changed[0] == ["Suppress([4])"] and len(changed[1]) == 2 and changed[2] == ["Suppress([4])"]
    same, none = apply_rows(raw, 0, [], [], [0], None, [])
    assert same is raw and none == [[], [], []]  # no interventions: the rows as they were, nothing changed


def test_registered_metrics_are_recorded_per_step_on_the_raw_logits_and_saved(session, tmp_path):
    t = session.generate("The capital of France is", max_new_tokens=4, metrics=["effective_vocab_size",
                                                                               "top_token_prob"])
    with torch.no_grad():
        logits = session.model(torch.tensor([t.prompt_ids + t.token_ids])).logits[0, len(t.prompt_ids) - 1:-1]
    for step, row in zip(t.steps, logits, strict=True):
        p = torch.softmax(row.double(), -1)
        h = float(-(p[p > 0] * p[p > 0].log2()).sum())
        assert step.metrics["effective_vocab_size"] == pytest.approx(2 ** h, rel=1e-4)
        assert step.metrics["top_token_prob"] == pytest.approx(float(p.max()), abs=1e-4)  # cached vs full pass
    assert "metric.effective_vocab_size" in t.to_pandas().columns
    for suffix in (".json", ".parquet"):
        assert Trace.load(t.save(tmp_path / f"run{suffix}")) == t
    with pytest.raises(InvalidArgument, match="unknown metric 'nope'"):
        session.generate("Hi", max_new_tokens=1, metrics=["nope"])
    with pytest.raises(InvalidArgument, match="metrics must be a list"):
        session.generate("Hi", max_new_tokens=1, metrics="top_token_prob")
    assert session.generate("Hi", max_new_tokens=1).steps[0].metrics == {}


def test_one_parser_reads_every_short_form_and_names_the_bad_one():
    items = from_text(suppress=[" Paris", "42"], boost=[" science=3"], force=["0= Rome"], ablate=["3:1"])
    assert [type(i) for i in items] == [Suppress, Boost, ForceTokens, AblateHead]
    assert items[0].tokens == [" Paris", 42] and items[1].factor == 3.0 and items[3].layer == 3
    assert [type(i) for i in parse(None, "boost= science=4")] == [Boost]
    assert [type(i) for i in parse(None, "ablate=2:0")] == [AblateHead]
    with pytest.raises(InvalidArgument, match=r"--boost must look like TOKEN=FACTOR"):
        from_text(boost=[" science"], prefix="--")
    with pytest.raises(InvalidArgument, match=r"^force must look like STEP=TOKEN"):
        parse(None, "force=x= Rome")
    with pytest.raises(InvalidArgument, match="recipe 'nope' is unknown"):
        parse(None, "nope:x=1")


def test_the_live_view_and_the_static_html_share_one_colour_scale():
    from labkit.ui.panels import TokenStream

    assert TokenStream().scales == render.scales_for_front_end()
    js = (Path(__file__).resolve().parents[1] / "widgets" / "token_stream.js").read_text()
    assert "const SCALES = {};" in js and "214, 39, 40" not in js and 'model.get("scales")' in js  # no own copy
    assert render.SCALES["surprisal"].shade(10.0) == "rgb(214, 39, 40)" == render.SCALES["surprisal"].shade(99.0)
    assert render.SCALES["surprisal"].shade(0.0) == "rgb(255, 255, 255)"
