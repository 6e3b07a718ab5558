"""What a node lets the server ask of it. The server names the policy, the reward models, the
prompts and the run directory in every round's config; a node loads a model or a file, or writes
under a directory, that the server names only when its own node config allows it:

- ``allow-server-models=true``: load a policy or reward model other than the built-in ones
  (the embedded policy, ``embedded:*``, ``relevance``, ``civility``): a hub id downloads and runs
  whatever the hub serves, a local path reads any model directory on the node;
- ``allow-server-paths=true``: read a local prompt file the server names (firm.federation.client_app);
- ``allow-server-run-dir=true``: keep the client state under the server's run directory when it
  exists on this host (else the node's own ``state-dir``, or memory).

`firm train` owns every simulated node and sets all three; a deployed SuperNode sets what it trusts.
Where a node's config cannot be set (`flwr run` on a local simulation), the environment of the
process that starts the nodes can: ``FIRM_NODE_ALLOW=allow-server-models,allow-server-run-dir``
(also node-side: a server cannot set it).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from firm.config import FirmConfig
from firm.errors import FirmError
from firm.models import EMBEDDED_POLICY

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
