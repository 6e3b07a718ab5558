"""The run directory: resolved config, metrics log, per-round adapters, plots, resume state.

Layout::

    RUN_DIR/config.json                  the resolved FirmConfig
    RUN_DIR/metrics.jsonl                one record per client per round, one per round
    RUN_DIR/adapters/round-NNN/          peft adapter (adapter_config.json + adapter_model.safetensors)
    RUN_DIR/state.json                   last completed round (what --resume continues from)
    RUN_DIR/plots/*.png

    RUN_DIR/clients/<partition-id>/      each simulated client's own state (firm.federation.client_state)
    RUN_DIR/server/                      the server's slow-poisoning ledger (firm.federation.defence)

Every file but the metrics log is written atomically (temp file + fsync + os.replace), so an
interrupted run never leaves a half-written adapter, config or state behind. The metrics log is
appended one whole write per round, fsynced; a resumed run moves a torn last line (a crash in
the middle of that write) to metrics.jsonl.torn and drops the metrics of unfinished rounds.

A run never follows a symbolic link it did not make: creating or opening a run directory that is
a link, or holds one where the run writes, is refused (a planted link would redirect its writes).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from firm.config import ConfigError, FirmConfig
from firm.errors import FirmError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TORN_SUFFIX = ".torn"
STATE_FILE = "state.json"
ADAPTERS_DIR = "adapters"
PLOTS_DIR = "plots"
CLIENTS_DIR = "clients"
# Records about a round's attempt (who failed and why) rather than its results: resume keeps them.
ATTEMPT_RECORD_TYPES = ("round-failed",)
# What a run writes inside its directory (folders: also their entries): none may be a symbolic link.
RUN_ENTRIES = (CONFIG_FILE, METRICS_FILE, METRICS_FILE + TORN_SUFFIX, STATE_FILE, ADAPTERS_DIR, PLOTS_DIR,
               CLIENTS_DIR, "server", "tensorboard", "heldout.json")


def default_run_dir(preset: str) -> str:
    """runs/<preset>-<local time>: where a run goes when no run_dir is given."""
    return os.path.join("runs", f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}")


class RunDirError(FirmError, RuntimeError):
    """The run directory is missing, incomplete or not a FIRM run."""


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a whole file or nothing: temp file in the same directory, fsync, os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def append_whole(path: Path, data: bytes) -> None:
    """Append ``data`` with O_APPEND writes (one, unless the kernel writes less) and fsync; never
    through a symbolic link (O_NOFOLLOW)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def split_torn_tail(data: bytes) -> tuple[bytes, bytes]:
    """(the whole lines, a torn last line): the last line is torn when it lacks its newline or
    is not JSON (a crash in the middle of an append). Only the last line can be torn."""
    if data.endswith(b"\n"):
        head, sep, last = data[:-1].rpartition(b"\n")
        if not last.strip():
            return data, b""
        try:
            json.loads(last)
            return data, b""
        except (json.JSONDecodeError, UnicodeDecodeError):
            return head + sep, last + b"\n"
    head, sep, last = data.rpartition(b"\n")
    return head + sep, last


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN: write None so the log stays parseable by any reader."""
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value


def planted_links(path: Path) -> list[Path]:
    """Symbolic links where a run directory writes: the directory itself, its entries and the
    entries of its folders (RUN_ENTRIES). A run never makes one, so each was put there by someone else."""
    if path.is_symlink():
        return [path]
    found = []
    for name in RUN_ENTRIES:
        entry = path / name
        if entry.is_symlink():
            found.append(entry)
        elif entry.is_dir():
            found += [p for p in entry.rglob("*") if p.is_symlink()]
    return found


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def refuse_links(self) -> None:
        links = planted_links(self.path)
        if links:
            raise RunDirError(f"{links[0]} is a symbolic link; a run directory writes only into files and folders it "
                              "made (move the link away)")

    # ---- creation and resume ------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, config: FirmConfig) -> "RunDir":
        run = cls(path)
        if any((run.path / name).exists() or (run.path / name).is_symlink()
               for name in (STATE_FILE, METRICS_FILE, CONFIG_FILE)):
            raise RunDirError(f"{run.path} already holds a run; use --resume {run.path} or another --run-dir")
        if run.path.exists() and not run.path.is_dir():
            raise RunDirError(f"run directory {run.path} is a file, not a folder")
        run.refuse_links()
        try:
            run.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"run directory {run.path} cannot be created: {err.strerror}") from None
        config.run_dir = str(run.path)
        run.save_config(config)
        run.write_state(completed_rounds=0)
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        run = cls(path)
        if not run.path.is_dir():
            raise RunDirError(f"run directory {run.path} does not exist")
        run.refuse_links()
        for name in (CONFIG_FILE, STATE_FILE):
            if not (run.path / name).is_file():
                raise RunDirError(f"{run.path} is not a FIRM run directory: {name} is missing")
        return run

    def config(self) -> FirmConfig:
        path = self.path / CONFIG_FILE
        config = FirmConfig.load(path)
        try:
            return config.validate()
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def save_config(self, config: FirmConfig) -> None:
        atomic_write_text(self.path / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")

    def state(self) -> dict[str, Any]:
        path = self.path / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunDirError(f"{path} is corrupt: {err}") from None
        done = state.get("completed_rounds") if isinstance(state, dict) else None
        if isinstance(done, bool) or not isinstance(done, int) or done < 0:
            raise RunDirError(f"{path} is corrupt: expected an object whose completed_rounds is a whole number "
                              f">= 0, got {json.dumps(state)[:80]}")
        return state

    @property
    def completed_rounds(self) -> int:
        return int(self.state()["completed_rounds"])

    def write_state(self, completed_rounds: int, **extra: Any) -> None:
        state = {"completed_rounds": completed_rounds, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
        atomic_write_text(self.path / STATE_FILE, json.dumps(state, indent=2) + "\n")

    def drop_unfinished_rounds(self) -> int:
        """Before a resumed run: move a torn last metrics line to metrics.jsonl.torn, and remove the
        result records of rounds after the last completed one (left by a crash); records of failed
        attempts stay. Returns how many records were removed."""
        self.move_torn_tail()
        done = self.completed_rounds
        records = self.read_metrics()
        kept = [r for r in records if int(r.get("round", 0)) <= done or r.get("type") in ATTEMPT_RECORD_TYPES]
        if len(kept) != len(records):
            atomic_write_text(self.path / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))
        return len(records) - len(kept)

    # ---- metrics -------------------------------------------------------------------------
    def move_torn_tail(self) -> bytes:
        """Move a torn last line of metrics.jsonl to metrics.jsonl.torn (appended there, so
        nothing is lost); returns the moved bytes (b"" when the log is whole)."""
        path = self.path / METRICS_FILE
        if not path.exists():
            return b""
        whole, torn = split_torn_tail(path.read_bytes())
        if torn:
            append_whole(path.with_name(path.name + TORN_SUFFIX), torn if torn.endswith(b"\n") else torn + b"\n")
            atomic_write_bytes(path, whole)
        return torn

    def append_metrics(self, records: Iterable[dict[str, Any]]) -> None:
        """Append records, one JSON line each, in one write, fsynced."""
        lines = "".join(json.dumps(_finite_or_none(r), allow_nan=False) + "\n" for r in records)
        append_whole(self.path / METRICS_FILE, lines.encode())

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / METRICS_FILE
        if not path.exists():
            return []
        records = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RunDirError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        return records

    # ---- adapters ------------------------------------------------------------------------
    def adapter_dir(self, round_number: int) -> Path:
        return self.path / ADAPTERS_DIR / f"round-{round_number:03d}"

    def save_adapter(self, round_number: int, peft_model, finish: Callable[[Path], None] | None = None) -> Path:
        """Write the peft adapter of a round atomically (temp dir + rename); ``finish`` edits the
        saved folder before it takes the round's name (the model card, the portable base name)."""
        target = self.adapter_dir(round_number)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        trash = target.with_name(f".{target.name}.old")
        try:
            peft_model.save_pretrained(tmp)
            if finish is not None:
                finish(tmp)
            tmp.chmod(0o755)
            if target.exists():  # a resumed round being redone: move the old one aside first
                if trash.exists():
                    shutil.rmtree(trash)
                os.replace(target, trash)
            try:
                os.replace(tmp, target)
            except BaseException:
                if trash.exists() and not target.exists():
                    os.replace(trash, target)  # put the previous adapter back
                raise
            if trash.exists():
                shutil.rmtree(trash)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def last_adapter(self) -> Path | None:
        done = self.completed_rounds
        return self.adapter_dir(done) if done > 0 else None

    @property
    def plots_dir(self) -> Path:
        return self.path / PLOTS_DIR

    def client_dir(self, partition_id: int) -> Path:
        """Where a simulated client keeps its state between rounds (and across --resume)."""
        return self.path / CLIENTS_DIR / str(int(partition_id))
