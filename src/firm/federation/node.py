"""What only a node decides (its node config; the server cannot override it): which prompts it
trains on, whether it reads a local file the server names (``allow-server-paths``), and how many
prompt/response samples it ever sends (``sample-responses``, default 0).

The node's shard: ``partition-id`` / ``num-partitions`` from the node config (set by the
simulation engine, or by ``flower-supernode --node-config``) select a partition of the prompt
source; a node config ``prompts=PATH`` makes the node train on its own file instead.
"""

from __future__ import annotations

from functools import lru_cache

from firm.config import FirmConfig
from firm.errors import FirmError
from firm.federation.protocol import NODE_ALLOW_SERVER_PATHS_KEY, NODE_PROMPTS_KEY, NODE_SAMPLES_KEY
from firm.partition import training_shards
from firm.prompts import load_prompts


@lru_cache(maxsize=4)
def cached_shards(source: str, eval_fraction: float, num_partitions: int, scheme: str, alpha: float, seed: int):
    """The training shards of a prompt source, loaded once per worker process."""
    return training_shards(load_prompts(source), eval_fraction, num_partitions, scheme, alpha, seed)


class NodePolicyError(FirmError, ValueError):
    """The server asked this node for something only the node may decide."""


def is_local_path(source: str) -> bool:
    return source != "embedded" and not source.startswith("hf:")


def client_shard(cfg: FirmConfig, node_config: dict):
    """The node's prompts: its own file (node config ``prompts``), else its partition of the run's
    prompt source. A server may name 'embedded' or an hf: data set, but a local file only when
    the node allows it (``allow-server-paths``): otherwise a server could make the node read any
    file on it."""
    if NODE_PROMPTS_KEY in node_config:  # a deployed node with its own private prompt file
        return load_prompts(str(node_config[NODE_PROMPTS_KEY]))
    if is_local_path(cfg.prompts) and not node_flag(node_config, NODE_ALLOW_SERVER_PATHS_KEY):
        raise NodePolicyError(f"the server asks this node to read the local file {cfg.prompts!r}; a node trains on "
                              f"its own prompts (node config {NODE_PROMPTS_KEY}=PATH) or on 'embedded' / hf: "
                              f"sources unless its node config sets {NODE_ALLOW_SERVER_PATHS_KEY}=true")
    partition_id = int(node_config.get("partition-id", 0))
    num_partitions = int(node_config.get("num-partitions", cfg.num_clients))
    return cached_shards(cfg.prompts, cfg.eval_fraction, num_partitions, cfg.partition, cfg.dirichlet_alpha,
                         cfg.partition_seed)[partition_id]


def node_flag(node_config, key: str) -> bool:
    return str(node_config.get(key, "false")).strip().lower() in ("true", "1", "yes")


def samples_allowed(cfg: FirmConfig, node_config) -> int:
    """Prompt/response pairs this node sends: what the server asks for, capped by what the node's
    own config allows (``sample-responses``, default 0: prompts are the node's private data)."""
    try:
        allowed = int(node_config.get(NODE_SAMPLES_KEY, 0))
    except (TypeError, ValueError):
        raise NodePolicyError(f"node config {NODE_SAMPLES_KEY} must be a whole number, "
                              f"got {node_config.get(NODE_SAMPLES_KEY)!r}") from None
    return max(0, min(cfg.sample_responses, allowed))
