"""The notebook panels, driven from Python (the real-browser test drives the same panels in Chromium)."""

from __future__ import annotations

import io
import math
import time
import zipfile
from pathlib import Path

import ipywidgets as widgets
import pytest
import torch
from PIL import Image

import labkit
from labkit.core.errors import InvalidArgument
from labkit.decoding.beam import BeamSearch
from labkit.interventions import AblateHead
from labkit.measures.attention import attn_implementation
from labkit.sampling import Classic, DoLa, Entropix
from labkit.speculative import PromptLookupDraft
from labkit.ui.panels import AttentionView, Lab, NextToken, SamplerControls, SpeculativeView, TokenStream
from labkit.ui.panels.attention_view import grow
from labkit.ui.panels.stream import step_view

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"


def _png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(bytes(data))).size


@pytest.fixture
def lab(session: labkit.Session):
    panel = Lab(session, chat=False, prompt=PROMPT, max_new_tokens=8, sampler=Classic(temperature=0.8))
    yield panel
    panel.close()


def test_token_stream_shows_every_step_with_its_measures(session):
    trace = session.generate(PROMPT, max_new_tokens=6)
    view = TokenStream(trace)
    assert view.prompt == PROMPT and len(view.shown) == 6
    for shown, step in zip(view.shown, trace.steps, strict=True):
        assert shown["token"] == step.token and shown["id"] == step.token_id
        assert shown["p"] == pytest.approx(math.exp(step.logprob))
        assert shown["s"] == pytest.approx(-step.logprob / math.log(2))
        assert shown["h"] == step.entropy_bits and shown["v"] == step.varentropy_bits
        assert [a[1] for a in shown["top"]] == [a.token_id for a in step.top]
    with pytest.raises(InvalidArgument, match="color_by"):
        view.color_by = "rainbow"
    assert view.color_by == "surprisal"


def test_token_stream_batches_its_messages(session):
    trace = session.generate(PROMPT, max_new_tokens=10)
    view = TokenStream(interval_s=3600)
    sent = []
    view.observe(lambda change: sent.append(len(change["new"])), names="tail")
    for step in trace.steps:
        view.push(step)
    assert sent == [1]  # the first push is due at once; the other 9 wait for the batch
    view.flush()
    assert sent == [1, 10] and [s["id"] for s in view.shown] == trace.token_ids


def test_token_stream_messages_stay_small_on_long_runs(session):
    trace = session.generate("Once upon a time", max_new_tokens=150, stop=[])
    view = TokenStream(interval_s=0)  # flush on every push
    largest = []
    view.observe(lambda change: largest.append(len(change["new"])), names=["steps", "tail"])
    for step in trace.steps:
        view.push(step)
    view.flush()
    assert [s["id"] for s in view.shown] == trace.token_ids
    commits = [n for n in largest if n % TokenStream.COMMIT == 0 and n > 0]
    assert commits == [64, 128]  # history moves in blocks; every other message is a tail of < 64 steps
    tails = [n for n in largest if n not in commits]
    assert max(tails) < TokenStream.COMMIT


def test_front_end_files_are_loaded_from_the_package_not_a_cdn():
    text, css = str(TokenStream._esm), str(TokenStream._css)  # anywidget reads the files into FileContents
    assert "export default" in text and "render" in text
    assert "http://" not in text and "https://" not in text and "import " not in text.split("export default")[0]
    assert ".lk-token" in css


def test_trace_renders_as_static_html(session):
    trace = session.generate("Write <b>bold</b> HTML:", max_new_tokens=5)
    html = trace._repr_html_()
    assert html.count('<span style="background:') == 5
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    for step in trace.steps:
        assert f"p={step.prob:.3f}" in html


def test_lab_generates_and_shows_what_session_generate_gives(session, lab):
    lab.controls.kind.value = "greedy"
    lab.buttons["Generate"].click()
    lab.wait(60)
    assert lab.message.value == ""
    expected = session.generate(PROMPT, max_new_tokens=8, capture=["attention"])
    assert lab.trace.token_ids == expected.token_ids
    assert [s["id"] for s in lab.stream.shown] == expected.token_ids
    assert lab.status.value.startswith("max_new_tokens after 8 tokens")
    last = lab.trace.steps[-1]
    assert list(lab.charts.bars.data[0].x) == pytest.approx([a.prob for a in last.top])
    assert list(lab.charts.lines.data[0].y) == [s.entropy_bits for s in lab.trace.steps]
    assert list(lab.charts.lines.data[1].y) == [s.varentropy_bits for s in lab.trace.steps]
    assert min(_png_size(lab.attention.image.value)) > 0
    lab.stream.selected = 2
    assert list(lab.charts.bars.data[0].x) == pytest.approx([a.prob for a in lab.trace.steps[2].top])


