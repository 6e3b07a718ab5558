"""The experiment harness: `firm compare` and `firm pareto` (read top to bottom).

Both commands plan a grid of `firm train` runs, run them one after the other, read every run's
``metrics.jsonl`` and write a table, a results file and plots into ``--out``:

- ``firm compare`` runs several algorithms (firm, mgda, linear, fsmgda, ...) on the same data,
  partitions and seeds and reports, per algorithm: the final reward per objective, the
  hypervolume of the final reward vector, bytes up and down per client per round, client
  disagreement drift (spread of lambda across clients, adapter distance from the average) and
  smoothness (spread of the round-to-round reward changes).
- ``firm pareto`` sweeps preference vectors p for firm (at one or more beta) and linear and
  reports the front of final rewards, its hypervolume, and whether the points follow the order
  of the preferences (Spearman rank correlation of p_m and the final reward of objective m).

Why a subprocess per run: every run starts its own Flower simulation (Ray); a fresh process
per run keeps Ray's and Flower's global state from leaking from one run into the next, and a
crashed run cannot take the harness down. Its output goes to RUN_DIR/train.log.

Resuming: a run directory whose state says all rounds are done is reused as it is; one that
holds fewer rounds is continued with ``firm train --resume``. An existing run whose settings
differ from the planned ones stops the harness before anything runs (results from different
settings must never be mixed silently).

What "final reward" means: a round record's rewards are those of the responses the clients
sampled in that round, i.e. of the global adapter the round STARTED from (the rollout comes
before the PPO update). So by default the final reward is that of the adapter after
num_rounds - 1 rounds. ``--eval-prompts N`` scores the adapter of the last round itself with
`firm eval` (the same N prompts and sampling seed for every run, so the comparison is paired)
and uses that instead; both numbers are kept in results.json.

Statistics across seeds are mean and sample standard deviation (ddof = 1). A difference
between two algorithms counts only where it exceeds the spread: the intervals mean +- std
of the two do not overlap.

The hypervolume reference point (unless ``--reference-point`` fixes one) is, per objective,
the lowest reward that any round of any run of the experiment recorded, minus 1% of that
objective's observed range (max - min over the same records). Every final point then
dominates it, so each run's hypervolume is positive and the values of one experiment are
comparable with each other; they are not comparable across experiments (fix the point for
that).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from firm.errors import FirmError
from firm.config import ALGORITHMS, EVAL_SEED, PARTITIONS, FirmConfig

MIN_SEEDS_FOR_CLAIMS = 3
MIN_PREFERENCES = 5
REFERENCE_MARGIN_FRACTION = 0.01
"""The default reference point sits this fraction of each objective's observed range below
the lowest observed reward, so that no point lies on the boundary (zero volume)."""
LOG_TAIL_LINES = 15
HARNESS_FILE = "harness.json"
"""Written into each run directory the harness ran: the command, exit code and wall time."""
TRAIN_LOG = "train.log"

# Flags of `firm train` the harness sets itself; passing them after `--` is an error.
HARNESS_FLAGS_COMPARE = ("run_dir", "algorithm", "seed", "partition", "resume", "print_config")
HARNESS_FLAGS_PARETO = HARNESS_FLAGS_COMPARE + ("preference", "beta")
"""Seed of `firm eval` for every run: the same prompts and sampling noise, a paired comparison."""


class ExperimentError(FirmError, ValueError):
    """The experiment cannot be planned or summarised as asked; the message names the problem."""


# ---- parsing of the command line -----------------------------------------------------------
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
    if any(b < 0 for b in betas):
        raise ExperimentError(f"--betas must be >= 0, got {text!r}")
    if len(set(betas)) != len(betas):
        raise ExperimentError(f"--betas lists a value twice: {text!r}")
    return betas


def default_preferences(num_objectives: int) -> list[tuple[float, ...]]:
    """Five preferences from 'mostly objective 2' to 'mostly objective 1' (two objectives)."""
    if num_objectives != 2:
        raise ExperimentError(f"there are {num_objectives} objectives: pass --preferences explicitly "
                              "(vectors separated by ';', e.g. '0.6,0.2,0.2;0.2,0.6,0.2;...')")
    return [(w, round(1.0 - w, 10)) for w in (0.1, 0.3, 0.5, 0.7, 0.9)]


def parse_preferences(text: str, num_objectives: int) -> list[tuple[float, ...]]:
    """';'-separated preference vectors, each validated like `firm train --preference`."""
    from firm.mgda import validate_preference

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


def parse_reference_point(text: str, num_objectives: int) -> list[float] | None:
    if not text.strip():
        return None
    point = parse_floats(text, "reference-point")
    if len(point) != num_objectives:
        raise ExperimentError(f"--reference-point has {len(point)} values but there are {num_objectives} objectives")
    return point


def check_eval_prompts(value: int) -> None:
    if value < 0:
        raise ExperimentError(f"--eval-prompts must be >= 0 (0 = off), got {value}")


def parse_train_flags(flags: Sequence[str], owned: Sequence[str]) -> argparse.Namespace:
    """Parse the flags after `--` with `firm train`'s own parser; refuse the ones the harness sets."""
    from firm.cli import build_parser  # TODO(layout): the harness must not import the CLI

    try:
        namespace = build_parser().parse_args(["train", *flags])
    except SystemExit:
        raise ExperimentError(f"the flags after -- are not valid `firm train` flags: {' '.join(flags)!r} "
                              "(argparse's message is above)") from None
    taken = [name for name in owned if getattr(namespace, name, None) not in (None, False)]
    if taken:
        names = ", ".join("--" + n.replace("_", "-") for n in taken)
        raise ExperimentError(f"{names} after -- is set by the harness for every run; use its own options instead")
    return namespace


# ---- planning runs --------------------------------------------------------------------------
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


def expected_config(train_flags: argparse.Namespace, overrides: dict[str, Any]) -> FirmConfig:
    """The FirmConfig `firm train <harness flags> <train flags>` resolves to (validated)."""
    from firm.cli.train import config_overrides
    from firm.config import build_config

    return build_config(train_flags.preset, {**config_overrides(train_flags), **overrides})


