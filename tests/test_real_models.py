"""Loading what researchers have, and memory known before it is spent.

Each way of naming a model is checked against loading the same weights from their folder: a hub id resolved from a
Hugging Face cache laid out in a temporary folder, the bundled GGUF file against its dequantised folder, a model
object passed in (plain and bitsandbytes 8-bit), and a model split between CPU-resident and disk-offloaded layers
with accelerate's ``device_map`` (every layer-hooking feature, within 1e-5 of the single-device run). Then a small
memory budget (``labkit.core.memory.budget``) forces each feature's piecewise path (equal to the whole) or its refusal
(naming the bytes and the budget), and the session stays usable after it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf

import labkit
from labkit.core import memory
from labkit.core.errors import InvalidArgument, MemoryBudgetExceeded, ModelLoadError
from labkit.interventions import AblateHead, Patch
from labkit.model import models
from labkit.sampling.beam import BeamSearch
from labkit.speculative import PromptLookupDraft

PROMPT = "The old lighthouse keeper climbed the stairs every night"
V = 49152
SMALL = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=2, max_position_embeddings=128)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2, **SMALL),
    "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=128, vocab_size=V, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=2),
}
# half the blocks in RAM, half on disk; embedding, final norm and unembedding in RAM
# The final norm sits on disk: its weights are on "meta" outside its forward, as for every module accelerate offloads
# (beside a GPU, modules mapped to "cpu" are offloaded the same way) -- logit attribution reads them (found on an H100).
SPLITS = {
    "llama": {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "disk",
              "model.layers.3": "disk", "model.norm": "disk", "model.rotary_emb": "cpu", "lm_head": "cpu"},
    "gpt2": {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "disk", "transformer.h.1": "cpu",
             "transformer.h.2": "disk", "transformer.h.3": "cpu", "transformer.ln_f": "disk", "lm_head": "cpu"},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tokenizer = tf.AutoTokenizer.from_pretrained(str(models.prepare_default_model(progress=False)))
    out = {}
    for name, make in CONFIGS.items():
        folder = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        cfg = make()
        cfg.initializer_range = 0.1
        tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def single(folders: dict[str, Path]) -> dict[str, labkit.Session]:
    return {name: labkit.Session(folder, device="cpu", dtype="float32", progress=False)
            for name, folder in folders.items()}


def _hub_cache(root: Path, repo: str, folder: Path, commit: str = "c0ffee" * 6 + "abcd") -> Path:
    """A Hugging Face hub cache as huggingface_hub lays it out: blobs, a snapshot of symlinks, refs/main."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(folder.iterdir())):
        blob = repo_dir / "blobs" / f"blob{i}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


# -- loading ---------------------------------------------------------------------------------------------------

def test_a_hub_id_in_the_local_cache_equals_loading_its_folder(folders, single, tmp_path, monkeypatch, no_network):
    commit = "c0ffee" * 6 + "abcd"
    _hub_cache(tmp_path / "home" / "hub", "acme/tiny-llama", folders["llama"], commit)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))  # the cache under $HF_HOME/hub
    s = labkit.Session("acme/tiny-llama", device="cpu", dtype="float32", progress=False)
    assert s.info.source == "hub" and s.model_id == "acme/tiny-llama"
    assert Path(s.info.path).name == commit
    assert torch.equal(s.next_token(PROMPT).logprobs, single["llama"].next_token(PROMPT).logprobs)
    pinned = labkit.Session("acme/tiny-llama", revision=commit, device="cpu", progress=False)
    assert Path(pinned.info.path).name == commit
    with pytest.raises(ModelLoadError, match=r"'acme/other' is not in the local Hugging Face cache .*Cached models "
                                             r"there: acme/tiny-llama"):
        labkit.Session("acme/other", progress=False)
    with pytest.raises(ModelLoadError, match=r"at revision 'v2'.*acme/tiny-llama"):
        labkit.Session("acme/tiny-llama", revision="v2", progress=False)
    with pytest.raises(InvalidArgument, match="revision applies to hub ids"):
        labkit.Session(folders["llama"], revision="main", progress=False)
    assert no_network == []  # nothing was asked of the network


