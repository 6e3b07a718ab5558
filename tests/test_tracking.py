"""Reporting (--report-to tensorboard,wandb): what a round becomes, read back with TensorBoard's
own event reader and from a wandb run written offline (no network)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from firm.config import ConfigError, FirmConfig
from conftest import offline_records
from firm.tracking import TENSORBOARD_DIR, make_reporters, round_scalars, scalars

ROUND = {"type": "round", "round": 2, "reward/helpful": -1.0, "reward/harmless": 0.5, "kl": 0.01,
         "lambda_mean": [0.3, 0.7], "lambda_std": [0.1, 0.1], "rejected": [], "algorithm": "firm", "clients": 2}
CLIENT = {"type": "client", "round": 2, "node_id": 81723, "partition-id": 1, "num-examples": 8,
          "reward/helpful": -2.0, "reward/harmless": 0.25, "lambda_mean": [0.4, 0.6], "preference": [0.9, 0.1],
          "grad_cosine": [-0.2], "step_lambda": [0.1, 0.9, 0.2, 0.8], "step_taken": [1.0, 1.0]}


def test_tags_are_named_by_objective_without_ids_or_per_step_lists():
    assert scalars(ROUND) == {"reward/helpful": -1.0, "reward/harmless": 0.5, "kl": 0.01,
                              "lambda/helpful": 0.3, "lambda/harmless": 0.7,
                              "lambda_std/helpful": 0.1, "lambda_std/harmless": 0.1}
    client = scalars(CLIENT)
    assert client == {"reward/helpful": -2.0, "reward/harmless": 0.25, "lambda/helpful": 0.4,
                      "lambda/harmless": 0.6, "preference/helpful": 0.9, "preference/harmless": 0.1,
                      "grad_cosine/helpful-harmless": -0.2}
    tags = round_scalars(ROUND, [CLIENT])
    assert tags["round/lambda/helpful"] == 0.3 and tags["client-1/lambda/harmless"] == 0.6
    assert not any("node_id" in t or "step_" in t or "/0" in t for t in tags)


def test_tensorboard_reporter_writes_round_and_client_curves(tmp_path):
    (reporter,) = make_reporters("tensorboard", tmp_path)
    reporter.report_round(ROUND, [CLIENT])
    reporter.close()
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"round/reward/helpful", "round/lambda/harmless", "client-1/reward/harmless",
            "client-1/grad_cosine/helpful-harmless"} <= tags
    assert not any("node_id" in t or "step_lambda" in t for t in tags)
    (point,) = events.Scalars("round/lambda/harmless")
    assert (point.step, point.value) == (2, pytest.approx(0.7))


def test_wandb_offline_writes_a_run_with_the_same_tags(tmp_path, wandb_offline):
    (reporter,) = make_reporters("wandb", tmp_path / "run", {"beta": 0.5})
    reporter.report_round(ROUND, [CLIENT])
    reporter.close()
    data = offline_records(wandb_offline, b"round/reward/helpful")
    for tag in (b"round/reward/helpful", b"round/lambda/harmless", b"client-1/lambda/helpful",
                b"client-1/preference/helpful"):
        assert tag in data
    assert b"node_id" not in data and b"step_lambda" not in data


def test_report_to_none_writes_nothing_and_unknown_targets_are_refused(tmp_path):
    assert make_reporters("none", tmp_path) == []
    assert not (tmp_path / TENSORBOARD_DIR).exists()
    with pytest.raises(ConfigError, match="report_to must be one of"):
        FirmConfig(report_to="comet").validate()
    FirmConfig(report_to="tensorboard,wandb").validate()


def test_wandb_without_a_login_is_one_clear_error(tmp_path):
    # a fresh process: wandb keeps the settings of its first run in a process for good
    env = {**os.environ, "HOME": str(tmp_path), "WANDB_MODE": "online", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("WANDB_API_KEY", None)
    for name in ("DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR"):
        env[f"WANDB_{name}"] = str(tmp_path / name.lower())
    script = ("from firm.config import ConfigError\nfrom firm.tracking import make_reporters\n"
              "try:\n    make_reporters('wandb', 'run')\nexcept ConfigError as err:\n    print(err)\n")
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.strip().splitlines()
    assert line.startswith("report_to wandb could not start a wandb run: ") and "WANDB_MODE=offline" in line