def plan_run(train_flags: argparse.Namespace, run_dir: Path, group: str, algorithm: str, partition: str, seed: int,
             preference: tuple[float, ...] | None = None, beta: float | None = None) -> PlannedRun:
    overrides: dict[str, Any] = {"run_dir": str(run_dir), "algorithm": algorithm, "partition": partition,
                                 "seed": seed}
    if preference is not None:
        overrides["preference"] = format_vector(preference)
    if beta is not None:
        overrides["beta"] = beta
    return PlannedRun(group, algorithm, partition, seed, run_dir, expected_config(train_flags, overrides),
                      preference, beta)


def run_status(run: PlannedRun) -> str:
    """'new', 'resume' or 'done'. An existing run with other settings raises ExperimentError."""
    from firm.rundir import STATE_FILE, RunDir

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


def train_command(run: PlannedRun, status: str, train_flags: Sequence[str]) -> list[str]:
    base = [sys.executable, "-m", "firm.cli", "train"]
    if status == "resume":  # a resumed run keeps its settings; only the number of rounds may change
        return base + ["--resume", str(run.run_dir), "--num-rounds", str(run.config.num_rounds)]
    return base + run.harness_flags() + list(train_flags)


@dataclass
class Failure:
    run: PlannedRun
    reason: str
    log_tail: str


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def execute_run(run: PlannedRun, status: str, train_flags: Sequence[str]) -> Failure | None:
    """Run (or continue) one training run in a subprocess; its output goes to RUN_DIR/train.log."""
    from firm.rundir import RunDir

    command = train_command(run, status, train_flags)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run.run_dir / TRAIN_LOG
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(command)}\n")
        log.flush()
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - start
    previous = read_harness_record(run.run_dir)
    record = {"command": command, "returncode": returncode, "wall_seconds": wall,
              "total_wall_seconds": wall + float(previous.get("total_wall_seconds", 0.0))}
    (run.run_dir / HARNESS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if returncode != 0:
        return Failure(run, f"`firm train` exited with code {returncode}", log_tail(log_path))
    done = RunDir.open(run.run_dir).completed_rounds
    if done < run.config.num_rounds:
        return Failure(run, f"only {done} of {run.config.num_rounds} rounds completed", log_tail(log_path))
    return None


def eval_path(run: PlannedRun, num_prompts: int) -> Path:
    """Where the evaluation of the run's last adapter lives; the name fixes what it measured."""
    return run.run_dir / f"eval-round-{run.config.num_rounds:03d}-{num_prompts}prompts.json"


def eval_command(run: PlannedRun, num_prompts: int) -> list[str]:
    """`firm eval` of the last round's adapter with the run's own prompts, rewards and sampling."""
    from firm.rundir import RunDir

    config = run.config
    return [sys.executable, "-m", "firm.cli", "eval", "--adapter", str(RunDir(run.run_dir).adapter_dir(config.num_rounds)),
            "--policy", config.policy, "--prompts", config.prompts, "--rewards", config.rewards,
            "--num-prompts", str(num_prompts), "--max-new-tokens", str(config.max_new_tokens),
            "--temperature", repr(config.temperature), "--seed", str(EVAL_SEED), "--samples", "0",
            "--json", str(eval_path(run, num_prompts))]


def execute_eval(run: PlannedRun, num_prompts: int) -> Failure | None:
    """Score the run's final adapter in a subprocess (output in RUN_DIR/eval.log)."""
    command = eval_command(run, num_prompts)
    log_path = run.run_dir / "eval.log"
    with open(log_path, "a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(command)}\n")
        log.flush()
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if returncode != 0 or not eval_path(run, num_prompts).exists():
        return Failure(run, f"`firm eval` of the final adapter exited with code {returncode}", log_tail(log_path))
    return None


def read_harness_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / HARNESS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def execute_plan(runs: Sequence[PlannedRun], train_flags: Sequence[str], dry_run: bool = False,
                 eval_prompts: int = 0) -> list[Failure]:
    """Run every planned run in turn (and, with eval_prompts > 0, score its final adapter);
    a failed run is reported and the others go on."""
    statuses = [run_status(run) for run in runs]  # settings conflicts stop us before anything runs
    failures = []
    for index, (run, status) in enumerate(zip(runs, statuses), start=1):
        prefix = f"[{index}/{len(runs)}] {run.describe()}"
        if dry_run:
            print(f"{prefix}: {status}\n    {' '.join(train_command(run, status, train_flags))}")
            if eval_prompts:
                print(f"    then {' '.join(eval_command(run, eval_prompts))}")
            continue
        if status == "done":
            print(f"{prefix}: done already ({run.run_dir})", flush=True)
            failure = None
        else:
            print(f"{prefix}: {'continuing' if status == 'resume' else 'training'} in {run.run_dir} ...", flush=True)
            start = time.perf_counter()
            failure = execute_run(run, status, train_flags)
            if failure is None:
                print(f"{prefix}: finished in {time.perf_counter() - start:.0f} s", flush=True)
        if failure is None and eval_prompts and not eval_path(run, eval_prompts).exists():
            print(f"{prefix}: scoring the final adapter on {eval_prompts} prompts ...", flush=True)
            failure = execute_eval(run, eval_prompts)
        if failure is not None:
            failures.append(failure)
            print(f"{prefix}: FAILED ({failure.reason}); last lines of its log:\n" + indent(failure.log_tail),
                  flush=True)
    return failures


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


# ---- reading and summarising one run --------------------------------------------------------
def read_round_records(run_dir: Path) -> list[dict[str, Any]]:
    """The round records of a run's metrics.jsonl, in round order."""
    from firm.rundir import RunDir

    rounds = sorted((r for r in RunDir(run_dir).read_metrics() if r.get("type") == "round"), key=lambda r: r["round"])
    numbers = [r["round"] for r in rounds]
    if not rounds:
        raise ExperimentError(f"{run_dir}: metrics.jsonl holds no round record")
    if len(set(numbers)) != len(numbers):
        raise ExperimentError(f"{run_dir}: metrics.jsonl holds a round twice (rounds {numbers})")
    return rounds


def objective_names(rounds: Sequence[dict[str, Any]]) -> list[str]:
    names = [k.split("/", 1)[1] for k in rounds[0] if k.startswith("reward/")]
    if len(names) < 2:
        raise ExperimentError(f"round records name {len(names)} reward(s); an experiment needs at least 2")
    return names


def smoothness(values: Sequence[float]) -> float | None:
    """Spread (population std) of the round-to-round changes; lower = smoother.

    A run that improves by the same amount every round scores 0; one that zig-zags scores
    high. Undefined (None) with fewer than 3 rounds, where there are fewer than 2 changes.
    """
    if len(values) < 3:
        return None
    return float(np.std(np.diff(np.asarray(values, dtype=np.float64))))


def optional_series(rounds: Sequence[dict[str, Any]], key: str) -> list[Any] | None:
    """The values of a metric over rounds, or None when any round lacks it (not measured)."""
    values = [r.get(key) for r in rounds]
    return None if any(v is None for v in values) else values


def summarize_run(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Everything the tables need from one run's round records.

    drift: mean over rounds (and objectives) of the spread of lambda across clients;
    adapter_distance: mean over rounds of the clients' mean distance from the average adapter.
    """
    names = objective_names(rounds)
    curves = {name: [float(r[f"reward/{name}"]) for r in rounds] for name in names}
    lambda_std = optional_series(rounds, "lambda_std")
    lambda_mean = optional_series(rounds, "lambda_mean")
    distance = optional_series(rounds, "adapter_distance")
    bytes_up = optional_series(rounds, "bytes_up_per_client")
    bytes_down = optional_series(rounds, "bytes_down_per_client")
    return {
        "rounds": [int(r["round"]) for r in rounds],
        "objectives": names,
        "final_reward": {name: curve[-1] for name, curve in curves.items()},
        "reward_curve": curves,
        "smoothness": {name: smoothness(curve) for name, curve in curves.items()},
        "bytes_up_per_client": None if bytes_up is None else float(np.mean(bytes_up)),
        "bytes_down_per_client": None if bytes_down is None else float(np.mean(bytes_down)),
        "drift_curve": None if lambda_std is None else [float(np.mean(s)) for s in lambda_std],
        "lambda_drift": None if lambda_std is None else float(np.mean(lambda_std)),
        "adapter_distance_curve": None if distance is None else [float(d) for d in distance],
        "adapter_distance": None if distance is None else float(np.mean(distance)),
        "lambda_mean_over_rounds": None if lambda_mean is None else np.mean(lambda_mean, axis=0).tolist(),
        "lambda_mean_final": None if lambda_mean is None else list(lambda_mean[-1]),
    }


# ---- hypervolume, statistics, rank correlation ---------------------------------------------
def reference_point(all_rounds: Sequence[Sequence[dict[str, Any]]], names: Sequence[str],
                    margin_fraction: float = REFERENCE_MARGIN_FRACTION,
                    finals: Sequence[dict[str, float]] = ()) -> list[float]:
    """Per objective: the lowest reward any round of any run recorded (or any final reward in
    ``finals``, e.g. evaluations), minus a margin of ``margin_fraction`` of that objective's
    observed range (1e-6 when the range is zero)."""
    point = []
    for name in names:
        values = [float(r[f"reward/{name}"]) for rounds in all_rounds for r in rounds]
        values += [float(f[name]) for f in finals]
        if not values:
            raise ExperimentError("no round record to place the reference point")
        spread = max(values) - min(values)
        point.append(min(values) - (margin_fraction * spread if spread > 0 else 1e-6))
    return point


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Hypervolume (maximisation) that the points dominate above the reference point (moocore).

    Points that do not strictly dominate the reference in every objective add nothing.
    """
    import moocore

    ref = np.asarray(reference, dtype=np.float64)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, ref.shape[0])
    if not np.all(np.isfinite(pts)) or not np.all(np.isfinite(ref)):
        raise ExperimentError("hypervolume of non-finite rewards is undefined")
    pts = pts[np.all(pts > ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    return float(moocore.hypervolume(pts, ref=ref, maximise=True))


@dataclass
class Stat:
    """Mean and sample std (ddof = 1) over seeds; std is None with a single seed."""

    mean: float | None
    std: float | None
    n: int
    note: str = ""  # why the value is missing, when it is

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n, **({"note": self.note} if self.note else {})}


def aggregate(values: Sequence[float | None], missing_note: str = "not measured") -> Stat:
    if not values:
        return Stat(None, None, 0, "no completed run")
    if any(v is None for v in values):
        return Stat(None, None, len(values), missing_note)
    array = np.asarray(values, dtype=np.float64)
    return Stat(float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else None, len(array))


def compare_stats(a: Stat, b: Stat, higher_is_better: bool) -> str:
    """'better', 'worse' (a against b) or 'within spread': a difference counts only where the
    intervals mean +- std do not overlap. Undecidable without a spread (fewer than 2 seeds)."""
    if a.mean is None or b.mean is None:
        return "n/a (" + (a.note or b.note) + ")"
    if a.std is None or b.std is None:
        return f"n/a (needs >= 2 seeds)"
    a_low, a_high, b_low, b_high = a.mean - a.std, a.mean + a.std, b.mean - b.std, b.mean + b.std
    if a_low > b_high:
        return "better" if higher_is_better else "worse"
    if a_high < b_low:
        return "worse" if higher_is_better else "better"
    return "within spread"


def rank_correlation(weights: Sequence[float], rewards: Sequence[float]) -> dict[str, Any]:
    """Spearman rank correlation of preference weights and final rewards (+1: the rewards
    follow the order of the preferences exactly)."""
    from scipy.stats import spearmanr

    if len(weights) != len(rewards) or len(weights) < 2:
        raise ExperimentError(f"rank correlation needs >= 2 paired values, got {len(weights)} and {len(rewards)}")
    if len(set(weights)) < 2 or len(set(rewards)) < 2:
        return {"rho": None, "p_value": None, "note": "constant input: no order to compare"}
    result = spearmanr(weights, rewards)
    return {"rho": float(result.statistic), "p_value": float(result.pvalue)}


# ---- collecting summaries -------------------------------------------------------------------
@dataclass
class RunResult:
    run: PlannedRun
    rounds: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)


def collect(runs: Sequence[PlannedRun], failures: Sequence[Failure], eval_prompts: int = 0) -> list[RunResult]:
    """Summaries of the runs that completed all their rounds (failed runs stay out). With
    eval_prompts > 0 the final reward is the evaluation of the last adapter."""
    failed = {id(f.run) for f in failures}
    results = []
    for run in runs:
        if id(run) in failed or not (run.run_dir / "state.json").exists():
            continue
        from firm.rundir import RunDir

        if RunDir.open(run.run_dir).completed_rounds < run.config.num_rounds:
            continue
        rounds = [r for r in read_round_records(run.run_dir) if r["round"] <= run.config.num_rounds]
        summary = summarize_run(rounds)
        if eval_prompts:
            evaluated = json.loads(eval_path(run, eval_prompts).read_text())["rewards"]
            if sorted(evaluated) != sorted(summary["objectives"]):
                raise ExperimentError(f"{eval_path(run, eval_prompts)} scores {sorted(evaluated)}, the run "
                                      f"{summary['objectives']}")
            summary["final_reward"] = {name: float(evaluated[name]) for name in summary["objectives"]}
        summary["final_reward_source"] = (f"firm eval of round {run.config.num_rounds}'s adapter on {eval_prompts} "
                                          "prompts" if eval_prompts else "last round record (rollouts of the "
                                          "adapter that round started from)")
        results.append(RunResult(run, rounds, summary))
    names = {tuple(r.summary["objectives"]) for r in results}
    if len(names) > 1:
        raise ExperimentError(f"runs report different objectives: {sorted(names)}")
    return results


def add_hypervolumes(results: Sequence[RunResult], reference: Sequence[float]) -> None:
    for result in results:
        final = [result.summary["final_reward"][n] for n in result.summary["objectives"]]
        result.summary["hypervolume"] = hypervolume([final], reference)
        result.summary["wall_seconds"] = read_harness_record(result.run.run_dir).get("total_wall_seconds")


def run_entry(result: RunResult) -> dict[str, Any]:
    run = result.run
    return {"group": run.group, "algorithm": run.algorithm, "partition": run.partition, "seed": run.seed,
            "preference": None if run.preference is None else list(run.preference), "beta": run.beta,
            "effective_beta": run.config.effective_beta(), "run_dir": str(run.run_dir), **result.summary}


# Metrics of the compare table: (key, label, claim, higher is better).
def compare_metrics(names: Sequence[str]) -> list[tuple[str, str, str, bool]]:
    metrics = [(f"final_reward/{n}", f"final reward {n}", "4", True) for n in names]
    metrics.append(("hypervolume", "hypervolume", "4", True))
    metrics += [("bytes_up_per_client", "bytes up / client / round", "1", False),
                ("bytes_down_per_client", "bytes down / client / round", "1", False),
                ("lambda_drift", "lambda drift (std across clients)", "3", False),
                ("adapter_distance", "adapter distance from mean", "3", False)]
    metrics += [(f"smoothness/{n}", f"smoothness {n} (std of changes)", "2", False) for n in names]
    return metrics


def metric_value(summary: dict[str, Any], key: str) -> float | None:
    head, _, tail = key.partition("/")
    return summary[head][tail] if tail else summary[key]


def aggregate_group(results: Sequence[RunResult], keys: Sequence[str]) -> dict[str, Stat]:
    notes = {"smoothness": "needs >= 3 rounds"}
    return {key: aggregate([metric_value(r.summary, key) for r in results], notes.get(key.split("/")[0], "not measured"))
            for key in keys}


# ---- formatting -----------------------------------------------------------------------------
def format_number(value: float, key: str = "") -> str:
    if key.startswith("bytes"):
        return f"{value:,.0f}"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def format_stat(stat: Stat, key: str = "") -> str:
    if stat.mean is None:
        return f"n/a ({stat.note})"
    if stat.std is None:
        return f"{format_number(stat.mean, key)} (1 seed)"
    return f"{format_number(stat.mean, key)} ± {format_number(stat.std, key)}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def reference_text(names: Sequence[str], reference: Sequence[float], fixed: bool) -> str:
    point = ", ".join(f"{n} = {v:.4g}" for n, v in zip(names, reference))
    how = ("fixed by --reference-point" if fixed else
           "per objective the lowest reward that any round record or final reward of any run of this experiment "
           "shows, minus "
           f"{REFERENCE_MARGIN_FRACTION:.0%} of that objective's observed range; comparable within this "
           "experiment only")
    return f"Hypervolume reference point: ({point}): {how}."


# ---- plots ----------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mean_std_curves(curves: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    array = np.asarray(curves, dtype=np.float64)
    return array.mean(0), (array.std(0, ddof=1) if len(array) > 1 else np.zeros(array.shape[1]))


def plot_band(ax, xs, curves, label: str) -> None:
    mean, std = mean_std_curves(curves)
    (line,) = ax.plot(xs, mean, marker="o", ms=3, label=f"{label} (n={len(curves)})")
    if len(curves) > 1:
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)


