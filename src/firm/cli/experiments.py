"""`firm compare` and `firm pareto`: the experiment harness's commands."""

from __future__ import annotations

from firm.experiments import add_experiment_commands


def add_parser(subparsers) -> None:
    add_experiment_commands(subparsers)
