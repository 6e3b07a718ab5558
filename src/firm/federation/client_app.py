"""Flower ClientApp: one FIRM client.

Each round it receives the global LoRA adapter and the run's FirmConfig (a ConfigRecord),
runs the local FIRM update on its own prompt shard and replies with ONE adapter and its
metrics. What must survive between rounds stays on the node, in ``context.state``: the
critic (value head), the running reward statistics and the KL controller.

The node's shard: ``partition-id`` / ``num-partitions`` from the node config (set by the
simulation engine, or by ``flower-supernode --node-config``) select a partition of the prompt
source; a node config ``prompts=PATH`` makes the node train on its own file instead.
"""

from __future__ import annotations

import random
import zlib
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from firm.config import FirmConfig
from firm.federation.protocol import ROUND_KEY, STATE_CLIENT, STATE_VALUE_HEAD, config_from_record
from firm.fsmgda import FsmgdaLocalTrainer, pack_objectives
from firm.models import (MultiObjectiveValueHead, adapter_state, add_lora, load_adapter_state, load_policy,
                         resolve_device)
from firm.partition import partition_prompts
from firm.prompts import load_prompts
from firm.rewards import build_rewards
from firm.trainer import FirmLocalTrainer, summarize

app = ClientApp()

@lru_cache(maxsize=1)
def cached_policy(policy: str, dtype: str, r: int, alpha: int, dropout: float, target_modules: tuple[str, ...],
                  device: str):
    """The base model + a LoRA adapter on ``device``, loaded once per worker process and reused
    by every client that runs in it (the adapter weights are overwritten at the start of each round)."""
    model, tokenizer = load_policy(policy, dtype)
    return add_lora(model, r, alpha, dropout, target_modules).to(device), tokenizer


def get_policy(cfg: FirmConfig):
    return cached_policy(cfg.policy, cfg.dtype, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules(),
                         str(resolve_device(cfg.device)))


@lru_cache(maxsize=4)
def cached_shards(source: str, num_partitions: int, scheme: str, alpha: float, seed: int):
    return partition_prompts(load_prompts(source), num_partitions, scheme=scheme, alpha=alpha, seed=seed)


def client_shard(cfg: FirmConfig, node_config: dict):
    if "prompts" in node_config:  # a deployed node with its own private prompt file
        return load_prompts(str(node_config["prompts"]))
    partition_id = int(node_config.get("partition-id", 0))
    num_partitions = int(node_config.get("num-partitions", cfg.num_clients))
    return cached_shards(cfg.prompts, num_partitions, cfg.partition, cfg.dirichlet_alpha, cfg.seed)[partition_id]


def round_seed(*parts: int) -> int:
    return zlib.crc32(",".join(str(p) for p in parts).encode())


def restore_state(context: Context, trainer: FirmLocalTrainer) -> None:
    state = context.state
    if STATE_VALUE_HEAD in state.array_records:
        trainer.value_head.load_state_dict(state.array_records[STATE_VALUE_HEAD].to_torch_state_dict())
    if STATE_CLIENT in state.config_records:
        saved = state.config_records[STATE_CLIENT]
        trainer.reward_stats.load_state_dict({"mean": list(saved["reward_mean"]), "var": list(saved["reward_var"]),
                                              "count": float(saved["reward_count"])})
        trainer.kl_controller.value = float(saved["kl_coef"])


def save_state(context: Context, trainer: FirmLocalTrainer) -> None:
    context.state.array_records[STATE_VALUE_HEAD] = ArrayRecord(
        {name: tensor.cpu() for name, tensor in trainer.value_head.state_dict().items()})
    stats = trainer.reward_stats.state_dict()
    context.state.config_records[STATE_CLIENT] = ConfigRecord({
        "reward_mean": [float(x) for x in stats["mean"]],
        "reward_var": [float(x) for x in stats["var"]],
        "reward_count": float(stats["count"]),
        "kl_coef": float(trainer.kl_controller.value),
    })


def run_local_update(cfg: FirmConfig, global_adapter: dict[str, torch.Tensor], context: Context, firm_round: int):
    """The whole client round, independent of messaging (tests call it directly)."""
    policy, tokenizer = get_policy(cfg)
    load_adapter_state(policy, global_adapter)
    rewards = build_rewards(cfg.reward_specs(), device=str(policy.device))
    hidden_size = policy.get_base_model().config.hidden_size
    value_head = MultiObjectiveValueHead(hidden_size, len(rewards))
    trainer_class = FsmgdaLocalTrainer if cfg.algorithm_spec().per_objective_upload else FirmLocalTrainer
    trainer = trainer_class(policy, tokenizer, value_head, rewards, cfg)  # fresh stats; restore_state loads saved ones
    restore_state(context, trainer)
    shard = client_shard(cfg, context.node_config)
    partition_id = int(context.node_config.get("partition-id", 0))
    seed = round_seed(cfg.seed, partition_id, firm_round)
    torch.manual_seed(seed)  # generate() samples from torch's global generator
    if isinstance(trainer, FsmgdaLocalTrainer):  # one adapter per objective, packed into one record
        stats, adapters = trainer.train_round_per_objective(shard, random.Random(seed))
        upload = pack_objectives(adapters)
    else:
        stats = trainer.train_round(shard, random.Random(seed))
        upload = adapter_state(policy)
    save_state(context, trainer)
    metrics = summarize(stats, [r.name for r in rewards])
    metrics["partition-id"] = partition_id
    metrics["kl_coef"] = float(trainer.kl_controller.value)
    return upload, metrics, stats.samples[: cfg.sample_responses]


@app.train()
def train(msg: Message, context: Context) -> Message:
    config_record = msg.content["config"]
    cfg = config_from_record(config_record)
    global_adapter = msg.content["arrays"].to_torch_state_dict()
    adapter, metrics, samples = run_local_update(cfg, global_adapter, context, int(config_record[ROUND_KEY]))
    content = RecordDict({"arrays": ArrayRecord(adapter), "metrics": MetricRecord(metrics)})
    if samples:  # opt-in: prompts are the client's private data
        content["samples"] = ConfigRecord({"prompts": [p for p, _ in samples], "responses": [r for _, r in samples]})
    return Message(content=content, reply_to=msg)
