"""`firm train`: federated FIRM training on Flower's simulation engine.

Every FirmConfig field is a flag (``--rollout-batch-size 16``); defaults and help come from
firm.config, the one source of truth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from firm.api import (TrainingStopped, check_client_preferences, create_run, execute, open_resumed_run,
                      parse_client_preference, resolve_config, run_heldout)
from firm.cli.flags import add_dataclass_flags, dataclass_overrides
from firm.config import DEFAULT_PRESET, PRESETS, ConfigError, FirmConfig
from firm.preflight import preflight
from firm.progress import RunProgress
from firm.rundir import RunDir


def add_parser(subparsers) -> None:
    train = subparsers.add_parser("train", help="run federated FIRM training (Flower simulation engine)")
    add_train_arguments(train)
    train.set_defaults(handler=train_command)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `firm train` (the experiment harness parses its pass-through flags with them)."""
    # None = not given: a resumed run refuses one (it keeps its settings); a new run takes DEFAULT_PRESET
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help=f"named set of settings [default: {DEFAULT_PRESET!r}]")
    parser.add_argument("--config", metavar="FILE",
                        help="JSON settings (any saved config.json reruns that run into a new run directory); "
                             "flags override it, it overrides the preset")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run after its last completed round")
    parser.add_argument("--client-preference", action="append", default=[], metavar="ID=P",
                        help="a simulated client's own preference, e.g. 0=0.7,0.3 (repeat per client; the others "
                             "use --preference): what a deployed node sets in its node config")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    add_dataclass_flags(parser, FirmConfig, "settings (defaults from firm.config; a preset overrides some)")


def config_overrides(args: argparse.Namespace) -> dict[str, object]:
    return dataclass_overrides(args, FirmConfig)


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
                  f"metrics: {run.path / 'metrics.jsonl'}", soft_wrap=True)


def train_command(args: argparse.Namespace) -> int:
    overrides = config_overrides(args)
    if args.resume:
        if args.preset is not None:
            raise ConfigError(f"a resumed run keeps its settings; --preset {args.preset} cannot be combined with "
                              "--resume")
        if args.config:
            raise ConfigError("--config starts a new run; --resume continues one with its own settings")
        # the same pre-flight as a fresh start, and config.json must still describe the saved run;
        # --print-config prints and writes nothing
        run, config = open_resumed_run(args.resume, overrides, save=not args.print_config)
        own = check_client_preferences(dict(map(parse_client_preference, args.client_preference)), config)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        if run.completed_rounds >= config.num_rounds:
            print(f"{run.path}: all {config.num_rounds} rounds are done; pass --num-rounds N to train further")
            return 0
    else:
        config = resolve_config(args.config, args.preset, overrides)
        own = check_client_preferences(dict(map(parse_client_preference, args.client_preference)), config)
        if args.print_config:
            preflight(config)
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        run = create_run(config, args.preset)
    done = run.completed_rounds
    print(f"FIRM: {config.num_clients} clients x {config.num_rounds} rounds ({config.algorithm}, beta "
          f"{config.effective_beta()}), policy {config.policy}, rewards {config.rewards}; run dir {run.path}"
          + "".join(f"; client {pid} prefers {p}" for pid, p in sorted(own.items()))
          + (f" (resuming after round {done})" if done else ""), file=sys.stderr)

    start = time.perf_counter()
    stopped = None
    with RunProgress(config, done) as progress:
        try:
            execute(run, config, verbose=args.verbose, on_round=progress.on_round,
                    client_progress=progress.client_progress, client_preferences=own)
        except TrainingStopped as err:
            stopped = err
    print_summary(run.path, time.perf_counter() - start)
    if stopped is not None:
        print(f"error: {stopped}", file=sys.stderr)
        return 1
    if config.heldout_prompts:
        start = time.perf_counter()
        print_heldout(run_heldout(run, config), time.perf_counter() - start, run.path)
    return 0


def print_heldout(record: dict, seconds: float, run_path: Path) -> None:
    """The run's last line: held-out reward of the untrained policy against the final adapter,
    paired, with the gain's 95% interval (firm.heldout); also RUN_DIR/heldout.json and a plot."""
    from firm.heldout import format_gains

    Console(width=max(Console().width, 110)).print(
        f"held-out before/after ({record['num_prompts']} prompts x {record['samples_per_prompt']} samples, untrained "
        f"policy -> final adapter, gain [95% CI]): {format_gains(record['gains'])}; KL {record['kl']:.3f} "
        f"({seconds:.0f} s; {run_path / 'heldout.json'})", highlight=False, soft_wrap=True)
