"""What the ServerApp and the ClientApp agree on: message keys, node-state names and how the
run's FirmConfig travels (a ConfigRecord each round; run-config keys under `flwr run`).

Both apps import this module and nothing of each other, as in Flower's examples.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from flwr.app import ConfigRecord

from firm.config import ConfigError, FirmConfig, build_config

# The global round number (continues across --resume) that the server adds to the config.
ROUND_KEY = "firm-round"
# Keys Flower or the server add to the ConfigRecord beside the FirmConfig fields.
FLOWER_CONFIG_KEYS = ("server-round", ROUND_KEY)
# The node state that survives between rounds.
STATE_VALUE_HEAD = "firm.value_head"
STATE_CLIENT = "firm.client_state"
# The run-config key that names a preset (every other key is a FirmConfig field).
PRESET_KEY = "preset"


def config_to_record(config: FirmConfig) -> ConfigRecord:
    return ConfigRecord(config.to_dict())


def config_from_record(record: Mapping[str, Any]) -> FirmConfig:
    return FirmConfig.from_dict({k: v for k, v in record.items() if k not in FLOWER_CONFIG_KEYS})


def run_config_key(field_name: str) -> str:
    """FirmConfig field -> Flower run-config key: kebab-case, as Flower's own apps name them."""
    return field_name.replace("_", "-")


def run_config_defaults() -> dict[str, Any]:
    """The run config pyproject.toml declares: ``preset`` and every FirmConfig field (kebab-case)
    with its default. Generated into pyproject by scripts/generate_config_files.py; a test
    keeps the two equal."""
    return {PRESET_KEY: "default", **{run_config_key(f.name): f.default for f in dataclasses.fields(FirmConfig)}}


def config_from_run_config(run_config: Mapping[str, Any]) -> FirmConfig:
    """The run's FirmConfig from `flwr run`'s run config.

    pyproject.toml declares every FirmConfig field with its default, and Flower hands the app
    the defaults merged with ``--run-config``, so a key whose value differs from the default
    is an explicit setting: it overrides the preset; the preset overrides the rest."""
    fields = {run_config_key(f.name): f for f in dataclasses.fields(FirmConfig)}
    unknown = sorted(set(run_config) - set(fields) - {PRESET_KEY})
    if unknown:
        raise ConfigError(f"unknown run-config key(s): {', '.join(unknown)}")
    defaults = FirmConfig()
    overrides = {}
    for key, value in run_config.items():
        if key in fields:
            name = fields[key].name
            if value != getattr(defaults, name):
                overrides[name] = value
    return build_config(str(run_config.get(PRESET_KEY, "default")), overrides)
