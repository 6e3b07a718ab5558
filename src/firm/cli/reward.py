"""`firm reward fit` and `firm reward eval`: the command-line face of firm.reward_model.

Bad input raises a FirmError (PairFileError, RewardModelError) that the top-level CLI prints
as one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from firm.reward_model import (
    BACKBONES,
    HEADS,
    FitConfig,
    RewardModelError,
    evaluate_pairs,
    fit_from_source,
    hh_to_messages,
    load_pairs,
    split_by_prompt,
)

_DEFAULTS = FitConfig()


def add_parser(subparsers) -> None:
    """Register ``reward fit`` and ``reward eval`` on an argparse subparsers object."""
    reward = subparsers.add_parser("reward", help="fit and evaluate Bradley-Terry reward models")
    commands = reward.add_subparsers(dest="reward_command", required=True)

    fit = commands.add_parser(
        "fit", help="train a reward model on preference pairs",
        description="Fit a Bradley-Terry reward model (LoRA + scalar head) on preference pairs, hold out "
                    "part of the prompts, report held-out accuracy and save a loadable directory.")
    fit.add_argument("--data", required=True,
                     help="pairs: .jsonl / .jsonl.gz with HH-RLHF 'chosen'/'rejected' transcripts or "
                          "'prompt'/'chosen'/'rejected' records, or hf:OWNER/NAME[/DATA_DIR][:SPLIT]")
    fit.add_argument("--out", required=True, help="output directory (created)")
    fit.add_argument("--objective", default=None,
                     help="objective label stored in the model, e.g. helpful or harmless (default: the out directory's name)")
    fit.add_argument("--backbone", choices=sorted(BACKBONES), default=_DEFAULTS.backbone,
                     help="minilm: MiniLM-L6 cross-encoder (fast, the default); smollm2: the embedded SmolLM2-135M causal LM")
    fit.add_argument("--base-path", default=None,
                     help="a local Hugging Face model directory to use instead of the backbone's packaged weights")
    fit.add_argument("--num-layers", type=int, default=_DEFAULTS.num_layers,
                     help="keep only the first N transformer blocks of the backbone: scoring then costs N / all "
                          "of a full forward pass (default: all blocks)")
    fit.add_argument("--chat-template", action="store_true",
                     help="causal-LM backbones: read the conversation in the tokenizer's chat template, as the "
                          "chat policy writes it (default: HH plain text)")
    fit.add_argument("--head", choices=HEADS, default=_DEFAULTS.head,
                     help="lora: LoRA adapters + scalar head trained end to end (default); probe: frozen backbone "
                          "and a linear head on its top block, L2 picked by cross-validation over prompts")
    fit.add_argument("--probe-l2", type=_float_list, default=_DEFAULTS.probe_l2,
                     help="probe head: comma-separated L2 strengths to cross-validate (default "
                          f"{','.join(f'{v:g}' for v in _DEFAULTS.probe_l2)})")
    fit.add_argument("--test-fraction", type=float, default=0.2, help="share of prompts held out (default 0.2)")
    fit.add_argument("--split-seed", type=int, default=0, help="seed of the prompt split (default 0)")
    fit.add_argument("--max-train-pairs", type=int, default=None,
                     help="subsample the training part to this many pairs (the held-out part is never cut)")
    fit.add_argument("--epochs", type=int, default=_DEFAULTS.epochs)
    fit.add_argument("--learning-rate", type=float, default=_DEFAULTS.learning_rate)
    fit.add_argument("--batch-pairs", type=int, default=_DEFAULTS.batch_pairs)
    fit.add_argument("--lora-r", type=int, default=_DEFAULTS.lora_r)
    fit.add_argument("--trainable-layers", type=int, default=_DEFAULTS.trainable_layers,
                     help="adapt only the top N transformer blocks; the frozen blocks below run once and are "
                          "cached, which makes each epoch much cheaper (default: all blocks)")
    fit.add_argument("--max-length", type=int, default=_DEFAULTS.max_length)
    fit.add_argument("--max-response-tokens", type=int, default=_DEFAULTS.max_response_tokens)
    fit.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="training seed")
    fit.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    fit.set_defaults(handler=run_fit)

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
    evaluate.set_defaults(handler=run_eval)


def run_fit(args: argparse.Namespace) -> int:
    """`firm reward fit`: load, split, fit, evaluate held-out pairs, save."""
    _set_threads(args.threads)
    objective = args.objective or Path(args.out).name
    config = FitConfig(
        objective=objective, backbone=args.backbone, base_path=args.base_path, num_layers=args.num_layers,
        chat_template=args.chat_template, head=args.head, probe_l2=args.probe_l2, epochs=args.epochs,
        learning_rate=args.learning_rate, batch_pairs=args.batch_pairs, lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r, trainable_layers=args.trainable_layers, max_length=args.max_length, max_response_tokens=args.max_response_tokens,
        seed=args.seed)
    result = fit_from_source(args.data, args.out, config, test_fraction=args.test_fraction,
                             split_seed=args.split_seed, max_train_pairs=args.max_train_pairs,
                             log=lambda line: print(line, flush=True))
    print(f"saved {result.output_dir} (trained on {result.n_train} pairs, held out {result.n_test})")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """`firm reward eval`: score every pair (or one split side) with any loadable reward."""
    _set_threads(args.threads)
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


def _build_reward(spec: str):
    """Whatever ``firm.rewards.build_reward`` accepts; imported late to keep start-up fast."""
    from firm.rewards import build_reward

    return build_reward(spec)


def hh_scorer(reward: Any):
    """Adapt a reward (``score(prompts, responses)`` on ``firm.prompts.Prompt``) to the HH
    prompt strings that pair files hold. Fitted models take HH text directly."""
    if hasattr(reward, "score_hh"):
        return reward.score_hh

    from firm.prompts import Prompt

    def score(hh_prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        prompts = [Prompt(messages=hh_to_messages(text), category="eval") for text in hh_prompts]
        return reward.score(prompts, list(responses))

    return score


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