def plot_compare(results: Sequence[RunResult], partitions: Sequence[str], groups: Sequence[str], out: Path) -> list[Path]:
    """rewards_<objective>.png (one panel per partition, one curve per algorithm, mean +- std
    over seeds) and drift.png (spread of lambda and adapter distance per round)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    names = results[0].summary["objectives"]
    paths = []
    panels = [(f"reward/{n}", f"rewards_{safe_name(n)}.png", f"final-round mean reward: {n}") for n in names]
    for key, filename, title in panels:
        fig, axes = plt.subplots(1, len(partitions), figsize=(5 * len(partitions), 3.6), squeeze=False)
        for ax, partition in zip(axes[0], partitions):
            for group in groups:
                runs = [r for r in results if r.run.group == group and r.run.partition == partition]
                if runs:
                    plot_band(ax, runs[0].summary["rounds"], [r.summary["reward_curve"][key.split("/", 1)[1]]
                                                                for r in runs], group)
            ax.set_title(f"{key.split('/', 1)[1]} ({partition})")
            ax.set_xlabel("round")
            ax.set_ylabel("mean reward of sampled responses")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{title}; band = ± std over seeds", fontsize=9)
        fig.tight_layout()
        paths.append(out / filename)
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)

    fig, axes = plt.subplots(2, len(partitions), figsize=(5 * len(partitions), 6.4), squeeze=False)
    for column, partition in enumerate(partitions):
        for row, (key, ylabel) in enumerate((("drift_curve", "std of lambda across clients"),
                                             ("adapter_distance_curve", "adapter distance from mean"))):
            ax = axes[row][column]
            for group in groups:
                runs = [r for r in results if r.run.group == group and r.run.partition == partition
                        and r.summary[key] is not None]
                if runs:
                    plot_band(ax, runs[0].summary["rounds"], [r.summary[key] for r in runs], group)
            ax.set_title(f"{ylabel} ({partition})", fontsize=9)
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("client disagreement drift per round; band = ± std over seeds", fontsize=9)
    fig.tight_layout()
    paths.append(out / "drift.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def plot_pareto(points: dict[str, list[dict[str, Any]]], names: Sequence[str], out: Path) -> list[Path]:
    """front.png: final (reward 1, reward 2) per preference, error bars = std over seeds;
    knob.png: lambda_1 actually used (mean over rounds) against the preference p_1."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.6))
    for group, rows in points.items():
        xs = [r["reward"][0].mean for r in rows]
        ys = [r["reward"][1].mean for r in rows]
        xerr = [r["reward"][0].std or 0.0 for r in rows]
        yerr = [r["reward"][1].std or 0.0 for r in rows]
        container = ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", ms=4, capsize=2, lw=1, label=group)
        for row, x, y in zip(rows, xs, ys):
            ax.annotate("p=" + format_vector(row["preference"]), (x, y), fontsize=6, xytext=(3, 3),
                        textcoords="offset points", color=container[0].get_color())
    ax.set_xlabel(f"final reward: {names[0]}")
    ax.set_ylabel(f"final reward: {names[1]}")
    ax.set_title("final rewards per preference (error bars: ± std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "front.png"]
    fig.savefig(paths[0], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for group, rows in points.items():
        rows = [r for r in rows if r["lambda_1"].mean is not None]
        if rows:
            ax.errorbar([r["preference"][0] for r in rows], [r["lambda_1"].mean for r in rows],
                        yerr=[r["lambda_1"].std or 0.0 for r in rows], marker="o", ms=4, capsize=2, label=group)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="lambda = p")
    ax.set_xlabel(f"preference p[{names[0]}]")
    ax.set_ylabel(f"lambda[{names[0]}], mean over rounds and clients")
    ax.set_title("does the preference move the weights?", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "knob.png")
    fig.savefig(paths[1], dpi=90)
    plt.close(fig)
    return paths


# ---- firm compare ---------------------------------------------------------------------------
def warn_seeds(seeds: Sequence[int]) -> None:
    if len(seeds) < MIN_SEEDS_FOR_CLAIMS:
        print(f"warning: {len(seeds)} seed(s): a claim needs >= {MIN_SEEDS_FOR_CLAIMS} seeds (mean and spread); "
              "these results only show that the runs work", file=sys.stderr)


def reference_algorithm(groups: Sequence[str]) -> str:
    """FIRM's claims are about firm; without firm the first algorithm is the reference."""
    return "firm" if "firm" in groups else groups[0]


def compare_tables(results: Sequence[RunResult], partitions: Sequence[str], groups: Sequence[str]
                   ) -> tuple[str, dict[str, Any]]:
    names = results[0].summary["objectives"]
    metrics = compare_metrics(names)
    keys = [m[0] for m in metrics]
    reference = reference_algorithm(groups)
    text, aggregates, verdicts = [], {}, {}
    for partition in partitions:
        stats = {g: aggregate_group([r for r in results if r.run.group == g and r.run.partition == partition], keys)
                 for g in groups}
        aggregates[partition] = {g: {k: s.to_dict() for k, s in st.items()} for g, st in stats.items()}
        header = ["algorithm", "seeds", *[m[1] for m in metrics], "wall s / run"]
        rows = []
        for g in groups:
            runs = [r for r in results if r.run.group == g and r.run.partition == partition]
            walls = [r.summary["wall_seconds"] for r in runs if r.summary.get("wall_seconds") is not None]
            rows.append([g, str(len(runs)), *[format_stat(stats[g][k], k) for k in keys],
                         f"{np.mean(walls):.0f}" if walls else "n/a"])
        text.append(f"## partition: {partition}\n\n" + markdown_table(header, rows))
        others = [g for g in groups if g != reference]
        if others:
            verdict_rows = []
            verdicts[partition] = {}
            for key, label, claim, higher in metrics:
                row = [f"({claim}) {label}", "higher" if higher else "lower"]
                for other in others:
                    verdict = compare_stats(stats[reference][key], stats[other][key], higher)
                    verdicts[partition].setdefault(other, {})[key] = verdict
                    row.append(verdict)
                verdict_rows.append(row)
            text.append(f"\n### {reference} against the others ({partition})\n\n"
                        f"'better' / 'worse': {reference}'s mean ± std interval lies entirely on the better / worse "
                        "side of the other's; 'within spread': the intervals overlap, no claim. "
                        "(n): the claim of the paper the row tests.\n\n"
                        + markdown_table(["metric", "better is", *[f"{reference} vs {o}" for o in others]],
                                         verdict_rows))
            constant = [g for g in ("linear", "fsmgda") if g in others]
            if constant:
                text.append(f"\nlambda drift of {' and '.join(constant)} is 0 by construction (linear: lambda = p "
                            "fixed; fsmgda: one lambda chosen by the server); for them the drift claim rests on the "
                            "adapter distance.\n")
    return "\n".join(text), {"aggregates": aggregates, "verdicts": verdicts, "reference_algorithm": reference}


def finish_experiment(kind: str, args: argparse.Namespace, out: Path, runs, failures, fixed_reference,
                      settings: dict[str, Any], build) -> int:
    """Collect the finished runs of ``compare`` or ``pareto``, score their hypervolumes against
    one reference point, and write tables, results.json and plots. ``build(results, reference)``
    returns the experiment's own (tables, extra results, plot function)."""
    results = collect(runs, failures, args.eval_prompts)
    if results:
        names = results[0].summary["objectives"]
        reference = fixed_reference or reference_point([r.rounds for r in results], names,
                                                       finals=[r.summary["final_reward"] for r in results])
        add_hypervolumes(results, reference)
        tables, extra, plot = build(results, reference)
        config = runs[0].config
        settings = {**settings, "seeds": parse_seeds(args.seeds), "train_flags": list(args.train_args),
                    "num_rounds": config.num_rounds, "num_clients": config.num_clients,
                    "policy": config.policy, "rewards": config.rewards}
        write_outputs(out, kind, canonical_command(kind, args), settings, names, reference,
                      fixed_reference is not None, results, failures, tables, extra, plot)
    return report_failures(failures, results, out)


def run_compare(args: argparse.Namespace) -> int:
    algorithms = parse_names(args.algorithms, ALGORITHMS, "algorithms")
    partitions = parse_names(args.partitions, PARTITIONS, "partitions")
    seeds = parse_seeds(args.seeds)
    check_eval_prompts(args.eval_prompts)
    flags = list(args.train_args)
    namespace = parse_train_flags(flags, HARNESS_FLAGS_COMPARE)
    out = Path(args.out).resolve()
    runs = [plan_run(namespace, out / "runs" / partition / algorithm / f"seed-{seed}", algorithm, algorithm,
                     partition, seed)
            for partition in partitions for algorithm in algorithms for seed in seeds]
    num_objectives = len(runs[0].config.reward_specs())
    fixed_reference = parse_reference_point(args.reference_point, num_objectives)
    warn_seeds(seeds)
    failures = execute_plan(runs, flags, dry_run=args.dry_run, eval_prompts=args.eval_prompts)
    if args.dry_run:
        return 0
    def build(results, reference):
        groups = [a for a in algorithms if any(r.run.group == a for r in results)]
        tables, extra = compare_tables(results, partitions, groups)
        return tables, extra, lambda: plot_compare(results, partitions, groups, out)

    return finish_experiment("compare", args, out, runs, failures, fixed_reference,
                             {"algorithms": algorithms, "partitions": partitions}, build)


def canonical_command(experiment: str, args: argparse.Namespace) -> str:
    """The command that reproduces this experiment (every option spelled out)."""
    options = [f"--{k.replace('_', '-')} {json.dumps(v) if isinstance(v, str) and (not v or ' ' in v or ';' in v) else v}"
               for k, v in sorted(vars(args).items())
               if k not in ("func", "command", "train_args", "dry_run", "out")]
    return " ".join([f"firm {experiment} --out {args.out}", *options, "--", *args.train_args])


def write_outputs(out: Path, experiment: str, command: str, settings: dict[str, Any], names: Sequence[str],
                  reference: Sequence[float], fixed: bool, results: Sequence[RunResult], failures: Sequence[Failure],
                  tables: str, extra: dict[str, Any], plot) -> None:
    out.mkdir(parents=True, exist_ok=True)
    header = [f"# firm {experiment}: {out}", "", f"Command: `{command}`", "",
              f"Settings: {json.dumps(settings)}.", "", reference_text(names, reference, fixed), "",
              f"Final reward: {results[0].summary['final_reward_source']}.", "",
              "Values are mean ± sample std (ddof 1) over seeds; smoothness = std over rounds of the round-to-round "
              "change of the mean reward (lower = smoother); lambda drift = mean over rounds of the std of lambda "
              "across clients; bytes are per client per round, as the server's counters logged them.", ""]
    if failures:
        header += ["FAILED runs (left out of every number below): "
                   + "; ".join(f"{f.run.describe()}: {f.reason}" for f in failures), ""]
    (out / "table.md").write_text("\n".join(header) + "\n" + tables)
    plots = plot()
    payload = {"experiment": experiment, "command": command, "settings": settings,
               "reference_point": dict(zip(names, reference)), "reference_point_fixed": fixed,
               "runs": [run_entry(r) for r in results],
               "failures": [{"run": f.run.describe(), "run_dir": str(f.run.run_dir), "reason": f.reason,
                             "log_tail": f.log_tail} for f in failures],
               "plots": [str(p.relative_to(out)) for p in plots], **extra}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out / 'table.md'}, {out / 'results.json'} and {', '.join(p.name for p in plots)}")


