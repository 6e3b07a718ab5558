"""Flower ClientApp: one FIRM client.

Each round it receives the global LoRA adapter and the run's FirmConfig (a ConfigRecord), runs
the local FIRM update on its own prompt shard and replies with ONE adapter and its metrics. What
must survive between rounds stays on the node (firm.federation.client_state); what only the node
decides, its shard, what it may load and send, and its own preference, is its node config
(firm.federation.node_policy, firm.federation.node_preference).
"""

from __future__ import annotations

import random
import zlib

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from firm.config import FirmConfig
from firm.errors import FirmError
from firm.federation.client_state import client_state_dir, restore_state, save_state
from firm.federation.flower_logs import quiet_library_warnings
from firm.federation.node_policy import check_server_models, client_shard, samples_allowed
from firm.federation.node_preference import config_for_node
from firm.federation.protocol import (NODE_PROGRESS_DIR_KEY, ROUND_KEY, check_metrics, client_metrics,
                                      config_from_record, reply_schema)
from firm.federation.replies import SAMPLE_TEXT_CHARS
from firm.fsmgda.client import FsmgdaLocalTrainer
from firm.fsmgda.server import pack_objectives
from firm.models import MultiObjectiveValueHead, adapter_state, cached_sampler, get_policy, load_adapter_state
from firm.progress import ClientProgressWriter, client_work
from firm.rewards import build_rewards
from firm.trainer import FirmLocalTrainer, summarize


def round_seed(*parts: int) -> int:
    return zlib.crc32(",".join(str(p) for p in parts).encode())


def run_local_update(cfg: FirmConfig, global_adapter: dict[str, torch.Tensor], context: Context, firm_round: int):
    """The whole client round, independent of messaging (tests call it directly)."""
    check_server_models(cfg, context.node_config)
    cfg = config_for_node(cfg, context.node_config)  # the node's own preference, if it states one
    policy, tokenizer = get_policy(cfg)
    load_adapter_state(policy, global_adapter)
    rewards = build_rewards(cfg.reward_specs(), device=str(policy.device))
    hidden_size = policy.get_base_model().config.hidden_size
    value_head = MultiObjectiveValueHead(hidden_size, len(rewards))
    trainer_class = FsmgdaLocalTrainer if cfg.algorithm_spec().per_objective_upload else FirmLocalTrainer
    sampler = cached_sampler(policy) if cfg.sampling_dtype == "bfloat16" else None
    # fresh stats; restore_state loads saved ones
    trainer = trainer_class(policy, tokenizer, value_head, rewards, cfg, sampler=sampler)
    state_dir = client_state_dir(cfg, context.node_config)
    restore_state(context, trainer, state_dir, firm_round)
    shard = client_shard(cfg, context.node_config)
    partition_id = int(context.node_config.get("partition-id", 0))
    if NODE_PROGRESS_DIR_KEY in context.node_config:
        trainer.progress = ClientProgressWriter(str(context.node_config[NODE_PROGRESS_DIR_KEY]), partition_id,
                                                firm_round, *client_work(cfg, len(shard), len(rewards)))
    seed = round_seed(cfg.seed, partition_id, firm_round)
    torch.manual_seed(seed)  # generate() samples from torch's global generator
    if isinstance(trainer, FsmgdaLocalTrainer):  # one adapter per objective, packed into one record
        stats, adapters = trainer.train_round_per_objective(shard, random.Random(seed))
        upload = pack_objectives(adapters)
    else:
        stats = trainer.train_round(shard, random.Random(seed))
        upload = adapter_state(policy)
    save_state(context, trainer, state_dir, firm_round)
    metrics = summarize(stats, [r.name for r in rewards])
    metrics.update(client_metrics(partition_id, trainer.kl_controller.value, cfg.preference_vector()))
    mismatch = check_metrics(reply_schema(cfg, [r.name for r in rewards]), metrics)
    if mismatch is not None:  # the server would reject this reply: a bug on this side, say it here
        raise RuntimeError(f"this client's reply does not fit the reply schema: {mismatch}")
    # the server refuses longer texts: cut them here rather than lose the round's update
    samples = [(p[:SAMPLE_TEXT_CHARS], r[:SAMPLE_TEXT_CHARS]) for p, r in stats.samples]
    return upload, metrics, samples[: samples_allowed(cfg, context.node_config)]


def train_reply(msg: Message, context: Context) -> Message:
    """One round: validate the server's config (a clear rejection when it is invalid or asks for
    what only the node decides), train, reply with one adapter, metrics and, if the node allows
    it, samples."""
    config_record = msg.content["config"]
    try:
        cfg = config_from_record(config_record).validate()
        global_adapter = msg.content["arrays"].to_torch_state_dict()
        adapter, metrics, samples = run_local_update(cfg, global_adapter, context, int(config_record[ROUND_KEY]))
    except FirmError as err:  # a known failure (bad config, unreadable state): one line for the server's record
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}"),
                       reply_to=msg)
    content = RecordDict({"arrays": ArrayRecord(adapter), "metrics": MetricRecord(metrics)})
    if samples:  # opt-in on both sides: prompts are the client's private data
        content["samples"] = ConfigRecord({"prompts": [p for p, _ in samples], "responses": [r for _, r in samples]})
    return Message(content=content, reply_to=msg)


def make_client_app(node_defaults: dict, per_partition: dict[int, dict] | None = None) -> ClientApp:
    """A ClientApp whose nodes take ``node_defaults`` (and, by partition id, ``per_partition``) as
    their own node config where Flower's gives none: how `firm train`, which owns every simulated
    node, states the node-side choices (samples allowed, server-named prompt files allowed, each
    node's own preference)."""
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        own = (per_partition or {}).get(int(context.node_config.get("partition-id", 0)), {})
        context.node_config = {**node_defaults, **own, **dict(context.node_config)}
        return train_reply(msg, context)

    return client


app = ClientApp()  # a deployed node: its node config alone decides (flower-supernode --node-config)


@app.train()
def train(msg: Message, context: Context) -> Message:
    quiet_library_warnings()
    return train_reply(msg, context)