def test_hf_hub_cache_overrides_hf_home(folders, tmp_path, monkeypatch):
    _hub_cache(tmp_path / "elsewhere", "acme/tiny-gpt2", folders["gpt2"])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert models.cached_models() == ["acme/tiny-gpt2"]
    assert labkit.Session("acme/tiny-gpt2", device="cpu", progress=False).info.n_layers == 4


@pytest.mark.slow
def test_the_gguf_file_equals_its_dequantised_folder(session):
    gguf = models.default_gguf()
    s = labkit.Session(gguf, device="cpu", dtype="float32", progress=False)
    assert s.info.source == "gguf" and s.info.name == str(gguf)
    assert s.tokenizer("The capital of France is").input_ids == session.tokenizer("The capital of France is").input_ids
    prompt = "The capital of France is"
    torch.testing.assert_close(s.next_token(prompt).logprobs, session.next_token(prompt).logprobs, atol=1e-5, rtol=0)
    assert s.generate(prompt, max_new_tokens=8).token_ids == session.generate(prompt, max_new_tokens=8).token_ids
    with pytest.raises(ModelLoadError, match=r"GGUF file .* does not exist"):
        labkit.Session(gguf.with_name("missing.gguf"), progress=False)


def test_a_loaded_model_object_equals_loading_its_folder(folders, single):
    model = tf.AutoModelForCausalLM.from_pretrained(folders["gpt2"], dtype=torch.float32)
    tokenizer = tf.AutoTokenizer.from_pretrained(folders["gpt2"])
    s = labkit.Session.from_model(model, tokenizer)
    assert s.model is model and s.info.source == "object" and s.info.n_layers == 4
    ref = single["gpt2"]
    assert torch.equal(s.next_token(PROMPT).logprobs, ref.next_token(PROMPT).logprobs)
    assert s.generate(PROMPT, max_new_tokens=6).token_ids == ref.generate(PROMPT, max_new_tokens=6).token_ids
    torch.testing.assert_close(s.activations(PROMPT, ["blocks.1.resid_post"])["blocks.1.resid_post"],
                               ref.activations(PROMPT, ["blocks.1.resid_post"])["blocks.1.resid_post"])
    with pytest.raises(InvalidArgument, match="a loaded model is used as it is; dtype='bfloat16'"):
        labkit.Session(model, tokenizer=tokenizer, dtype="bfloat16")
    with pytest.raises(InvalidArgument, match="a loaded model needs its tokenizer"):
        labkit.Session(model)
    with pytest.raises(InvalidArgument, match="must be a transformers causal language model"):
        labkit.Session(torch.nn.Linear(2, 2), tokenizer=tokenizer)


def test_a_bitsandbytes_8bit_model_object_is_used_as_it_is(folders):
    pytest.importorskip("bitsandbytes")
    model = tf.AutoModelForCausalLM.from_pretrained(
        folders["llama"], quantization_config=tf.BitsAndBytesConfig(load_in_8bit=True), device_map={"": "cpu"})
    s = labkit.Session.from_model(model, tf.AutoTokenizer.from_pretrained(folders["llama"]))
    assert s.info.quantization == "8bit"
    with torch.no_grad():  # the model's own logits, by transformers alone
        own = torch.log_softmax(model(input_ids=s.encode(PROMPT)).logits[0, -1].float(), -1)
    torch.testing.assert_close(s.next_token(PROMPT).logprobs, own, atol=1e-5, rtol=0)
    with s.intervene(AblateHead(1, 2)):  # hooks work through the quantized projection
        assert not torch.equal(s.next_token(PROMPT).logprobs, own)


