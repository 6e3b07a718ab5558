"""The Python API (``from firm import FirmConfig, train``) and `firm train --config FILE`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import offline_records
from firm import FirmConfig, TrainingStopped, train
from firm.api import config_file_values, resolve_config
from firm.cli import main
from firm.config import ConfigError

TINY = dict(num_clients=2, num_rounds=1, rollout_batch_size=2, max_new_tokens=4, ppo_epochs=1, num_minibatches=1,
            max_prompt_tokens=32, rewards="relevance,civility", heldout_prompts=4, heldout_samples=1)


def test_train_returns_the_run_directory_and_the_final_metrics(tiny_policy_dir, tmp_path, wandb_offline):
    config = FirmConfig(policy=tiny_policy_dir, run_dir=str(tmp_path / "run"), report_to="tensorboard,wandb", **TINY)
    result = train(config, progress=False)
    assert result.run_dir == tmp_path / "run" and result.completed_rounds == 1
    assert result.metrics["type"] == "round" and result.metrics["round"] == 1
    assert set(result.metrics) >= {"reward/relevance", "reward/civility", "kl", "lambda_mean"}
    assert result.adapter == tmp_path / "run" / "adapters" / "round-001"
    assert (result.adapter / "adapter_model.safetensors").is_file() and (result.adapter / "README.md").is_file()
    assert config.run_dir == str(tmp_path / "run")  # the caller's config is not changed
    # the held-out before/after it ends with, also in the final adapter's model card
    assert set(result.heldout["gains"]) == {"relevance", "civility"} and result.heldout["num_prompts"] == 4
    card = (result.adapter / "README.md").read_text()
    assert "None recorded yet" not in card and "`firm eval` on 4 prompts x 1 samples" in card
    # the round went to both trackers, wandb offline with no network
    assert (tmp_path / "run" / "tensorboard").is_dir()
    assert b"client-1/lambda/civility" in offline_records(wandb_offline, b"round/lambda/relevance")
    # asking for more rounds of a finished run: resume continues it
    again = train(resume=result.run_dir, num_rounds=1, progress=False)
    assert again.completed_rounds == 1 and again.metrics == result.metrics
    with pytest.raises(ConfigError, match="only --num-rounds may change"):
        train(resume=result.run_dir, beta=0.5, progress=False)


def test_bad_api_input_is_one_clear_error_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="beta must be >= 0"):
        train(FirmConfig(run_dir=str(tmp_path / "run"), rewards="relevance,civility"), beta=-1.0, progress=False)
    with pytest.raises(ConfigError, match="unknown setting"):
        train(FirmConfig(), num_round=2, progress=False)
    with pytest.raises(ConfigError, match="either a FirmConfig or a preset"):
        train(FirmConfig(), preset="paper", progress=False)
    assert not (tmp_path / "run").exists()
    assert issubclass(TrainingStopped, Exception)


def write_json(path: Path, values) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))
    return path


def test_a_config_file_is_checked_and_a_runs_own_folder_is_not_reused(tmp_path):
    saved = FirmConfig(run_dir=str(tmp_path / "old-run"), beta=0.5, num_rounds=7).to_dict()
    own = write_json(tmp_path / "old-run" / "config.json", saved)
    assert "run_dir" not in config_file_values(own)  # rerunning a run writes a new run directory
    assert config_file_values(own)["beta"] == 0.5
    elsewhere = write_json(tmp_path / "settings" / "mine.json", {"run_dir": "runs/mine", "num_rounds": 2})
    assert config_file_values(elsewhere) == {"run_dir": "runs/mine", "num_rounds": 2}  # a partial file is fine
    # preset < file < overrides
    config = resolve_config(elsewhere, "simple-rewards", {"num_rounds": 5})
    assert (config.rewards, config.num_rounds, config.run_dir) == ("relevance,civility", 5, "runs/mine")
    for values, message in (({"num_round": 2}, "unknown setting"), ({"beta": "high"}, "beta expects a float"),
                            ([1, 2], "expected a JSON object")):
        with pytest.raises(ConfigError, match=message):
            config_file_values(write_json(tmp_path / "bad.json", values))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        config_file_values(tmp_path / "broken.json")
    with pytest.raises(ConfigError, match="does not exist"):
        config_file_values(tmp_path / "missing.json")


def test_firm_train_config_reruns_a_saved_config_with_flags_on_top(tmp_path, capsys):
    saved = FirmConfig(run_dir=str(tmp_path / "old-run"), beta=0.5, num_rounds=7, rewards="relevance,civility",
                       seed=3).to_dict()
    path = write_json(tmp_path / "old-run" / "config.json", saved)
    assert main(["train", "--config", str(path), "--num-rounds", "2", "--print-config"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved == {**saved, "num_rounds": 2, "run_dir": ""}
    assert main(["train", "--config", str(path), "--resume", str(tmp_path / "old-run")]) == 2
    assert "--config starts a new run" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "nope.json")]) == 2
    assert capsys.readouterr().err.strip() == f"error: config file {tmp_path / 'nope.json'} does not exist"
