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

from transformers import AutoConfig, AutoModelForCausalLM

from firm.checks import check_context, check_reward_spec
from firm.config import ConfigError, FirmConfig
from firm.federation.client_app import make_client_app
from firm.federation.flower_logs import SilencedNotices
from firm.federation.node_policy import NODE_ALLOW_SERVER_MODELS_KEY, NODE_ALLOW_SERVER_RUN_DIR_KEY
from firm.federation.node_preference import NODE_PREFERENCE_KEY
from firm.federation.protocol import NODE_ALLOW_SERVER_PATHS_KEY, NODE_PROGRESS_DIR_KEY, NODE_SAMPLES_KEY
from firm.federation.server_app import RoundCallback, make_server_app
from firm.models import check_policy, resolve_device, resolve_policy_path
from firm.partition import partition_prompts, split_evaluation
from firm.prompts import load_prompts
from firm.tracking import check_reporters


def preflight(config: FirmConfig) -> None:
    """Fail before starting Flower (and before creating the run directory) on inputs that
    would otherwise only fail inside a client: prompts, partition, reward specs, policy and
    its LoRA targets and context length, device."""
    train, _ = split_evaluation(load_prompts(config.prompts), config.eval_fraction)
    partition_prompts(train, config.num_clients, scheme=config.partition, alpha=config.dirichlet_alpha,
                      seed=config.partition_seed)
    for spec in config.reward_specs():
        check_reward_spec(spec)
    check_policy(config.policy)
    check_policy_settings(config)
    resolve_device(config.device)
    check_reporters(config.report_to)


def check_policy_settings(config: FirmConfig) -> None:
    """The LoRA target modules exist in the policy, and prompt + response fit its context. Reads
    the policy's config and builds its module tree on the meta device (no weights)."""
    check_context(config.policy, config.max_prompt_tokens, config.max_new_tokens)
    model_config = AutoConfig.from_pretrained(resolve_policy_path(config.policy))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules()
                     if isinstance(module, torch.nn.Linear)})
    missing = [name for name in config.target_modules() if name not in linear]
    if missing:
        raise ConfigError(f"lora_target_modules {', '.join(missing)} not found in the policy; its linear layers are: "
                          f"{', '.join(linear)}")


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
