"""What the ServerApp and the ClientApp agree on: message keys, node-state names and how the
run's FirmConfig travels (a ConfigRecord each round; run-config keys under `flwr run`).

Both apps import this module and nothing of each other, as in Flower's examples.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ConfigRecord

from firm.config import ConfigError, FirmConfig, build_config
from firm.rewards import parse_reward_spec
from firm.rewards.descriptor import read_descriptor

# The global round number (continues across --resume) that the server adds to the config.
ROUND_KEY = "firm-round"
# Keys Flower or the server add to the ConfigRecord beside the FirmConfig fields.
FLOWER_CONFIG_KEYS = ("server-round", ROUND_KEY)
# The node state that survives between rounds (in memory; on disk see firm.federation.client_app).
STATE_VALUE_HEAD = "firm.value_head"
STATE_CLIENT = "firm.client_state"
STATE_OPTIMIZER = "firm.optimizer"
# A deployed node's own directory for its state (node config: --node-config "state-dir=PATH").
NODE_STATE_DIR_KEY = "state-dir"
# Node-side choices (node config keys) the server cannot override.
NODE_PROMPTS_KEY = "prompts"
NODE_SAMPLES_KEY = "sample-responses"
NODE_ALLOW_SERVER_PATHS_KEY = "allow-server-paths"
# Where a node reports its progress inside a round (firm.progress; set by `firm train` for its
# own simulated nodes, whose display reads it).
NODE_PROGRESS_DIR_KEY = "progress-dir"
# Metrics every reply carries beside the per-objective rewards, as (key, kind): "scalar",
# "objectives" (a list of M) or "pairs" (a list of M(M-1)/2). firm.trainer.summarize writes them;
# the client app adds partition-id, kl_coef and preference (the p its weights were solved toward).
REPLY_METRICS = (
    ("kl", "scalar"), ("response_tokens", "scalar"), ("lambda_mean", "objectives"), ("lambda_last", "objectives"),
    ("grad_cosine", "pairs"), ("policy_loss", "scalar"), ("value_loss", "scalar"), ("approx_kl", "scalar"),
    ("clipfrac", "scalar"), ("steps", "scalar"), ("skipped_steps", "scalar"), ("num-examples", "scalar"),
    ("partition-id", "scalar"), ("kl_coef", "scalar"), ("preference", "objectives"),
)
# Per-local-step lists (firm.trainer.summarize): their length is the number of steps the client
# took or skipped times a width (objectives, objective pairs or 1), checked against the counts.
PER_STEP = -1
PER_STEP_METRICS = ("step_lambda", "step_gram_distance", "step_cosine", "step_norm_ratio", "step_taken")
REWARD_PREFIX = "reward/"
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


def max_local_steps(config: FirmConfig) -> int:
    """Optimiser steps one local pass can take in a round (firm.trainer.ppo_epochs over a rollout
    batch of n <= rollout_batch_size prompts: n // max(1, n // num_minibatches) minibatches)."""
    per_epoch = max(n // max(1, n // config.num_minibatches) for n in range(1, config.rollout_batch_size + 1))
    return config.rollouts_per_round * config.ppo_epochs * per_epoch


def honest_step_ceiling(config: FirmConfig, num_parameters: int) -> float:
    """The L2 norm of the largest update an honest client's pass can make: AdamW moves each
    coordinate by about learning_rate per step (Adam's normalised step), so at most
    learning_rate x steps x sqrt(parameters), reached only if every coordinate moves the same way
    every step; SGD moves by learning_rate x the clipped gradient, at most
    learning_rate x max_grad_norm per step."""
    per_step = config.max_grad_norm if config.optimizer == "sgd" else math.sqrt(num_parameters)
    return config.learning_rate * max_local_steps(config) * per_step


# max_update_norm = 0 (auto) allows this multiple of the honest ceiling. Measured honest updates
# (L2 of client adapter - global adapter):
# - tiny test model (tests/test_cli.py: 3,584 LoRA parameters, 1 step per round, ceiling 0.0180):
#   round 1 0.0115 (only lora_B moves: 3e-4 x sqrt(1,536)), round 2 0.0171-0.0175, i.e. 97% of
#   the ceiling: a one-step round moves nearly every coordinate by learning_rate;
# - embedded SmolLM2, default config (921,600 parameters, 4 steps, ceiling 1.15; 6 with a
#   3-prompt shard, 1.73): root-mean-square client update 0.60 in round 1, 0.69 in round 2 (from
#   a 4-client run's global updates and adapter_distance: mean |u_c|^2 = |mean u|^2 + mean
#   |u_c - mean u|^2), 52-60% of the ceiling.
# Twice the ceiling leaves room for AdamW's weight decay and Adam's occasional per-coordinate step
# above learning_rate, while a hostile reply (x10^6, or any update many times an honest one) fails.
AUTO_UPDATE_BOUND_FACTOR = 2.0


def update_bound(config: FirmConfig, num_parameters: int) -> float:
    """The largest accepted L2 distance of a client adapter from the global adapter."""
    if config.max_update_norm > 0:
        return config.max_update_norm
    return AUTO_UPDATE_BOUND_FACTOR * honest_step_ceiling(config, num_parameters)


@dataclasses.dataclass(frozen=True)
class ReplySchema:
    """The metrics a client reply must carry (key -> list length, 0 for a scalar) and the bounds
    of its counts. Built from the server's config (``reply_schema``), never from a reply."""

    metrics: Mapping[str, int]
    max_examples: int
    max_steps: int
    max_samples: int = 0
    num_objectives: int = 2


def reply_schema(config: FirmConfig, objectives: list[str] | None = None) -> ReplySchema:
    names = objective_names(config) if objectives is None else objectives
    m = len(names)
    lengths = {"scalar": 0, "objectives": m, "pairs": m * (m - 1) // 2}
    metrics = {f"{REWARD_PREFIX}{name}": 0 for name in names}
    metrics.update({key: lengths[kind] for key, kind in REPLY_METRICS})
    passes = config.algorithm_spec().adapters_uploaded(m)  # fsmgda: one pass per objective
    metrics.update({key: PER_STEP for key in PER_STEP_METRICS})
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
    widths = {"step_lambda": m, "step_gram_distance": m * (m - 1) // 2, "step_cosine": m * (m - 1) // 2,
              "step_norm_ratio": 1, "step_taken": 1}
    for key in PER_STEP_METRICS:
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
