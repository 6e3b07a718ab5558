"""`firm synthetic`: FIRM, MGDA, linear weights and FSMGDA on a controlled problem.

Every SyntheticConfig field is a flag (``--conflict-angle 30``); ``--grid`` runs the regime grid
of EXPERIMENTS.md. Writes results.json, table.md and plots under ``--out``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from firm.cli.flags import add_dataclass_flags, check_output_folder, dataclass_overrides, flag_name
from firm.config import ConfigError
from firm.synthetic.config import SyntheticConfig


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "synthetic", help="compare firm, mgda, linear and fsmgda on a quadratic problem with a known Pareto set",
        description="Federated quadratic objectives with a known Pareto set, run with the pipeline's weight solver "
                    "and FSMGDA server step; paired statistics over shared seeds (firm.stats).")
    parser.add_argument("--out", default="runs/synthetic", help="output folder [default: runs/synthetic]")
    add_dataclass_flags(parser, SyntheticConfig, "problem, algorithms and statistics")
    parser.set_defaults(handler=synthetic_command)


def build_synthetic_config(args: argparse.Namespace) -> SyntheticConfig:
    try:
        config = SyntheticConfig(**dataclass_overrides(args, SyntheticConfig))
    except TypeError as err:  # pragma: no cover - the flags come from the fields
        raise ConfigError(str(err)) from None
    return config.validate()


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (the flags the user set), for the outputs' headers."""
    parts = ["firm", "synthetic", "--out", str(args.out)]
    for name, value in dataclass_overrides(args, SyntheticConfig).items():
        parts += [flag_name(name), ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def synthetic_command(args: argparse.Namespace) -> int:
    config = build_synthetic_config(args)
    out = Path(args.out)
    check_output_folder(out)
    # Imported here: matplotlib and the fsmgda module (torch) are not needed for --help or bad flags.
    from firm.synthetic.grid import REGIMES, regime_config, run_configuration
    from firm.synthetic.report import write_configuration, write_grid

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    command = command_line(args)
    start = time.perf_counter()
    if config.grid:
        done = []
        for name, description, overrides in REGIMES:
            log(f"regime {name}: {description}")
            done.append((name, description, run_configuration(regime_config(config, overrides), log)))
        wall = time.perf_counter() - start
        write_grid(done, out, wall, command, config.plots)
    else:
        result = run_configuration(config, log)
        wall = time.perf_counter() - start
        write_configuration(result, out, "firm synthetic", config.plots)
        for claim, rows in result["tables"].items():
            print(f"claim {claim}: " + "; ".join(f"{c.metric} {c.a}-{c.b}: {c.verdict}" for c in rows
                                                 if c.a in ("firm b=0.01", "firm b=1")))
    print(f"wall time {wall:.0f} s; results: {out / 'results.json'}, table: {out / 'table.md'}")
    return 0
