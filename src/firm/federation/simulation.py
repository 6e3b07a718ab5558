"""How `firm train` runs the Flower apps: Flower's simulation engine (Ray) in this process.

The only owner of that start-up. The CLI passes the run directory and a per-round callback as
arguments (no globals, no environment variables).

Why ``flwr.simulation.run_simulation`` and not ``flwr run``: ``flwr run`` needs a SuperLink
process and an installed app, which `firm train` would have to start and stop around every
run; the same apps run unchanged under ``flwr run`` (README, "Flower runtimes"). Flower marks
the Python entry point deprecated; its banner says nothing our users can act on, so it is
filtered out of `firm train`'s output.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from flwr.common.logger import FLOWER_LOGGER
from flwr.simulation import run_simulation as flwr_run_simulation

from firm.config import FirmConfig
from firm.federation.client_app import make_client_app
from firm.federation.flower_logs import SilencedNotices
from firm.federation.node_policy import (NODE_ALLOW_SERVER_MODELS_KEY, NODE_ALLOW_SERVER_PATHS_KEY,
                                         NODE_ALLOW_SERVER_RUN_DIR_KEY, NODE_SAMPLES_KEY)
from firm.federation.node_preference import NODE_PREFERENCE_KEY
from firm.federation.protocol import NODE_PROGRESS_DIR_KEY
from firm.federation.server_app import RoundCallback, make_server_app
from firm.models import resolve_device


def simulation_backend_config(config: FirmConfig, cpus: int, verbose: bool = False) -> dict:
    """Ray resources: one client at a time with all the CPUs, and with the GPU when the run uses
    one. Ray hides GPUs from workers that were not given one, so without this a client's
    device=auto would find none and train on the CPU."""
    gpus = torch.cuda.device_count() if resolve_device(config.device).type == "cuda" else 0
    return {"client_resources": {"num_cpus": cpus, "num_gpus": 1.0 if gpus else 0.0},
            "init_args": {"num_cpus": cpus, "num_gpus": gpus, "include_dashboard": False, "log_to_driver": verbose}}


def run_simulation(config: FirmConfig, run_path: Path, verbose: bool = False,
                   on_round: RoundCallback | None = None, client_progress: Path | None = None,
                   client_preferences: Mapping[int, str] | None = None) -> None:
    """Run the Flower apps on Flower's simulation engine, one client at a time. With
    ``client_progress`` the clients report their steps inside a round there (firm.progress);
    ``client_preferences`` gives simulated nodes (by partition id) their own preference, as a
    deployed node's node config would (firm.federation.node_preference)."""
    banner_filter = SilencedNotices()
    logger = FLOWER_LOGGER
    logger.addFilter(banner_filter)
    try:
        # `firm train` owns every simulated node, so its settings are also the nodes' own choices.
        node_defaults = {NODE_SAMPLES_KEY: config.sample_responses, NODE_ALLOW_SERVER_PATHS_KEY: "true",
                         NODE_ALLOW_SERVER_MODELS_KEY: "true", NODE_ALLOW_SERVER_RUN_DIR_KEY: "true"}
        if client_progress is not None:
            node_defaults[NODE_PROGRESS_DIR_KEY] = str(client_progress)
        per_partition = {pid: {NODE_PREFERENCE_KEY: p} for pid, p in (client_preferences or {}).items()}
        client_app = make_client_app(node_defaults, per_partition)
        flwr_run_simulation(server_app=make_server_app(str(run_path), on_round), client_app=client_app,
                            num_supernodes=config.num_clients,
                            backend_config=simulation_backend_config(config, os.cpu_count() or 1, verbose),
                            verbose_logging=verbose)
    finally:
        logger.removeFilter(banner_filter)