def test_a_peft_lora_model_is_unwrapped_with_its_adapters_in_place(folders):
    peft = pytest.importorskip("peft")
    model = tf.AutoModelForCausalLM.from_pretrained(folders["llama"], dtype=torch.float32)
    torch.manual_seed(1)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"],
                                                      init_lora_weights=False))  # random adapters: they change f
    s = labkit.Session.from_model(lora, tf.AutoTokenizer.from_pretrained(folders["llama"]))
    assert type(s.model).__name__ == "LlamaForCausalLM" and s.info.source == "object"
    ids = s.encode(PROMPT)
    with torch.no_grad():
        own = torch.log_softmax(lora(input_ids=ids).logits[0, -1].float(), -1)  # PEFT's own forward
        with lora.disable_adapter():
            base = torch.log_softmax(lora(input_ids=ids).logits[0, -1].float(), -1)
    got = s.next_token(PROMPT).logprobs
    torch.testing.assert_close(got, own, atol=1e-5, rtol=0)
    assert float((got - base).abs().max()) > 1e-3  # the adapters are in the forward labkit runs
    z = s.activations(PROMPT, ["blocks.1.attn.z"])["blocks.1.attn.z"]  # the site before the LoRA-wrapped o_proj
    assert z.shape == (ids.shape[1], 4, 16)
    with s.intervene(AblateHead(1, 2)):
        assert float((s.next_token(PROMPT).logprobs - own).abs().max()) > 1e-3


# -- a model split between RAM and disk ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def split(folders, tmp_path_factory) -> dict[str, labkit.Session]:
    return {name: labkit.Session(folders[name], device_map=SPLITS[name], dtype="float32", progress=False,
                                 offload_folder=tmp_path_factory.mktemp(f"offload-{name}"))
            for name in folders}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_a_cpu_disk_split_equals_the_single_device_run(arch, single, split):
    a, d = single[arch], split[arch]
    assert "disk" in d.info.device_map.values() and d.info.device == "cpu"
    close = dict(atol=1e-5, rtol=0)
    torch.testing.assert_close(d.next_token(PROMPT).logprobs, a.next_token(PROMPT).logprobs, **close)
    ta, td = (s.generate(PROMPT, max_new_tokens=8, capture=["attention"]) for s in (a, d))
    assert td.token_ids == ta.token_ids
    for x, y in zip(ta.steps, td.steps, strict=True):
        torch.testing.assert_close(y.captures["attention"].probs, x.captures["attention"].probs, **close)
    torch.testing.assert_close(d.attention(PROMPT).probs, a.attention(PROMPT).probs, **close)
    with a.intervene(AblateHead(2, 1)), d.intervene(AblateHead(2, 1)):  # layer 2 is on disk in both splits
        torch.testing.assert_close(d.next_token(PROMPT).logprobs, a.next_token(PROMPT).logprobs, **close)
    source = "A young sailor rowed across the bay every morning"
    with a.intervene(Patch(source, 2, [3])), d.intervene(Patch(source, 2, [3])):
        torch.testing.assert_close(d.next_token(PROMPT).logprobs, a.next_token(PROMPT).logprobs, **close)
    la, ld = (s.logit_attribution(PROMPT) for s in (a, d))
    torch.testing.assert_close(torch.tensor(ld.heads), torch.tensor(la.heads), **close)
    assert ld.total == pytest.approx(la.total, abs=1e-5)
    ia, id_ = (s.attribute(PROMPT, method="ig", steps=16, max_steps=16) for s in (a, d))
    torch.testing.assert_close(torch.tensor(id_.scores), torch.tensor(ia.scores), atol=1e-5, rtol=1e-4)
    qa, qd = (s.generate(PROMPT, max_new_tokens=8, kv="quant:bits=4,residual=2,group=16") for s in (a, d))
    assert qd.token_ids == qa.token_ids
    torch.testing.assert_close(torch.tensor([s.logprob for s in qd.steps]), torch.tensor([s.logprob for s in qa.steps]),
                               **close)
    torch.testing.assert_close(d.lens(PROMPT).logprobs, a.lens(PROMPT).logprobs, **close)
    site = "blocks.2.mlp_out"  # computed on disk-offloaded weights in both splits
    torch.testing.assert_close(d.activations(PROMPT, [site])[site], a.activations(PROMPT, [site])[site], **close)
    repeat = "one two three four five one two three four five one two three"
    sa, sd = (s.generate(repeat, max_new_tokens=8, speculative=PromptLookupDraft()) for s in (a, d))
    assert sd.token_ids == sa.token_ids == a.generate(repeat, max_new_tokens=8).token_ids
    ba, bd = (s.generate(PROMPT, max_new_tokens=5, beam=BeamSearch(num_beams=3)) for s in (a, d))
    assert bd.token_ids == ba.token_ids
    na, nd = (s.generate(PROMPT, max_new_tokens=5, n=3, seed=1, sampler=labkit.sampling.Classic()) for s in (a, d))
    assert [t.token_ids for t in nd] == [t.token_ids for t in na]


