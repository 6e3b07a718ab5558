"""Flower ClientApp: one FIRM client.

Each round it receives the global LoRA adapter and the run's FirmConfig (a ConfigRecord),
runs the local FIRM update on its own prompt shard and replies with ONE adapter and its
metrics. What must survive between rounds stays on the node: the critic (value head), the
running reward statistics, the KL controller, and AdamW's moments when optimizer = adamw
(adamw-reset and sgd start every round fresh or have no state). It lives in the node's own directory, one file per round written
atomically after the round (``round-NNN.safetensors``; it and the one before are kept) and read
back at the start of the next, so ``--resume`` continues it exactly, even after a crash in the
middle of a round (round r always starts from the latest state saved before round r):
- a node config ``state-dir=PATH`` (a deployed SuperNode: its own directory);
- else RUN_DIR/clients/<partition-id>/ when the run directory is on this host and the node
  allows it (``allow-server-run-dir``; `firm train`'s simulated nodes do);
- else Flower's in-memory ``context.state`` (lost when the node restarts).

The node's shard: ``partition-id`` / ``num-partitions`` from the node config (set by the
simulation engine, or by ``flower-supernode --node-config``) select a partition of the prompt
source; a node config ``prompts=PATH`` makes the node train on its own file instead.

What only the node decides (its node config; the server cannot override it): which prompt file
it trains on, whether it reads a local file (``allow-server-paths``), loads a model
(``allow-server-models``) or keeps its state in a run directory (``allow-server-run-dir``) that
the server names (firm.federation.node_policy), how many prompt/response samples it ever
sends (``sample-responses``, default 0), and the preference its weights are pulled toward
(``preference``, default the server's; firm.federation.node_preference).
"""

from __future__ import annotations

import json
import random
import re
import zlib
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from firm.config import FirmConfig
from firm.errors import FirmError
from firm.federation.protocol import (NODE_ALLOW_SERVER_PATHS_KEY, NODE_PROGRESS_DIR_KEY, NODE_PROMPTS_KEY,
                                      NODE_SAMPLES_KEY,
                                      NODE_STATE_DIR_KEY, ROUND_KEY, STATE_CLIENT, STATE_OPTIMIZER, STATE_VALUE_HEAD,
                                      check_metrics, config_from_record, reply_schema)
from firm.federation.flower_logs import quiet_library_warnings
from firm.federation.node_policy import (NODE_ALLOW_SERVER_RUN_DIR_KEY, NodePolicyError, check_server_models,
                                         node_allows)
from firm.federation.node_preference import config_for_node
from firm.federation.replies import SAMPLE_TEXT_CHARS
from firm.fsmgda import FsmgdaLocalTrainer, pack_objectives
from firm.models import (BFloat16Sampler, MultiObjectiveValueHead, adapter_state, add_lora, load_adapter_state,
                         load_policy, resolve_device)
from firm.partition import partition_prompts, split_evaluation
from firm.progress import ClientProgressWriter, client_work
from firm.prompts import load_prompts
from firm.rewards import build_rewards
from firm.rundir import CONFIG_FILE, RunDir, atomic_write_bytes
from firm.trainer import FirmLocalTrainer, summarize

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


@lru_cache(maxsize=1)
def cached_sampler(policy) -> BFloat16Sampler:
    """sampling_dtype = bfloat16: one bfloat16 copy per worker's policy, refreshed every rollout."""
    return BFloat16Sampler(policy)


@lru_cache(maxsize=4)
def cached_shards(source: str, eval_fraction: float, num_partitions: int, scheme: str, alpha: float, seed: int):
    """The training shards: the prompt source less its held-out evaluation split, partitioned."""
    train, _ = split_evaluation(load_prompts(source), eval_fraction)
    return partition_prompts(train, num_partitions, scheme=scheme, alpha=alpha, seed=seed)


def is_local_path(source: str) -> bool:
    return source != "embedded" and not source.startswith("hf:")


