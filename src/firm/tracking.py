"""Where training curves go besides metrics.jsonl: TensorBoard when asked (``report_to``,
TRL's name for the same setting), because that is where our users look at curves.

metrics.jsonl stays the record of the run; a reporter only mirrors each finished round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

from torch.utils.tensorboard import SummaryWriter

TENSORBOARD_DIR = "tensorboard"


class Reporter(Protocol):
    def report_round(self, round_record: dict[str, Any], client_records: Sequence[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics record as TensorBoard tags: vectors with one entry per
    objective (lambda) become one tag per objective, named as the record's reward/<name> keys."""
    names = [key.split("/", 1)[1] for key in record if key.startswith("reward/")]
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, bool) or key in ("round", "type"):
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            labels = names if len(value) == len(names) else [str(i) for i in range(len(value))]
            out.update({f"{key}/{label}": float(v) for label, v in zip(labels, value)})
    return out


class TensorBoardReporter:
    """One TensorBoard run in RUN_DIR/tensorboard: round means under round/, each client's
    numbers under client-<partition-id>/, step = the federated round."""

    def __init__(self, run_dir: Path):
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))

    def report_round(self, round_record: dict[str, Any], client_records: Sequence[dict[str, Any]]) -> None:
        step = int(round_record["round"])
        for tag, value in scalars(round_record).items():
            self.writer.add_scalar(f"round/{tag}", value, step)
        for client in client_records:
            who = f"client-{client.get('partition-id', client.get('node_id'))}"
            for tag, value in scalars(client).items():
                self.writer.add_scalar(f"{who}/{tag}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_reporters(report_to: str, run_dir: Path) -> list[Reporter]:
    """The reporters a comma-separated ``report_to`` asks for ('none' = metrics.jsonl only)."""
    wanted = [name.strip() for name in report_to.split(",") if name.strip() and name.strip() != "none"]
    return [TensorBoardReporter(run_dir) for name in wanted if name == "tensorboard"]
