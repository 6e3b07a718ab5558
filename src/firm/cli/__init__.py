"""The `firm` command line: argparse and dispatch only.

Each command lives in its own module with ``add_parser(subparsers)``, which registers the
command and sets ``handler`` to a function ``<command>_command(args) -> exit code``. Flags of
commands that run from a config dataclass are generated from it (firm.cli.flags).
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from typing import Sequence

from firm.cli import eval as eval_cli
from firm.cli import experiments as experiments_cli
from firm.cli import reward as reward_cli
from firm.cli import synthetic as synthetic_cli
from firm.cli import train as train_cli
from firm.cli.flags import OneLineParser, UsageError
from firm.errors import FirmError

# Input errors are one line and exit code 2; every other exception is a bug and keeps its
# traceback. FileNotFoundError and ConnectionError are the user's too: a path or an address.
USER_ERRORS: tuple[type[BaseException], ...] = (FirmError, FileNotFoundError, ConnectionError)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="firm", description="FIRM: federated in-client regularized "
                                                    "multi-objective alignment")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train_cli, eval_cli, reward_cli, experiments_cli, synthetic_cli):
        module.add_parser(sub)
    return parser


# A value that starts with a minus and a digit ("-0.5,1.5") is a value, not a flag.
NEGATIVE_VALUE = re.compile(r"^-\.?\d")


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--flag -0.5,1.5`` -> ``--flag=-0.5,1.5``: argparse would read the value as an unknown
    flag and report a missing argument instead of checking the value."""
    out: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        if tokens[i].startswith("--") and "=" not in tokens[i] and i + 1 < len(tokens) \
                and NEGATIVE_VALUE.match(tokens[i + 1]):
            out.append(f"{tokens[i]}={tokens[i + 1]}")
            i += 2
        else:
            out.append(tokens[i])
            i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    # Library deprecation chatter (transformers, Ray, click) is not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        args = build_parser().parse_args(join_negative_values(sys.argv[1:] if argv is None else argv))
        return int(args.handler(args) or 0)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; everything written so far is kept (firm train --resume RUN_DIR continues)",
              file=sys.stderr)
        return 130


__all__ = ["build_parser", "main", "OneLineParser", "UsageError", "USER_ERRORS"]