def test_the_lab_runs_on_a_split_model_and_draws_the_same_tokens(single, split):
    pytest.importorskip("anywidget")
    from labkit.ui.panels import Lab

    labs = [Lab(s, chat=False, prompt=PROMPT, max_new_tokens=6) for s in (single["llama"], split["llama"])]
    try:
        for lab in labs:
            lab.run()
            lab.wait(60)
        a, d = (lab.trace for lab in labs)
        assert len(a) == 6 and d.token_ids == a.token_ids
        assert labs[1].attention.image.value  # the attention image was drawn from the split model's maps
    finally:
        for lab in labs:
            lab.close()


def test_the_labs_attention_image_is_switched_off_when_the_maps_do_not_fit(single):
    pytest.importorskip("anywidget")
    from labkit.ui.panels import Lab

    s = single["llama"]
    lab = Lab(s, chat=False, prompt=PROMPT, max_new_tokens=6)
    n = s.encode(PROMPT).shape[1] + 6  # positions the image grows to
    f32, f16 = (2 * 4 * 4 * n * n * size for size in (4, 2))  # prompt maps + grown matrix, L = H = 4
    try:
        with memory.budget(f32 - 1):  # float32 does not fit, float16 does
            lab.run()
            lab.wait(60)
        assert lab._prompt_maps.probs.dtype == torch.float16 and len(lab.trace) == 6
        with memory.budget(f16 - 1):  # nothing fits: the image is off, the run goes on
            lab.run()
            lab.wait(60)
        assert lab.attention.label.value.startswith(f"attention image off: the maps of {n} positions need "
                                                    f"{memory.fmt_bytes(f16)} in float16, the budget is "
                                                    f"{memory.fmt_bytes(f16 - 1)}")
        assert lab._prompt_maps is None and len(lab.trace) == 6
    finally:
        lab.close()


def test_device_map_options_are_checked_before_loading(folders):
    with pytest.raises(InvalidArgument, match="device_map must be one of 'auto', 'balanced'"):
        labkit.Session(folders["llama"], device_map="everywhere")
    with pytest.raises(InvalidArgument, match="device='cpu' and device_map='auto' both place the model"):
        labkit.Session(folders["llama"], device="cpu", device_map="auto")
    with pytest.raises(InvalidArgument, match="max_memory and offload_folder spread a model over devices"):
        labkit.Session(folders["llama"], max_memory={"cpu": "1GiB"})


