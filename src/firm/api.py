"""The Python API: ``from firm import FirmConfig, train``.

    from firm import FirmConfig, train

    result = train(FirmConfig(num_clients=2, num_rounds=1, rollout_batch_size=4))
    print(result.run_dir, result.metrics["reward/helpful"], result.adapter)

``train`` does what `firm train` does (the CLI calls the same functions): check every input
before anything is written, create the run directory, run the Flower apps on Flower's simulation
engine, and return where the run is and its last round's metrics. A run that stops early raises
``TrainingStopped`` (a FirmError) after keeping everything written; ``train(resume=RUN_DIR)``
continues it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from firm.config import DEFAULT_PRESET, ConfigError, FirmConfig, build_config
from firm.errors import FirmError
from firm.rundir import CONFIG_FILE, RunDir, default_run_dir

# Settings a resumed run may change (everything else is the run's own).
RESUMABLE_SETTINGS = ("num_rounds",)


class TrainingStopped(FirmError):
    """The run stopped before its last round; everything written is kept (resume it)."""

    def __init__(self, message: str, run_dir: Path, completed_rounds: int):
        super().__init__(message)
        self.run_dir = run_dir
        self.completed_rounds = completed_rounds


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    """the run directory (config.json, metrics.jsonl, adapters/, plots/)"""
    completed_rounds: int
    metrics: dict[str, Any]
    """the last round's record from metrics.jsonl: reward/<objective>, kl, lambda_mean, ... ({} if none)"""
    adapter: Path | None
    """the last round's global adapter (a peft folder with a model card)"""
    heldout: dict[str, Any] | None = None
    """the held-out before/after (RUN_DIR/heldout.json: untrained policy and final adapter on the same
    held-out prompts, the paired gain per objective with its interval); None when heldout_prompts = 0"""


def config_file_values(path: str | Path) -> dict[str, Any]:
    """The settings a JSON config file holds (any subset of FirmConfig's fields; a saved run's
    config.json holds all of them), checked by name and type. A run's own config.json names its
    own folder as run_dir; that entry is dropped, so rerunning it writes a new run directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object of settings, got {type(values).__name__}")
    try:
        FirmConfig.from_dict(values)  # names and types
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    run_dir = values.get("run_dir")
    if run_dir and (path.parent / CONFIG_FILE == path) and Path(run_dir).resolve() == path.parent.resolve():
        values = {k: v for k, v in values.items() if k != "run_dir"}
    return values


def resolve_config(config: FirmConfig | str | Path | None = None, preset: str | None = None,
                   overrides: Mapping[str, Any] | None = None) -> FirmConfig:
    """The run's validated settings: a preset (default 'default'), under a config file's or a
    FirmConfig's values, under ``overrides``. A FirmConfig is copied, never changed."""
    overrides = dict(overrides or {})
    if isinstance(config, FirmConfig):
        if preset is not None:
            raise ConfigError("pass either a FirmConfig or a preset, not both (a FirmConfig holds every setting)")
        try:
            return dataclasses.replace(config, **overrides).validate()
        except TypeError as err:  # an unknown keyword
            raise ConfigError(f"unknown setting: {err}") from None
    file_values = config_file_values(config) if config is not None else {}
    return build_config(preset or DEFAULT_PRESET, {**file_values, **overrides})


def create_run(config: FirmConfig, preset: str | None = None) -> RunDir:
    """Check every input (prompts, partition, rewards, policy, device), then create the run
    directory; nothing is written when a check fails."""
    from firm.preflight import check_distinct_objectives, check_new_run, preflight

    run_dir = config.run_dir or default_run_dir(preset or DEFAULT_PRESET)
    check_new_run(config, run_dir)
    preflight(config)
    check_distinct_objectives(config)
    config = dataclasses.replace(config)
    return RunDir.create(run_dir, config)


def open_resumed_run(path: str | Path, overrides: Mapping[str, Any] | None = None,
                     save: bool = True) -> tuple[RunDir, FirmConfig]:
    """A run to continue, with the settings it keeps (only num_rounds may change), checked as
    strictly as a fresh start, and config.json against what the run saved."""
    from firm.preflight import check_model_inputs, check_resumed_run, preflight

    run = RunDir.open(path)
    config = run.config()
    overrides = dict(overrides or {})
    extra = sorted(set(overrides) - set(RESUMABLE_SETTINGS))
    if extra:
        raise ConfigError(f"a resumed run keeps its settings; only --num-rounds may change (got {extra})")
    if "num_rounds" in overrides:
        config.num_rounds = int(overrides["num_rounds"])
        config.validate()
    check_model_inputs(config)
    preflight(config)
    check_resumed_run(run, config)
    if save and "num_rounds" in overrides:
        run.save_config(config)
    return run, config


def check_client_preferences(preferences: Mapping[int, Any] | None, config: FirmConfig) -> dict[int, str]:
    """Simulated nodes' own preferences by partition id, checked against the run's settings (each
    is what a deployed node would put in its node config)."""
    from firm.federation.node_preference import NODE_PREFERENCE_KEY, config_for_node

    checked = {}
    for pid, preference in (preferences or {}).items():
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < config.num_clients:
            raise ConfigError(f"client preference for client {pid!r}: clients are 0 to {config.num_clients - 1}")
        try:
            checked[pid] = config_for_node(config, {NODE_PREFERENCE_KEY: preference}).preference
        except FirmError as err:
            raise ConfigError(f"client {pid}: {err}") from None
    return checked


