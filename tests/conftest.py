"""Shared fixtures: the tiny offline tokenizer and Llama of firm.testing."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from firm.testing import build_tiny_llama_config, build_tiny_tokenizer


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tokenizer per test, since code under test may set padding/truncation sides."""
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_llama_config(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return build_tiny_llama_config(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> str:
    """A tiny random Llama chat model saved like a hub checkpoint (config, weights, tokenizer)."""
    tokenizer = build_tiny_tokenizer()
    config = build_tiny_llama_config(tokenizer)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-policy")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """wandb with no network and every file it writes under tmp_path. wandb reads its
    environment once per process (its first run's settings stay), so every test that uses wandb
    in this process asks for offline mode."""
    for name in ("DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR", "ARTIFACT_DIR"):
        monkeypatch.setenv(f"WANDB_{name}", str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path / "wandb-home" / "dir"


def offline_records(wandb_dir, first_tag: bytes, wait_s: float = 120.0) -> bytes:
    """The bytes of the one offline wandb run's transaction log under ``wandb_dir`` (protobuf
    records; tags and values are plain strings in it), once ``first_tag`` is in it. wandb writes
    it from its own service process: after a process's first run, finish() can return before the
    records reach the file (measured with wandb 0.31: of 5 later runs in one process, 1 in one
    trial and all 5 in another held only the 7-byte header right after finish; every one was
    complete 3 s later)."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        (log,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
        data = log.read_bytes()
        if first_tag in data or time.monotonic() > deadline:
            return data
        time.sleep(0.5)