def report_failures(failures: Sequence[Failure], results: Sequence[RunResult], out: Path) -> int:
    if not results:
        print(f"error: no run completed; nothing to summarise in {out}", file=sys.stderr)
    if failures:
        print(f"error: {len(failures)} run(s) failed:", file=sys.stderr)
        for f in failures:
            print(f"  {f.run.describe()}: {f.reason} (log: {f.run.run_dir / TRAIN_LOG})", file=sys.stderr)
    return 1 if failures or not results else 0


# ---- firm pareto ----------------------------------------------------------------------------
def pareto_group(algorithm: str, beta: float | None) -> str:
    return algorithm if beta is None else f"{algorithm} (beta={beta:g})"


def depends_on_beta(algorithm: str) -> bool:
    """Whether beta changes what the algorithm does: linear uses p as fixed weights (no solver),
    and the unregularized methods (mgda, fsmgda) set beta to 0. Pareto runs the others at every
    beta and these once per preference."""
    if algorithm == "linear":
        return False
    return FirmConfig(algorithm=algorithm, beta=1.0).effective_beta() != FirmConfig(algorithm=algorithm,
                                                                                 beta=0.0).effective_beta()


def plan_pareto(namespace: argparse.Namespace, out: Path, algorithms: Sequence[str], betas: Sequence[float],
                preferences: Sequence[tuple[float, ...]], partition: str, seeds: Sequence[int]) -> list[PlannedRun]:
    runs = []
    for algorithm in algorithms:
        for beta in (betas if depends_on_beta(algorithm) else [None]):
            folder = algorithm if beta is None else f"{algorithm}-beta{beta:g}"
            for preference in preferences:
                for seed in seeds:
                    run_dir = out / "runs" / folder / f"p{format_vector(preference).replace(',', '-')}" / f"seed-{seed}"
                    runs.append(plan_run(namespace, run_dir, pareto_group(algorithm, beta), algorithm, partition,
                                         seed, preference, beta))
    return runs


