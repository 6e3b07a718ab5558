"""What a node lets the server ask of it. The server names the policy, the reward models, the
prompts and the run directory in every round's config; a node loads a model or a file, or writes
under a directory, that the server names only when its own node config allows it:

- ``allow-server-models=true``: load a policy or reward model other than the built-in ones
  (the embedded policy, ``embedded:*``, ``relevance``, ``civility``): a hub id downloads and runs
  whatever the hub serves, a local path reads any model directory on the node;
- ``allow-server-paths=true``: read a local prompt file the server names (``client_shard``);
- ``allow-server-run-dir=true``: keep the client state under the server's run directory when it
  exists on this host (else the node's own ``state-dir``, or memory).

`firm train` owns every simulated node and sets all three; a deployed SuperNode sets what it trusts.
Where a node's config cannot be set (`flwr run` on a local simulation), the environment of the
process that starts the nodes can: ``FIRM_NODE_ALLOW=allow-server-models,allow-server-run-dir``
(also node-side: a server cannot set it).

The node's shard: ``partition-id`` / ``num-partitions`` from the node config (set by the
simulation engine, or by ``flower-supernode --node-config``) select a partition of the prompt
source; a node config ``prompts=PATH`` makes the node train on its own file instead. How many
prompt/response samples a node ever sends is its own ``sample-responses`` (default 0).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Mapping

from firm.config import FirmConfig
from firm.errors import FirmError
from firm.models import EMBEDDED_POLICY
from firm.partition import training_shards
from firm.prompts import Prompt, load_prompts

# Node config keys: the node's choices, which the server cannot override.
NODE_PROMPTS_KEY = "prompts"
NODE_SAMPLES_KEY = "sample-responses"
NODE_ALLOW_SERVER_PATHS_KEY = "allow-server-paths"
NODE_ALLOW_SERVER_MODELS_KEY = "allow-server-models"
NODE_ALLOW_SERVER_RUN_DIR_KEY = "allow-server-run-dir"
# Node-side consents given by the environment of the node's process (comma-separated keys).
NODE_ALLOW_ENV = "FIRM_NODE_ALLOW"
BUILT_IN_REWARDS = ("relevance", "civility")
EMBEDDED_REWARD_PREFIX = "embedded:"


class NodePolicyError(FirmError, ValueError):
    """The server asked this node for something only the node may decide."""


def node_allows(node_config: Mapping[str, Any], key: str) -> bool:
    """The node's config, else its process environment (NODE_ALLOW_ENV), allows ``key``."""
    if key in node_config:
        return str(node_config[key]).strip().lower() in ("true", "1", "yes")
    return key in {item.strip() for item in os.environ.get(NODE_ALLOW_ENV, "").split(",")}


def is_built_in_reward(spec: str) -> bool:
    return spec in BUILT_IN_REWARDS or spec.startswith(EMBEDDED_REWARD_PREFIX)


def server_models(cfg: FirmConfig) -> list[str]:
    """The policy and reward models the server's config names that are not built in."""
    named = [] if cfg.policy == EMBEDDED_POLICY else [f"policy {cfg.policy!r}"]
    return named + [f"reward {spec!r}" for spec in cfg.reward_specs() if not is_built_in_reward(spec)]


def check_server_models(cfg: FirmConfig, node_config: Mapping[str, Any]) -> None:
    """Refuse, before anything loads, models the node has not allowed the server to name."""
    named = server_models(cfg)
    if named and not node_allows(node_config, NODE_ALLOW_SERVER_MODELS_KEY):
        raise NodePolicyError(f"the server asks this node to load {', '.join(named)}; a node loads only the built-in "
                              f"models unless its node config sets {NODE_ALLOW_SERVER_MODELS_KEY}=true")


def is_local_path(source: str) -> bool:
    return source != "embedded" and not source.startswith("hf:")


@lru_cache(maxsize=4)
def cached_shards(source: str, eval_fraction: float, num_partitions: int, scheme: str, alpha: float, seed: int):
    """The training shards of a prompt source, loaded once per worker process."""
    return training_shards(load_prompts(source), eval_fraction, num_partitions, scheme, alpha, seed)


def client_shard(cfg: FirmConfig, node_config: Mapping[str, Any]) -> list[Prompt]:
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


def samples_allowed(cfg: FirmConfig, node_config: Mapping[str, Any]) -> int:
    """Prompt/response pairs this node sends: what the server asks for, capped by what the node's
    own config allows (``sample-responses``, default 0: prompts are the node's private data)."""
    try:
        allowed = int(node_config.get(NODE_SAMPLES_KEY, 0))
    except (TypeError, ValueError):
        raise NodePolicyError(f"node config {NODE_SAMPLES_KEY} must be a whole number, "
                              f"got {node_config.get(NODE_SAMPLES_KEY)!r}") from None
    return max(0, min(cfg.sample_responses, allowed))
