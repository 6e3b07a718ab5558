"""Running the planned runs: `firm train` (and `firm eval` of each final adapter) in subprocesses.

Why a subprocess per run: every run starts its own Flower simulation (Ray); a fresh process
per run keeps Ray's and Flower's global state from leaking from one run into the next, and a
crashed run cannot take the harness down. Its output goes to RUN_DIR/train.log (the
evaluation's to RUN_DIR/eval.log).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from firm.config import EVAL_SEED
from firm.experiments.plan import ExperimentError, PlannedRun, base_eval_path, eval_path, run_status
from firm.rundir import RunDir

LOG_TAIL_LINES = 15
HARNESS_FILE = "harness.json"
"""Written into each run directory the harness ran: the command, exit code and wall time."""
TRAIN_LOG = "train.log"
EVAL_LOG = "eval.log"


@dataclass
class Failure:
    run: PlannedRun
    reason: str
    log_tail: str


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_logged(command: Sequence[str], log_path: Path) -> int:
    """Run ``command`` with its output appended to ``log_path`` after a line naming the command
    and the time; the exit code."""
    with open(log_path, "a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(command)}\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode


def train_command(run: PlannedRun, status: str, train_flags: Sequence[str]) -> list[str]:
    base = [sys.executable, "-m", "firm.cli", "train"]
    if status == "resume":  # a resumed run keeps its settings; only the number of rounds may change
        return base + ["--resume", str(run.run_dir), "--num-rounds", str(run.config.num_rounds)]
    return base + run.harness_flags() + list(train_flags)


def eval_flags(config, num_prompts: int, samples_per_prompt: int, json_path: Path) -> list[str]:
    """`firm eval` flags for the run's held-out prompts, rewards and sampling, with the same seed
    for every evaluation of an experiment (paired)."""
    return ["--policy", config.policy, "--prompts", config.prompts, "--rewards", config.rewards,
            "--split", "eval", "--eval-fraction", repr(config.eval_fraction),
            "--num-prompts", str(num_prompts), "--samples-per-prompt", str(samples_per_prompt),
            "--max-new-tokens", str(config.max_new_tokens), "--temperature", repr(config.temperature),
            "--seed", str(EVAL_SEED), "--show-samples", "0", "--json", str(json_path)]


def eval_command(run: PlannedRun, num_prompts: int, samples_per_prompt: int = 1) -> list[str]:
    """`firm eval` of the last round's adapter on the run's held-out prompts."""
    adapter = RunDir(run.run_dir).adapter_dir(run.config.num_rounds)
    return [sys.executable, "-m", "firm.cli", "eval", "--adapter", str(adapter),
            *eval_flags(run.config, num_prompts, samples_per_prompt, eval_path(run, num_prompts, samples_per_prompt))]


def base_eval_command(run: PlannedRun, out: Path, num_prompts: int, samples_per_prompt: int = 1) -> list[str]:
    """`firm eval` of the untrained policy (no adapter) on the same prompts, samples and seed."""
    return [sys.executable, "-m", "firm.cli", "eval",
            *eval_flags(run.config, num_prompts, samples_per_prompt, base_eval_path(out, num_prompts, samples_per_prompt))]


def execute_base_eval(run: PlannedRun, out: Path, num_prompts: int, samples_per_prompt: int = 1) -> None:
    """Score the untrained policy once per experiment; a failure stops the experiment (every
    run's gain is measured against it)."""
    if base_eval_path(out, num_prompts, samples_per_prompt).exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "base-eval.log"
    print(f"scoring the untrained policy on {num_prompts} held-out prompts x {samples_per_prompt} ...", flush=True)
    returncode = run_logged(base_eval_command(run, out, num_prompts, samples_per_prompt), log_path)
    if returncode != 0 or not base_eval_path(out, num_prompts, samples_per_prompt).exists():
        raise ExperimentError(f"`firm eval` of the untrained policy exited with code {returncode}; its log "
                              f"{log_path} ends:\n{log_tail(log_path)}")


def read_harness_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / HARNESS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def execute_run(run: PlannedRun, status: str, train_flags: Sequence[str]) -> Failure | None:
    """Run (or continue) one training run; record the command, exit code and wall time."""
    command = train_command(run, status, train_flags)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run.run_dir / TRAIN_LOG
    start = time.perf_counter()
    returncode = run_logged(command, log_path)
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


def execute_eval(run: PlannedRun, num_prompts: int, samples_per_prompt: int = 1) -> Failure | None:
    """Score the run's final adapter."""
    log_path = run.run_dir / EVAL_LOG
    returncode = run_logged(eval_command(run, num_prompts, samples_per_prompt), log_path)
    if returncode != 0 or not eval_path(run, num_prompts, samples_per_prompt).exists():
        return Failure(run, f"`firm eval` of the final adapter exited with code {returncode}", log_tail(log_path))
    return None


def execute_plan(runs: Sequence[PlannedRun], train_flags: Sequence[str], dry_run: bool = False,
                 eval_prompts: int = 0, eval_samples: int = 1, out: Path | None = None) -> list[Failure]:
    """Run every planned run in turn (and, with eval_prompts > 0, score its final adapter with
    eval_samples responses per prompt, and once the untrained policy into ``out``);
    a failed run is reported and the others go on."""
    statuses = [run_status(run) for run in runs]  # settings conflicts stop us before anything runs
    failures = []
    if eval_prompts and out is not None and runs:
        if dry_run:
            print(f"untrained policy: {' '.join(base_eval_command(runs[0], out, eval_prompts, eval_samples))}")
        else:
            execute_base_eval(runs[0], out, eval_prompts, eval_samples)
    for index, (run, status) in enumerate(zip(runs, statuses), start=1):
        prefix = f"[{index}/{len(runs)}] {run.describe()}"
        if dry_run:
            print(f"{prefix}: {status}\n    {' '.join(train_command(run, status, train_flags))}")
            if eval_prompts:
                print(f"    then {' '.join(eval_command(run, eval_prompts, eval_samples))}")
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
        if failure is None and eval_prompts and not eval_path(run, eval_prompts, eval_samples).exists():
            print(f"{prefix}: scoring the final adapter on {eval_prompts} prompts x {eval_samples} ...", flush=True)
            failure = execute_eval(run, eval_prompts, eval_samples)
        if failure is not None:
            failures.append(failure)
            print(f"{prefix}: FAILED ({failure.reason}); last lines of its log:\n" + indent(failure.log_tail),
                  flush=True)
    return failures


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


__all__ = ["EVAL_LOG", "Failure", "HARNESS_FILE", "TRAIN_LOG", "base_eval_command", "eval_command", "eval_flags",
           "execute_base_eval", "execute_eval", "execute_plan",
           "execute_run", "log_tail", "read_harness_record", "run_logged", "train_command"]
