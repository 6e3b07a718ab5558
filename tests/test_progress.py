"""The progress display: each client's work inside a round, the ETA, no wrapped lines when
piped, and library logs routed through the display."""

from __future__ import annotations

import io
import logging
import warnings
from types import SimpleNamespace

from rich.console import Console

from firm.config import FirmConfig
from firm.progress import (ClientProgressWriter, RunProgress, client_work, eta_seconds, format_seconds,
                           read_client_progress, routed_library_logs)
from firm.trainer import steps_per_rollout

ROUND = {"type": "round", "round": 1, "reward/helpful": -1.0, "reward/harmless": 0.5, "kl": 0.01,
         "lambda_mean": [0.3, 0.7], "lambda_std": [0.1, 0.1], "rejected": [], "bytes_up_per_client": 15000.0}


def test_a_clients_work_is_its_rollouts_and_update_steps():
    config = FirmConfig(rollout_batch_size=8, num_minibatches=2, ppo_epochs=2, rollouts_per_round=3)
    assert steps_per_rollout(config, 8) == 4
    assert steps_per_rollout(config, 3) == 6  # 3 prompts: minibatches of 3 // 2 = 1, three per epoch
    assert client_work(config, shard_size=100, num_objectives=2) == (3, 12)
    assert client_work(config, shard_size=3, num_objectives=2) == (3, 3 * steps_per_rollout(config, 3))
    fsmgda = FirmConfig(algorithm="fsmgda", rollout_batch_size=8, num_minibatches=2, ppo_epochs=2)
    assert client_work(fsmgda, shard_size=100, num_objectives=3) == (1, 3 * 4)  # one pass per objective


def test_progress_files_follow_the_client_and_skip_other_rounds(tmp_path):
    writer = ClientProgressWriter(tmp_path, partition_id=1, firm_round=2, rollouts=1, updates=2)
    writer("rollout")
    writer("update")
    ClientProgressWriter(tmp_path, partition_id=0, firm_round=1, rollouts=1, updates=2)  # an earlier round
    (tmp_path / "client-7.json").write_text("{")  # being written
    assert read_client_progress(tmp_path, 2) == {1: {"partition": 1, "round": 2, "rollouts": 1, "rollouts_total": 1,
                                                     "updates": 1, "updates_total": 2}}


def test_eta_and_time_format():
    assert eta_seconds(elapsed=30.0, done=1.0, remaining=3.0) == 90.0
    assert eta_seconds(elapsed=30.0, done=0.0, remaining=3.0) is None
    assert format_seconds(75) == "1:15" and format_seconds(3725) == "1:02:05"


def test_piped_round_lines_are_never_wrapped(capsys):
    with RunProgress(FirmConfig(num_rounds=3, num_clients=2), done_rounds=0) as progress:
        progress.on_round(SimpleNamespace(round=1, round_record=ROUND))
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("round 1:")]
    assert len(line) > 80 and "lambda=[0.30, 0.70] (std 0.100)" in line and "ETA" in line
    assert progress.client_progress is None  # no live display when piped: no client files to poll


def test_library_logs_and_warnings_go_through_the_display_and_are_restored():
    console = Console(file=io.StringIO(), width=200)
    flwr = logging.getLogger("flwr")
    before = list(flwr.handlers)
    with routed_library_logs(console):
        flwr.warning("a notice from Flower")
        warnings.warn("a library's FutureWarning", FutureWarning)
    printed = console.file.getvalue()
    assert "WARNING a notice from Flower" in printed and "a library's FutureWarning" in printed
    assert flwr.handlers == before


def test_the_trainer_reports_exactly_the_work_client_work_plans(tiny_llama_config, tiny_tokenizer, tmp_path):
    import random

    from test_trainer import make_base, make_config, make_prompts, make_trainer, wrap

    config = make_config(ppo_epochs=2, num_minibatches=2, rollouts_per_round=2)
    trainer = make_trainer(wrap(make_base(tiny_llama_config)), tiny_tokenizer, config)
    shard = make_prompts()
    rollouts, updates = client_work(config, len(shard), trainer.num_objectives)
    trainer.progress = ClientProgressWriter(tmp_path, partition_id=0, firm_round=1, rollouts=rollouts, updates=updates)
    trainer.train_round(shard, random.Random(0))
    state = read_client_progress(tmp_path, 1)[0]
    assert (state["rollouts"], state["updates"]) == (rollouts, updates) == (2, 8)