def test_grown_attention_equals_a_full_pass_over_prompt_and_generated_tokens(session):
    trace = session.generate(PROMPT, max_new_tokens=5, capture=["attention"])
    maps = session.attention(PROMPT)
    grown = grow(maps.probs, [s.captures["attention"] for s in trace.steps])  # (L, H, N, N)
    ids = torch.tensor([trace.prompt_ids + trace.token_ids[:-1]])
    with torch.inference_mode(), attn_implementation(session.model, "eager"):
        out = session.model(input_ids=ids, output_attentions=True, logits_to_keep=1)
    full = torch.stack([a[0].float() for a in out.attentions])  # (L, H, N, N)
    assert grown.shape == full.shape
    torch.testing.assert_close(grown, full, atol=1e-4, rtol=1e-4)


def test_slider_moved_between_steps_changes_the_next_token_and_is_recorded(lab, session):
    for _ in range(3):
        lab.buttons["Step"].click()
        lab.wait(30)
    lab.controls.sliders["temperature"].value = 0.3
    assert lab.controls.sampler.temperature == 0.3
    assert "temperature=0.3" in lab.controls.values.value
    for _ in range(3):
        lab.buttons["Step"].click()
        lab.wait(30)
    temps = [s.sampler["temperature"] for s in lab.trace.steps]
    assert temps == [0.8] * 3 + [0.3] * 3
    # the recorded entropy after the sampler matches a recomputation at the recorded temperature: the model's own
    # logits by teacher forcing, divided by that temperature (Classic with no top-k/p cut), entropy in bits
    t = lab.trace
    with torch.no_grad():
        logits = session.model(torch.tensor([t.prompt_ids + t.token_ids])).logits[0, len(t.prompt_ids) - 1:-1]
    for step, row in zip(t.steps, logits, strict=True):
        p = torch.softmax(row.double() / step.sampler["temperature"], -1)
        expected = float(-(p[p > 0] * p[p > 0].log2()).sum())
        assert step.sampler["entropy_after_bits"] == pytest.approx(expected, abs=1e-3)


def test_stop_ends_the_run_within_one_token(session):
    lab = Lab(session, chat=False, prompt="Tell me a long story about a dragon.", max_new_tokens=300)
    lab.buttons["Generate"].click()
    deadline = time.time() + 60
    while len(lab.trace) < 3 and time.time() < deadline:
        time.sleep(0.02)
    at_press = len(lab.trace)
    lab.buttons["Stop"].click()
    lab.wait(60)
    assert not lab.running
    assert lab.trace.stop_reason == "stopped"
    assert len(lab.trace) <= at_press + 1 < 300
    assert lab.status.value.startswith("stopped")
    session.next_token(PROMPT)  # the session is free again


def test_a_run_paused_by_step_holds_the_session_until_close(session):
    from labkit.core.errors import SessionBusy

    lab = Lab(session, chat=False, prompt=PROMPT, max_new_tokens=8)
    lab.step()
    lab.wait(30)
    assert len(lab.trace) == 1 and lab.status.value.startswith("paused")
    with pytest.raises(SessionBusy):
        session.next_token(PROMPT)
    lab.close()
    assert session.next_token(PROMPT).top(1)[0].token == " Paris"


def test_clicking_an_alternative_branches_and_keeps_the_old_run(lab):
    lab.controls.kind.value = "greedy"
    lab.run()
    lab.wait(60)
    old = lab.trace
    alt = old.steps[2].top[1].token_id
    lab.stream.branch = {"step": 2, "token_id": alt, "n": 1}
    lab.wait(60)
    new = lab.trace
    assert new is not old and lab.traces == [old, new]
    assert new.token_ids[:2] == old.token_ids[:2] and new.token_ids[2] == alt and old.token_ids[2] != alt
    assert len(old) == 8
    labels = [label for label, _ in lab.branch.options]
    assert labels[0] == "1: run" and labels[1].startswith("2: branch at step 2")
    lab.branch.value = 0
    assert lab.trace is old and [s["id"] for s in lab.stream.shown] == old.token_ids


def test_interventions_from_the_panel(session, lab):
    lab.controls.kind.value = "greedy"
    assert session.next_token(PROMPT).top(1)[0].token == " Paris"
    lab.suppress.value = " Paris"
    lab.run()
    lab.wait(60)
    assert lab.trace.steps[0].token != " Paris"
    assert lab.trace.steps[0].interventions
    lab.stream.selected = 0  # the bars stay the model's raw top-k (" Paris" first); the title says what edited it
    assert lab.charts.bars.data[0].y[0] == repr(" Paris")
    assert lab.charts.bars.layout.title.text.endswith("edited by " + ", ".join(lab.trace.steps[0].interventions))


