"""A node's own preference: the trade-off between objectives an organisation states for its
SuperNode (node config ``preference="0.7,0.3"``), which its client solves its weights toward
instead of the server's p.

FIRM's weights on a client are lambda = argmin_simplex l^T G l + beta |l - p|^2: beta pulls them
toward p. With a node preference each client is pulled toward its own p_c; the server still
averages one adapter per client, so the global adapter follows the clients' steps, each taken
with weights near that client's p_c (how near: beta against the gradient geometry). Nothing the
server sends can override it, and every client reply records the p it used.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from firm.config import FirmConfig
from firm.errors import FirmError
from firm.mgda import validate_preference

NODE_PREFERENCE_KEY = "preference"


class NodePreferenceError(FirmError, ValueError):
    """A node's preference cannot be used; the message names the node config key."""


def parse_preference(value: Any, num_objectives: int, where: str) -> str:
    """A preference given as "0.7,0.3" (or a list of numbers), checked against the number of
    objectives, in the comma-separated form FirmConfig.preference holds."""
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        numbers = [float(x) for x in parts]
    except (TypeError, ValueError):
        raise NodePreferenceError(f"{where} must be comma-separated numbers, got {value!r}") from None
    try:
        validate_preference(numbers, num_objectives)
    except ValueError as err:
        raise NodePreferenceError(f"{where} {value!r}: {err}") from None
    return ",".join(repr(x) for x in numbers)


def config_for_node(cfg: FirmConfig, node_config: Mapping[str, Any]) -> FirmConfig:
    """The settings this node trains with: the server's, with the node's own preference when its
    node config states one."""
    if NODE_PREFERENCE_KEY not in node_config:
        return cfg
    where = f"node config {NODE_PREFERENCE_KEY}"
    if cfg.algorithm_spec().per_objective_upload:
        raise NodePreferenceError(f"{where}: {cfg.algorithm} solves the weights on the server with the server's "
                                  "preference; a node preference cannot apply (remove it, or use firm or linear)")
    preference = parse_preference(node_config[NODE_PREFERENCE_KEY], len(cfg.reward_specs()), where)
    return dataclasses.replace(cfg, preference=preference)
