"""What a person watching a run sees: a progress display over rounds and each client's work
inside a round, with an ETA, and one line per finished round.

The clients run in Flower's simulation workers (other processes), so a client reports its work
through a small JSON file per client in a directory the display owns (``ClientProgressWriter``;
node config ``progress-dir``, set only by `firm train` for its own simulated nodes); the display
polls that directory. A round's work for one client is its rollouts plus its local update steps.

Library logs (Flower, Ray, Python warnings) are routed through the display's console while it
runs, so they print above the bar instead of through it; piped output is never wrapped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from firm.config import FirmConfig
from firm.trainer import steps_per_rollout

PROGRESS_FILE_PREFIX = "client-"
POLL_SECONDS = 0.5
# Loggers whose records are routed through the display (warnings.warn arrives as py.warnings).
ROUTED_LOGGERS = ("flwr", "ray", "py.warnings")
# Width of piped output: wide enough that a round line is never wrapped.
PIPE_WIDTH = 400


def client_work(config: FirmConfig, shard_size: int, num_objectives: int) -> tuple[int, int]:
    """(rollouts, update steps) one client does in a round: every rollout batch is trained on
    once per uploaded adapter (fsmgda: once per objective)."""
    batch = min(config.rollout_batch_size, shard_size)
    passes = config.algorithm_spec().adapters_uploaded(num_objectives)
    return config.rollouts_per_round, passes * config.rollouts_per_round * steps_per_rollout(config, batch)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def eta_seconds(elapsed: float, done: float, remaining: float) -> float | None:
    """Seconds left at the pace so far (``done`` units took ``elapsed`` seconds); None before
    any unit is done."""
    if done <= 0 or elapsed <= 0:
        return None
    return elapsed / done * remaining


class ClientProgressWriter:
    """Called by the trainer after each rollout and each update step; keeps
    ``<directory>/client-<partition>.json`` at the client's position in its round."""

    def __init__(self, directory: str | Path, partition_id: int, firm_round: int, rollouts: int, updates: int):
        self.path = Path(directory) / f"{PROGRESS_FILE_PREFIX}{partition_id}.json"
        self.state = {"partition": partition_id, "round": firm_round, "rollouts": 0, "rollouts_total": rollouts,
                      "updates": 0, "updates_total": updates}
        self.write()

    def __call__(self, phase: str) -> None:
        key = {"rollout": "rollouts", "update": "updates"}[phase]
        self.state[key] += 1
        self.write()

    def write(self) -> None:
        # temp file + rename: the display never reads half a file
        fd, tmp = tempfile.mkstemp(prefix=".progress-", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(self.state, f)
        os.replace(tmp, self.path)


def read_client_progress(directory: Path, firm_round: int) -> dict[int, dict[str, int]]:
    """Each client's position in round ``firm_round``, by partition id (a file being replaced
    or from another round is skipped)."""
    found = {}
    for path in directory.glob(f"{PROGRESS_FILE_PREFIX}*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(state, dict) and state.get("round") == firm_round:
            found[int(state["partition"])] = state
    return found


def client_fraction(state: dict[str, int]) -> float:
    total = state["rollouts_total"] + state["updates_total"]
    return (state["rollouts"] + state["updates"]) / total if total else 0.0


def client_detail(state: dict[str, int]) -> str:
    return (f"rollout {state['rollouts']}/{state['rollouts_total']}  "
            f"update {state['updates']}/{state['updates_total']}")


def round_line(record: dict[str, Any]) -> str:
    """One finished round on one line: rewards, KL, lambda, upload, rejected replies."""
    rewards = "  ".join(f"{k.split('/', 1)[1]}={v:.3f}" for k, v in record.items() if k.startswith("reward/"))
    lam = ", ".join(f"{x:.2f}" for x in record["lambda_mean"])
    return (f"round {record['round']}: {rewards}  kl={record['kl']:.3f}  lambda=[{lam}] "
            f"(std {max(record['lambda_std']):.3f})  up {record['bytes_up_per_client'] / 1e6:.2f} MB/client  "
            f"rejected={len(record['rejected'])}")


class ConsoleLogHandler(logging.Handler):
    """A log record as one line through a rich console: above its live display, never padded
    or wrapped."""

    def __init__(self, console):
        super().__init__()
        self.console = console
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(" ".join(self.format(record).split()), markup=False, highlight=False)
        except Exception:
            self.handleError(record)


@contextmanager
def no_transformers_bars() -> Iterator[None]:
    """transformers' own per-load progress bars ("Loading weights") off while inside: they would
    print through a live display, and say nothing about the run."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def routed_library_logs(console) -> Iterator[None]:
    """While inside: Flower's, Ray's and Python's warnings print through ``console`` (above a
    live display), transformers' own progress bars are off, and all is put back after."""
    bars = no_transformers_bars()
    bars.__enter__()
    handler = ConsoleLogHandler(console)
    saved = []
    for name in ROUTED_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        bars.__exit__(None, None, None)
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate


class RunProgress:
    """The display of `firm train` and ``firm.train``: a bar over the run's client-rounds that
    moves with every rollout and update step of every client, the elapsed time and an ETA, one
    line per client at work, and one line per finished round. Not on a terminal (piped): only
    the round lines, each with the ETA, never wrapped. ``enabled=False``: silent."""

    def __init__(self, config: FirmConfig, done_rounds: int, enabled: bool = True):
        from rich.console import Console

        self.config = config
        self.enabled = enabled
        self.total_rounds = config.num_rounds
        self.done_rounds = done_rounds
        self.start_rounds = done_rounds
        interactive = Console(stderr=True).is_terminal
        self.console = Console(stderr=True, soft_wrap=True, width=None if interactive else PIPE_WIDTH)
        self.live = enabled and interactive
        self.client_progress: Path | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the poller and the round callback run in different threads
        self._logs = None
        self.started = time.monotonic()
        self.progress = None

    # ---- lifetime -------------------------------------------------------------------------------
    def __enter__(self) -> "RunProgress":
        if not self.enabled:
            return self
        self.started = time.monotonic()
        self._logs = routed_library_logs(self.console)
        self._logs.__enter__()
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn

            self.client_progress = Path(tempfile.mkdtemp(prefix="firm-progress-"))
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
                                     console=self.console, refresh_per_second=4)
            self.progress.__enter__()
            self.overall = self.progress.add_task(self.round_label(), total=self.total_rounds * self.config.num_clients,
                                                  completed=self.done_rounds * self.config.num_clients, detail="")
            self.client_tasks: dict[int, Any] = {}
            self._thread = threading.Thread(target=self._poll, name="firm-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.progress is not None:
            self.progress.__exit__(*exc)
        if self.client_progress is not None:
            shutil.rmtree(self.client_progress, ignore_errors=True)
        self._logs.__exit__(*exc)

    # ---- what the display shows ------------------------------------------------------------------
    def round_label(self) -> str:
        current = min(self.done_rounds + 1, self.total_rounds)
        return f"[bold]FIRM[/] round {current}/{self.total_rounds}"

    def timing(self, units_done: float) -> str:
        """Elapsed time and ETA, from the client-rounds done since this display started."""
        elapsed = time.monotonic() - self.started
        total = self.total_rounds * self.config.num_clients
        done_here = units_done - self.start_rounds * self.config.num_clients
        eta = eta_seconds(elapsed, done_here, total - units_done)
        if eta is None:
            return f"{format_seconds(elapsed)} elapsed; starting Flower and loading the models (ETA after the first step)"
        return f"{format_seconds(elapsed)} elapsed, ETA {format_seconds(eta)}"

    def _poll(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self.refresh_clients()

    def refresh_clients(self) -> None:
        with self._lock:
            self._refresh_clients()

    def _refresh_clients(self) -> None:
        states = read_client_progress(self.client_progress, self.done_rounds + 1)
        for pid, state in sorted(states.items()):
            if pid not in self.client_tasks:
                self.client_tasks[pid] = self.progress.add_task(f"  client {pid}", total=1.0, detail="")
            self.progress.update(self.client_tasks[pid], completed=client_fraction(state), detail=client_detail(state))
        units = self.done_rounds * self.config.num_clients + sum(client_fraction(s) for s in states.values())
        self.progress.update(self.overall, completed=units, description=self.round_label(), detail=self.timing(units))

    def on_round(self, result) -> None:
        """A round finished (firm.federation.server_app's callback): print its line, move on."""
        self.done_rounds = result.round
        if not self.enabled:
            return
        units = self.done_rounds * self.config.num_clients
        self.console.print(f"{round_line(result.round_record)}  [{self.timing(units)}]", highlight=False)
        if self.progress is not None:
            with self._lock:
                for task in self.client_tasks.values():
                    self.progress.remove_task(task)
                self.client_tasks = {}
                self.progress.update(self.overall, completed=units, description=self.round_label(),
                                     detail=self.timing(units))


__all__ = ["ClientProgressWriter", "RunProgress", "client_work", "eta_seconds", "format_seconds",
           "read_client_progress", "round_line", "routed_library_logs"]