def test_errors_show_in_the_panel_and_leave_the_session_usable(session, lab):
    lab.prompt.value = ""
    lab.buttons["Generate"].click()
    assert "prompt must not be empty" in lab.message.value
    lab.prompt.value = "word " * 9000
    lab.buttons["Generate"].click()
    assert "context" in lab.message.value
    lab.suppress.value = "two tokens here"
    lab.prompt.value = PROMPT
    lab.buttons["Generate"].click()
    assert "token" in lab.message.value and not lab.running
    assert session.next_token(PROMPT).top(1)[0].token == " Paris"


def test_sampler_controls_reject_a_bad_value_and_keep_the_old_one():
    controls = SamplerControls(Classic(temperature=0.8, top_p=0.9))
    assert set(controls.sliders) >= {"temperature", "top_k", "top_p", "min_p"}
    controls._set("top_p", {"new": 1.5})  # what a widget sending an out-of-range value would do
    assert "top_p" in controls.error.value and "1.5" in controls.error.value
    assert controls.sampler.top_p == 0.9
    controls.kind.value = "entropix"
    assert isinstance(controls.sampler, Entropix)
    controls.sliders["high_ent"].value = 4.0
    assert controls.sampler.high_ent == 4.0 and controls.sampler.cfg.high_ent == 4.0


def test_lab_runs_entropix(session):
    lab = Lab(session, chat=False, prompt=PROMPT, max_new_tokens=4, sampler=Entropix())
    lab.run()
    lab.wait(60)
    assert lab.message.value == "" and len(lab.trace) == 4
    assert all("branch" in s.sampler for s in lab.trace.steps)


def test_next_token_panel(session):
    panel = NextToken(session, prompt=PROMPT)
    d = session.next_token(PROMPT)
    assert list(panel.chart.data[0].x) == pytest.approx([a.prob for a in d.top(10)])
    assert f"entropy {d.entropy('bits'):.3f} bits" in panel.summary.value
    panel.prompt.value = ""
    assert "empty" in panel.error.value


def test_attention_view(session):
    view = AttentionView(session, "Hello world, hello world")
    single = _png_size(view.image.value)
    assert min(single) > 0 and "pattern in the prompt" in view.label.value
    view.grid.value = True
    assert _png_size(view.image.value) != single
    view.layer.value, view.head.value = 0, 1
    assert view.label.value.startswith("layer 0, head 1")


def test_speculative_view(session):
    trace = session.generate("Repeat: the cat sat on the mat. the cat sat on the mat.", max_new_tokens=12,
                             speculative=PromptLookupDraft())
    view = SpeculativeView(trace)
    assert view.stream.color_by == "origin"
    assert [s["origin"] for s in view.stream.shown] == [s.speculative["origin"] for s in trace.steps]
    assert "accepted" in view.summary.value or "α" in view.summary.value
    with pytest.raises(InvalidArgument, match="speculatively"):
        SpeculativeView(session.generate(PROMPT, max_new_tokens=2))


def test_step_view_is_what_the_front_end_reads(session):
    step = session.generate(PROMPT, max_new_tokens=1).steps[0]
    assert set(step_view(step)) == {"id", "token", "p", "s", "h", "v", "top", "origin"}