def test_device_map_auto_with_a_tiny_max_memory_offloads_to_disk_and_still_equals(folders, single, tmp_path):
    s = labkit.Session(folders["llama"], device_map="auto", max_memory={"cpu": 300_000}, dtype="float32",
                       offload_folder=tmp_path / "offload", progress=False)
    assert "disk" in s.info.device_map.values()
    torch.testing.assert_close(s.next_token(PROMPT).logprobs, single["llama"].next_token(PROMPT).logprobs,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_ig_completes_within_one_percent_at_the_default_settings_on_a_300_token_text(arch, folders, tmp_path):
    import json

    long = tmp_path / arch  # the same weights with a context of 512 positions
    shutil.copytree(folders[arch], long)
    cfg = json.loads((long / "config.json").read_text())
    cfg["max_position_embeddings" if arch == "llama" else "n_positions"] = 512
    if arch == "gpt2":  # GPT-2 learns its positions: give it 512 rows (the first 128 as trained)
        from safetensors.torch import load_file, save_file

        weights = load_file(long / "model.safetensors")
        key = next(k for k in weights if k.endswith("wpe.weight"))
        weights[key] = torch.cat([weights[key]] * 4)
        save_file(weights, long / "model.safetensors", metadata={"format": "pt"})
    (long / "config.json").write_text(json.dumps(cfg))
    s = labkit.Session(long, device="cpu", dtype="float32", progress=False)
    text = " ".join([PROMPT + ", and the ships passed the rocks by the light of his lamp."] * 14)
    a = s.attribute(text)
    assert len(a.tokens) >= 256
    assert a.completeness_error <= 0.01 and a.baseline == "unk", (a.completeness_error, a.steps)


# -- memory ----------------------------------------------------------------------------------------------------------

def test_budget_parses_sizes_and_is_scoped():
    assert memory.parse_bytes("2GiB") == 2 * 2**30 and memory.parse_bytes("1.5 MB") == 1_500_000
    with pytest.raises(InvalidArgument, match="budget must be a positive number of bytes"):
        memory.parse_bytes("lots")
    outside = memory.available("cpu")[0]
    with memory.budget("3MiB"):
        assert memory.available("cpu") == (3 * 2**20, "set with labkit.core.memory.budget")
    assert memory.available("cpu")[0] != 3 * 2**20 and outside > 0


def test_free_ram_stays_under_a_data_segment_limit_as_a_workshop_student_has():
    import subprocess
    import sys

    code = ("import resource\nresource.setrlimit(resource.RLIMIT_DATA, (2**30, 2**30))\n"
            "from labkit.core import memory\n"
            "used = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmData:')][0]\n"
            "print(memory.free_ram(), used)")
    free, used = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                         check=True).stdout.split())
    assert 0 < free <= 2**30 - used + 2**20  # what is left under the limit (1 MiB for the allocations in between)


def test_attention_maps_refuse_with_bytes_and_budget_then_fit_by_layers_heads_and_half_precision(single):
    s = single["llama"]
    full = s.attention(PROMPT)
    t = full.probs.shape[-1]
    need = 4 * 4 * t * t * 4  # L·H·T²·4 bytes
    with memory.budget(need - 1):
        with pytest.raises(MemoryBudgetExceeded, match=r"needs about .* but the budget is .* \(set with "
                                                       r"labkit.core.memory.budget\); choose fewer layers= or heads="):
            s.attention(PROMPT)
        some = s.attention(PROMPT, layers=[1, 3], heads=[2])  # a quarter of the layers, a quarter of the heads
        half = s.attention(PROMPT, dtype="float16")
    assert some.probs.shape == (2, 1, t, t) and some.layers == [1, 3] and some.heads == [2]
    torch.testing.assert_close(some.head(3, 2), full.head(3, 2), atol=0, rtol=0)
    assert half.probs.dtype == torch.float16
    torch.testing.assert_close(half.probs.float(), full.probs, atol=1e-3, rtol=0)
    with pytest.raises(InvalidArgument, match="head must be one of the heads held"):
        some.head(3, 0)
    assert s.next_token(PROMPT).top(1) is not None  # usable after the refusal


