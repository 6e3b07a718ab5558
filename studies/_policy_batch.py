"""Set-up shared by the studies: the generation flags and default-preset config of the reward
studies (bench_reward_cost.py, reward_conflict.py), and the seeded policy, reward models and
fresh critic of the trainer studies (gradient_geometry.py, gram_agreement.py, knob_lambda.py,
bf16_sampling.py)."""

from __future__ import annotations

import argparse

import torch

from firm.config import FirmConfig, build_config
from firm.models import MultiObjectiveValueHead, get_policy
from firm.rewards import build_rewards


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """--batch-size, --max-new-tokens, --threads and --seed, as both scripts read them."""
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a busy shared CPU, token-by-token decoding "
                             "with several threads can stall on thread synchronisation)")
    parser.add_argument("--seed", type=int, default=0)


def sampling_config(args: argparse.Namespace, **overrides):
    """Apply --threads and --seed, and return the "default" preset's config with the batch
    size, --max-new-tokens and ``overrides`` set."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    overrides["rollout_batch_size"] = args.batch_size
    if args.max_new_tokens is not None:
        overrides["max_new_tokens"] = args.max_new_tokens
    return build_config("default", overrides)


def seeded_policy(config: FirmConfig, seed: int):
    """(policy, tokenizer, reward models) for ``config``; the LoRA's random A matrices come from
    ``seed``, so every run of a study starts from the same adapter."""
    torch.manual_seed(seed)
    policy, tokenizer = get_policy(config)
    return policy, tokenizer, build_rewards(config.reward_specs())


def fresh_value_head(policy, rewards) -> MultiObjectiveValueHead:
    """A new critic for ``policy`` with one output per reward model."""
    return MultiObjectiveValueHead(policy.get_base_model().config.hidden_size, len(rewards))
