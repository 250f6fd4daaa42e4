"""Decoding beyond sampling, against known answers: batched rows = single runs, beam search = transformers',
contrastive decoding / DoLa / contrastive search = hand computations, uncertainty estimates = closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from labkit import Trace
from labkit.core.errors import InvalidArgument
from labkit.decoding.beam import BeamSearch
from labkit.interventions import AblateHead, Boost, Steer
from labkit.measures.uncertainty import estimate, normalize_answer
from labkit.sampling import Classic, Entropix, Greedy, Mirostat, evaluate, parse_sampler
from labkit.sampling.contrastive import ContrastiveDecoding, ContrastiveSearch, DoLa, dola_layers
from labkit.ui.cli import main

PROMPT = "The history of the city begins"


def _mismatches(batched, singles):
    """Rows whose tokens differ from their single run (a floating-point near-tie), and the largest log-prob gap."""
    bad = sum(a.token_ids != b.token_ids for a, b in zip(batched, singles, strict=True))
    gap = max(abs(x.logprob - y.logprob) for a, b in zip(batched, singles, strict=True)
              for x, y in zip(a.steps, b.steps, strict=False))
    return bad, gap


@pytest.mark.parametrize("sampler", [None, Classic(temperature=0.9, top_p=0.95), Mirostat(tau=4.0)],
                         ids=["greedy", "classic", "mirostat-stateful"])
def test_batched_rows_equal_single_runs_with_their_seeds(session, sampler):
    batched = session.generate(PROMPT, max_new_tokens=10, sampler=sampler, seed=11, n=3)
    singles = [session.generate(PROMPT, max_new_tokens=10, sampler=sampler, seed=11 + b) for b in range(3)]
    bad, gap = _mismatches(batched, singles)
    print(f"near-tie mismatches: {bad}/3, max |Δ log p| {gap:.2e} nats")
    assert bad == 0 and gap < 1e-3
    assert [t.meta.seed for t in batched] == [11, 12, 13]
    assert len({tuple(t.token_ids) for t in batched}) == (1 if sampler is None else 3)  # seeds really differ


def test_a_row_does_not_depend_on_the_batch_size_and_seed_lists_batch(session):
    two = session.generate(PROMPT, max_new_tokens=10, sampler=Classic(temperature=1.0), seed=5, n=2)
    listed = session.generate(PROMPT, max_new_tokens=10, sampler=Classic(temperature=1.0), seed=[9, 6])
    assert two[1].token_ids == listed[1].token_ids  # seed 6 in a batch of two, whichever its neighbour
    assert [t.meta.seed for t in listed] == [9, 6]


def test_batched_rows_with_attention_sampler_interventions_and_site_captures_equal_single_runs(session):
    items = [AblateHead(layer=5, head=3), Boost(" the", 2.0), Steer(layer=6, vector=torch.ones(576) * 0.05)]
    kw = dict(max_new_tokens=8, sampler=Entropix(), interventions=items, capture=["attention", "blocks.4.resid_post"])
    batched = session.generate(PROMPT, seed=3, n=3, **kw)
    singles = [session.generate(PROMPT, seed=3 + b, **kw) for b in range(3)]
    assert _mismatches(batched, singles)[0] == 0
    for a, b in zip(batched, singles, strict=True):
        for x, y in zip(a.steps, b.steps, strict=True):
            assert torch.allclose(x.captures["attention"].scores, y.captures["attention"].scores, atol=1e-3)
            assert torch.allclose(x.captures["blocks.4.resid_post"], y.captures["blocks.4.resid_post"], atol=1e-2)
            assert x.interventions == y.interventions and x.sampler["branch"] == y.sampler["branch"]


def test_batched_rows_end_on_their_own_stop_rules(session):
    kw = dict(max_new_tokens=16, sampler=Classic(temperature=1.0), stop=[" and", "."])
    batched = session.generate("I went to the market", seed=0, n=5, **kw)
    singles = [session.generate("I went to the market", seed=b, **kw) for b in range(5)]
    assert [t.token_ids for t in batched] == [t.token_ids for t in singles]
    assert [t.stop_reason for t in batched] == [t.stop_reason for t in singles]
    assert len({len(t) for t in batched}) > 1  # rows left the batch at different steps


def test_stop_during_a_batched_run_keeps_every_rows_partial_trace(session):
    seen = []

    def stop_after_three(step):
        seen.append(step)
        if len(seen) == 3 * 2:
            session.stop()

    gen = session.stream(PROMPT, max_new_tokens=30, sampler=Classic(), seed=0, n=3)
    for step in gen:
        stop_after_three(step)
    assert [len(t) for t in gen.traces] == [2, 2, 2] and {t.stop_reason for t in gen.traces} == {"stopped"}
    assert session.generate("Hi", max_new_tokens=2).stop_reason == "max_new_tokens"  # the session is free


def test_a_sweeps_seeds_run_as_one_batch_and_each_row_is_its_cells_single_run(session):
    from labkit.studies.experiments import Sweep

    sweep = Sweep(["The capital of France is"], samplers={"t1": Classic(temperature=1.0), "beam": BeamSearch(2)},
                  interventions={"none": [], "boost": [Boost(" the", 3.0)]}, seeds=[0, 1], max_new_tokens=4)
    frame = sweep.run(session, progress=False)
    assert len(frame) == 8
    for cell in sweep.cells()[::2]:
        row, single = frame[frame.cell == cell.key].iloc[0], sweep.run_cell(session, cell)
        assert (row.text, row.kv_bytes, row.tokens) == (single["text"], single["kv_bytes"], single["tokens"])
        assert row.kl_to_baseline_bits == pytest.approx(single["kl_to_baseline_bits"], abs=1e-4)
        assert row.perplexity == pytest.approx(single["perplexity"], rel=1e-4)


# -- beam search ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("prompt", "beams", "ends"), [
    ("The capital of France is", BeamSearch(3, 1.0, False), True),
    ("Once upon a time", BeamSearch(4, 1.0, True), True),
    ("The three primary colors are", BeamSearch(4, -0.5, "never"), True),
    ("def fibonacci(n):", BeamSearch(2, 2.0, False), False),
])
def test_beam_search_equals_transformers_generate_num_beams(session, prompt, beams, ends):
    ids = session.encode(prompt)
    dot, nl = session.tokenizer.encode(".")[0], session.tokenizer.encode("\n")[0]
    stop = [dot, nl] if ends else None
    extra = dict(eos_token_id=[*session.eos_ids, dot, nl], pad_token_id=2) if ends else {}
    with torch.no_grad():
        out = session.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=14,
                                     num_beams=beams.num_beams, length_penalty=beams.length_penalty,
                                     early_stopping=beams.early_stopping, **extra)[0, ids.shape[1]:].tolist()
    trace = session.generate(prompt, max_new_tokens=14, beam=beams, stop=stop)
    assert trace.token_ids == out[:len(trace)] and set(out[len(trace):]) <= {2}  # transformers pads after the end


def test_beam_tree_scores_add_up_and_the_trace_is_the_returned_path(session, tmp_path):
    beams = BeamSearch(3, length_penalty=1.0, entropy_coef=-0.3)
    trace = session.generate("The capital of France is", max_new_tokens=10, beam=beams, stop=".")
    tree = trace.beam_tree()
    path = tree.path()
    assert [n.token_id for n in path] == trace.token_ids
    # the running score of every node = Σ log p (nats) + λ Σ H (bits) along its path, each from its own Step
    assert path[-1].score == pytest.approx(sum(s.logprob for s in trace) - 0.3 * sum(s.entropy_bits for s in trace),
                                           abs=1e-3)
    assert path[-1].final_score == pytest.approx(path[-1].score / len(trace), abs=1e-4)
    assert path[-1].status == "returned" and {n.status for n in tree.nodes} <= {"returned", "finished", "expanded",
                                                                                 "pruned"}
    assert len(tree.nodes) == len({n.id for n in tree.nodes}) and all(n.parent < n.id for n in tree.nodes)
    finished = [n for n in tree.nodes if n.status in ("finished", "returned")]
    assert max(finished, key=lambda n: n.final_score) is path[-1]
    trace.save(tmp_path / "b.json")
    assert Trace.load(tmp_path / "b.json").beam_tree().as_dict() == tree.as_dict()
    picture = tree.image()
    assert picture.size[0] >= 500 and picture.png()[:4] == b"\x89PNG"
    fig = picture.figure  # the figure rules: the legend beside the axes (never over a node), no label clipped
    fig.canvas.draw()
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    assert ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    canvas = fig.bbox
    for text in ax.texts:
        box = text.get_window_extent(renderer)
        assert canvas.x0 <= box.x0 and box.x1 <= canvas.x1, f"{text.get_text()!r} runs off the figure"


def test_entropy_coefficient_is_shared_by_siblings_so_one_beam_stays_greedy_and_zero_is_plain(session):
    prompt = "My favourite food is"
    greedy = session.generate(prompt, max_new_tokens=10)
    # with one beam every candidate has the same parent, so λ·H(parent) never changes the choice
    assert session.generate(prompt, max_new_tokens=10, beam=BeamSearch(1, entropy_coef=-5.0)).token_ids == \
        greedy.token_ids
    plain = session.generate(prompt, max_new_tokens=10, beam=BeamSearch(4))
    assert session.generate(prompt, max_new_tokens=10, beam=BeamSearch(4, entropy_coef=0.0)).token_ids == \
        plain.token_ids
    weighted = session.generate(prompt, max_new_tokens=10, beam=BeamSearch(4, entropy_coef=-3.0))
    assert weighted.token_ids != plain.token_ids  # across beams it does re-rank


# -- contrast -----------------------------------------------------------------------------------------------------

class _FakeSites:
    def __init__(self, logits):
        self.value = logits

    def logits(self, stream):
        return self.value


def test_contrastive_decoding_follows_its_formula_on_hand_made_logits():
    expert = torch.tensor([[2.0, 1.9, 0.0, -3.0, 1.0]])
    amateur = torch.tensor([[3.0, 0.0, 0.0, 0.0, 0.5]])
    cd = ContrastiveDecoding(alpha=0.3, beta=0.5, amateur="layers:1")
    cd._sites.value = _FakeSites(amateur)
    cd.observe({"blocks.0.resid_post": torch.zeros(1, 4)})
    out = cd(torch.zeros(1, 3, dtype=torch.long), expert)
    lp_e, lp_a = torch.log_softmax(expert, -1)[0], torch.log_softmax(amateur, -1)[0]
    head = lp_e.exp() >= 0.3 * lp_e.exp().max()  # tokens 0, 1, 4 (p ≥ 0.3 max p)
    assert head.tolist() == [True, True, False, False, True]
    expected = torch.where(head, lp_e - 0.5 * lp_a, torch.tensor(float("-inf")))
    assert torch.allclose(out[0], expected)
    assert int(cd.draw(out, None)) == 1  # the amateur's favourite (token 0) loses to token 1


def test_contrastive_decoding_with_beta_zero_is_greedy(session):
    greedy = session.generate(PROMPT, max_new_tokens=12)
    cd = session.generate(PROMPT, max_new_tokens=12, sampler=parse_sampler("contrastive:beta=0,amateur=layers:8"))
    assert cd.token_ids == greedy.token_ids


def test_contrastive_decoding_with_a_local_amateur_model(session, tiny_model_dir):
    trace = session.generate(PROMPT, max_new_tokens=4, sampler=ContrastiveDecoding(amateur=f"model:{tiny_model_dir}"))
    assert len(trace) == 4 and trace.steps[0].sampler["plausible"] >= 1


def _hidden(session, ids):
    with torch.no_grad():
        return session.model(torch.tensor([ids]), output_hidden_states=True).hidden_states  # (N + 1) × (1, T, d)


def _lens(session, stream):
    m = session.model
    return torch.log_softmax(m.lm_head(m.model.norm(stream)).double(), dim=-1)


def test_dola_premature_layer_and_scores_equal_a_hand_computation_from_the_lens(session):
    trace = session.generate("The capital of France is", max_new_tokens=3, sampler=DoLa(layers="high", alpha=0.1))
    layers = dola_layers("high", session.info.n_layers)
    assert layers == list(range(15, 30, 2))
    ids = trace.prompt_ids
    for step in trace:
        hs = _hidden(session, ids)
        final = torch.log_softmax(session.model.lm_head(hs[-1][0, -1]).double(), dim=-1)  # (V,)
        js = []
        for j in layers:
            early = _lens(session, hs[j][0, -1])
            p, q = final.exp(), early.exp()
            m = (p + q) / 2
            kl_pm, kl_qm = (p * (p / m).log()).nansum(), (q * (q / m).log()).nansum()
            js.append(float((0.5 * kl_pm + 0.5 * kl_qm).detach()) / math.log(2))
        pick = layers[max(range(len(js)), key=js.__getitem__)]
        assert step.sampler["premature_layer"] == pick
        assert [step.sampler["js_bits"][str(j)] for j in layers] == pytest.approx(js, abs=1e-4)
        early = _lens(session, hs[pick][0, -1])
        head = final >= final.max() + math.log(0.1)
        assert step.token_id == int(torch.where(head, final - early, -math.inf).argmax())
        ids = [*ids, step.token_id]


def test_contrastive_search_choice_equals_a_hand_computation_over_the_top_k(session):
    alpha, k = 0.6, 4
    trace = session.generate("The capital of France is", max_new_tokens=3,
                             sampler=ContrastiveSearch(penalty_alpha=alpha, top_k=k))
    ids = trace.prompt_ids
    for step in trace:
        hs = _hidden(session, ids)
        context = torch.nn.functional.normalize(hs[-1][0], dim=-1)  # (T, d): the final-norm states
        probs = torch.softmax(session.model.lm_head(hs[-1][0, -1]).float(), dim=-1)
        top_p, top_ids = probs.topk(k)
        values = []
        for p, cand in zip(top_p.tolist(), top_ids.tolist(), strict=True):
            h = torch.nn.functional.normalize(_hidden(session, [*ids, cand])[-1][0, -1], dim=-1)
            values.append((1 - alpha) * p - alpha * float((context @ h).max()))
        best = max(range(k), key=values.__getitem__)
        assert step.token_id == top_ids[best]
        assert [step.sampler["candidates"][str(t)] for t in top_ids.tolist()] == pytest.approx(values, abs=1e-4)
        ids = [*ids, step.token_id]


def test_contrastive_search_with_alpha_zero_is_greedy_and_batched_rows_agree(session):
    greedy = session.generate(PROMPT, max_new_tokens=6)
    assert session.generate(PROMPT, max_new_tokens=6, sampler=ContrastiveSearch(0.0, 4)).token_ids == greedy.token_ids
    rows = session.generate(PROMPT, max_new_tokens=6, sampler=ContrastiveSearch(0.6, 4), n=2, seed=0)
    single = session.generate(PROMPT, max_new_tokens=6, sampler=ContrastiveSearch(0.6, 4))
    assert rows[0].token_ids == rows[1].token_ids == single.token_ids  # deterministic: every row the same


def test_decoding_strategies_in_evaluate_and_the_cli(session):
    specs = ["greedy", "beam:num_beams=2", "dola:layers=high", "contrastive-search:penalty_alpha=0.6,top_k=4"]
    frame = evaluate(session, ["The capital of France is"], specs, seeds=[0, 1], max_new_tokens=4)
    assert list(frame["sampler"]) == ["greedy", "beam:num_beams=2", "dola", "contrastive_search"]
    assert (frame["tokens"] > 0).all()
    result = CliRunner().invoke(main, ["generate", "The capital of France is", "--max-new-tokens", "6", "--sampler",
                                       "beam:num_beams=2"], catch_exceptions=False)
    assert result.exit_code == 0
    beam = session.generate("The capital of France is", max_new_tokens=6, beam=BeamSearch(2))
    assert beam.text in result.output


# -- uncertainty ---------------------------------------------------------------------------------------------------

def test_uncertainty_of_identical_certain_samples_is_zero_and_of_n_equiprobable_answers_log2_n():
    same = estimate("q", ["Paris"] * 6, [0.0] * 6, [1] * 6, [[0.0]] * 6)
    assert same.predictive_entropy_bits == 0 and same.semantic_entropy_bits == 0
    assert same.semantic_entropy_weighted_bits == 0
    n = 8
    distinct = estimate("q", [f"answer {i}" for i in range(n)], [math.log(n)] * n, [2] * n, [[1.0, 2.0]] * n)
    assert distinct.predictive_entropy_bits == pytest.approx(math.log2(n))
    assert distinct.semantic_entropy_bits == pytest.approx(math.log2(n))
    assert distinct.semantic_entropy_weighted_bits == pytest.approx(math.log2(n))
    assert distinct.predictive_entropy_per_token_bits == pytest.approx(math.log2(n) / 2)
    assert distinct.samples[0].mean_entropy_bits == 1.5 and distinct.samples[0].max_entropy_bits == 2.0


def test_semantic_clusters_by_normaliser_or_equivalence_function():
    texts = [" Paris.", "paris", "The Paris\nmore", "Lyon", " lyon!"]
    u = estimate("q", texts, [1.0] * 5, [1] * 5, [[1.0]] * 5)
    assert u.clusters == {"paris": 3, "lyon": 2}
    assert u.semantic_entropy_bits == pytest.approx(-(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4)))
    assert normalize_answer("  The Answer: Paris!\nignored") == "answer paris"
    one = estimate("q", texts, [1.0] * 5, [1] * 5, [[1.0]] * 5, equivalent=lambda a, b: True)
    assert one.semantic_entropy_bits == 0 and len(one.clusters) == 1


def test_session_uncertainty_equals_its_single_runs(session):
    u = session.uncertainty("Question: What is the capital of France?\nAnswer:", n=3, seed=4, max_new_tokens=6)
    for b, smp in enumerate(u.samples):
        t = session.generate("Question: What is the capital of France?\nAnswer:", max_new_tokens=6,
                             sampler=Classic(temperature=1.0), seed=4 + b)
        assert smp.text == t.text
        assert smp.nll_nats == pytest.approx(-sum(s.logprob for s in t), abs=1e-3)
        assert smp.nll_bits == pytest.approx(smp.nll_nats / math.log(2))
    assert u.predictive_entropy_bits == pytest.approx(sum(s.nll_bits for s in u.samples) / 3)
    result = CliRunner().invoke(main, ["uncertainty", "Question: What is the capital of France?\nAnswer:", "-n", "3",
                                       "--seed", "4", "--max-new-tokens", "6", "--json"], catch_exceptions=False)
    import json

    assert json.loads(result.output)["predictive_entropy_bits"] == pytest.approx(u.predictive_entropy_bits)


# -- refusals -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("call", "match"), [
    (lambda s: s.generate("x", n=0), "n must be"),
    (lambda s: s.generate("x", n=2, kv="quant:bits=8"), "one sequence"),
    (lambda s: s.generate("x", seed=[1, 2], n=3), "one seed per sequence"),
    (lambda s: s.generate("x", beam=BeamSearch(2), n=2), "beam search"),
    (lambda s: s.generate("x", beam=BeamSearch(2), capture=["attention"]), "beam search"),
    (lambda s: BeamSearch(0), "num_beams"),
    (lambda s: BeamSearch(2, early_stopping="sometimes"), "early_stopping"),
    (lambda s: s.generate("x", sampler=DoLa(layers=[99])), "layers must be"),
    (lambda s: ContrastiveDecoding(amateur="friend"), "amateur must be"),
    (lambda s: s.generate("x", sampler=ContrastiveDecoding(amateur="layers:30")), "fewer blocks"),
    (lambda s: ContrastiveSearch(top_k=0), "top_k"),
    (lambda s: ContrastiveDecoding(alpha=0), "alpha"),
    (lambda s: s.uncertainty("x", n=1), "n must be"),
])
def test_bad_decoding_arguments_are_refused_and_the_session_stays_usable(session, call, match):
    with pytest.raises(InvalidArgument, match=match):
        call(session)
    assert len(session.generate("Hi", max_new_tokens=1, sampler=Greedy())) == 1
