"""Flower ServerApp: FedAvg of FIRM clients' LoRA adapters, writing the run directory.

Where the run's settings come from:
- ``firm train`` (Flower's simulation engine started from Python) prepares the run directory
  and passes it in the environment variable FIRM_RUN_DIR;
- ``flwr run .`` passes the run config of pyproject.toml / ``--run-config``: ``preset``,
  ``overrides`` ("num_rounds=2 beta=0.1") and optionally ``run-dir`` (an existing run
  directory there is resumed).
"""

from __future__ import annotations

import os
import time
from logging import INFO
from typing import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from firm.config import FirmConfig, build_config, parse_overrides
from firm.models import adapter_state, add_lora, load_adapter_state, load_policy
from firm.rundir import RunDir
from firm.strategy import FirmFedAvg, FsmgdaFedAvg, RoundResult

RUN_DIR_ENV = "FIRM_RUN_DIR"

app = ServerApp()

# The CLI sets this to show progress; it receives each finished round.
round_listeners: list[Callable[[RoundResult], None]] = []


def default_run_dir(preset: str) -> str:
    return os.path.join("runs", f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}")


def run_dir_from_context(context: Context) -> RunDir:
    if os.environ.get(RUN_DIR_ENV):
        return RunDir.open(os.environ[RUN_DIR_ENV])
    run_config = context.run_config
    preset = str(run_config.get("preset", "default"))
    requested = str(run_config.get("run-dir", "") or "")
    if requested and os.path.exists(os.path.join(requested, "state.json")):
        return RunDir.open(requested)
    config = build_config(preset, parse_overrides(str(run_config.get("overrides", ""))))
    return RunDir.create(requested or config.run_dir or default_run_dir(preset), config)


def initial_global_model(config: FirmConfig, run: RunDir):
    """The server's copy of the adapter: seeded fresh LoRA, or the last completed round's."""
    torch.manual_seed(config.seed)
    model, _ = load_policy(config.policy, config.dtype)
    peft_model = add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.target_modules())
    last = run.last_adapter()
    if last is not None:
        from safetensors.torch import load_file

        load_adapter_state(peft_model, load_file(str(last / "adapter_model.safetensors")))
    else:
        run.save_adapter(0, peft_model)
    return peft_model


def run_federation(grid: Grid, run: RunDir) -> None:
    config = run.config().validate()
    run.drop_unfinished_rounds()
    done = run.completed_rounds
    remaining = config.num_rounds - done
    if remaining <= 0:
        return
    peft_model = initial_global_model(config, run)

    def on_round_end(result: RoundResult) -> None:
        load_adapter_state(peft_model, result.arrays.to_torch_state_dict())
        adapter = run.save_adapter(result.round, peft_model)
        result.round_record["adapter"] = str(adapter.relative_to(run.path))
        run.append_metrics(result.client_records + [result.round_record])
        run.write_state(result.round)
        from firm.plots import plot_run

        plot_run(run)
        for listener in round_listeners:
            listener(result)

    common = dict(on_round_end=on_round_end, round_offset=done, fraction_train=1.0,
                  min_train_nodes=config.num_clients, min_available_nodes=config.num_clients)
    if config.algorithm == "fsmgda":
        strategy = FsmgdaFedAvg(num_objectives=len(config.reward_specs()), beta=config.effective_beta(),
                                preference=config.preference_vector(), **common)
    else:
        strategy = FirmFedAvg(algorithm=config.algorithm, **common)
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(adapter_state(peft_model)),
            num_rounds=remaining,
            train_config=ConfigRecord(config.to_dict()),
        )
    except Exception as err:
        # Keep what was written; record why the run stopped so the CLI can say it.
        run.write_state(run.completed_rounds, error=f"{type(err).__name__}: {err}")
        raise


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = run_dir_from_context(context)
    # Under `flwr run` a relative run-dir resolves in the SuperLink's working directory: say where.
    log(INFO, "FIRM run directory: %s", run.path.resolve())
    run_federation(grid, run)
