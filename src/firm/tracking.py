"""Where training curves go besides metrics.jsonl: TensorBoard and/or Weights & Biases when asked
(``report_to``, TRL's name for the same setting).

metrics.jsonl stays the record of the run; a reporter only mirrors each finished round, at
step = the federated round. Tags are named by what they measure and by objective
(``reward/helpful``, ``lambda/helpful``, ``grad_cosine/helpful-harmless``); the round means go
under ``round/``, each client's numbers under ``client-<partition-id>/``. Identifiers and
per-local-step lists (node ids, ``step_lambda``: one entry per step and objective) stay in
metrics.jsonl only: a round-indexed curve cannot show them.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Protocol, Sequence

from firm.config import ConfigError

TENSORBOARD_DIR = "tensorboard"
WANDB_PROJECT_DEFAULT = "firm"

# Record entries that identify rather than measure, or that are per local step.
NOT_CURVES = frozenset({"round", "type", "node_id", "partition-id", "num-examples", "clients", "adapter"})
PER_STEP_PREFIX = "step_"
# Vector entries (one value per objective) and the tag each becomes, per objective.
PER_OBJECTIVE_TAGS = {"lambda_mean": "lambda", "lambda_last": "lambda_last", "lambda_std": "lambda_std",
                      "preference": "preference"}
PER_PAIR_KEYS = ("grad_cosine",)


class Reporter(Protocol):
    def report_round(self, round_record: dict[str, Any], client_records: Sequence[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


def objective_names(record: dict[str, Any]) -> list[str]:
    return [key.split("/", 1)[1] for key in record if key.startswith("reward/")]


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The curves of a metrics record as tag -> value: numbers as they are, per-objective
    vectors as one tag per objective (lambda_mean -> lambda/<objective>), per-pair vectors as
    one tag per objective pair; identifiers, text and per-step lists are left out."""
    names = objective_names(record)
    pairs = [f"{a}-{b}" for a, b in itertools.combinations(names, 2)]
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, bool) or key in NOT_CURVES or key.startswith(PER_STEP_PREFIX):
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif key in PER_OBJECTIVE_TAGS and isinstance(value, list) and len(value) == len(names):
            out.update({f"{PER_OBJECTIVE_TAGS[key]}/{name}": float(v) for name, v in zip(names, value)})
        elif key in PER_PAIR_KEYS and isinstance(value, list) and len(value) == len(pairs):
            out.update({f"{key}/{pair}": float(v) for pair, v in zip(pairs, value)})
    return out


def round_scalars(round_record: dict[str, Any], client_records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Every curve of a finished round under its tag: round/<tag> and client-<partition-id>/<tag>."""
    out = {f"round/{tag}": value for tag, value in scalars(round_record).items()}
    for client in client_records:
        who = f"client-{client['partition-id']}"
        out.update({f"{who}/{tag}": value for tag, value in scalars(client).items()})
    return out


class TensorBoardReporter:
    """One TensorBoard run in RUN_DIR/tensorboard."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))

    def report_round(self, round_record: dict[str, Any], client_records: Sequence[dict[str, Any]]) -> None:
        step = int(round_record["round"])
        for tag, value in round_scalars(round_record, client_records).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def import_wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError("report_to wandb needs the wandb package: pip install 'firm[wandb]' "
                          "(make install installs it)") from None
    return wandb


class WandbReporter:
    """One Weights & Biases run per training process, named after the run directory, with the
    run's settings as its config. wandb's own settings apply (WANDB_MODE=offline: no network,
    the run is kept on disk for `wandb sync`; WANDB_PROJECT, default 'firm'; WANDB_DIR, default
    the run directory)."""

    def __init__(self, run_dir: Path, config: dict[str, Any] | None = None):
        wandb = import_wandb()
        run_dir = Path(run_dir)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT_DEFAULT), name=run_dir.name,
                                  dir=os.environ.get("WANDB_DIR", str(run_dir)), config=config or {},
                                  reinit="create_new")
        except Exception as err:  # wandb raises its own types (no login, no network)
            detail = " ".join(str(err).split()) or type(err).__name__
            raise ConfigError(f"report_to wandb could not start a wandb run: {detail} "
                              "(log in with `wandb login`, or set WANDB_MODE=offline)") from None

    def report_round(self, round_record: dict[str, Any], client_records: Sequence[dict[str, Any]]) -> None:
        self.run.log(round_scalars(round_record, client_records), step=int(round_record["round"]))

    def close(self) -> None:
        self.run.finish()


def requested(report_to: str) -> list[str]:
    return [name.strip() for name in report_to.split(",") if name.strip() and name.strip() != "none"]


def check_reporters(report_to: str) -> None:
    """Before a run: the reporters asked for can be used (wandb is installed)."""
    if "wandb" in requested(report_to):
        import_wandb()


def make_reporters(report_to: str, run_dir: Path, config: dict[str, Any] | None = None) -> list[Reporter]:
    """The reporters a comma-separated ``report_to`` asks for ('none' = metrics.jsonl only)."""
    reporters: list[Reporter] = []
    try:
        for name in requested(report_to):
            reporters.append(TensorBoardReporter(run_dir) if name == "tensorboard" else WandbReporter(run_dir, config))
    except BaseException:
        for reporter in reporters:
            reporter.close()
        raise
    return reporters