def pareto_tables(results: Sequence[RunResult], groups: Sequence[str], preferences: Sequence[tuple[float, ...]],
                  seeds: Sequence[int], reference: Sequence[float]) -> tuple[str, dict[str, Any], dict[str, list]]:
    names = results[0].summary["objectives"]
    points: dict[str, list[dict[str, Any]]] = {}
    point_rows, front_rows, fronts = [], [], {}
    for group in groups:
        rows = []
        for preference in preferences:
            runs = [r for r in results if r.run.group == group and r.run.preference == preference]
            if not runs:
                continue
            rows.append({
                "preference": preference,
                "seeds": [r.run.seed for r in runs],
                "reward": [aggregate([r.summary["final_reward"][n] for r in runs]) for n in names],
                "lambda_1": aggregate([None if r.summary["lambda_mean_over_rounds"] is None
                                       else r.summary["lambda_mean_over_rounds"][0] for r in runs]),
            })
        points[group] = rows
        for row in rows:
            point_rows.append([group, format_vector(row["preference"]), str(len(row["seeds"])),
                               *[format_stat(s) for s in row["reward"]], format_stat(row["lambda_1"])])
        front = pareto_front_summary(group, rows, results, names, seeds, reference)
        fronts[group] = front
        front_rows.append(front_row(group, front, names))
    text = ("## points (final reward per preference)\n\n"
            + markdown_table(["algorithm", "preference", "seeds", *[f"final reward {n}" for n in names],
                              f"lambda[{names[0]}] (mean over rounds)"], point_rows)
            + "\n## fronts\n\n"
            "hypervolume: of each seed's set of final points (one per preference), mean ± std over seeds. "
            "rho_m: Spearman rank correlation of the preference weight p_m and the final reward of objective m "
            "over the preferences (on the seed means; +1 = the points follow the order of the preferences). "
            "moves beyond spread: the final reward of objective 1 at the largest p_1 exceeds the one at the "
            "smallest p_1 by more than the spread. lambda range: how far the weights actually used moved.\n\n"
            + markdown_table(["algorithm", "front hypervolume", *[f"rho_{n} (p-value)" for n in names],
                              "rho per seed (mean ± std)", "order follows preferences",
                              f"{names[0]}: moves beyond spread", f"lambda[{names[0]}] range"], front_rows))
    return text, {"fronts": fronts, "points": {g: [point_entry(r) for r in rows] for g, rows in points.items()}}, points