def client_shard(cfg: FirmConfig, node_config: dict):
    """The node's prompts: its own file (node config ``prompts``), else its partition of the run's
    prompt source. A server may name 'embedded' or an hf: data set, but a local file only when
    the node allows it (``allow-server-paths``): otherwise a server could make the node read any
    file on it."""
    if NODE_PROMPTS_KEY in node_config:  # a deployed node with its own private prompt file
        return load_prompts(str(node_config[NODE_PROMPTS_KEY]))
    if is_local_path(cfg.prompts) and not node_allows(node_config, NODE_ALLOW_SERVER_PATHS_KEY):
        raise NodePolicyError(f"the server asks this node to read the local file {cfg.prompts!r}; a node trains on "
                              f"its own prompts (node config {NODE_PROMPTS_KEY}=PATH) or on 'embedded' / hf: "
                              f"sources unless its node config sets {NODE_ALLOW_SERVER_PATHS_KEY}=true")
    partition_id = int(node_config.get("partition-id", 0))
    num_partitions = int(node_config.get("num-partitions", cfg.num_clients))
    return cached_shards(cfg.prompts, cfg.eval_fraction, num_partitions, cfg.partition, cfg.dirichlet_alpha,
                         cfg.partition_seed)[partition_id]


def samples_allowed(cfg: FirmConfig, node_config) -> int:
    """Prompt/response pairs this node sends: what the server asks for, capped by what the node's
    own config allows (``sample-responses``, default 0: prompts are the node's private data)."""
    try:
        allowed = int(node_config.get(NODE_SAMPLES_KEY, 0))
    except (TypeError, ValueError):
        raise NodePolicyError(f"node config {NODE_SAMPLES_KEY} must be a whole number, "
                              f"got {node_config.get(NODE_SAMPLES_KEY)!r}") from None
    return max(0, min(cfg.sample_responses, allowed))


def round_seed(*parts: int) -> int:
    return zlib.crc32(",".join(str(p) for p in parts).encode())


# ---- the node's state between rounds -------------------------------------------------------------
STATE_FORMAT = "firm-client-state"
STATE_FILE_PATTERN = re.compile(r"round-(\d{3,})\.safetensors")


class ClientStateError(FirmError, RuntimeError):
    """A client's saved state cannot be read; the message names the file."""


def state_file(directory: Path, firm_round: int) -> Path:
    return directory / f"round-{firm_round:03d}.safetensors"


def client_state_dir(cfg: FirmConfig, node_config) -> Path | None:
    """Where this node keeps its state: its node config's state-dir, else the run directory's
    clients/<partition-id>/ when the run directory is on this host and the node allows the server
    to name it; None: in memory only."""
    if NODE_STATE_DIR_KEY in node_config:
        return Path(str(node_config[NODE_STATE_DIR_KEY]))
    server_dir_allowed = node_allows(node_config, NODE_ALLOW_SERVER_RUN_DIR_KEY)
    if cfg.run_dir and server_dir_allowed and (Path(cfg.run_dir) / CONFIG_FILE).is_file():
        return RunDir(cfg.run_dir).client_dir(int(node_config.get("partition-id", 0)))
    return None


def trainer_state(trainer: FirmLocalTrainer, firm_round: int) -> bytes:
    """The critic, reward statistics and KL controller after ``firm_round``, as one safetensors file."""
    stats = trainer.reward_stats.state_dict()
    tensors = {f"value_head.{k}": v.detach().cpu().contiguous() for k, v in trainer.value_head.state_dict().items()}
    tensors["reward_stats.mean"] = torch.tensor(stats["mean"], dtype=torch.float64)
    tensors["reward_stats.var"] = torch.tensor(stats["var"], dtype=torch.float64)
    if trainer.keeps_optimizer_state:
        tensors.update(trainer.optimizer_tensors())
    metadata = {"format": STATE_FORMAT, "round": str(firm_round), "reward_count": repr(float(stats["count"])),
                "kl_controller": json.dumps(trainer.kl_controller.state_dict())}
    return save_safetensors(tensors, metadata=metadata)


