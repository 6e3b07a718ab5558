"""`firm eval`: score an adapter (or the base model) on the held-out prompts."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rich.console import Console

from firm.cli.flags import add_dataclass_flags, dataclass_overrides
from firm.config import ConfigError
from firm.evaluate import RUN_SETTINGS, EvalConfig, eval_config_for, evaluate, infer_policy, settings_taken_from_run
from firm.model_card import check_card, write_heldout


def add_parser(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="score an adapter (or the base model) on the held-out prompts")
    add_dataclass_flags(ev, EvalConfig, "evaluation (defaults from firm.evaluate.EvalConfig)",
                        default_notes={name: "the adapter's run's, else {shown}" for name in RUN_SETTINGS})
    ev.add_argument("--json", help="also write the result, with the settings used, to this JSON file")
    ev.add_argument("--write-card", action="store_true",
                    help="also write the result into the adapter's model card (its README.md)")
    ev.set_defaults(handler=eval_command)


def check_writable(path: str) -> None:
    """Fail before a long evaluation, not after it, when the result cannot be written."""
    folder = Path(path).resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK) or Path(path).is_dir():
        raise ConfigError(f"--json {path}: cannot write there (no such folder, or not writable)")


def provenance_line(from_run: dict, adapter: str | None, policy_set: bool) -> str | None:
    """Which settings came from somewhere the user did not type: the adapter's run, or (for an
    adapter outside a run) the base its config and card name."""
    parts = []
    if from_run:
        parts.append(f"from the adapter's run ({Path(adapter).parent.parent}): "
                     + ", ".join(f"{k}={v}" for k, v in from_run.items()))
    if adapter is not None and not policy_set and "policy" not in from_run:
        parts.append(f"base from the adapter's config and card: policy={infer_policy(adapter)}")
    return "; ".join(parts) if parts else None


def eval_command(args: argparse.Namespace) -> int:
    overrides = dataclass_overrides(args, EvalConfig)
    cfg = eval_config_for(overrides)
    if args.json:
        check_writable(args.json)
    if args.write_card:
        if cfg.adapter is None:
            raise ConfigError("--write-card needs --adapter (the base model has no card of ours)")
        check_card(cfg.adapter)
    from_run = settings_taken_from_run(overrides)
    console = Console(soft_wrap=True)
    note = provenance_line(from_run, cfg.adapter, "policy" in overrides)
    if note:
        console.print(f"settings {note}", highlight=False)
    result = evaluate(cfg)
    result["settings_from_run"] = sorted(from_run)
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
    if args.write_card:
        write_heldout(Path(cfg.adapter), result)
    return 0
