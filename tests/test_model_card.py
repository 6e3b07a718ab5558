"""Portable adapters: a saved adapter names its base by hub id and carries a filled model card,
so a copy in a folder with no cache still says what it is and loads its base by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftConfig
from transformers import LlamaForCausalLM

from firm.config import ConfigError, FirmConfig
from firm.evaluate import infer_policy
from firm.model_card import (POLICY_KEY, card_text, check_card, finish_adapter, policy_for_base, portable_base_name,
                             read_card, write_heldout)
from firm.models import EMBEDDED_HUB_ID, add_lora
from firm.rundir import RunDir

ROUND = {"type": "round", "round": 2, "reward/helpful": -1.25, "reward/harmless": 0.5, "kl": 0.0123,
         "lambda_mean": [0.4, 0.6], "clients": 2}
HELDOUT = {"num_prompts": 3, "samples_per_prompt": 1, "split": "eval", "rewards": {"helpful": -0.75, "harmless": 0.25},
           "kl": 0.5, "response_tokens": 4.0, "settings": {"seed": 1234, "max_new_tokens": 4, "temperature": 0.8}}


def save_embedded_run_adapter(tmp_path, tiny_llama_config, monkeypatch):
    """An adapter saved as a run on the embedded policy saves it: peft names the loaded base by the
    cache directory the embedded weights were loaded from (here a stand-in tiny model)."""
    cache = tmp_path / "cache" / "smollm2-135m-instruct-f32"
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config)
    base.save_pretrained(cache)
    base = LlamaForCausalLM.from_pretrained(cache)
    peft_model = add_lora(base, r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    config = FirmConfig(num_clients=2, num_rounds=3, beta=0.5, preference="0.7,0.3")
    run = RunDir.create(tmp_path / "run", config)
    return run.save_adapter(2, peft_model, finish=lambda folder: finish_adapter(folder, config, 2, ROUND)), cache


def test_base_names_and_the_policy_to_load_them_with(tiny_policy_dir):
    assert portable_base_name("embedded") == EMBEDDED_HUB_ID
    assert portable_base_name("TinyLlama/TinyLlama-1.1B-Chat-v1.0") == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert portable_base_name(tiny_policy_dir).startswith("/")
    assert policy_for_base(EMBEDDED_HUB_ID, "embedded") == "embedded"  # offline, on the embedded weights
    assert policy_for_base(EMBEDDED_HUB_ID, EMBEDDED_HUB_ID) == EMBEDDED_HUB_ID  # trained on the hub's weights
    assert policy_for_base(EMBEDDED_HUB_ID, None) == EMBEDDED_HUB_ID  # no card of ours: take the config's word
    assert policy_for_base("/some/dir", None) == "/some/dir"


def test_an_adapter_copied_to_a_folder_with_no_cache_names_its_hub_base_and_has_a_filled_card(
        tmp_path, tiny_llama_config, monkeypatch):
    saved, cache = save_embedded_run_adapter(tmp_path, tiny_llama_config, monkeypatch)
    copy = tmp_path / "elsewhere" / "my-adapter"
    shutil.copytree(saved, copy)
    shutil.rmtree(tmp_path / "cache")  # the machine it was trained on is gone
    shutil.rmtree(tmp_path / "run")
    monkeypatch.setenv("FIRM_CACHE", str(tmp_path / "empty-cache"))

    assert json.loads((copy / "adapter_config.json").read_text())["base_model_name_or_path"] == EMBEDDED_HUB_ID
    assert PeftConfig.from_pretrained(str(copy)).base_model_name_or_path == EMBEDDED_HUB_ID
    assert str(cache) not in (copy / "adapter_config.json").read_text()

    front = read_card(copy)
    assert front["base_model"] == EMBEDDED_HUB_ID and front["library_name"] == "peft"
    assert front[POLICY_KEY] == "embedded" and "firm" in front["tags"]
    card = (copy / "README.md").read_text()
    assert "More Information Needed" not in card  # not peft's blank template
    for expected in ("round 2 of 3", "| beta | 0.5 |", "helpful 0.7, harmless 0.3", "`embedded:helpful`",
                     "| clients | 2 ", "| reward helpful | -1.2500 |", "0.0123", "helpful 0.400, harmless 0.600",
                     "dequantized from Q4_1 GGUF", "AutoPeftModelForCausalLM", "## Held-out evaluation"):
        assert expected in card, expected
    # firm eval on the copy loads the embedded weights offline, not the unreachable hub id
    assert infer_policy(str(copy)) == "embedded"
    # every table row has its three pipes: no cell text breaks the table
    for line in card.splitlines():
        if line.startswith("| "):
            assert line.replace("\\|", "").count("|") == 3, line


def test_firm_eval_writes_its_held_out_result_into_the_card(tmp_path, tiny_llama_config, monkeypatch):
    saved, _ = save_embedded_run_adapter(tmp_path, tiny_llama_config, monkeypatch)
    write_heldout(saved, HELDOUT)
    card = (saved / "README.md").read_text()
    assert "None recorded yet" not in card
    assert "`firm eval` on 3 prompts x 1 samples (split `eval`: prompts no client trained on" in card
    assert "| reward harmless | 0.2500 |" in card and "| response tokens | 4.0 |" in card
    assert card.index("## Held-out evaluation") < card.index("## How to load")
    write_heldout(saved, {**HELDOUT, "kl": 0.25})  # a second evaluation replaces the first
    card = (saved / "README.md").read_text()
    assert card.count("## Held-out evaluation") == 1
    assert "| KL to the base (nats per response) | 0.2500 |" in card
    assert "| KL to the base (nats per response) | 0.5000 |" not in card
    assert read_card(saved)[POLICY_KEY] == "embedded"  # front matter untouched


def test_a_card_that_is_not_ours_is_refused_before_evaluation(tmp_path):
    (tmp_path / "README.md").write_text("# someone else's adapter\n")
    with pytest.raises(ConfigError, match="not a FIRM model card"):
        check_card(tmp_path)


def test_a_local_base_is_named_by_its_path_and_the_card_says_so(tiny_policy_dir):
    text = card_text(FirmConfig(policy=tiny_policy_dir, rewards="relevance,civility", algorithm="mgda"), 0)
    assert "base_model:" not in text  # no hub id to give
    assert "the local model directory" in text and "initial adapter" in text
    assert "| beta | 0 (setting 0.01; mgda does not use it) |" in text
