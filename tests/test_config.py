"""Settings: one source of truth, presets, coercion, and what is generated from them (the
configuration reference and Flower's run-config keys)."""

import dataclasses
import importlib.util
import tomllib
from pathlib import Path

import pytest

from firm.config import PRESETS, ConfigError, FirmConfig, build_config
from firm.federation.protocol import config_from_run_config, run_config_defaults

ROOT = Path(__file__).resolve().parents[1]
STALE = "stale: regenerate with `python scripts/generate_config_files.py`"


def load_generator():
    path = ROOT / "scripts" / "generate_config_files.py"
    spec = importlib.util.spec_from_file_location("generate_config_files", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_generated_from_the_config():
    assert (ROOT / "docs" / "configuration.md").read_text() == load_generator().config_reference_markdown(), STALE


def test_every_setting_is_a_flower_run_config_key_with_its_default():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == run_config_defaults(), STALE
    assert set(declared) == {"preset"} | {f.name.replace("_", "-") for f in dataclasses.fields(FirmConfig)}


def test_run_config_keys_override_the_preset_and_the_defaults():
    run_config = {**run_config_defaults(), "preset": "paper", "num-rounds": 5, "beta": 1.0, "adaptive-kl": True}
    cfg = config_from_run_config(run_config)
    assert (cfg.num_rounds, cfg.beta, cfg.adaptive_kl) == (5, 1.0, True)
    assert (cfg.num_clients, cfg.ppo_epochs) == (8, 3)  # the rest comes from the preset
    with pytest.raises(ConfigError, match="unknown run-config key.*num-round"):
        config_from_run_config({**run_config_defaults(), "num-round": 5})
    with pytest.raises(ConfigError, match="beta must be >= 0"):
        config_from_run_config({**run_config_defaults(), "beta": -1.0})


def test_every_preset_builds_and_validates():
    for name in PRESETS:
        assert isinstance(build_config(name), FirmConfig)
    paper = build_config("paper")
    assert (paper.num_clients, paper.num_rounds, paper.ppo_epochs, paper.rollout_batch_size, paper.lora_r,
            paper.beta) == (8, 16, 3, 16, 16, 0.01)
    assert paper.policy == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"


def test_overrides_are_coerced_and_unknown_keys_rejected():
    cfg = build_config("default", {"num_rounds": "5", "beta": "0.1", "adaptive_kl": "true"})
    assert (cfg.num_rounds, cfg.beta, cfg.adaptive_kl) == (5, 0.1, True)
    with pytest.raises(ConfigError, match="unknown setting"):
        build_config("default", {"num_round": 5})
    with pytest.raises(ConfigError, match="unknown preset"):
        build_config("papr")


def test_round_trip_through_flower_config_record():
    from flwr.app import ConfigRecord

    cfg = build_config("default", {"preference": "0.3,0.7", "beta": 0.5})
    record = ConfigRecord(cfg.to_dict())
    assert FirmConfig.from_dict(dict(record)) == cfg
    assert cfg.preference_vector() == [0.3, 0.7]
    assert build_config("default", {"algorithm": "mgda"}).effective_beta() == 0.0


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_device_settings_that_validate(device):
    FirmConfig(device=device).validate()


@pytest.mark.parametrize("device", ["gpu", "cuda:", "CUDA", "cuda:x", ""])
def test_device_settings_that_do_not(device):
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
        FirmConfig(device=device).validate()


def test_resolve_device_never_falls_back_quietly(monkeypatch):
    import torch

    from firm.models import ModelLoadError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="'cuda': torch sees no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ModelLoadError, match="'cuda:1': torch sees only 1 GPU"):
        resolve_device("cuda:1")