def test_score_and_teacher_forced_logits_in_chunks_equal_the_whole(single):
    s = single["gpt2"]
    text = " ".join([PROMPT] * 8)
    whole = s.score(text)
    ids = s.encode(text)
    shape = memory.Shape.of(s.model)
    budget = 2 * (memory.forward_bytes(shape, ids.shape[1]) + 7 * memory.logits_bytes(shape, 1, copies=5))
    with memory.budget(budget):  # about 7 positions per chunk
        parts = s.score(text)
    torch.testing.assert_close(torch.tensor(parts.logprobs), torch.tensor(whole.logprobs), atol=1e-5, rtol=0)
    assert parts.rank == whole.rank
    trace = s.generate(PROMPT, max_new_tokens=12)
    logits = s.teacher_forced_logits(trace)
    for i, step in enumerate(trace.steps):
        assert float(torch.log_softmax(logits[i], -1)[step.token_id]) == pytest.approx(step.logprob, abs=1e-5)
    with memory.budget(1000), pytest.raises(MemoryBudgetExceeded, match="teacher-forced logits of 12 steps"):
        s.teacher_forced_logits(trace)
    with memory.budget(1000), pytest.raises(MemoryBudgetExceeded, match="use a shorter text"):
        s.score(text)


def test_ig_batches_are_sized_by_memory_and_give_the_same_scores(single):
    s = single["llama"]
    whole = s.attribute(PROMPT, steps=16, max_steps=16)
    per_point = memory.backward_bytes(memory.Shape.of(s.model), len(whole.tokens))
    with memory.budget(int(per_point * 2.5)):  # one point per pass at share 0.5 of the budget
        parts = s.attribute(PROMPT, steps=16, max_steps=16)
    torch.testing.assert_close(torch.tensor(parts.scores), torch.tensor(whole.scores), atol=1e-6, rtol=1e-4)
    with memory.budget(per_point // 2), pytest.raises(MemoryBudgetExceeded, match=r"ig attribution over .* tokens"):
        s.attribute(PROMPT)
    with memory.budget(1000), pytest.raises(MemoryBudgetExceeded, match="attention rollout"):
        s.attribute(PROMPT, method="rollout")


def test_per_step_captures_over_a_long_generation_are_refused_before_the_first_token(single):
    s = single["llama"]
    with memory.budget("1MiB"), pytest.raises(MemoryBudgetExceeded, match=r"capture=\['logits'\] over 100 steps"):
        s.generate(PROMPT, max_new_tokens=100, capture=["logits"])  # 100 × 49,152 × 4 bytes ≈ 19 MiB
    assert s.last_trace is None or len(s.last_trace) != 100
    with memory.budget("1MiB"):
        assert len(s.generate(PROMPT, max_new_tokens=3, capture=["blocks.0.resid_post", "attention"])) == 3


def test_the_memory_table_is_computed_from_the_estimates():
    frame = memory.table()
    assert set(frame["model"]) == set(memory.SHAPES) and list(frame.columns[2:]) == ["8GiB", "24GiB", "80GiB"]
    row = frame[(frame["model"].str.startswith("135M")) & (frame["feature"] == "attention maps, all layers (float32)")]
    t = int(row["24GiB"].iloc[0])
    shape = memory.SHAPES["135M (SmolLM2-135M)"]
    left = 24 * 2**30 - 2 * shape.n_params  # bfloat16 weights first
    assert 150e6 < shape.n_params < 170e6  # embedding and unembedding counted apart
    assert memory.attention_maps_bytes(shape, t) <= left < memory.attention_maps_bytes(shape, t + 1)
    assert t > 4096  # float32 maps without eager attention's temporaries: 4,096 tokens fit in 24 GiB
    eight_b = frame[frame["model"].str.startswith("8B")]
    assert (eight_b["8GiB"] == 0).all() and (eight_b["24GiB"] > 0).all()  # 16 GB of bfloat16 weights
