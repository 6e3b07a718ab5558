"""`firm compare` and `firm pareto`: the experiment harness's command line.

The options become plain values here. The flags after ``--`` are parsed with `firm train`'s own
flags; firm.experiments gets the preset they name, the settings they override, and the flags
themselves to pass on to every run.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Sequence

from firm.api import config_file_values
from firm.cli.flags import OneLineParser, UsageError, check_output_folder
from firm.cli.train import add_train_arguments, config_overrides
from firm.config import ALGORITHMS, DEFAULT_PRESET, PARTITIONS
from firm.experiments import (HARNESS_FLAGS_COMPARE, HARNESS_FLAGS_PARETO, MIN_SEEDS_FOR_CLAIMS, ExperimentError,
                              ExperimentOptions, TrainSettings, default_preferences, expected_config, run_compare,
                              run_pareto)
from firm.mgda import check_beta, validate_preference

EPILOG = ("Flags after -- go to every `firm train` run, e.g. "
          "-- --num-rounds 3 --num-clients 4 --rewards relevance,civility. The harness sets --run-dir, "
          "--algorithm, --partition and --seed itself (pareto also --preference and --beta). A run whose "
          "directory already holds all rounds is reused; an unfinished one is resumed.")


def add_parser(subparsers) -> None:
    """Register `compare` and `pareto` on the `firm` command's subparsers."""
    compare = subparsers.add_parser(
        "compare", help="run algorithms side by side on the same data, partitions and seeds; table + plots",
        epilog=EPILOG)
    compare.add_argument("--out", required=True, help="experiment directory (runs/, table.md, results.json, plots)")
    compare.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated algorithms")
    compare.add_argument("--partitions", default=",".join(PARTITIONS), help="comma-separated prompt partitions")
    compare.add_argument("--betas", default="",
                         help="comma-separated beta values; each beta-dependent algorithm (firm) runs at each, as "
                              "its own group, the first one the reference ('' = the beta of the train flags)")
    compare.add_argument("--primary", default="",
                         help="the comparisons named before the run, ';'-separated 'A vs B: METRIC' (groups as the "
                              "table names them, e.g. 'firm (beta=1) vs mgda: lambda_drift; firm (beta=0.01) vs linear: "
                              "hypervolume'); Holm's correction runs over these only, every other comparison is "
                              "labelled exploratory ('' = every comparison of the table is one family)")
    add_common_options(compare)
    compare.set_defaults(handler=compare_command)

    pareto = subparsers.add_parser(
        "pareto", help="sweep preference vectors for firm and linear; front, hypervolume, rank correlation",
        epilog=EPILOG)
    pareto.add_argument("--out", required=True, help="experiment directory (runs/, table.md, results.json, plots)")
    pareto.add_argument("--algorithms", default="firm,linear", help="comma-separated algorithms")
    pareto.add_argument("--preferences", default="",
                        help="';'-separated preference vectors, e.g. '0.1,0.9;0.5,0.5;0.9,0.1' "
                             "('' = p_1 in 0.1, 0.3, 0.5, 0.7, 0.9 for two objectives)")
    pareto.add_argument("--betas", default="0.01",
                        help="comma-separated beta values; each beta-dependent algorithm (firm) runs at each")
    pareto.add_argument("--partition", default="iid", choices=PARTITIONS, help="prompt partition of every run")
    add_common_options(pareto)
    pareto.set_defaults(handler=pareto_command)


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", default="0,1,2", help=f"comma-separated seeds (claims need >= {MIN_SEEDS_FOR_CLAIMS})")
    parser.add_argument("--reference-point", default="",
                        help="fixed hypervolume reference point, one value per objective "
                             "('' = lowest observed reward minus 1%% of its range)")
    parser.add_argument("--eval-prompts", type=int, default=0,
                        help="score each run's final adapter with `firm eval` on this many prompts and use that as "
                             "the final reward (0 = the last round record, whose rollouts predate the last update)")
    parser.add_argument("--eval-samples", type=int, default=1,
                        help="responses sampled per held-out prompt in that evaluation")
    parser.add_argument("--dry-run", action="store_true", help="print the planned runs and commands, run nothing")
    parser.add_argument("train_args", nargs="*", default=[], metavar="-- TRAIN_FLAGS",
                        help="flags for every `firm train` run, after a lone --")


