"""Shared fixtures: one default-model Session for the whole run (float32 on CPU), and a tiny local model."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

import labkit
from labkit.model import models


@pytest.fixture(scope="session")
def session() -> labkit.Session:
    """The bundled default model, as a newcomer gets it (converted once by `make test`'s set-up)."""
    return labkit.Session(device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, session: labkit.Session) -> Path:
    """A tiny random Llama (2 layers, context 64) saved as a local Hugging Face folder with safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(vocab_size=session.info.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    session.tokenizer.save_pretrained(folder)
    return folder


def hooks_on(model: torch.nn.Module) -> int:
    """Forward (pre-)hooks on ``model``'s modules, not counting transformers' own output-capturing hooks (installed
    for good the first time a model is asked for ``output_attentions``)."""
    return sum(1 for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
               if not getattr(h, "__module__", "").startswith("transformers."))


class NetworkBlocked(AssertionError):
    pass


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Make every socket connection to a non-loopback address fail; returns the list of attempts."""
    attempts: list[object] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def is_loopback(address: object) -> bool:
        if isinstance(address, tuple) and address:
            host = str(address[0])
            return host in ("localhost", "::1") or host.startswith("127.")
        return isinstance(address, (str, bytes))  # AF_UNIX paths are local

    def guarded(real):
        def connect(self, address):
            if not is_loopback(address):
                attempts.append(address)
                raise NetworkBlocked(f"network connection attempted to {address!r}")
            return real(self, address)
        return connect

    monkeypatch.setattr(socket.socket, "connect", guarded(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(real_connect_ex))
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host not in (None, "localhost", "127.0.0.1", "::1"):
            attempts.append(host)
            raise NetworkBlocked(f"DNS lookup attempted for {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty LABKIT_CACHE for this test."""
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path / "cache"))
    assert models.cache_dir() == tmp_path / "cache"
    return tmp_path / "cache"
