"""`firm reward fit` and `firm reward eval`: the command-line face of firm.rewards.

Every FitConfig field is a flag of ``firm reward fit`` (``--lora-r 8``); defaults and help come
from firm.rewards.fit_config, the one source of truth. Bad input raises a FirmError
(PairFileError, RewardModelError, RewardSpecError, ConfigError) that the top-level CLI prints
as one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from firm.preflight import check_reward_spec
from firm.cli.flags import add_dataclass_flags, check_output_folder, dataclass_overrides
from firm.config import ConfigError
from firm.rewards import RewardModel, build_reward
from firm.rewards.errors import RewardModelError
from firm.rewards.fit_config import FitConfig
from firm.rewards.pairs import load_pairs, split_by_prompt
from firm.rewards.pairwise import evaluate_pairs, hh_scorer
from firm.rewards.pipeline import fit_from_source

PAIRS_HELP = ("pairs: .jsonl / .jsonl.gz / .json / .json.gz with HH-RLHF 'chosen'/'rejected' transcripts or "
              "'prompt'/'chosen'/'rejected' records, or hf:OWNER/NAME[/DATA_DIR][:SPLIT]")


def add_parser(subparsers) -> None:
    """Register ``reward fit`` and ``reward eval`` on an argparse subparsers object."""
    reward = subparsers.add_parser("reward", help="fit and evaluate Bradley-Terry reward models")
    commands = reward.add_subparsers(dest="reward_command", required=True)

    fit = commands.add_parser(
        "fit", help="train a reward model on preference pairs",
        description="Fit a Bradley-Terry reward model (LoRA + scalar head, or a linear probe) on preference "
                    "pairs, hold out part of the prompts, report held-out accuracy and save a loadable directory.")
    fit.add_argument("--data", required=True, help=PAIRS_HELP)
    fit.add_argument("--out", required=True, help="output directory (created)")
    fit.add_argument("--test-fraction", type=float, default=0.2, help="share of prompts held out (default 0.2)")
    fit.add_argument("--split-seed", type=int, default=0, help="seed of the prompt split (default 0)")
    fit.add_argument("--max-train-pairs", type=int, default=None,
                     help="subsample the training part to this many pairs (the held-out part is never cut)")
    fit.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_dataclass_flags(fit, FitConfig, "fit settings (defaults from firm.rewards.fit_config)")
    fit.set_defaults(handler=reward_fit_command)

    evaluate = commands.add_parser(
        "eval", help="pairwise accuracy of a reward model on preference pairs",
        description="Pairwise accuracy (95%% bootstrap CI), mean reward margin and reward-length correlation "
                    "of any reward the project can load, on a pairs file.")
    evaluate.add_argument("--model", required=True,
                          help="reward spec: embedded:helpful, embedded:harmless, a fitted directory, hf:NAME, ...")
    evaluate.add_argument("--data", required=True, help="pairs file or hf:OWNER/NAME[/DATA_DIR][:SPLIT] (as for fit)")
    evaluate.add_argument("--split", choices=("all", "train", "test"), default="all",
                          help="score every pair, or one side of the prompt split fit makes (default all)")
    evaluate.add_argument("--test-fraction", type=float, default=0.2, help="as in fit; used with --split")
    evaluate.add_argument("--split-seed", type=int, default=0, help="as in fit; used with --split")
    evaluate.add_argument("--limit", type=int, default=None, help="read at most this many pairs")
    evaluate.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON")
    evaluate.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    evaluate.set_defaults(handler=reward_eval_command)


def fit_config(args: argparse.Namespace) -> FitConfig:
    """The FitConfig of a `firm reward fit` command line; the objective defaults to the out directory's name."""
    overrides = dataclass_overrides(args, FitConfig)
    overrides.setdefault("objective", Path(args.out).name)
    return FitConfig(**overrides).validate()


def reward_fit_command(args: argparse.Namespace) -> int:
    """`firm reward fit`: load, split, fit, evaluate held-out pairs, save."""
    _set_threads(args.threads)
    config = fit_config(args)
    check_output_folder(args.out)
    result = fit_from_source(args.data, args.out, config, test_fraction=args.test_fraction,
                             split_seed=args.split_seed, max_train_pairs=args.max_train_pairs,
                             log=lambda line: print(line, flush=True))
    print(f"saved {result.output_dir} (trained on {result.n_train} pairs, held out {result.n_test})")
    return 0


def reward_eval_command(args: argparse.Namespace) -> int:
    """`firm reward eval`: score every pair (or one split side) with any loadable reward."""
    _set_threads(args.threads)
    for flag, value in (("--bootstrap", args.bootstrap), ("--batch-size", args.batch_size), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    pairs = load_pairs(args.data, limit=args.limit)
    if args.split != "all":
        try:
            train, test = split_by_prompt(pairs, args.test_fraction, args.split_seed)
        except ValueError as error:
            raise RewardModelError(f"{args.data}: {error}") from None
        pairs = test if args.split == "test" else train
        if not pairs:
            raise RewardModelError(f"{args.data}: the {args.split} side of the split is empty")
    reward = _build_reward(args.model)
    report = evaluate_pairs(hh_scorer(reward), pairs, batch_size=args.batch_size, n_bootstrap=args.bootstrap)
    if args.json:
        print(json.dumps({"model": args.model, "data": str(args.data), "split": args.split, **report.as_dict()}))
    else:
        print(f"{args.model} on {args.data} ({args.split}):\n{report.format()}")
    return 0


def _build_reward(spec: str) -> RewardModel:
    """Whatever ``firm.rewards.build_reward`` accepts (a seam: tests substitute a hand-made reward)."""
    check_reward_spec(spec)
    return build_reward(spec)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