def parse_client_preference(item: str) -> tuple[int, str]:
    """'PID=P' (the --client-preference flag): a partition id and its preference."""
    pid, sep, preference = item.partition("=")
    if not sep or not pid.strip().isdigit():
        raise ConfigError(f"--client-preference expects PARTITION_ID=P1,P2,..., got {item!r}")
    return int(pid), preference


def last_round_record(run: RunDir) -> dict[str, Any]:
    rounds = [r for r in run.read_metrics() if r.get("type") == "round"]
    return max(rounds, key=lambda r: r["round"]) if rounds else {}


def execute(run: RunDir, config: FirmConfig, *, verbose: bool = False,
            on_round: Callable[[Any], None] | None = None, client_progress: Any = None,
            client_preferences: Mapping[int, str] | None = None) -> TrainResult:
    """Run the Flower apps on the simulation engine until the run's last round; TrainingStopped
    when it stops early (its message says why and how to resume)."""
    from firm.federation.simulation import run_simulation

    flower = logging.getLogger("flwr")
    level = flower.level
    if not verbose:
        flower.setLevel(logging.WARNING)  # Flower's per-round INFO log repeats what the display shows
    try:
        run_simulation(config, run.path, verbose=verbose, on_round=on_round, client_progress=client_progress,
                       client_preferences=client_preferences)
    finally:
        flower.setLevel(level)
    state = run.state()
    if state["completed_rounds"] < config.num_rounds:
        raise TrainingStopped(stop_message(state, config.num_rounds, run.path), run.path, state["completed_rounds"])
    return TrainResult(run.path, state["completed_rounds"], last_round_record(run), run.last_adapter())


def run_heldout(run: RunDir, config: FirmConfig) -> dict[str, Any] | None:
    """What a finished run ends with (heldout_prompts > 0): the untrained policy and the final
    adapter scored on the same held-out prompts (firm.heldout; RUN_DIR/heldout.json and
    plots/heldout.png), the final adapter's result written into its model card."""
    if not config.heldout_prompts:
        return None
    from firm.heldout import heldout_before_after
    from firm.model_card import write_heldout
    from firm.plots import plot_heldout
    from firm.progress import no_transformers_bars

    adapter = run.last_adapter()
    with no_transformers_bars():
        record = heldout_before_after(run.path, adapter, config.heldout_prompts, config.heldout_samples)
    run.plots_dir.mkdir(parents=True, exist_ok=True)
    plot_heldout(record["gains"], record["num_prompts"], config.heldout_samples, run.plots_dir / "heldout.png")
    write_heldout(adapter, record["final"])
    return record


def read_heldout(run: RunDir) -> dict[str, Any] | None:
    from firm.heldout import HELDOUT_FILE

    path = run.path / HELDOUT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def stop_message(state: dict, num_rounds: int, run_path: Path) -> str:
    """Why a run stopped early, on one line, then the exact command that continues it."""
    import shlex

    reason = " ".join(str(state.get("error", "see the log above")).split())
    return (f"the run stopped after round {state['completed_rounds']} of {num_rounds}: {reason}; "
            f"everything written so far is kept\n"
            f"resume with: firm train --resume {shlex.quote(str(run_path))}")


def train(config: FirmConfig | str | Path | None = None, *, preset: str | None = None,
          resume: str | Path | None = None, client_preferences: Mapping[int, Any] | None = None,
          progress: bool = True, verbose: bool = False, **overrides: Any) -> TrainResult:
    """Train FIRM on Flower's simulation engine and return the run directory and final metrics.

    ``config``: a FirmConfig, or the path of a JSON config file (a saved run's config.json
    reruns that run into a new directory), or None for the preset's settings. ``overrides``:
    settings by field name (``num_rounds=2``), over the config. ``resume``: continue a run
    directory after its last completed round (only ``num_rounds`` may change).
    ``client_preferences``: {partition id: "0.7,0.3"}, the simulated clients' own preferences
    (each solves its weights toward its own p; the others toward the run's). ``progress``: show
    the progress display (rounds, each client's steps, ETA) on stderr.
    """
    from firm.progress import RunProgress

    if resume is not None:
        if config is not None or preset is not None:
            raise ConfigError("resume continues a run with its own settings; pass no config or preset with it")
        run, resolved = open_resumed_run(resume, overrides)
        own = check_client_preferences(client_preferences, resolved)
    else:
        resolved = resolve_config(config, preset, overrides)
        own = check_client_preferences(client_preferences, resolved)
        run = create_run(resolved, preset)
    done = run.completed_rounds
    if done >= resolved.num_rounds:
        return TrainResult(run.path, done, last_round_record(run), run.last_adapter(), read_heldout(run))
    with RunProgress(resolved, done, enabled=progress) as display:
        result = execute(run, resolved, verbose=verbose, on_round=display.on_round,
                         client_progress=display.client_progress, client_preferences=own)
    return dataclasses.replace(result, heldout=run_heldout(run, resolved))


__all__ = ["TrainResult", "TrainingStopped", "check_client_preferences", "config_file_values", "create_run",
           "execute", "open_resumed_run", "parse_client_preference", "resolve_config", "run_heldout", "stop_message",
           "train"]