def load_trainer_state(trainer: FirmLocalTrainer, data: bytes, source: str) -> None:
    try:
        tensors = load_safetensors(data)
        metadata = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {})
        if metadata.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} file")
        trainer.value_head.load_state_dict({k.removeprefix("value_head."): v.to(trainer.value_head.linear.weight.device)
                                            for k, v in tensors.items() if k.startswith("value_head.")})
        trainer.reward_stats.load_state_dict({"mean": tensors["reward_stats.mean"].tolist(),
                                              "var": tensors["reward_stats.var"].tolist(),
                                              "count": float(metadata["reward_count"])})
        trainer.kl_controller.load_state_dict(json.loads(metadata["kl_controller"]))
        if trainer.keeps_optimizer_state:
            trainer.load_optimizer_tensors({k: v for k, v in tensors.items() if k.startswith("optimizer.")})
    except (SafetensorError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as err:
        raise ClientStateError(f"client state {source} cannot be read ({type(err).__name__}: {err}); "
                               "move it away to restart this client's state") from None


def saved_rounds(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := STATE_FILE_PATTERN.fullmatch(p.name)))


def restore_state(context: Context, trainer: FirmLocalTrainer, directory: Path | None, firm_round: int) -> None:
    """Load the state saved after the latest round before ``firm_round`` (none: a fresh start)."""
    if directory is not None:
        earlier = [r for r in saved_rounds(directory) if r < firm_round]
        if earlier:
            path = state_file(directory, earlier[-1])
            load_trainer_state(trainer, path.read_bytes(), str(path))
        return
    state = context.state
    if STATE_VALUE_HEAD in state.array_records:
        trainer.value_head.load_state_dict(state.array_records[STATE_VALUE_HEAD].to_torch_state_dict())
    if trainer.keeps_optimizer_state and STATE_OPTIMIZER in state.array_records:
        trainer.load_optimizer_tensors(state.array_records[STATE_OPTIMIZER].to_torch_state_dict())
    if STATE_CLIENT in state.config_records:
        saved = state.config_records[STATE_CLIENT]
        trainer.reward_stats.load_state_dict({"mean": list(saved["reward_mean"]), "var": list(saved["reward_var"]),
                                              "count": float(saved["reward_count"])})
        trainer.kl_controller.load_state_dict(json.loads(str(saved["kl_controller"])))


def save_state(context: Context, trainer: FirmLocalTrainer, directory: Path | None, firm_round: int) -> None:
    """Write the state after ``firm_round`` atomically; keep it and the latest one before it (a
    round redone after a crash starts from that), remove older ones."""
    if directory is not None:
        atomic_write_bytes(state_file(directory, firm_round), trainer_state(trainer, firm_round))
        earlier = [r for r in saved_rounds(directory) if r < firm_round]
        for old in earlier[:-1]:
            state_file(directory, old).unlink(missing_ok=True)
        return
    context.state.array_records[STATE_VALUE_HEAD] = ArrayRecord(
        {name: tensor.cpu() for name, tensor in trainer.value_head.state_dict().items()})
    if trainer.keeps_optimizer_state:
        context.state.array_records[STATE_OPTIMIZER] = ArrayRecord(
            {k: v.float() if v.dtype == torch.float64 else v for k, v in trainer.optimizer_tensors().items()})
    stats = trainer.reward_stats.state_dict()
    context.state.config_records[STATE_CLIENT] = ConfigRecord({
        "reward_mean": [float(x) for x in stats["mean"]],
        "reward_var": [float(x) for x in stats["var"]],
        "reward_count": float(stats["count"]),
        "kl_controller": json.dumps(trainer.kl_controller.state_dict()),
    })


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
    metrics["partition-id"] = partition_id
    metrics["kl_coef"] = float(trainer.kl_controller.value)
    metrics["preference"] = cfg.preference_vector()
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