def point_entry(row: dict[str, Any]) -> dict[str, Any]:
    return {"preference": list(row["preference"]), "seeds": row["seeds"],
            "reward": [s.to_dict() for s in row["reward"]], "lambda_1": row["lambda_1"].to_dict()}


def pareto_front_summary(group: str, rows: Sequence[dict[str, Any]], results: Sequence[RunResult],
                         names: Sequence[str], seeds: Sequence[int], reference: Sequence[float]) -> dict[str, Any]:
    """Hypervolume of each seed's front, rank correlations, and whether the knob moves objective 1."""
    per_seed_hv, per_seed_rho = [], []
    for seed in seeds:
        runs = sorted((r for r in results if r.run.group == group and r.run.seed == seed),
                      key=lambda r: r.run.preference)
        if len(runs) != len(rows) or len(runs) < 2:  # an incomplete front is not comparable
            continue
        finals = [[r.summary["final_reward"][n] for n in names] for r in runs]
        per_seed_hv.append(hypervolume(finals, reference))
        per_seed_rho.append(rank_correlation([r.run.preference[0] for r in runs], [f[0] for f in finals])["rho"])
    correlations = ([rank_correlation([r["preference"][m] for r in rows], [r["reward"][m].mean for r in rows])
                     for m in range(len(names))] if len(rows) >= 2 else [])
    by_p1 = sorted(rows, key=lambda r: r["preference"][0])
    lambdas = [r["lambda_1"].mean for r in rows if r["lambda_1"].mean is not None]
    return {
        "hypervolume": aggregate(per_seed_hv).to_dict(),
        "rank_correlation": dict(zip(names, correlations)),
        "rho_per_seed": aggregate(per_seed_rho, "constant rewards on a seed: no order").to_dict(),
        "order_follows_preferences": order_follows(correlations),
        "moves_beyond_spread": (compare_stats(by_p1[-1]["reward"][0], by_p1[0]["reward"][0], higher_is_better=True)
                                if len(by_p1) >= 2 else "n/a (one preference)"),
        "lambda_1_range": [min(lambdas), max(lambdas)] if lambdas else None,
    }


