"""The run directory: resolved config, metrics log, per-round adapters, plots, resume state.

Layout::

    RUN_DIR/config.json                  the resolved FirmConfig
    RUN_DIR/metrics.jsonl                one record per client per round, one per round
    RUN_DIR/adapters/round-NNN/          peft adapter (adapter_config.json + adapter_model.safetensors)
    RUN_DIR/state.json                   last completed round (what --resume continues from)
    RUN_DIR/plots/*.png

Every file is written atomically (temp file + os.replace) so an interrupted run never leaves a
half-written adapter or state behind, and a resumed run drops metrics of unfinished rounds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from firm.config import FirmConfig
from firm.errors import FirmError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.json"
ADAPTERS_DIR = "adapters"
PLOTS_DIR = "plots"


def default_run_dir(preset: str) -> str:
    """runs/<preset>-<local time>: where a run goes when no run_dir is given."""
    return os.path.join("runs", f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}")


class RunDirError(FirmError, RuntimeError):
    """The run directory is missing, incomplete or not a FIRM run."""


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ---- creation and resume ------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, config: FirmConfig) -> "RunDir":
        run = cls(path)
        if (run.path / STATE_FILE).exists() or (run.path / METRICS_FILE).exists():
            raise RunDirError(f"{run.path} already holds a run; use --resume {run.path} or another --run-dir")
        run.path.mkdir(parents=True, exist_ok=True)
        config.run_dir = str(run.path)
        run.save_config(config)
        run.write_state(completed_rounds=0)
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        run = cls(path)
        if not run.path.is_dir():
            raise RunDirError(f"run directory {run.path} does not exist")
        for name in (CONFIG_FILE, STATE_FILE):
            if not (run.path / name).is_file():
                raise RunDirError(f"{run.path} is not a FIRM run directory: {name} is missing")
        return run

    def config(self) -> FirmConfig:
        return FirmConfig.load(self.path / CONFIG_FILE)

    def save_config(self, config: FirmConfig) -> None:
        atomic_write_text(self.path / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")

    def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / STATE_FILE).read_text())
        except json.JSONDecodeError as err:
            raise RunDirError(f"{self.path / STATE_FILE} is corrupt: {err}") from None

    @property
    def completed_rounds(self) -> int:
        return int(self.state()["completed_rounds"])

    def write_state(self, completed_rounds: int, **extra: Any) -> None:
        state = {"completed_rounds": completed_rounds, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
        atomic_write_text(self.path / STATE_FILE, json.dumps(state, indent=2) + "\n")

    def drop_unfinished_rounds(self) -> int:
        """Remove metric records of rounds after the last completed one (left by a crash)."""
        done = self.completed_rounds
        records = self.read_metrics()
        kept = [r for r in records if int(r.get("round", 0)) <= done]
        if len(kept) != len(records):
            atomic_write_text(self.path / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))
        return len(records) - len(kept)

    # ---- metrics -------------------------------------------------------------------------
    def append_metrics(self, records: Iterable[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(_finite_or_none(r), allow_nan=False) + "\n" for r in records)
        with open(self.path / METRICS_FILE, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

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

    def save_adapter(self, round_number: int, peft_model) -> Path:
        """Write the peft adapter of a round atomically (temp dir + rename)."""
        target = self.adapter_dir(round_number)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        trash = target.with_name(f".{target.name}.old")
        try:
            peft_model.save_pretrained(tmp)
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
