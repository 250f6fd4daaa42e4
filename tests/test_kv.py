"""KV-cache policies: quantization error bounds on synthetic tensors, policies that drop nothing equal the full cache,
what an eviction policy keeps, byte counts against the tensors' nbytes, and the KL measurement."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from labkit.core.errors import InvalidArgument
from labkit.decoding import kv
from labkit.records.figures import static_picture
from labkit.speculative import PromptLookupDraft
from labkit.ui.cli import main

PROMPT = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
          "grain, salt and cloth.")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_dequantize_error_is_within_half_a_step_per_element(bits):
    x = torch.randn(2, 3, 17, 64, generator=torch.Generator().manual_seed(0)) * 3  # (B, H, T, D)
    x[0, 0, 0] = 1.5  # a constant group: exact
    q = kv.quantize(x, bits, group=16)
    back = kv.dequantize(q)
    step = q.scales.repeat_interleave(16, dim=-1)  # (B, H, T, D): each element's group scale
    assert ((back - x).abs() <= step / 2 + 1e-5 * x.abs().max()).all()
    assert torch.equal(back[0, 0, 0], x[0, 0, 0])
    assert q.codes.shape[-1] == (32 if bits == 4 else 64) and q.codes.dtype == torch.uint8
    assert q.nbytes == q.codes.nbytes + q.mins.nbytes + q.scales.nbytes


def _forward_through(cache, keys, values):
    """Feed a cache layer 0 a prefill of 10 positions, then 6 single positions; the keys it returned last."""
    out = cache.layers[0].update(keys[..., :10, :], values[..., :10, :])
    for t in range(10, 16):
        out = cache.layers[0].update(keys[..., t:t + 1, :], values[..., t:t + 1, :])
    return out


def test_a_residual_window_longer_than_the_sequence_is_bit_identical_to_the_full_cache():
    from transformers.cache_utils import DynamicLayer

    keys, values = torch.randn(1, 2, 16, 32), torch.randn(1, 2, 16, 32)
    quant = kv.Quant(bits=4, residual=16).new_cache(1)
    k, v = _forward_through(quant, keys, values)
    full = DynamicLayer()
    full.update(keys[..., :10, :], values[..., :10, :])
    for t in range(10, 16):
        fk, fv = full.update(keys[..., t:t + 1, :], values[..., t:t + 1, :])
    assert torch.equal(k, fk) and torch.equal(v, fv)


def test_tiered_quantization_keeps_recent_positions_exact_and_older_ones_within_their_tiers_bound():
    keys, values = torch.randn(1, 2, 16, 32), torch.randn(1, 2, 16, 32)
    cache = kv.Quant(bits=4, residual=4, int8=4, group=16).new_cache(1)
    _forward_through(cache, keys, values)
    layer = cache.layers[0]
    assert layer.old[0].length == 8 and layer.mid[0].length == 4 and layer.keys.shape[-2] == 4
    k, _ = layer.update(torch.zeros(1, 2, 1, 32), torch.zeros(1, 2, 1, 32))  # what the next pass sees
    assert torch.equal(k[..., 12:16, :], keys[..., 12:16, :])  # full precision
    err8 = (k[..., 8:12, :] - keys[..., 8:12, :]).abs().max()
    err4 = (k[..., :8, :] - keys[..., :8, :]).abs().max()
    assert err8 <= layer.mid[0].scales.max() and 0 < err8 < err4 <= 2 * layer.old[0].scales.max()


def test_a_sink_window_keeps_the_sinks_and_the_last_positions_exactly():
    keys, values = torch.arange(16.0).view(1, 1, 16, 1).expand(1, 1, 16, 4).contiguous(), torch.randn(1, 1, 16, 4)
    cache = kv.Window(sinks=2, window=5).new_cache(1)
    _forward_through(cache, keys, values)
    layer = cache.layers[0]
    assert layer.positions.tolist() == [0, 1, 11, 12, 13, 14, 15]
    assert layer.keys[0, 0, :, 0].tolist() == [0.0, 1.0, 11.0, 12.0, 13.0, 14.0, 15.0]
    assert layer.get_seq_length() == 16 and layer.get_mask_sizes(1) == (8, 9)


def test_heavy_hitters_keep_the_recent_window_and_the_most_attended_older_keys_by_hand():
    cache = kv.HeavyHitters(budget=2, recent=2).new_cache(1)
    layer = cache.layers[0]
    history = [torch.tensor([[0.1, 0.5, 0.1, 0.2, 0.1], [0.3, 0.3, 0.1, 0.2, 0.1]]),  # (H=2, 5 keys) after prefill
               None, None]
    layer.update(torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4))
    layer.observe(history[0])
    # accumulated: [0.4, 0.8, 0.2, 0.4, 0.2]; older = positions 0..2 -> top 2: 1 (0.8), 0 (0.4); recent: 3, 4
    assert layer.positions.tolist() == [0, 1, 3, 4] and layer.keys.shape[-2] == 4
    layer.update(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4))  # position 5
    assert layer.seen.tolist() == [0, 1, 3, 4, 5]
    layer.observe(torch.tensor([[0.0, 0.0, 0.9, 0.1, 0.0], [0.0, 0.1, 0.8, 0.1, 0.0]]))
    # scores now 0: 0.4, 1: 0.9, 3: 2.1, 4: 0.4, 5: 0.0; older = 0, 1, 3 -> top 2: 3 (2.1), 1 (0.9); recent 4, 5
    assert layer.positions.tolist() == [1, 3, 4, 5]
    assert layer.score.tolist() == pytest.approx([0.9, 2.1, 0.4, 0.0])


@pytest.mark.parametrize("spec", ["window:sinks=2,window=6", "h2o:budget=4,recent=4"])
def test_captured_rows_under_eviction_cover_every_position_with_evicted_keys_marked(session, spec):
    plain = session.generate(PROMPT, max_new_tokens=6, kv=spec)
    trace = session.generate(PROMPT, max_new_tokens=6, kv=spec, capture=["attention"])
    assert trace.token_ids == plain.token_ids  # capturing changes nothing
    t = len(trace.prompt_ids)
    assert t > 8
    for i, step in enumerate(trace.steps):
        row = step.captures["attention"]
        assert row.scores.shape == (30, 9, t + i)
        held = (~row.outside_window).sum(-1)  # (L,) keys each layer attended to
        assert held.tolist() == [t if i == 0 else 9] * 30  # the prompt, then the 8 kept + the newest
        torch.testing.assert_close(row.probs.sum(-1), torch.ones(30, 9))
        assert float(row.probs[row.outside_window[:, None].expand_as(row.probs)].abs().sum()) == 0.0
        assert bool(row.outside_window.any()) == (i > 0)  # the prefill saw every key; later passes the kept ones
        assert step.kv["bytes"] == 2 * 30 * 3 * 64 * 8 * 4  # 8 positions kept after the step, float32


@pytest.mark.parametrize("spec", ["full", "quant:bits=4,residual=4096", "window:sinks=4,window=4096",
                                  "h2o:budget=4096,recent=8"])
def test_greedy_with_a_policy_that_drops_nothing_equals_plain_greedy(session, spec):
    plain = session.generate(PROMPT, max_new_tokens=12)
    trace = session.generate(PROMPT, max_new_tokens=12, kv=spec)
    assert trace.token_ids == plain.token_ids
    assert [s.logprob for s in trace.steps] == [s.logprob for s in plain.steps]


def test_reported_bytes_are_the_sum_of_the_tensors_nbytes_and_the_full_formula(session):
    n = len(session.encode(PROMPT)[0])
    for spec in ["full", "quant:bits=4,residual=8,int8=8", "window:sinks=4,window=8"]:
        policy = kv.parse_kv(spec)
        cache = policy.new_cache(session.info.n_layers)
        from labkit.model.cache import forward_cached

        with torch.inference_mode():
            forward_cached(session.model, session.encode(PROMPT), cache)
        by_hand = 0
        for layer in cache.layers:
            tensors = [layer.keys, layer.values]
            for q in (*getattr(layer, "old", ()), *getattr(layer, "mid", ())):
                if q is not None:
                    tensors += [q.codes, q.mins, q.scales]
            by_hand += sum(t.nbytes for t in tensors)
        assert kv.cache_bytes(cache) == by_hand
    full = kv.Full().new_cache(session.info.n_layers)
    with torch.inference_mode():
        forward_cached(session.model, session.encode(PROMPT), full)
    assert kv.cache_bytes(full) == kv.full_cache_bytes(session.model.config, n, torch.float32)
    trace = session.generate(PROMPT, max_new_tokens=3, kv="window:sinks=4,window=8")
    assert all(s.kv["bytes"] == 2 * 30 * 3 * 64 * 12 * 4 for s in trace.steps)  # 4 sinks + 8 recent, fp32
    assert trace.to_pandas()["kv_bytes"].tolist() == [s.kv["bytes"] for s in trace.steps]


def test_kl_of_a_run_against_itself_is_zero_and_evaluate_reports_each_policy(session):
    logits = torch.randn(3, 50)
    assert torch.equal(kv.bits_kl(logits, logits), torch.zeros(3))
    trace = session.generate(PROMPT, max_new_tokens=4, kv="window:sinks=2,window=6", capture=["logits"])
    kl, agree = kv.divergence(session, trace)
    ids = torch.tensor([[*trace.prompt_ids, *trace.token_ids[:-1]]])
    with torch.no_grad():  # the full model on the same tokens, by hand
        full = torch.log_softmax(session.model(input_ids=ids).logits[0, -4:].float(), -1)
    ran = torch.log_softmax(torch.stack([s.captures["logits"] for s in trace.steps]).float(), -1)
    by_hand = (ran.exp() * (ran - full)).sum(-1) / torch.log(torch.tensor(2.0))
    torch.testing.assert_close(kl, by_hand, atol=1e-5, rtol=1e-4)
    assert agree.tolist() == (full.argmax(-1) == ran.argmax(-1)).tolist() and float(kl[0]) < 1e-6  # step 0: no eviction
    with pytest.raises(InvalidArgument, match="capture=\\['logits'\\]"):
        kv.divergence(session, session.generate(PROMPT, max_new_tokens=1))
    report = kv.evaluate(session, [PROMPT], ["full", "quant:bits=8,residual=0", "window:sinks=4,window=8"],
                         max_new_tokens=8)
    table = report.summary().set_index("policy")
    assert table.loc["full", "mean_kl_bits"] < 1e-6 and table.loc["full", "ratio_to_full"] == 1.0
    assert table.loc["full", "top1_agreement"] == 1.0
    quant = table.loc["quant:bits=8,residual=0,int8=0,group=32"]
    assert quant["ratio_to_full"] == pytest.approx((64 + 2 * 4 * 2) / (64 * 4))  # codes + float32 min/scale per 32
    assert 0 < quant["mean_kl_bits"] < 0.01
    assert table.loc["window:sinks=4,window=8", "mean_kl_bits"] > quant["mean_kl_bits"]
    chart = report.plot()
    assert len(chart.data) == 1 and "text" in chart.data[0].mode  # each point is named on the figure
    assert list(chart.data[0].text) == list(report.summary()["policy"])
    static = static_picture(chart)  # the matplotlib fallback draws the names too
    assert sorted(t.get_text() for t in static.figure.axes[0].texts) == sorted(report.summary()["policy"])


@pytest.mark.parametrize(("spec", "match"), [
    ("lossy", "not one of"), ("quant:bits=3", "bits must be 4 or 8"), ("quant:group=5", "group must be even"),
    ("window:window=0", "window window must be"), ("quant:depth=2", "has no parameter 'depth'"),
    ("quant:residual=1.5", "must be an integer"), (42, "kv must be a cache policy"),
])
def test_bad_kv_specs_are_refused_with_one_clear_error(session, spec, match):
    with pytest.raises(InvalidArgument, match=match):
        session.generate(PROMPT, max_new_tokens=1, kv=spec)


def test_what_a_policy_cannot_do_exactly_is_refused_before_the_first_token(session):
    with pytest.raises(InvalidArgument, match="speculative"):
        session.generate(PROMPT, max_new_tokens=2, kv="quant:bits=4", speculative=PromptLookupDraft())
    with pytest.raises(InvalidArgument, match="speculative"):
        session.generate(PROMPT, max_new_tokens=2, kv="h2o:budget=8,recent=4", speculative=PromptLookupDraft())
    assert session.generate(PROMPT, max_new_tokens=1).token_ids  # the session stays usable


def test_cli_generate_with_a_kv_policy_prints_the_cache_size(session):
    r = CliRunner().invoke(main, ["generate", PROMPT, "--max-new-tokens", "3", "--kv", "window:sinks=4,window=8"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert f"kv cache window:sinks=4,window=8: {2 * 30 * 3 * 64 * 12 * 4 / 2**20:.3f} MiB after 3 tokens" in r.output
    bad = CliRunner().invoke(main, ["generate", PROMPT, "--kv", "lossy"])
    assert bad.exit_code != 0 and "not one of" in bad.output


def test_samplers_and_interventions_run_unchanged_on_a_policy_that_drops_nothing(session):
    from labkit.interventions import AblateHead, Suppress
    from labkit.sampling import Classic

    options = dict(max_new_tokens=10, sampler=Classic(temperature=0.9), seed=7,
                   interventions=[Suppress(" The"), AblateHead(3, 1)])
    plain = session.generate(PROMPT, **options)
    for spec in ["quant:bits=4,residual=4096", "h2o:budget=4096,recent=4"]:
        trace = session.generate(PROMPT, kv=spec, **options)
        assert trace.token_ids == plain.token_ids and [s.interventions for s in trace.steps] == \
            [s.interventions for s in plain.steps]


def test_a_policy_registered_in_policies_is_accepted_as_an_object(monkeypatch):
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Coarse(kv._Layered):  # a user's policy, as ARCHITECTURE.md says to write one (not one of the built-ins)
        bits: int = 4
        name = "coarse"
        evicts = False
        layer_class = staticmethod(kv._tiered_layer_class)

    monkeypatch.setitem(kv.POLICIES, "coarse", Coarse)
    policy = Coarse(bits=4)
    assert kv.parse_kv(policy) is policy
    assert kv.parse_kv("coarse:bits=4") == policy
    with pytest.raises(InvalidArgument, match="kv must be a cache policy"):
        kv.parse_kv(object())
