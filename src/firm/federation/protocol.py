"""What the ServerApp and the ClientApp agree on: message keys, the reply schema and how the
run's FirmConfig travels (a ConfigRecord each round; run-config keys under `flwr run`). What only
a node decides (its node config) is firm.federation.node_policy's.

Both apps import this module and nothing of each other, as in Flower's examples.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from flwr.app import ConfigRecord

from firm.config import ConfigError, FirmConfig, build_config
from firm.rewards import parse_reward_spec
from firm.rewards.descriptor import read_descriptor
from firm.trainer import PER_STEP_METRICS, REWARD_PREFIX, ROUND_METRICS, max_local_steps

# The global round number (continues across --resume) that the server adds to the config.
ROUND_KEY = "firm-round"
# Keys Flower or the server add to the ConfigRecord beside the FirmConfig fields.
FLOWER_CONFIG_KEYS = ("server-round", ROUND_KEY)
# Where a node reports its progress inside a round (firm.progress; set by `firm train` for its
# own simulated nodes, whose display reads it).
NODE_PROGRESS_DIR_KEY = "progress-dir"
# The metrics the client app adds to what the trainer's summarize writes (firm.trainer owns those
# keys), as (key, kind); client_metrics fills them.
CLIENT_METRICS = (("partition-id", "scalar"), ("kl_coef", "scalar"), ("preference", "objectives"))
# Metrics every reply carries beside the per-objective rewards.
REPLY_METRICS = ROUND_METRICS + CLIENT_METRICS
# Per-local-step lists (firm.trainer.PER_STEP_METRICS): their length is the number of steps the
# client took or skipped times a width (objectives, objective pairs or 1), checked against the counts.
PER_STEP = -1
# Probability vectors in a reply must sum to 1 within this.
SIMPLEX_TOLERANCE = 1e-6
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
    try:
        return build_config(str(run_config.get(PRESET_KEY, "default")), overrides)
    except ConfigError as err:
        raise ConfigError(run_config_message(str(err))) from None


def run_config_message(message: str) -> str:
    """A settings error in the run config's own words: its keys are kebab-case (num-rounds, not
    num_rounds)."""
    for f in dataclasses.fields(FirmConfig):
        if "_" in f.name:
            message = re.sub(rf"\b{f.name}\b", run_config_key(f.name), message)
    return f"run config: {message}"


# ---- what a client reply must look like, from the server's config alone ------------------------
def objective_names(config: FirmConfig) -> list[str]:
    """The objective names the clients' reward models report (metric keys ``reward/<name>``),
    resolved on the server from the reward specs: a fitted model's name is the ``objective`` of
    its firm_reward.json, every other kind's is its label."""
    names = []
    for spec in config.reward_specs():
        parsed = parse_reward_spec(spec)
        names.append(read_descriptor(Path(parsed.target))["objective"] if parsed.kind == "fitted" else parsed.label)
    return names


def client_metrics(partition_id: int, kl_coef: float, preference: Sequence[float]) -> dict[str, Any]:
    """CLIENT_METRICS for one reply: the node's partition, its KL coefficient after the round and
    the preference p its weights were solved toward."""
    return {"partition-id": partition_id, "kl_coef": float(kl_coef), "preference": list(preference)}


@dataclasses.dataclass(frozen=True)
class ReplySchema:
    """The metrics a client reply must carry (key -> list length, 0 for a scalar) and the bounds
    of its counts. Built from the server's config (``reply_schema``), never from a reply."""

    metrics: Mapping[str, int]
    max_examples: int
    max_steps: int
    max_samples: int = 0
    num_objectives: int = 2


