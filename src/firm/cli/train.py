"""`firm train`: federated FIRM training on Flower's simulation engine.

Every FirmConfig field is a flag (``--rollout-batch-size 16``); defaults and help come from
firm.config, the one source of truth.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn
from rich.table import Table

from firm.cli.flags import add_dataclass_flags, dataclass_overrides
from firm.config import PRESETS, ConfigError, FirmConfig, build_config
from firm.federation.simulation import preflight, run_simulation
from firm.rundir import RunDir, default_run_dir


def add_parser(subparsers) -> None:
    train = subparsers.add_parser("train", help="run federated FIRM training (Flower simulation engine)")
    add_train_arguments(train)
    train.set_defaults(handler=train_command)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `firm train` (the experiment harness parses its pass-through flags with them)."""
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="named set of settings")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run after its last completed round")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    add_dataclass_flags(parser, FirmConfig, "settings (defaults from firm.config; a preset overrides some)")


def config_overrides(args: argparse.Namespace) -> dict[str, object]:
    return dataclass_overrides(args, FirmConfig)


class Progress:
    """A rich progress bar over rounds with a line per finished round."""

    def __init__(self, total_rounds: int, done: int):
        self.console = Console(stderr=True)
        self.progress = RichProgress(TextColumn("[bold]FIRM[/] round"), MofNCompleteColumn(), BarColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.description}"), console=self.console)
        self.task = self.progress.add_task("", total=total_rounds, completed=done)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def on_round(self, result) -> None:
        r = result.round_record
        rewards = "  ".join(f"{k.split('/', 1)[1]}={v:.3f}" for k, v in r.items() if k.startswith("reward/"))
        lam = ", ".join(f"{x:.2f}" for x in r["lambda_mean"])
        self.progress.console.print(
            f"round {r['round']}: {rewards}  kl={r['kl']:.3f}  lambda=[{lam}] (std {max(r['lambda_std']):.3f})"
            f"  up {r['bytes_up_per_client'] / 1e6:.2f} MB/client  rejected={len(r['rejected'])}")
        self.progress.update(self.task, completed=r["round"], description=rewards)


def print_summary(run_path: Path, wall_seconds: float) -> None:
    run = RunDir.open(run_path)
    rounds = [r for r in run.read_metrics() if r.get("type") == "round"]
    console = Console(width=max(Console().width, 110))
    if not rounds:
        console.print("no completed round")
        return
    keys = [k for k in rounds[0] if k.startswith("reward/")]
    table = Table(title=f"FIRM run {run_path}")
    table.add_column("round", justify="right")
    for k in keys:
        table.add_column(k.split("/", 1)[1], justify="right")
    for name in ("KL", "lambda mean", "lambda std", "adapter dist", "KB up/down per client"):
        table.add_column(name, justify="right")
    for r in rounds:
        table.add_row(str(r["round"]), *(f"{r[k]:.4f}" for k in keys), f"{r['kl']:.4f}",
                      "/".join(f"{x:.3f}" for x in r["lambda_mean"]),
                      "/".join(f"{x:.3f}" for x in r["lambda_std"]),
                      f"{r['adapter_distance']:.4f}",
                      f"{r['bytes_up_per_client'] / 1e3:.0f}/{r['bytes_down_per_client'] / 1e3:.0f}")
    console.print(table)
    console.print(f"wall time {wall_seconds:.0f} s; final adapter: {run.last_adapter()}; plots: {run.plots_dir}; "
                  f"metrics: {run.path / 'metrics.jsonl'}")


def train_command(args: argparse.Namespace) -> int:
    overrides = config_overrides(args)
    if args.resume:
        run = RunDir.open(args.resume)
        config = run.config()
        extra = sorted(set(overrides) - {"num_rounds"})
        if extra:
            raise ConfigError(f"a resumed run keeps its settings; only --num-rounds may change (got {extra})")
        if "num_rounds" in overrides:
            config.num_rounds = int(overrides["num_rounds"])
            config.validate()
            run.save_config(config)
        if run.completed_rounds >= config.num_rounds:
            print(f"{run.path}: all {config.num_rounds} rounds are done; pass --num-rounds N to train further")
            return 0
    else:
        config = build_config(args.preset, overrides)
        preflight(config)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        run = RunDir.create(config.run_dir or default_run_dir(args.preset), config)
    done = run.completed_rounds
    print(f"FIRM: {config.num_clients} clients x {config.num_rounds} rounds ({config.algorithm}, beta "
          f"{config.effective_beta()}), policy {config.policy}, rewards {config.rewards}; run dir {run.path}"
          + (f" (resuming after round {done})" if done else ""), file=sys.stderr)

    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    start = time.perf_counter()
    with Progress(config.num_rounds, done) as progress:
        run_simulation(config, run.path, verbose=args.verbose, on_round=progress.on_round)
    wall = time.perf_counter() - start
    state = run.state()
    print_summary(run.path, wall)
    if state["completed_rounds"] < config.num_rounds:
        print(stop_message(state, config.num_rounds, run.path), file=sys.stderr)
        return 1
    if config.heldout_prompts:
        print_heldout(run, config)
    return 0


def print_heldout(run: RunDir, config: FirmConfig) -> None:
    """The run's last line: held-out reward of the untrained policy against the final adapter,
    paired, with the gain's 95% interval (firm.heldout); also RUN_DIR/heldout.json and a plot."""
    from firm.heldout import format_gains, heldout_before_after
    from firm.plots import plot_heldout

    start = time.perf_counter()
    record = heldout_before_after(run.path, run.last_adapter(), config.heldout_prompts, config.heldout_samples)
    run.plots_dir.mkdir(parents=True, exist_ok=True)
    plot_heldout(record["gains"], record["num_prompts"], config.heldout_samples, run.plots_dir / "heldout.png")
    Console(width=max(Console().width, 110)).print(
        f"held-out before/after ({record['num_prompts']} prompts x {config.heldout_samples} samples, untrained policy "
        f"-> final adapter, gain [95% CI]): {format_gains(record['gains'])}; KL {record['kl']:.3f} "
        f"({time.perf_counter() - start:.0f} s; {run.path / 'heldout.json'})", highlight=False, soft_wrap=True)


def stop_message(state: dict, num_rounds: int, run_path: Path) -> str:
    """Why a run stopped early, on one line, then the exact command that continues it."""
    reason = " ".join(str(state.get("error", "see the log above")).split())
    return (f"error: the run stopped after round {state['completed_rounds']} of {num_rounds}: {reason}; "
            f"everything written so far is kept\n"
            f"resume with: firm train --resume {shlex.quote(str(run_path))}")
