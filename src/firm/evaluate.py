"""`firm eval`: score a peft adapter (or the base model) on a prompt set.

Scores, by default, the evaluation split of the prompt set that no client trains on
(firm.partition.split_evaluation), with one or more samples per prompt. Reports the mean
reward per objective over sampled responses, the KL of the adapted policy to
the base (the sum over response tokens of log pi(y) - log pi_base(y), averaged over responses:
an unbiased Monte Carlo estimate of KL(pi || pi_base)), and a few sample responses.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.utils import CONFIG_NAME

from firm.config import EVAL_SEED, ConfigError, FirmConfig
from firm.model_card import POLICY_KEY, policy_for_base, read_card
from firm.models import load_policy, resolve_device
from firm.partition import split_evaluation
from firm.preflight import check_adapter, check_context, check_policy, check_reward_spec
from firm.prompts import Prompt, load_prompts
from firm.rewards import build_rewards
from firm.sampling import generate, policy_forward
from firm.trainer import score_responses

EVAL_SPLITS = ("eval", "all")


def infer_policy(adapter: str | None) -> str:
    """The base model an adapter names in its adapter_config.json (its FIRM model card says when
    that hub id was trained on as the embedded, offline weights), else 'embedded'."""
    if adapter is None:
        return "embedded"
    adapter_config = Path(adapter) / CONFIG_NAME
    try:
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise ConfigError(f"{adapter_config}: not a readable adapter config ({err})") from None
    return policy_for_base(base, read_card(adapter).get(POLICY_KEY))


@dataclass
class EvalConfig:
    """What `firm eval` scores, and how (its flags are generated from these fields). For an
    adapter inside a run directory, the settings in RUN_SETTINGS default to the run's own."""

    adapter: str | None = None
    """peft adapter directory (e.g. RUN_DIR/adapters/round-003); none = the base model"""
    policy: str | None = None
    """base model; none = the adapter's base (its run's policy or adapter_config), else 'embedded'"""
    prompts: str = FirmConfig.prompts
    """prompt source (as for firm train)"""
    split: str = "eval"
    """which prompts: eval (the held-out split no client trains on) or all"""
    eval_fraction: float = FirmConfig.eval_fraction
    """size of the held-out split (must match the training run's eval_fraction)"""
    rewards: str = FirmConfig.rewards
    """comma-separated reward specs, one per objective"""
    num_prompts: int = 32
    """prompts to score (drawn with the seed from the chosen split; fewer if the split is smaller)"""
    samples_per_prompt: int = 1
    """responses sampled per prompt (rewards and KL are averaged over all of them)"""
    max_new_tokens: int = FirmConfig.max_new_tokens
    """length limit of sampled responses"""
    temperature: float = FirmConfig.temperature
    """sampling temperature"""
    batch_size: int = 8
    """prompts per generation batch"""
    seed: int = EVAL_SEED
    """sampling seed: the same for every adapter, so comparisons between adapters are paired"""
    device: str = FirmConfig.device
    """auto, cpu, cuda or cuda:N"""
    show_samples: int = 3
    """sample responses to include in the result"""

    def validate(self) -> "EvalConfig":
        for name in ("num_prompts", "samples_per_prompt", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.split not in EVAL_SPLITS:
            raise ConfigError(f"split must be one of {EVAL_SPLITS}, got {self.split!r}")
        if self.show_samples < 0:
            raise ConfigError(f"show_samples must be >= 0, got {self.show_samples}")
        if self.adapter is not None:
            check_adapter(self.adapter)
        return self


# What an adapter's own run decides unless the user says otherwise: its base model, its prompts
# and their held-out split, its rewards and its sampling.
RUN_SETTINGS = ("policy", "prompts", "eval_fraction", "rewards", "max_new_tokens", "temperature")


def run_settings(adapter: str | None) -> dict[str, Any]:
    """The RUN_SETTINGS of the run an adapter sits in (RUN_DIR/adapters/round-NNN); {} for an
    adapter outside a run directory."""
    run_config = Path(adapter).parent.parent / "config.json" if adapter else None
    if run_config is None or not run_config.is_file():
        return {}
    run = FirmConfig.load(run_config)
    return {name: getattr(run, name) for name in RUN_SETTINGS}


def settings_taken_from_run(overrides: dict) -> dict[str, Any]:
    """The settings `firm eval` takes from the adapter's run: its RUN_SETTINGS the user did not set."""
    return {k: v for k, v in run_settings(overrides.get("adapter")).items() if k not in overrides}


def eval_config_for(overrides: dict) -> EvalConfig:
    """EvalConfig from the user's settings, the rest taken from the adapter's run when the
    adapter sits in a run directory (RUN_DIR/adapters/round-NNN), else the defaults."""
    return EvalConfig(**{**run_settings(overrides.get("adapter")), **overrides}).validate()


def evaluation_prompts(cfg: EvalConfig) -> list[Prompt]:
    """The prompts to score: the held-out split (or all), then ``num_prompts`` of them drawn with
    the seed, each repeated ``samples_per_prompt`` times."""
    prompts = load_prompts(cfg.prompts)
    if cfg.split == "eval":
        prompts = split_evaluation(prompts, cfg.eval_fraction)[1]
        if not prompts:
            raise ConfigError("split 'eval' is empty: eval_fraction is 0 (score with --split all)")
    chosen = random.Random(cfg.seed).sample(prompts, k=min(cfg.num_prompts, len(prompts)))
    return [p for p in chosen for _ in range(cfg.samples_per_prompt)]


def evaluate(cfg: EvalConfig) -> dict:
    cfg.validate()
    policy = cfg.policy or infer_policy(cfg.adapter)
    run_cfg = FirmConfig(policy=policy, prompts=cfg.prompts, rewards=cfg.rewards, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, device=cfg.device).validate()
    torch_device = resolve_device(run_cfg.device)
    prompt_set = evaluation_prompts(cfg)
    for spec in run_cfg.reward_specs():  # everything checked before the first model loads
        check_reward_spec(spec)
    check_policy(policy)
    check_context(policy, run_cfg.max_prompt_tokens, run_cfg.max_new_tokens)
    reward_models = build_rewards(run_cfg.reward_specs(), device=str(torch_device))
    model, tokenizer = load_policy(policy, run_cfg.dtype)
    if cfg.adapter is not None:
        try:
            model = PeftModel.from_pretrained(model, cfg.adapter)
        except Exception as err:  # safetensors, peft and torch each raise their own type for a broken file
            raise ConfigError(f"adapter {cfg.adapter} could not be loaded: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else 'no detail'}") from err
    model.to(torch_device).eval()
    torch.manual_seed(cfg.seed)
    scores, kls, lengths, samples = [], [], [], []
    for start in range(0, len(prompt_set), cfg.batch_size):
        batch = prompt_set[start : start + cfg.batch_size]
        gen = generate(model, tokenizer, batch, run_cfg)
        T = gen.response_mask.shape[1]
        if cfg.adapter is not None:
            with torch.no_grad():
                logprobs, _ = policy_forward(model, gen.input_ids, gen.attention_mask, T, run_cfg.temperature)
                with model.disable_adapter():
                    ref, _ = policy_forward(model, gen.input_ids, gen.attention_mask, T, run_cfg.temperature)
            kls.append(((logprobs - ref) * gen.response_mask).sum(-1).cpu())
        else:
            kls.append(torch.zeros(len(batch)))
        batch_scores = score_responses(reward_models, batch, gen.responses)
        scores.append(batch_scores)
        lengths.append(gen.response_mask.sum(-1).cpu())
        for p, r, s in zip(batch, gen.responses, batch_scores):
            if len(samples) < cfg.show_samples:
                samples.append({"prompt": p.text, "response": r,
                                "rewards": {m.name: float(v) for m, v in zip(reward_models, s)}})
    all_scores = torch.cat(scores).double()
    return {
        "model": f"{policy} + {cfg.adapter}" if cfg.adapter else f"{policy} (base)",
        "settings": {**dataclasses.asdict(cfg), "policy": policy},
        "split": cfg.split,
        "pairing": pairing_key(cfg, policy),
        "num_prompts": len(prompt_set) // cfg.samples_per_prompt,
        "samples_per_prompt": cfg.samples_per_prompt,
        "rewards": {m.name: float(all_scores[:, i].mean()) for i, m in enumerate(reward_models)},
        "reward_std": {m.name: float(all_scores[:, i].std()) for i, m in enumerate(reward_models)},
        "kl": float(torch.cat(kls).double().mean()),
        "response_tokens": float(torch.cat(lengths).double().mean()),
        "samples": samples,
        # one row per sampled response, in prompt order (samples_per_prompt rows per prompt):
        # what a paired comparison against another adapter on the same prompts needs
        "per_response": {
            "prompt_index": [i // cfg.samples_per_prompt for i in range(len(prompt_set))],
            "rewards": all_scores.tolist(),
            "kl": torch.cat(kls).double().tolist(),
        },
    }


def pairing_key(cfg: EvalConfig, policy: str) -> dict:
    """What must be equal for two evaluations to be paired response by response: the same
    prompts in the same order, the same number of samples, the same sampling settings and seed,
    the same base model and rewards."""
    return {"policy": policy, "prompts": cfg.prompts, "split": cfg.split, "eval_fraction": cfg.eval_fraction,
            "rewards": cfg.rewards, "num_prompts": cfg.num_prompts, "samples_per_prompt": cfg.samples_per_prompt,
            "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": cfg.seed}