def test_wheel_ships_the_front_end_and_the_kernelspec(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True)
    wheel = next(tmp_path.glob("labkit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"labkit/_widgets/token_stream.js", "labkit/_widgets/token_stream.css",
            "labkit/_kernels_ext/labkit/kernel.json", "labkit/ui/panels/lab.py"} <= names


def test_why_view_of_a_clicked_token_equals_the_direct_calls_and_its_head_button_ablates_and_regenerates(session,
                                                                                                          lab):
    lab.controls.kind.value = "greedy"
    lab.run()
    lab.wait(60)
    lab.why.method.value = "saliency"
    lab.stream.selected = 3  # a click on the fourth generated token
    lab.wait_why(60)
    assert lab.why.status.value == ""
    direct = session.attribute_step(lab.trace, 3, method="saliency")
    assert lab.why.attribution.tokens == direct.tokens and lab.why.attribution.target_id == lab.trace.token_ids[3]
    assert lab.why.attribution.scores == pytest.approx(direct.scores, abs=1e-6)
    dla = session.logit_attribution_step(lab.trace, 3)
    torch.testing.assert_close(torch.tensor(lab.why.logit_attribution.heads), torch.tensor(dla.heads), atol=1e-6,
                               rtol=0)
    assert lab.why.strip.value.count('class="lk-attr"') == len(direct.tokens)
    assert min(_png_size(lab.why.heads.value)) > 0 and min(_png_size(lab.why.layers.value)) > 0
    buttons = [b for b in lab.why.top.children if isinstance(b, widgets.Button)]
    (layer, head, _), = dla.top_heads(1)
    assert buttons[0].description.startswith(f"ablate {layer}:{head} ")
    runs = len(lab.traces)
    buttons[0].click()
    lab.wait(60)
    assert len(lab.traces) == runs + 1 and (lab.ablate_layer.value, lab.ablate_head.value) == (layer, head)
    with session.intervene(AblateHead(layer, head)):
        assert lab.trace.token_ids == session.generate(PROMPT, max_new_tokens=8).token_ids


def test_why_view_during_a_run_is_computed_between_steps_and_the_stream_goes_on(session):
    lab = Lab(session, chat=False, prompt="Tell me a long story about a dragon.", max_new_tokens=60)
    lab.suppress.value = session.tokenizer.eos_token
    try:
        lab.run()
        while len(lab.trace) < 3:
            time.sleep(0.01)
        lab.stream.selected = 1
        lab.wait_why(60)
        asked_at = len(lab.trace)
        assert lab.running or len(lab.trace) == 60
        lab.wait(120)
        assert len(lab.trace) == 60 > asked_at  # the run went on after the why view was drawn
        assert lab.why.attribution.target_id == lab.trace.token_ids[1]
        direct = session.attribute_step(lab.trace, 1, method=lab.why.method.value)
        assert lab.why.attribution.scores == pytest.approx(direct.scores, abs=1e-6)
    finally:
        lab.close()


def test_lab_generates_with_the_chosen_kv_policy_and_shows_the_caches_size(session):
    lab = Lab(session, chat=False, prompt=PROMPT, max_new_tokens=5)
    try:
        lab.controls.kind.value = "greedy"
        lab.kv.value = "window:sinks=2,window=4"
        lab.run()
        lab.wait(60)
        expected = session.generate(PROMPT, max_new_tokens=5, kv="window:sinks=2,window=4")
        assert lab.trace.token_ids == expected.token_ids
        assert lab.kv_size.value == (f"cache {expected.steps[-1].kv['bytes'] / 2**20:.2f} MiB after 5 tokens "
                                     "(window:sinks=2,window=4)")
        assert not lab.trace.steps[-1].captures["attention"].outside_window[:, :2].any()  # the sinks stay
        lab.kv.value = "lossy"
        lab.buttons["Generate"].click()
        assert "not one of" in lab.message.value
    finally:
        lab.close()


def test_lab_offers_beam_search_and_the_contrast_decoders_with_live_sliders(session):
    lab = Lab(session, chat=False, prompt=PROMPT, max_new_tokens=4)
    try:
        lab.controls.kind.value = "beam"
        lab.run()
        lab.wait(60)
        assert lab.trace.token_ids == session.generate(PROMPT, max_new_tokens=4, beam=BeamSearch(4)).token_ids
        assert lab.trace.beam_tree().returned >= 0
        lab.controls.kind.value = "dola"
        lab.controls.sliders["alpha"].value = 0.2
        assert lab.controls.sampler.alpha == 0.2
        lab.buttons["Generate"].click()
        lab.wait(60)
        expected = session.generate(PROMPT, max_new_tokens=4, sampler=DoLa(alpha=0.2))
        assert lab.trace.token_ids == expected.token_ids
        assert [s.sampler["premature_layer"] for s in lab.trace] == [s.sampler["premature_layer"] for s in expected]
    finally:
        lab.close()


def test_the_labs_first_run_on_the_instruct_default_writes_a_story_and_its_sliders_have_width(session):
    # chat off, the instruct model ends this request after one token (<|im_end|>, p = 0.48); the Lab's default is on
    lab = Lab(session, prompt="Tell me a story about a lighthouse keeper.", max_new_tokens=12,
              sampler=labkit.sampling.Greedy())
    try:
        assert lab.chat.value is True
        lab.run()
        lab.wait(60)
        assert len(lab.trace) == 12 and lab.trace.stop_reason == "max_new_tokens"
        plain = session.generate("Tell me a story about a lighthouse keeper.", max_new_tokens=12)
        assert len(plain) == 1 and plain.stop_reason == "eos"  # what the old default did
        assert lab.max_new_tokens.layout.width == "340px"
        assert all(s.layout.width == "100%" for s in lab.controls.sliders.values())
    finally:
        lab.close()
