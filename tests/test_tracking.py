"""TensorBoard reporting (--report-to tensorboard): what a round record becomes, read back with
TensorBoard's own event reader."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from firm.config import ConfigError, FirmConfig
from firm.tracking import TENSORBOARD_DIR, make_reporters, scalars

ROUND = {"type": "round", "round": 2, "reward/helpful": -1.0, "reward/harmless": 0.5, "kl": 0.01,
         "lambda_mean": [0.3, 0.7], "lambda_std": [0.1, 0.1], "rejected": [], "algorithm": "firm"}
CLIENT = {"type": "client", "round": 2, "partition-id": 1, "reward/helpful": -2.0, "reward/harmless": 0.25,
          "lambda_mean": [0.4, 0.6], "grad_cosine": [-0.2]}


def test_vectors_become_one_tag_per_objective_and_text_is_skipped():
    assert scalars(ROUND) == {"reward/helpful": -1.0, "reward/harmless": 0.5, "kl": 0.01,
                              "lambda_mean/helpful": 0.3, "lambda_mean/harmless": 0.7,
                              "lambda_std/helpful": 0.1, "lambda_std/harmless": 0.1}
    assert scalars(CLIENT)["grad_cosine/0"] == -0.2  # one value per objective pair, not per objective


def test_tensorboard_reporter_writes_round_and_client_curves(tmp_path):
    (reporter,) = make_reporters("tensorboard", tmp_path)
    reporter.report_round(ROUND, [CLIENT])
    reporter.close()
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"round/reward/helpful", "round/lambda_mean/harmless", "client-1/reward/harmless"} <= tags
    (point,) = events.Scalars("round/lambda_mean/harmless")
    assert (point.step, point.value) == (2, pytest.approx(0.7))


def test_report_to_none_writes_nothing_and_unknown_targets_are_refused(tmp_path):
    assert make_reporters("none", tmp_path) == []
    assert not (tmp_path / TENSORBOARD_DIR).exists()
    with pytest.raises(ConfigError, match="report_to must be one of"):
        FirmConfig(report_to="wandb").validate()
