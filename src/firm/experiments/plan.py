"""Planning an experiment: the `firm train` runs it needs, where each one lives, and how far
each one already got.

Resuming: a run directory whose state says all rounds are done is reused as it is; one that
holds fewer rounds is continued with ``firm train --resume``. An existing run whose settings
differ from the planned ones stops the harness before anything runs (results from different
settings must never be mixed silently).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from firm.config import ALGORITHMS, FirmConfig, build_config
from firm.errors import FirmError
from firm.rundir import STATE_FILE, RunDir

MIN_SEEDS_FOR_CLAIMS = 3

# Flags of `firm train` the harness sets itself; passing them after `--` is an error.
HARNESS_FLAGS_COMPARE = ("run_dir", "algorithm", "seed", "partition", "resume", "print_config")
HARNESS_FLAGS_PARETO = HARNESS_FLAGS_COMPARE + ("preference", "beta")


class ExperimentError(FirmError, ValueError):
    """The experiment cannot be planned or summarised as asked; the message names the problem."""


@dataclass
class TrainSettings:
    """The `firm train` flags given after ``--``: the preset they name, the settings they
    override, and the flags themselves (passed on to every new run)."""

    preset: str = "default"
    overrides: dict[str, Any] = field(default_factory=dict)
    flags: tuple[str, ...] = ()


@dataclass
class ExperimentOptions:
    """What `firm compare` and `firm pareto` share."""

    out: Path  # the experiment directory: runs/, table.md, results.json, plots
    seeds: list[int]
    train: TrainSettings
    reference_point: list[float] | None  # fixed hypervolume reference point; None = from the data
    eval_prompts: int  # > 0: score each run's final adapter with `firm eval` on this many prompts
    dry_run: bool  # print the planned runs and commands, run nothing
    command: str  # the command line that reproduces the experiment (written into the report)
    eval_samples: int = 1  # responses sampled per held-out prompt in the final evaluation
    primary: tuple[tuple[str, str, str], ...] = ()  # (a, b, metric) named before the run: Holm over these only


@dataclass
class PlannedRun:
    """One `firm train` run of an experiment and where its results live."""

    group: str  # what the tables and plots call it: 'firm', 'firm (beta=1)', 'linear', ...
    algorithm: str
    partition: str
    seed: int
    run_dir: Path
    config: FirmConfig  # the settings the run must have (checked against an existing run)
    preference: tuple[float, ...] | None = None
    beta: float | None = None

    def harness_flags(self) -> list[str]:
        flags = ["--run-dir", str(self.run_dir), "--algorithm", self.algorithm, "--partition", self.partition,
                 "--seed", str(self.seed)]
        if self.preference is not None:
            flags += ["--preference", format_vector(self.preference)]
        if self.beta is not None:
            flags += ["--beta", repr(self.beta)]
        return flags

    def describe(self) -> str:
        text = f"{self.group} {self.partition} seed {self.seed}"
        return text + (f" p=({format_vector(self.preference)})" if self.preference is not None else "")


def format_vector(values: Sequence[float]) -> str:
    """'0.1,0.9': short for labels and folder names, exact enough (10 digits) to keep sum(p) = 1."""
    return ",".join(f"{v:.10g}" for v in values)


def expected_config(train: TrainSettings, overrides: dict[str, Any]) -> FirmConfig:
    """The FirmConfig `firm train <harness flags> <train flags>` resolves to (validated)."""
    return build_config(train.preset, {**train.overrides, **overrides})


def plan_run(train: TrainSettings, run_dir: Path, group: str, algorithm: str, partition: str, seed: int,
             preference: tuple[float, ...] | None = None, beta: float | None = None) -> PlannedRun:
    overrides: dict[str, Any] = {"run_dir": str(run_dir), "algorithm": algorithm, "partition": partition,
                                 "seed": seed}
    if preference is not None:
        overrides["preference"] = format_vector(preference)
    if beta is not None:
        overrides["beta"] = beta
    return PlannedRun(group, algorithm, partition, seed, run_dir, expected_config(train, overrides),
                      preference, beta)


def plan_compare(train: TrainSettings, out: Path, algorithms: Sequence[str], partitions: Sequence[str],
                 seeds: Sequence[int], betas: Sequence[float] = ()) -> list[PlannedRun]:
    """Every algorithm on every partition and seed; the algorithm names its group. With ``betas``
    an algorithm whose solver uses beta (firm) runs once per beta, as group 'firm (beta=1)'.
    Seeds are the outer loop, so an experiment stopped part-way has complete paired seeds."""
    variants = [(algorithm, beta) for algorithm in algorithms
                for beta in (betas if betas and ALGORITHMS[algorithm].uses_beta else [None])]
    runs = []
    for partition in partitions:
        for seed in seeds:
            for algorithm, beta in variants:
                run_dir = out / "runs" / partition / variant_folder(algorithm, beta) / f"seed-{seed}"
                runs.append(plan_run(train, run_dir, pareto_group(algorithm, beta), algorithm, partition, seed,
                                     beta=beta))
    return runs


def pareto_group(algorithm: str, beta: float | None) -> str:
    return algorithm if beta is None else f"{algorithm} (beta={beta:g})"


def variant_folder(algorithm: str, beta: float | None) -> str:
    """The runs/ folder of an algorithm run at one beta (None: the algorithm's own)."""
    return algorithm if beta is None else f"{algorithm}-beta{beta:g}"


def plan_pareto(train: TrainSettings, out: Path, algorithms: Sequence[str], betas: Sequence[float],
                preferences: Sequence[tuple[float, ...]], partition: str, seeds: Sequence[int]) -> list[PlannedRun]:
    """Every preference and seed for each algorithm. An algorithm whose solver uses beta (firm)
    runs at every beta; the others once per preference: linear uses p as fixed weights (no
    solver), and the unregularized methods (mgda, fsmgda) solve with beta = 0."""
    runs = []
    for algorithm in algorithms:
        for beta in (betas if ALGORITHMS[algorithm].uses_beta else [None]):
            folder = variant_folder(algorithm, beta)
            for preference in preferences:
                for seed in seeds:
                    run_dir = out / "runs" / folder / f"p{format_vector(preference).replace(',', '-')}" / f"seed-{seed}"
                    runs.append(plan_run(train, run_dir, pareto_group(algorithm, beta), algorithm, partition,
                                         seed, preference, beta))
    return runs


def run_status(run: PlannedRun) -> str:
    """'new', 'resume' or 'done'. An existing run with other settings raises ExperimentError."""
    if not (run.run_dir / STATE_FILE).exists():
        return "new"
    existing = RunDir.open(run.run_dir)
    have, want = existing.config().to_dict(), run.config.to_dict()
    differing = sorted(k for k in want if k not in ("run_dir", "num_rounds") and have.get(k) != want[k])
    if differing:
        detail = ", ".join(f"{k}: {have.get(k)!r} there, {want[k]!r} planned" for k in differing)
        raise ExperimentError(f"{run.run_dir} holds a run with other settings ({detail}); "
                              "remove it or choose another --out")
    done = existing.completed_rounds
    if have["num_rounds"] > want["num_rounds"]:
        raise ExperimentError(f"{run.run_dir} holds a run of {have['num_rounds']} rounds but {want['num_rounds']} "
                              "are planned; remove it or choose another --out")
    return "done" if done >= want["num_rounds"] else "resume"


def eval_path(run: PlannedRun, num_prompts: int, samples_per_prompt: int = 1) -> Path:
    """Where the evaluation of the run's last adapter lives; the name fixes what it measured."""
    samples = f"-x{samples_per_prompt}" if samples_per_prompt > 1 else ""
    return run.run_dir / f"eval-round-{run.config.num_rounds:03d}-{num_prompts}prompts{samples}.json"


def base_eval_path(out: Path, num_prompts: int, samples_per_prompt: int = 1) -> Path:
    """Where the experiment's one evaluation of the untrained policy lives (same prompts, samples
    and seed as every run's final evaluation, so each run's gain over it is paired)."""
    samples = f"-x{samples_per_prompt}" if samples_per_prompt > 1 else ""
    return out / f"base-eval-{num_prompts}prompts{samples}.json"


def warn_seeds(seeds: Sequence[int]) -> None:
    if len(seeds) < MIN_SEEDS_FOR_CLAIMS:
        print(f"warning: {len(seeds)} seed(s): a claim needs >= {MIN_SEEDS_FOR_CLAIMS} seeds (mean and spread); "
              "these results only show that the runs work", file=sys.stderr)


__all__ = ["ExperimentError", "ExperimentOptions", "HARNESS_FLAGS_COMPARE", "HARNESS_FLAGS_PARETO",
           "MIN_SEEDS_FOR_CLAIMS", "PlannedRun", "TrainSettings", "base_eval_path", "eval_path", "expected_config", "format_vector",
           "pareto_group", "plan_compare", "plan_pareto", "plan_run", "run_status", "variant_folder", "warn_seeds"]
