"""FedAvg over LoRA adapters, with FIRM's bookkeeping.

The averaging itself is Flower's FedAvg (weighted by ``num-examples``). On top of it this
strategy
- rejects replies whose adapter or metrics are not finite (the round goes on with the others;
  the rejection is logged with the node and the reason; if every reply is rejected the run
  stops with an error and everything written so far stays),
- counts the bytes each client receives and sends,
- measures client disagreement: mean and spread of lambda across clients, and the mean
  distance of the client adapters from their average,
- hands the averaged adapter and the round's records to ``on_round_end`` (the server app
  writes checkpoints and metrics there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from logging import WARNING
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from firm.federation.protocol import ROUND_KEY
from firm.fsmgda import fsmgda_combine, pack_objectives, split_objectives

class FederationError(RuntimeError):
    """A round could not produce a global adapter."""


def arrayrecord_bytes(record: ArrayRecord) -> int:
    """Bytes of an ArrayRecord's tensors as Flower serialises them (.npy: the data plus a 128-byte
    header per tensor); message framing and metadata are not counted."""
    return int(sum(len(array.data) for array in record.values()))


def check_reply(content, expected_shapes: dict[str, tuple[int, ...]] | None = None) -> str | None:
    """Why a client reply cannot be averaged, or None if it can: exactly one adapter record
    with the expected tensor names and shapes, finite values, one finite metric record."""
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return (f"expected one adapter record and one metric record, got {len(content.array_records)} and "
                f"{len(content.metric_records)}")
    if expected_shapes is not None:
        record = next(iter(content.array_records.values()))
        got = {k: tuple(a.shape) for k, a in record.items()}
        if set(got) != set(expected_shapes):
            missing = sorted(set(expected_shapes) - set(got))[:2]
            extra = sorted(set(got) - set(expected_shapes))[:2]
            return f"adapter tensors do not match the global adapter (missing {missing}, unexpected {extra})"
        for key, shape in got.items():
            if shape != tuple(expected_shapes[key]):
                return f"adapter tensor {key} has shape {shape}, expected {tuple(expected_shapes[key])}"
    for array_record in content.array_records.values():
        for key, array in array_record.items():
            values = array.numpy()
            if not np.all(np.isfinite(values)):
                return f"adapter tensor {key} has non-finite values"
    for metric_record in content.metric_records.values():
        for key, value in metric_record.items():
            values = value if isinstance(value, list) else [value]
            if not all(math.isfinite(float(v)) for v in values):
                return f"metric {key} is not finite ({value})"
    return None


def adapter_drift(records: list[ArrayRecord], average: ArrayRecord) -> list[float]:
    """L2 distance of each client's adapter from the average adapter."""
    avg = {k: v.numpy().astype(np.float64) for k, v in average.items()}
    return [
        float(math.sqrt(sum(float(np.sum((r[k].numpy().astype(np.float64) - avg[k]) ** 2)) for k in avg)))
        for r in records
    ]


@dataclass
class RoundResult:
    round: int
    arrays: ArrayRecord
    client_records: list[dict[str, Any]]
    round_record: dict[str, Any]


