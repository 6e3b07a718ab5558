"""Flower ServerApp: FedAvg of FIRM clients' LoRA adapters, writing the run directory.

Two ways in:
- ``flwr run .``: the module-level ``app``. Its settings are the run config: every FirmConfig
  field is a kebab-case key declared in pyproject.toml (``--run-config "num-rounds=5 beta=1.0"``)
  plus ``preset``; a ``run-dir`` that already holds a run is resumed.
- ``firm train``: firm.federation.simulation builds a ServerApp with ``make_server_app`` around
  the run directory the CLI prepared and a callback for its progress display.
"""

from __future__ import annotations

import os
from logging import ERROR, INFO
from pathlib import Path
from typing import Callable

import torch
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import ExitCode, flwr_exit
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file

from firm.config import ConfigError, FirmConfig
from firm.errors import FirmError
from firm.federation.defence import load_ledger, save_ledger
from firm.federation.flower_logs import install_app_filters, quiet_library_warnings, short_config_record
from firm.federation.protocol import config_from_run_config, config_to_record
from firm.federation.strategy import FederationError, RoundFailed, RoundResult, make_strategy
from firm.federation.replies import clean_text
from firm.model_card import finish_adapter
from firm.models import adapter_state, add_lora, load_adapter_state, load_policy
from firm.plots import plot_run
from firm.preflight import check_resumed_run
from firm.rundir import CONFIG_FILE, STATE_FILE, RunDir, default_run_dir
from firm.tracking import make_reporters

RoundCallback = Callable[[RoundResult], None]


# Under `flwr run` the run-dir comes from whoever submits the run; the SuperLink host's operator
# confines it to one root directory (default: ./runs where the ServerApp process starts).
RUN_ROOT_ENV = "FIRM_RUN_ROOT"
# The longest refusal line a `flwr run` log shows.
REFUSAL_CHARS = 500


def confine_run_dir(requested: str, preset: str, root: Path) -> Path:
    """The run directory a submitted run may use: ``requested`` resolved inside ``root`` (a
    relative path is taken under it; '' gives root/<preset>-<time>); anything that resolves
    outside the root is refused."""
    root = root.resolve()
    path = (root / requested).resolve() if requested else root / Path(default_run_dir(preset)).name
    if not path.is_relative_to(root):
        raise ConfigError(f"run-dir {requested!r} is outside the run root {root} that this SuperLink host allows "
                          f"(set {RUN_ROOT_ENV} there to change it)")
    return path


def run_dir_from_run_config(context: Context) -> RunDir:
    config = config_from_run_config(context.run_config)
    preset = str(context.run_config.get("preset", "default"))
    path = confine_run_dir(config.run_dir, preset, Path(os.environ.get(RUN_ROOT_ENV, "runs")))
    if (path / STATE_FILE).exists():
        return RunDir.open(path)
    return RunDir.create(path, config)


def initial_global_model(config: FirmConfig, run: RunDir):
    """The server's copy of the adapter: seeded fresh LoRA, or the last completed round's."""
    torch.manual_seed(config.seed)
    model, _ = load_policy(config.policy, config.dtype)
    peft_model = add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.target_modules())
    last = run.last_adapter()
    if last is not None:
        load_adapter_state(peft_model, load_file(str(last / SAFETENSORS_WEIGHTS_NAME)))
    else:
        run.save_adapter(0, peft_model, finish=lambda folder: finish_adapter(folder, config, 0))
    return peft_model


def run_federation(grid: Grid, run: RunDir, on_round: RoundCallback | None = None) -> None:
    config = run.config().validate()
    # The clients keep their state under the run directory: send where it is now (a run
    # directory may have been copied or moved since config.json was written), absolute since a
    # client's working directory need not be the server's.
    config.run_dir = str(run.path.resolve())
    run.drop_unfinished_rounds()
    done = run.completed_rounds
    remaining = config.num_rounds - done
    if remaining <= 0:
        return
    peft_model = initial_global_model(config, run)
    try:
        reporters = make_reporters(config.report_to, run.path, config.to_dict())
    except ConfigError as err:  # a tracker that cannot start (no wandb login): stop before round 1, say why
        run.write_state(run.completed_rounds, error=str(err))
        raise FederationError(str(err)) from None

    def on_round_end(result: RoundResult) -> None:
        load_adapter_state(peft_model, result.arrays.to_torch_state_dict())
        adapter = run.save_adapter(result.round, peft_model, finish=lambda folder: finish_adapter(
            folder, config, result.round, result.round_record))
        result.round_record["adapter"] = str(adapter.relative_to(run.path))
        run.append_metrics(result.client_records + [result.round_record])
        if result.ledger is not None:
            save_ledger(run.path, result.round, result.ledger)
        run.write_state(result.round)
        plot_run(run)
        for reporter in reporters:
            reporter.report_round(result.round_record, result.client_records)
        if on_round is not None:
            on_round(result)

    strategy = make_strategy(config, on_round_end=on_round_end, round_offset=done,
                             ledger=load_ledger(run.path, done, config.contribution_budget))
    train_config = config_to_record(config)
    try:
        with short_config_record(len(train_config), str(run.path.resolve() / CONFIG_FILE)):
            strategy.start(grid=grid, initial_arrays=ArrayRecord(adapter_state(peft_model)), num_rounds=remaining,
                           timeout=config.round_timeout, train_config=train_config)
    except Exception as err:
        # Keep what was written; record who failed and why, and why the run stopped, so the CLI can say it.
        if isinstance(err, RoundFailed):
            run.append_metrics([err.record])
        reason = str(err) if isinstance(err, FederationError) else f"{type(err).__name__}: {err}"
        run.write_state(run.completed_rounds, error=reason)
        raise
    finally:
        for reporter in reporters:
            reporter.close()


def make_server_app(run_dir: str, on_round: RoundCallback | None = None) -> ServerApp:
    """A ServerApp for a run directory prepared by the caller (``firm train``)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_federation(grid, RunDir.open(run_dir), on_round)
        except FederationError:
            pass  # recorded in state.json and metrics.jsonl; the caller reports it in one line

    return server


def refuse_run(err: FirmError) -> None:
    """End a `flwr run` on a bad setting: one line and a failed run (non-zero exit, Flower's status
    FAILED), without a traceback; nothing was written."""
    flwr_exit(ExitCode.SERVERAPP_EXCEPTION, f"FIRM run refused: {clean_text(err, REFUSAL_CHARS)}")


install_app_filters()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    quiet_library_warnings()
    try:
        run = run_dir_from_run_config(context)
        if run.completed_rounds > 0:  # a resubmitted run: config.json must still describe what it saved
            check_resumed_run(run, run.config())
    except FirmError as err:
        refuse_run(err)
        return
    # Under `flwr run` a relative run-dir resolves in the SuperLink's working directory: say where.
    log(INFO, "FIRM run directory: %s", run.path.resolve())
    try:
        run_federation(grid, run)
    except FederationError as err:
        log(ERROR, "FIRM run stopped: %s; everything written is kept; resume with run-dir=%s", err, run.path.resolve())
        raise
