"""`firm eval`: score an adapter (or the base model) on the held-out prompts."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rich.console import Console

from firm.cli.flags import add_dataclass_flags, dataclass_overrides
from firm.config import ConfigError
from firm.evaluate import EvalConfig, eval_config_for, evaluate


def add_parser(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="score an adapter (or the base model) on the held-out prompts")
    add_dataclass_flags(ev, EvalConfig, "evaluation (defaults from firm.evaluate.EvalConfig)")
    ev.add_argument("--json", help="also write the result to this JSON file")
    ev.set_defaults(handler=eval_command)


def check_writable(path: str) -> None:
    """Fail before a long evaluation, not after it, when the result cannot be written."""
    folder = Path(path).resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK) or Path(path).is_dir():
        raise ConfigError(f"--json {path}: cannot write there (no such folder, or not writable)")


def eval_command(args: argparse.Namespace) -> int:
    cfg = eval_config_for(dataclass_overrides(args, EvalConfig))
    if args.json:
        check_writable(args.json)
    result = evaluate(cfg)
    console = Console()
    console.print(f"[bold]{result['model']}[/] on {result['num_prompts']} prompts x {result['samples_per_prompt']} "
                  f"samples from {cfg.prompts} (split: {result['split']})")
    for name, value in result["rewards"].items():
        console.print(f"  reward {name}: {value:.4f}")
    console.print(f"  KL to base: {result['kl']:.4f} nats/response; mean response tokens {result['response_tokens']:.1f}")
    for sample in result["samples"]:
        console.print(f"\n[bold]prompt:[/] {sample['prompt']}\n[bold]response:[/] {sample['response']}")
        console.print("  " + "  ".join(f"{k}={v:.3f}" for k, v in sample["rewards"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
