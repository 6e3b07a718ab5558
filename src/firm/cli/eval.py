"""`firm eval`: score an adapter (or the base model) on a prompt set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from firm.config import EVAL_SEED, FirmConfig
from firm.evaluate import evaluate


def add_parser(subparsers) -> None:
    defaults = FirmConfig()
    ev = subparsers.add_parser("eval", help="score an adapter (or the base model) on a prompt set",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("--adapter", help="peft adapter directory (e.g. RUN_DIR/adapters/round-003); omit for the base")
    ev.add_argument("--policy", default=None, help="base model; default: the run's policy, else 'embedded'")
    ev.add_argument("--prompts", default=defaults.prompts)
    ev.add_argument("--rewards", default=defaults.rewards)
    ev.add_argument("--num-prompts", type=int, default=32)
    ev.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    ev.add_argument("--temperature", type=float, default=defaults.temperature)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--seed", type=int, default=EVAL_SEED)
    ev.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    ev.add_argument("--samples", type=int, default=3, help="sample responses to show")
    ev.add_argument("--json", help="also write the result to this JSON file")
    ev.set_defaults(handler=eval_command)


def eval_command(args: argparse.Namespace) -> int:
    result = evaluate(adapter=args.adapter, policy=args.policy, prompts=args.prompts, rewards=args.rewards,
                      num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, batch_size=args.batch_size, seed=args.seed,
                      num_samples=args.samples, device=args.device)
    console = Console()
    console.print(f"[bold]{result['model']}[/] on {result['num_prompts']} prompts from {args.prompts}")
    for name, value in result["rewards"].items():
        console.print(f"  reward {name}: {value:.4f}")
    console.print(f"  KL to base: {result['kl']:.4f} nats/response; mean response tokens {result['response_tokens']:.1f}")
    for sample in result["samples"]:
        console.print(f"\n[bold]prompt:[/] {sample['prompt']}\n[bold]response:[/] {sample['response']}")
        console.print("  " + "  ".join(f"{k}={v:.3f}" for k, v in sample["rewards"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
