"""What FIRM's apps leave in Flower's log: a bad run-config value as one line naming the key
(no traceback), each round's rewards, KL and lambda in the aggregated MetricRecord, and no dump
of every setting."""

from __future__ import annotations

import io
import logging
from logging import ERROR

import pytest
from flwr.app import ArrayRecord, Context, RecordDict
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info

from firm.config import ConfigError, FirmConfig
from firm.federation import server_app
from firm.federation.flower_logs import short_config_record
from firm.federation.protocol import config_from_run_config, config_to_record, run_config_defaults, run_config_message
from firm.federation.strategy import round_metrics


@pytest.fixture
def flower_log():
    """Everything Flower's logger prints while the test runs."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    level = FLOWER_LOGGER.level
    FLOWER_LOGGER.setLevel(logging.INFO)
    FLOWER_LOGGER.addHandler(handler)
    yield stream
    FLOWER_LOGGER.removeHandler(handler)
    FLOWER_LOGGER.setLevel(level)


def test_settings_errors_name_the_run_config_key():
    assert run_config_message("num_rounds must be >= 1, got 0") == "run config: num-rounds must be >= 1, got 0"
    assert run_config_message("beta must be >= 0, got -1.0") == "run config: beta must be >= 0, got -1.0"
    with pytest.raises(ConfigError, match=r"^run config: min-clients must be between 1 and num-clients \(4\)"):
        config_from_run_config({**run_config_defaults(), "min-clients": 9})


def test_a_bad_run_config_value_is_one_line_in_flowers_log(tmp_path, monkeypatch, flower_log):
    monkeypatch.setenv(server_app.RUN_ROOT_ENV, str(tmp_path))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={**run_config_defaults(), "beta": -1.0})
    exits = []

    def fake_exit(code, text):  # Flower's flwr_exit: logs the line, marks the run failed, exits 1
        exits.append((code, text))
        raise SystemExit(1)

    monkeypatch.setattr(server_app, "flwr_exit", fake_exit)
    with pytest.raises(SystemExit):
        server_app.main(None, context)
    assert exits == [(201, "FIRM run refused: run config: beta must be >= 0, got -1.0")]
    assert "Traceback" not in flower_log.getvalue()
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_other_exceptions_keep_their_traceback(flower_log):
    try:
        raise RuntimeError("a bug")
    except RuntimeError as err:
        log(ERROR, "ServerApp raised an exception", exc_info=err)
    assert "Traceback" in flower_log.getvalue() and "RuntimeError: a bug" in flower_log.getvalue()


def test_the_config_record_is_summarised_not_dumped(flower_log):
    record = config_to_record(FirmConfig())
    with short_config_record(len(record), "/runs/x/config.json"):
        log_strategy_start_info(3, ArrayRecord(), record, None)
    text = flower_log.getvalue()
    assert f"ConfigRecord (train): {len(record)} FIRM settings, as in /runs/x/config.json" in text
    assert "learning_rate" not in text
    log_strategy_start_info(3, ArrayRecord(), record, None)  # outside: Flower's own dump again
    assert "learning_rate" in flower_log.getvalue()


def test_the_aggregated_metric_record_holds_rewards_kl_and_lambda():
    record = {"type": "round", "round": 1, "clients": 2, "reward/helpful": -1.0, "reward/harmless": 0.5,
              "kl": 0.01, "lambda_mean": [0.3, 0.7], "lambda_std": [0.1, 0.1], "rejected": []}
    assert round_metrics(record) == {"clients": 2, "reward/helpful": -1.0, "reward/harmless": 0.5, "kl": 0.01,
                                     "lambda/helpful": 0.3, "lambda/harmless": 0.7}
