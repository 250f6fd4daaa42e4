"""However a generation ends, it cleans up at once: the Session's lock is released, every hook is removed, torch's
inference mode is left, and the partial trace is kept with a stop reason. Each test ends a run one way, with an
activation-level intervention (forward hooks) active, and then checks: no hook left on any module, next-token
log-probs bit-identical to before, another thread can generate at once."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import hooks_on

from labkit.core.errors import InvalidArgument, SessionBusy
from labkit.interventions import AblateHead, Steer
from labkit.sampling import Classic

PROMPT = "The capital of France is"


class Boom(Exception):
    pass




def _interventions(session):
    return [AblateHead(2, 1), Steer(5, torch.ones(session.sites.d_model), 3.0)]


@pytest.fixture
def clean(session):
    """Checks after the test body: no hook left, log-probs bit-identical, another thread generates at once."""
    before_hooks, before = hooks_on(session.model), session.next_token(PROMPT).logprobs
    yield
    assert hooks_on(session.model) == before_hooks
    assert not torch.is_inference_mode_enabled()
    assert torch.equal(session.next_token(PROMPT).logprobs, before)
    out: list = []
    worker = threading.Thread(target=lambda: out.append(session.generate(PROMPT, max_new_tokens=2).token_ids))
    worker.start()
    worker.join(30)
    assert len(out) == 1 and len(out[0]) == 2  # no SessionBusy in another thread


def test_normal_end_cleans_up(session, clean):
    t = session.generate(PROMPT, max_new_tokens=3, interventions=_interventions(session))
    assert t.stop_reason == "max_new_tokens" and session.last_trace is t


def test_exception_in_on_step_cleans_up_and_keeps_the_partial_trace(session, clean):
    def on_step(step):
        if step.index == 1:
            raise Boom("callback failed")

    with pytest.raises(Boom):
        session.generate(PROMPT, max_new_tokens=6, interventions=_interventions(session), on_step=on_step)
    assert len(session.last_trace.steps) == 2 and session.last_trace.stop_reason == "error"


def test_exception_in_the_loop_body_of_a_stream_cleans_up(session, clean):
    with pytest.raises(Boom):
        for step in session.stream(PROMPT, max_new_tokens=6, interventions=_interventions(session)):
            if step.index == 2:
                raise Boom("loop body failed")
    assert len(session.last_trace.steps) == 3 and session.last_trace.stop_reason == "stopped"


def test_break_out_of_an_unbound_stream_cleans_up_at_once(session, clean):
    for step in session.stream(PROMPT, max_new_tokens=6, interventions=_interventions(session)):
        if step.index == 1:
            break
    assert len(session.last_trace.steps) == 2  # cleaned at the break (no gc.collect() anywhere in this test)


def test_close_and_dropping_a_bound_stream_clean_up(session, clean):
    gen = session.stream(PROMPT, max_new_tokens=6, interventions=_interventions(session))
    next(gen)
    gen.close()
    assert gen.trace.stop_reason == "stopped" and len(gen.trace.steps) == 1
    gen = session.stream(PROMPT, max_new_tokens=6, interventions=_interventions(session))
    next(gen)
    del gen  # dropped mid-run: cleaned at once, not at garbage collection


def test_keyboard_interrupt_in_on_step_keeps_the_trace(session, clean):
    def on_step(step):
        if step.index == 1:
            raise KeyboardInterrupt

    t = session.generate(PROMPT, max_new_tokens=6, interventions=_interventions(session), on_step=on_step)
    assert t.stop_reason == "interrupted" and len(t.steps) == 2


def test_an_invalid_live_slider_value_stops_the_run_and_cleans_up(session, clean):
    sampler = Classic(temperature=0.8)

    def on_step(step):
        sampler.temperature = -1

    with pytest.raises(InvalidArgument, match="temperature"):
        session.generate(PROMPT, max_new_tokens=6, sampler=sampler, seed=0, interventions=_interventions(session),
                         on_step=on_step)
    assert session.last_trace.steps


def test_a_generation_started_inside_on_step_is_refused(session, clean):
    def on_step(step):
        session.generate(PROMPT, max_new_tokens=1)

    with pytest.raises(SessionBusy, match="busy"):
        session.generate(PROMPT, max_new_tokens=3, on_step=on_step)


def test_callbacks_and_loop_bodies_run_outside_inference_mode(session, clean):
    seen = []
    session.generate(PROMPT, max_new_tokens=2, on_step=lambda st: seen.append(torch.is_inference_mode_enabled()))
    for _ in session.stream(PROMPT, max_new_tokens=2):
        seen.append(torch.is_inference_mode_enabled())
        x = torch.ones(2, requires_grad=True)
        (x * 2).sum().backward()  # user autograd code works between steps
    assert seen == [False] * 4