class FirmFedAvg(FedAvg):
    """FedAvg on LoRA adapters plus the per-round records FIRM logs."""

    def __init__(
        self,
        *,
        on_round_end: Callable[[RoundResult], None],
        round_offset: int = 0,
        algorithm: str = "firm",
        **kwargs: Any,
    ):
        kwargs.setdefault("fraction_evaluate", 0.0)  # FIRM evaluates with `firm eval`
        super().__init__(**kwargs)
        self.on_round_end = on_round_end
        self.round_offset = round_offset
        self.algorithm = algorithm
        self._bytes_down = 0
        self._global: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config[ROUND_KEY] = self.round_offset + server_round
        self._bytes_down = arrayrecord_bytes(arrays)
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def expected_upload(self) -> dict[str, tuple[int, ...]] | None:
        """Tensor names and shapes a client must send back: the global adapter's."""
        if self._global is None:
            return None
        return {k: tuple(a.shape) for k, a in self._global.items()}

    def combine(self, averaged: ArrayRecord, client_lambdas: np.ndarray) -> tuple[ArrayRecord, dict[str, Any]]:
        """The new global adapter from the FedAvg average of the replies, and the round's
        lambda statistics. FIRM: the average itself; lambda drift = spread across clients."""
        return averaged, {"lambda_mean": client_lambdas.mean(0).tolist(),
                          "lambda_std": client_lambdas.std(0).tolist()}  # client disagreement drift

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        firm_round = self.round_offset + server_round
        replies = list(replies)
        valid, rejected = [], []
        expected_shapes = self.expected_upload()
        metric_keys: set[str] | None = None
        for msg in replies:
            if msg.has_error():
                rejected.append((msg.metadata.src_node_id, f"client error: {msg.error.reason}"))
                continue
            reason = check_reply(msg.content, expected_shapes)
            if reason is None:
                keys = set(next(iter(msg.content.metric_records.values())).keys())
                metric_keys = keys if metric_keys is None else metric_keys
                if keys != metric_keys:
                    reason = f"metric keys differ from the other clients' ({sorted(keys ^ metric_keys)[:3]})"
            if reason is None:
                valid.append(msg)
            else:
                rejected.append((msg.metadata.src_node_id, reason))
                log(WARNING, "round %s: rejected reply from node %s: %s", firm_round, msg.metadata.src_node_id, reason)
        if not valid:
            reasons = "; ".join(f"node {n}: {r}" for n, r in rejected) or "no replies arrived"
            raise FederationError(f"round {firm_round}: no usable client reply ({reasons})")

        averaged, metrics = super().aggregate_train(server_round, valid)
        client_arrays = [next(iter(m.content.array_records.values())) for m in valid]
        distances = adapter_drift(client_arrays, averaged)

        client_records = []
        lambdas = []
        for msg, adapter, distance in zip(valid, client_arrays, distances):
            metric = dict(next(iter(msg.content.metric_records.values())))
            lambdas.append(metric["lambda_mean"])
            record = {
                "type": "client",
                "round": firm_round,
                "node_id": int(msg.metadata.src_node_id),
                **metric,
                "bytes_down": self._bytes_down,
                "bytes_up": arrayrecord_bytes(adapter),
                "adapter_distance": distance,
            }
            if "samples" in msg.content.config_records:  # opt-in (--sample-responses)
                samples = msg.content.config_records["samples"]
                record["samples"] = [{"prompt": p, "response": r}
                                     for p, r in zip(samples["prompts"], samples["responses"])]
            client_records.append(record)
        arrays, lambda_stats = self.combine(averaged, np.asarray(lambdas, dtype=np.float64))
        round_record = {
            "type": "round",
            "round": firm_round,
            "algorithm": self.algorithm,
            "clients": len(valid),
            "rejected": [{"node_id": int(n), "reason": r} for n, r in rejected],
            **{key: float(np.mean([c[key] for c in client_records]))
               for key in client_records[0] if key.startswith("reward/")},
            "kl": float(np.mean([c["kl"] for c in client_records])),
            **lambda_stats,
            "adapter_distance": float(np.mean(distances)),
            "skipped_steps": int(sum(c["skipped_steps"] for c in client_records)),
            "bytes_down_per_client": self._bytes_down,
            "bytes_up_per_client": float(np.mean([c["bytes_up"] for c in client_records])),
        }
        self.on_round_end(RoundResult(firm_round, arrays, client_records, round_record))
        return arrays, metrics if metrics is not None else MetricRecord()


# ---- FSMGDA: the server-side multi-gradient baseline (its math: firm.fsmgda) ---------------------
class FsmgdaFedAvg(FirmFedAvg):
    """Each client uploads M adapters (one local update per objective) packed in one
    ArrayRecord; the server averages them per objective (FedAvg), solves the min-norm problem
    on the averaged updates and applies the combination. M times FIRM's upload."""

    def __init__(self, *, num_objectives: int, beta: float, preference: list[float], **kwargs: Any):
        super().__init__(algorithm="fsmgda", **kwargs)
        self.num_objectives = num_objectives
        self.beta = beta
        self.preference = preference

    def expected_upload(self) -> dict[str, tuple[int, ...]] | None:
        single = super().expected_upload()
        if single is None:
            return None
        return pack_objectives([single] * self.num_objectives)

    def combine(self, averaged: ArrayRecord, client_lambdas: np.ndarray) -> tuple[ArrayRecord, dict[str, Any]]:
        assert self._global is not None, "configure_train sets the global adapter"
        global_adapter = {k: v.numpy().astype(np.float64) for k, v in self._global.items()}
        per_objective = split_objectives({k: v.numpy() for k, v in averaged.items()}, self.num_objectives)
        new, weights = fsmgda_combine(global_adapter, per_objective, self.beta, self.preference)
        record = ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in new.items()})
        # One lambda, chosen by the server: no client disagreement by construction.
        return record, {"lambda_mean": weights.tolist(), "lambda_std": [0.0] * self.num_objectives}