def order_follows(correlations: Sequence[dict[str, Any]]) -> bool | None:
    """True when every objective's final reward has exactly the order of its preference weight
    (rho = +1); False when one has not; None when that cannot be told (constant rewards)."""
    known = [c["rho"] for c in correlations if c["rho"] is not None]
    if any(rho < 1 - 1e-9 for rho in known):
        return False
    return True if known and len(known) == len(correlations) else None


def front_row(group: str, front: dict[str, Any], names: Sequence[str]) -> list[str]:
    def rho_text(c: dict[str, Any] | None) -> str:
        if not c or c["rho"] is None:
            return "n/a" + (f" ({c['note']})" if c else "")
        return f"{c['rho']:+.2f} ({c['p_value']:.2g})"

    hv = front["hypervolume"]
    seeds_rho = front["rho_per_seed"]
    lam = front["lambda_1_range"]
    return [group, format_stat(Stat(hv["mean"], hv["std"], hv["n"], hv.get("note", ""))),
            *[rho_text(front["rank_correlation"].get(n)) for n in names],
            format_stat(Stat(seeds_rho["mean"], seeds_rho["std"], seeds_rho["n"], seeds_rho.get("note", ""))),
            {True: "yes", False: "no", None: "n/a"}[front["order_follows_preferences"]],
            "yes (larger)" if front["moves_beyond_spread"] == "better" else front["moves_beyond_spread"],
            "n/a" if lam is None else f"{lam[0]:.3f} .. {lam[1]:.3f}"]