# ---- option values ----------------------------------------------------------------------------
def parse_names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ExperimentError(f"--{what} is empty")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ExperimentError(f"unknown {what}: {', '.join(unknown)}; choose from {', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise ExperimentError(f"--{what} lists a name twice: {text!r}")
    return names


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ExperimentError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ExperimentError("--seeds is empty")
    if len(set(seeds)) != len(seeds):
        raise ExperimentError(f"--seeds lists a seed twice: {text!r}")
    return seeds


def parse_floats(text: str, what: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ExperimentError(f"--{what} must be comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ExperimentError(f"--{what} must be finite numbers, got {text!r}")
    return values


def parse_betas(text: str) -> list[float]:
    betas = parse_floats(text, "betas")
    for beta in betas:
        try:
            check_beta(beta)
        except ValueError as err:
            raise ExperimentError(f"--betas: {err} (in {text!r})") from None
    if len(set(betas)) != len(betas):
        raise ExperimentError(f"--betas lists a value twice: {text!r}")
    return betas


def parse_preferences(text: str, num_objectives: int) -> list[tuple[float, ...]]:
    """';'-separated preference vectors, each validated like `firm train --preference`."""
    if not text.strip():
        return default_preferences(num_objectives)
    vectors = []
    for item in text.split(";"):
        if not item.strip():
            continue
        values = parse_floats(item, "preferences")
        try:
            validate_preference(values, num_objectives)
        except ValueError as err:
            raise ExperimentError(f"preference {item.strip()!r}: {err}") from None
        vectors.append(tuple(values))
    if len(set(vectors)) != len(vectors):
        raise ExperimentError(f"--preferences lists a vector twice: {text!r}")
    if len(vectors) < 2:
        raise ExperimentError(f"--preferences needs at least 2 vectors to draw a front, got {len(vectors)}")
    return vectors


def parse_primary(text: str) -> tuple[tuple[str, str, str], ...]:
    """'A vs B: METRIC; ...' -> ((A, B, METRIC), ...)."""
    comparisons = []
    for item in text.split(";"):
        if not item.strip():
            continue
        pair, colon, metric = item.partition(":")
        a, vs, b = pair.partition(" vs ")
        if not colon or not vs or not a.strip() or not b.strip() or not metric.strip():
            raise ExperimentError(f"--primary: {item.strip()!r} is not 'A vs B: METRIC'")
        comparisons.append((a.strip(), b.strip(), metric.strip()))
    if len(comparisons) > 4:
        raise ExperimentError(f"--primary names {len(comparisons)} comparisons; at most 4 keep the correction "
                              "meaningful (the rest are exploratory anyway)")
    if len(set(comparisons)) != len(comparisons):
        raise ExperimentError(f"--primary names a comparison twice: {text!r}")
    return tuple(comparisons)


def parse_reference_point(text: str, num_objectives: int) -> list[float] | None:
    if not text.strip():
        return None
    point = parse_floats(text, "reference-point")
    if len(point) != num_objectives:
        raise ExperimentError(f"--reference-point has {len(point)} values but there are {num_objectives} objectives")
    return point


def check_eval_prompts(value: int, samples: int = 1) -> None:
    if value < 0:
        raise ExperimentError(f"--eval-prompts must be >= 0 (0 = off), got {value}")
    if samples < 1:
        raise ExperimentError(f"--eval-samples must be >= 1, got {samples}")


# ---- the flags after -- -----------------------------------------------------------------------
def parse_train_flags(flags: Sequence[str], owned: Sequence[str]) -> argparse.Namespace:
    """Parse the flags after `--` with `firm train`'s own flags; refuse the ones the harness sets."""
    parser = OneLineParser(prog="firm train")
    add_train_arguments(parser)
    try:
        namespace = parser.parse_args(list(flags))
    except UsageError as err:
        raise ExperimentError(f"the flags after -- are not valid `firm train` flags: {' '.join(flags)!r} "
                              f"({err})") from None
    taken = [name for name in owned if getattr(namespace, name, None) not in (None, False)]
    if taken:
        names = ", ".join("--" + n.replace("_", "-") for n in taken)
        raise ExperimentError(f"{names} after -- is set by the harness for every run; use its own options instead")
    return namespace


def train_settings(flags: Sequence[str], owned: Sequence[str]) -> TrainSettings:
    """The flags after `--` as the harness uses them: preset, settings overridden, the flags."""
    namespace = parse_train_flags(flags, owned)
    from_file = config_file_values(namespace.config) if namespace.config else {}
    return TrainSettings(namespace.preset or DEFAULT_PRESET, {**from_file, **config_overrides(namespace)}, tuple(flags))


def num_objectives(train: TrainSettings) -> int:
    return len(expected_config(train, {}).reward_specs())


def canonical_command(experiment: str, args: argparse.Namespace) -> str:
    """The command that reproduces this experiment (every option spelled out)."""
    options = [f"--{k.replace('_', '-')} {json.dumps(v) if isinstance(v, str) and (not v or ' ' in v or ';' in v) else v}"
               for k, v in sorted(vars(args).items())
               if k not in ("handler", "command", "train_args", "dry_run", "out")]
    return " ".join([f"firm {experiment} --out {args.out}", *options, "--", *args.train_args])


def experiment_options(experiment: str, args: argparse.Namespace, seeds: list[int], train: TrainSettings,
                       reference_point: list[float] | None) -> ExperimentOptions:
    return ExperimentOptions(out=Path(args.out).resolve(), seeds=seeds, train=train, reference_point=reference_point,
                             eval_prompts=args.eval_prompts, eval_samples=args.eval_samples, dry_run=args.dry_run,
                             command=canonical_command(experiment, args),
                             primary=parse_primary(getattr(args, "primary", "")))


# ---- handlers ---------------------------------------------------------------------------------
def compare_command(args: argparse.Namespace) -> int:
    check_output_folder(args.out)
    algorithms = parse_names(args.algorithms, ALGORITHMS, "algorithms")
    partitions = parse_names(args.partitions, PARTITIONS, "partitions")
    seeds = parse_seeds(args.seeds)
    check_eval_prompts(args.eval_prompts, args.eval_samples)
    betas = parse_betas(args.betas) if args.betas else []
    # with --betas the harness sets each run's beta, so a --beta among the train flags is refused
    train = train_settings(args.train_args, HARNESS_FLAGS_COMPARE + (("beta",) if betas else ()))
    reference_point = parse_reference_point(args.reference_point, num_objectives(train))
    return run_compare(experiment_options("compare", args, seeds, train, reference_point), algorithms, partitions,
                       betas)


def pareto_command(args: argparse.Namespace) -> int:
    check_output_folder(args.out)
    algorithms = parse_names(args.algorithms, ALGORITHMS, "algorithms")
    if args.partition not in PARTITIONS:
        raise ExperimentError(f"--partition must be one of {', '.join(PARTITIONS)}, got {args.partition!r}")
    seeds = parse_seeds(args.seeds)
    check_eval_prompts(args.eval_prompts, args.eval_samples)
    betas = parse_betas(args.betas)
    train = train_settings(args.train_args, HARNESS_FLAGS_PARETO)
    objectives = num_objectives(train)
    preferences = parse_preferences(args.preferences, objectives)
    reference_point = parse_reference_point(args.reference_point, objectives)
    return run_pareto(experiment_options("pareto", args, seeds, train, reference_point), algorithms, betas,
                      preferences, args.partition)


__all__ = ["add_parser", "compare_command", "pareto_command", "parse_betas", "parse_names", "parse_preferences",
           "parse_primary", "parse_reference_point", "parse_seeds", "parse_train_flags", "train_settings"]