def kind_length(kind: str, num_objectives: int) -> int:
    """A metric kind's list length: 0 for a scalar (a number, not a list), M, or M(M-1)/2."""
    return {"scalar": 0, "objectives": num_objectives, "pairs": num_objectives * (num_objectives - 1) // 2}[kind]


def reply_schema(config: FirmConfig, objectives: list[str] | None = None) -> ReplySchema:
    names = objective_names(config) if objectives is None else objectives
    m = len(names)
    metrics = {f"{REWARD_PREFIX}{name}": 0 for name in names}
    metrics.update({key: kind_length(kind, m) for key, kind in REPLY_METRICS})
    passes = config.algorithm_spec().adapters_uploaded(m)  # fsmgda: one pass per objective
    metrics.update({key: PER_STEP for key, _ in PER_STEP_METRICS})
    return ReplySchema(metrics=metrics, max_examples=config.rollouts_per_round * config.rollout_batch_size,
                       max_steps=passes * max_local_steps(config), max_samples=config.sample_responses,
                       num_objectives=m)


def _is_count(value: Any) -> bool:
    return not isinstance(value, (list, bool)) and float(value).is_integer()


def check_per_step(schema: ReplySchema, metrics: Mapping[str, Any]) -> str | None:
    """The per-step lists: one entry (or one per objective / objective pair) per local step the
    reply says it took or skipped, finite, lambda on the simplex where a step was taken."""
    steps = int(metrics["steps"]) + int(metrics["skipped_steps"])
    m = schema.num_objectives
    widths = {key: max(1, kind_length(kind, m)) for key, kind in PER_STEP_METRICS}
    for key, _ in PER_STEP_METRICS:
        value = metrics[key]
        if not isinstance(value, list) or len(value) != steps * widths[key]:
            got = f"a list of {len(value)}" if isinstance(value, list) else "a number"
            return f"metric {key} must be a list of {steps * widths[key]} ({steps} steps), got {got}"
        if not all(math.isfinite(float(v)) for v in value):
            return f"metric {key} is not finite"
    taken = metrics["step_taken"]
    if any(v not in (0, 1) for v in taken) or sum(taken) != metrics["steps"]:
        return f"metric step_taken must hold {metrics['steps']} ones (steps taken) and zeros, got {taken}"
    for k, was_taken in enumerate(taken):
        weights = metrics["step_lambda"][k * m:(k + 1) * m]
        if was_taken and (min(weights) < 0 or abs(sum(weights) - 1.0) > SIMPLEX_TOLERANCE):
            return f"metric step_lambda at step {k} is not a probability vector ({weights})"
    return None


def check_metrics(schema: ReplySchema, metrics: Mapping[str, Any]) -> str | None:
    """Why a reply's metrics do not fit the schema, or None if they do."""
    missing = sorted(set(schema.metrics) - set(metrics))
    extra = sorted(set(metrics) - set(schema.metrics))
    if missing or extra:
        return f"metric keys differ from the server's schema (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, length in schema.metrics.items():
        value = metrics[key]
        if length == PER_STEP:
            continue  # checked below against the step counts
        if length == 0 and isinstance(value, list):
            return f"metric {key} must be a number, got a list of {len(value)}"
        if length > 0 and (not isinstance(value, list) or len(value) != length):
            got = f"a list of {len(value)}" if isinstance(value, list) else "a number"
            return f"metric {key} must be a list of {length}, got {got}"
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(float(v)) for v in values):
            return f"metric {key} is not finite ({value})"
    examples = metrics["num-examples"]
    if not _is_count(examples) or not 1 <= examples <= schema.max_examples:
        return f"num-examples must be a whole number from 1 to {schema.max_examples}, got {examples}"
    for key in ("steps", "skipped_steps"):
        if not _is_count(metrics[key]) or not 0 <= metrics[key] <= schema.max_steps:
            return f"{key} must be a whole number from 0 to {schema.max_steps}, got {metrics[key]}"
    reason = check_per_step(schema, metrics)
    if reason:
        return reason
    if not _is_count(metrics["partition-id"]) or metrics["partition-id"] < 0:
        return f"partition-id must be a whole number >= 0, got {metrics['partition-id']}"
    if metrics["kl_coef"] < 0:
        return f"kl_coef must be >= 0, got {metrics['kl_coef']}"
    for key in ("lambda_mean", "lambda_last", "preference"):
        weights = metrics[key]
        if min(weights) < 0 or abs(sum(weights) - 1.0) > SIMPLEX_TOLERANCE:
            return f"metric {key} is not a probability vector ({weights})"
    return None


def check_samples(schema: ReplySchema, samples: Mapping[str, Any]) -> str | None:
    """Why a reply's opt-in samples record does not fit, or None if it does."""
    if schema.max_samples == 0:
        return "sent samples the server did not ask for (sample_responses = 0)"
    if set(samples) != {"prompts", "responses"}:
        return f"samples must hold prompts and responses, got {sorted(samples)}"
    prompts, responses = samples["prompts"], samples["responses"]
    if not (isinstance(prompts, list) and isinstance(responses, list) and len(prompts) == len(responses)):
        return "samples must be two lists of the same length"
    if len(prompts) > schema.max_samples:
        return f"sent {len(prompts)} samples, more than sample_responses ({schema.max_samples})"
    if not all(isinstance(t, str) for t in prompts + responses):
        return "samples must be strings"
    return None