def run_pareto(args: argparse.Namespace) -> int:
    algorithms = parse_names(args.algorithms, ALGORITHMS, "algorithms")
    if args.partition not in PARTITIONS:
        raise ExperimentError(f"--partition must be one of {', '.join(PARTITIONS)}, got {args.partition!r}")
    seeds = parse_seeds(args.seeds)
    check_eval_prompts(args.eval_prompts)
    betas = parse_betas(args.betas)
    flags = list(args.train_args)
    namespace = parse_train_flags(flags, HARNESS_FLAGS_PARETO)
    num_objectives = len(expected_config(namespace, {}).reward_specs())
    preferences = parse_preferences(args.preferences, num_objectives)
    fixed_reference = parse_reference_point(args.reference_point, num_objectives)
    out = Path(args.out).resolve()
    runs = plan_pareto(namespace, out, algorithms, betas, preferences, args.partition, seeds)
    warn_seeds(seeds)
    if len(preferences) < MIN_PREFERENCES:
        print(f"warning: {len(preferences)} preferences; a front needs >= {MIN_PREFERENCES} to say much",
              file=sys.stderr)
    failures = execute_plan(runs, flags, dry_run=args.dry_run, eval_prompts=args.eval_prompts)
    if args.dry_run:
        return 0
    def build(results, reference):
        groups = list(dict.fromkeys(r.group for r in runs if any(x.run.group == r.group for x in results)))
        tables, extra, points = pareto_tables(results, groups, preferences, seeds, reference)
        return tables, extra, lambda: plot_pareto(points, results[0].summary["objectives"], out)

    return finish_experiment("pareto", args, out, runs, failures, fixed_reference,
                             {"algorithms": algorithms, "betas": betas, "preferences": [list(p) for p in preferences],
                              "partition": args.partition}, build)


# ---- command line ---------------------------------------------------------------------------
def add_experiment_commands(subparsers) -> None:
    """Register `compare` and `pareto` on the `firm` command's subparsers."""
    epilog = ("Flags after -- go to every `firm train` run, e.g. "
              "-- --num-rounds 3 --num-clients 4 --rewards relevance,civility. The harness sets --run-dir, "
              "--algorithm, --partition and --seed itself (pareto also --preference and --beta). A run whose "
              "directory already holds all rounds is reused; an unfinished one is resumed.")
    compare = subparsers.add_parser(
        "compare", help="run algorithms side by side on the same data, partitions and seeds; table + plots",
        epilog=epilog, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    compare.add_argument("--out", required=True, help="experiment directory (runs/, table.md, results.json, plots)")
    compare.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated algorithms")
    compare.add_argument("--partitions", default=",".join(PARTITIONS), help="comma-separated prompt partitions")
    add_common_options(compare)
    compare.set_defaults(handler=run_compare)

    pareto = subparsers.add_parser(
        "pareto", help="sweep preference vectors for firm and linear; front, hypervolume, rank correlation",
        epilog=epilog, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pareto.add_argument("--out", required=True, help="experiment directory (runs/, table.md, results.json, plots)")
    pareto.add_argument("--algorithms", default="firm,linear", help="comma-separated algorithms")
    pareto.add_argument("--preferences", default="",
                        help="';'-separated preference vectors, e.g. '0.1,0.9;0.5,0.5;0.9,0.1' "
                             "('' = p_1 in 0.1, 0.3, 0.5, 0.7, 0.9 for two objectives)")
    pareto.add_argument("--betas", default="0.01",
                        help="comma-separated beta values; each beta-dependent algorithm (firm) runs at each")
    pareto.add_argument("--partition", default="iid", choices=PARTITIONS, help="prompt partition of every run")
    add_common_options(pareto)
    pareto.set_defaults(handler=run_pareto)


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", default="0,1,2", help=f"comma-separated seeds (claims need >= {MIN_SEEDS_FOR_CLAIMS})")
    parser.add_argument("--reference-point", default="",
                        help="fixed hypervolume reference point, one value per objective "
                             "('' = lowest observed reward minus 1%% of its range)")
    parser.add_argument("--eval-prompts", type=int, default=0,
                        help="score each run's final adapter with `firm eval` on this many prompts and use that as "
                             "the final reward (0 = the last round record, whose rollouts predate the last update)")
    parser.add_argument("--dry-run", action="store_true", help="print the planned runs and commands, run nothing")
    parser.add_argument("train_args", nargs="*", default=[], metavar="-- TRAIN_FLAGS",
                        help="flags for every `firm train` run, after a lone --")


__all__ = ["ExperimentError", "add_experiment_commands", "run_compare", "run_pareto", "summarize_run", "smoothness",
           "hypervolume", "reference_point", "aggregate", "compare_stats", "rank_correlation", "Stat",
           "read_round_records", "run_status", "parse_preferences", "parse_train_flags"]
