"""The `firm` command line: train, eval, reward.

Every field of FirmConfig is a flag of `firm train` (``--rollout-batch-size 16``); the
defaults and help texts come from firm.config, the one source of truth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from firm.config import PRESETS, ConfigError, FirmConfig, build_config, coerce, field_help

# Errors that mean "the user's input is wrong": printed as one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    helps = field_help()
    group = parser.add_argument_group("settings (defaults from firm.config; a preset overrides some)")
    for f in dataclasses.fields(FirmConfig):
        default = f.default
        group.add_argument(_flag(f.name), dest=f.name, default=None, metavar=type(default).__name__.upper(),
                           help=f"{helps.get(f.name, '')} [default: {default!r}]")


def config_overrides(args: argparse.Namespace) -> dict[str, object]:
    fields = {f.name: f for f in dataclasses.fields(FirmConfig)}
    return {name: coerce(fields[name], getattr(args, name)) for name in fields if getattr(args, name) is not None}


# ---- firm train --------------------------------------------------------------------------------
def preflight(config: FirmConfig) -> None:
    """Fail before starting Flower (and before creating the run directory) on inputs that
    would otherwise only fail inside a client: prompts, partition, reward specs, policy, device."""
    from firm.models import check_policy, resolve_device
    from firm.partition import partition_prompts
    from firm.prompts import load_prompts
    from firm.rewards import parse_reward_spec

    prompts = load_prompts(config.prompts)
    partition_prompts(prompts, config.num_clients, scheme=config.partition, alpha=config.dirichlet_alpha,
                      seed=config.seed)
    for spec in config.reward_specs():
        parse_reward_spec(spec)
    check_policy(config.policy)
    resolve_device(config.device)


def simulation_backend_config(config: FirmConfig, cpus: int, verbose: bool = False) -> dict:
    """Ray resources: one client at a time with all the CPUs, and with the GPU when the run uses
    one. Ray hides GPUs from workers that were not given one, so without this a client's
    device=auto would find none and train on the CPU."""
    import torch

    from firm.models import resolve_device

    gpus = torch.cuda.device_count() if resolve_device(config.device).type == "cuda" else 0
    return {"client_resources": {"num_cpus": cpus, "num_gpus": 1.0 if gpus else 0.0},
            "init_args": {"num_cpus": cpus, "num_gpus": gpus, "include_dashboard": False, "log_to_driver": verbose}}


def run_simulation(config: FirmConfig, run_path: Path, verbose: bool) -> None:
    """Run the Flower apps on Flower's simulation engine (Ray), one client at a time."""
    from flwr.simulation import run_simulation as flwr_run_simulation

    from firm.client_app import app as client_app
    from firm.server_app import RUN_DIR_ENV
    from firm.server_app import app as server_app

    backend_config = simulation_backend_config(config, os.cpu_count() or 1, verbose)
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_path)  # read by the ServerApp; never left behind
    try:
        flwr_run_simulation(server_app=server_app, client_app=client_app, num_supernodes=config.num_clients,
                            backend_config=backend_config, verbose_logging=verbose)
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous


class Progress:
    """A rich progress bar over rounds with a line per finished round."""

    def __init__(self, total_rounds: int, done: int, reward_keys: list[str]):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

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
    from rich.console import Console
    from rich.table import Table

    from firm.rundir import RunDir

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
    last = run.last_adapter()
    console.print(f"wall time {wall_seconds:.0f} s; final adapter: {last}; plots: {run.plots_dir}; "
                  f"metrics: {run.path / 'metrics.jsonl'}")


def cmd_train(args: argparse.Namespace) -> int:
    from firm.rundir import RunDir

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
            config.save(run.path / "config.json")
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

    from firm import server_app

    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    start = time.perf_counter()
    with Progress(config.num_rounds, done, []) as progress:
        server_app.round_listeners.append(progress.on_round)
        try:
            run_simulation(config, run.path, args.verbose)
        finally:
            server_app.round_listeners.remove(progress.on_round)
    wall = time.perf_counter() - start
    state = run.state()
    print_summary(run.path, wall)
    if state["completed_rounds"] < config.num_rounds:
        reason = state.get("error", "see the log above")
        print(f"error: the run stopped after round {state['completed_rounds']} of {config.num_rounds}: {reason}\n"
              f"everything written so far is kept; continue with: firm train --resume {run.path}", file=sys.stderr)
        return 1
    return 0


def default_run_dir(preset: str) -> str:
    from firm.server_app import default_run_dir as server_default

    return server_default(preset)


# ---- firm eval ---------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from firm.evaluate import evaluate

    result = evaluate(adapter=args.adapter, policy=args.policy, prompts=args.prompts, rewards=args.rewards,
                      num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, batch_size=args.batch_size, seed=args.seed,
                      num_samples=args.samples, device=args.device)
    from rich.console import Console

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


# ---- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="firm", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run federated FIRM training (Flower simulation engine)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--preset", default="default", choices=sorted(PRESETS), help="named set of settings")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run after its last completed round")
    train.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    train.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    add_config_flags(train)
    train.set_defaults(func=cmd_train)

    defaults = FirmConfig()
    ev = sub.add_parser("eval", help="score an adapter (or the base model) on a prompt set",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("--adapter", help="peft adapter directory (e.g. RUN_DIR/adapters/round-003); omit for the base")
    ev.add_argument("--policy", default=None, help="base model; default: the run's policy, else 'embedded'")
    ev.add_argument("--prompts", default=defaults.prompts)
    ev.add_argument("--rewards", default=defaults.rewards)
    ev.add_argument("--num-prompts", type=int, default=32)
    ev.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    ev.add_argument("--temperature", type=float, default=defaults.temperature)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--seed", type=int, default=1234)
    ev.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    ev.add_argument("--samples", type=int, default=3, help="sample responses to show")
    ev.add_argument("--json", help="also write the result to this JSON file")
    ev.set_defaults(func=cmd_eval)

    from firm.experiments import add_experiment_commands
    from firm.reward_cli import add_reward_commands

    add_reward_commands(sub)
    add_experiment_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    # Library deprecation chatter (transformers, Ray, click) is not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    from firm.models import ModelLoadError
    from firm.rundir import RunDirError

    try:
        return int(args.func(args) or 0)
    except (*USER_ERRORS, ModelLoadError, RunDirError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; everything written so far is kept (firm train --resume RUN_DIR continues)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
