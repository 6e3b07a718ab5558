"""Aggregation of FIRM clients' LoRA adapters that no single client can own.

Built on Flower's FedAvg (its message construction and ``start`` loop); what it changes:
- Weights: every accepted reply counts the same. ``num-examples`` is what the client asserts,
  so it is checked (a whole number from 1 to rollouts_per_round x rollout_batch_size) but never
  used as a weight. Equal weights are also what honest FedAvg gives here: every client does the
  same work per round (rollouts_per_round batches of rollout_batch_size prompts, whatever its
  shard size), and the shard sizes the server could assign are unknown for a deployed node
  that trains on its own prompt file.
- Schema: the reply a client must send (tensor names, shapes and dtype of the global adapter;
  the metric keys and list lengths of firm.federation.protocol.reply_schema, from the server's
  config) is fixed before any reply arrives. A reply that does not fit (its tensors' real bytes
  included: firm.federation.replies), has non-finite or out-of-bounds values, impossible counts,
  or an update (L2 distance from the global adapter) above the bound is rejected with its reason;
  checking a reply never raises. A node that replies twice in a round has none of its replies used.
- Slow poisoning: each node's cumulative deviation from the others is capped
  (``contribution_budget``, firm.federation.defence); a reply beyond its node's budget is left out.
- Update bound: replies beyond it are rejected, not clipped. A reply that far from the global
  adapter is broken or hostile; clipping would still give its direction full weight every round
  and hide it, while rejection leaves the honest average untouched and names the node.
- Aggregator: fedavg (equal-weight mean), median or trimmed-mean, coordinate-wise: Flower
  FedMedian's rule (``np.median`` over the stacked replies), and a trimmed mean that cuts at least
  one reply at each end of those that arrived (Flower's ``trim_mean`` cuts none of 3). Flower's
  own aggregate_train methods are not called: they weight metrics by ``num-examples`` and pop the
  arrays out of the replies. Replies are combined in an order fixed by their content, not their
  arrival, so a resumed run is bit for bit the run that never stopped.
- Failures: nodes are sampled from those connected after a bounded wait (``node_wait``); a node
  that answers with an error or not within ``round_timeout`` is recorded with the reason; a round
  with fewer than ``min_clients`` usable replies raises ``RoundFailed`` carrying a record of who
  failed and why (the server app writes it to metrics.jsonl and stops the run cleanly).
- Bookkeeping as before: bytes each way, lambda statistics, distances; the new global adapter
  and the round's records go to ``on_round_end``.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from firm.config import FirmConfig
from firm.federation.defence import ContributionLedger, trimmed_mean
from firm.federation.protocol import ROUND_KEY, ReplySchema, check_metrics, check_samples, reply_schema
from firm.federation.replies import (ESCAPE_SEQUENCE, REASON_CHARS, clean_text, decode, metrics_problem,
                                     payload_problem, texts_problem)
from firm.fsmgda.server import fsmgda_combine, pack_objectives, split_objectives
from firm.trainer import max_local_steps

# The longest a node's failure reason may be in the one-line stop message (metrics.jsonl keeps it whole).
SHORT_REASON_CHARS = 240
# The longest client error kept in the records (Flower's reasons can be whole tracebacks).
CLIENT_ERROR_CHARS = REASON_CHARS


class FederationError(RuntimeError):
    """A round could not produce a global adapter."""


class RoundFailed(FederationError):
    """A round had fewer usable replies than min_clients; ``record`` says who failed and why."""

    def __init__(self, message: str, record: dict[str, Any]):
        super().__init__(message)
        self.record = record


def honest_step_ceiling(config: FirmConfig, num_parameters: int) -> float:
    """The L2 norm of the largest update an honest client's pass can make: AdamW moves each
    coordinate by about learning_rate per step (Adam's normalised step), so at most
    learning_rate x steps x sqrt(parameters), reached only if every coordinate moves the same way
    every step; SGD moves by learning_rate x the clipped gradient, at most
    learning_rate x max_grad_norm per step. The steps are the trainer's own count."""
    per_step = config.max_grad_norm if config.optimizer == "sgd" else math.sqrt(num_parameters)
    return config.learning_rate * max_local_steps(config) * per_step


# max_update_norm = 0 (auto) allows this multiple of the honest ceiling. Measured honest updates
# (L2 of client adapter - global adapter):
# - tiny test model (tests/test_cli.py: 3,584 LoRA parameters, 1 step per round, ceiling 0.0180):
#   round 1 0.0115 (only lora_B moves: 3e-4 x sqrt(1,536)), round 2 0.0171-0.0175, i.e. 97% of
#   the ceiling: a one-step round moves nearly every coordinate by learning_rate;
# - embedded SmolLM2, default config (921,600 parameters, 4 steps, ceiling 1.15; 6 with a
#   3-prompt shard, 1.73): root-mean-square client update 0.60 in round 1, 0.69 in round 2 (from
#   a 4-client run's global updates and adapter_distance: mean |u_c|^2 = |mean u|^2 + mean
#   |u_c - mean u|^2), 52-60% of the ceiling.
# Twice the ceiling leaves room for AdamW's weight decay and Adam's occasional per-coordinate step
# above learning_rate, while a hostile reply (x10^6, or any update many times an honest one) fails.
AUTO_UPDATE_BOUND_FACTOR = 2.0


def update_bound(config: FirmConfig, num_parameters: int) -> float:
    """The largest accepted L2 distance of a client adapter from the global adapter."""
    if config.max_update_norm > 0:
        return config.max_update_norm
    return AUTO_UPDATE_BOUND_FACTOR * honest_step_ceiling(config, num_parameters)


def arrayrecord_bytes(record: ArrayRecord) -> int:
    """Bytes of an ArrayRecord's tensors as Flower serialises them (.npy: the data plus a 128-byte
    header per tensor); message framing and metadata are not counted."""
    return int(sum(len(array.data) for array in record.values()))


TensorSpec = tuple[tuple[int, ...], str]  # shape, dtype


def check_reply(content: RecordDict, expected: dict[str, TensorSpec],
                schema: ReplySchema | None = None) -> str | None:
    """Why a client reply cannot be aggregated, or None if it can: exactly one adapter record
    whose tensors have the expected names, shapes and dtype and finite values, one metric record
    that fits the schema, and no config record but the opt-in samples."""
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return (f"expected one adapter record and one metric record, got {len(content.array_records)} and "
                f"{len(content.metric_records)}")
    extra_records = sorted(set(content.config_records) - {"samples"})
    if extra_records:
        return f"unexpected config record(s) {extra_records[:3]}"
    record = next(iter(content.array_records.values()))
    if set(record) != set(expected):
        missing = sorted(set(expected) - set(record))[:2]
        extra = sorted(set(record) - set(expected))[:2]
        return f"adapter tensors do not match the global adapter (missing {missing}, unexpected {extra})"
    for key, array in record.items():  # the bytes themselves, not only what they declare
        reason = payload_problem(key, array, *expected[key])
        if reason:
            return reason
    metrics = next(iter(content.metric_records.values()))
    reason = metrics_problem(metrics)
    if reason is None and schema is not None:
        reason = check_metrics(schema, metrics)
    if reason is None and schema is not None and "samples" in content.config_records:
        samples = content.config_records["samples"]
        reason = check_samples(schema, samples)
        for key in ("prompts", "responses"):
            reason = reason or texts_problem(samples[key], key)
    return reason


def l2_distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """L2 norm of a - b over all tensors (float64)."""
    return float(math.sqrt(sum(float(np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2))
                               for k in b)))


def aggregate_arrays(uploads: list[dict[str, np.ndarray]], aggregator: str, trim_fraction: float,
                     dtype: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    """Combine the accepted uploads coordinate-wise, every reply weighted the same: fedavg = mean,
    median = Flower FedMedian's np.median, trimmed-mean = the mean less ``trim_count`` replies at
    each end, sized by the replies that arrived (firm.federation.defence). The result has the
    global adapter's dtypes."""
    combined = {}
    for key in uploads[0]:
        stacked = np.stack([np.asarray(u[key], dtype=np.float64) for u in uploads])
        if aggregator == "fedavg":
            value = stacked.mean(axis=0)
        elif aggregator == "median":
            value = np.median(stacked, axis=0)
        elif aggregator == "trimmed-mean":
            value = trimmed_mean(stacked, trim_fraction)
        else:
            raise ValueError(f"unknown aggregator {aggregator!r}")
        combined[key] = np.asarray(value, dtype=dtype[key])
    return combined


def upload_digest(upload: dict[str, np.ndarray]) -> bytes:
    """A digest of an upload's tensors (names and bytes), independent of when it arrived."""
    digest = hashlib.sha256()
    for key in sorted(upload):
        digest.update(key.encode() + b"\0" + np.ascontiguousarray(upload[key]).tobytes())
    return digest.digest()


def wait_for_nodes(grid: Grid, want: int, wait_s: float, sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic) -> list[int]:
    """The connected node ids, once ``want`` are connected or ``wait_s`` seconds have passed
    (Flower's own sampling waits without limit)."""
    deadline = clock() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        remaining = deadline - clock()
        if len(nodes) >= want or remaining <= 0:
            return nodes
        sleep(min(1.0, remaining))


def client_error_summary(reason: str) -> str:
    """The message of a client's error without Flower's traceback and colour codes: the line
    after Flower's last "Message: ", else the last non-empty line."""
    text = ESCAPE_SEQUENCE.sub("", str(reason or ""))
    if "Message: " in text:
        lines = text.rsplit("Message: ", 1)[1].strip().splitlines()
        summary = lines[0] if lines else ""
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        summary = lines[-1] if lines else ""
    summary = summary.strip().removesuffix("'>").strip()
    return clean_text(summary or "no reason given", CLIENT_ERROR_CHARS)


DUPLICATE_REASON = "sent {} replies this round; none is used"


def short_reasons(items: list[tuple[int, str]]) -> str:
    return "; ".join(f"node {n}: {r if len(r) <= SHORT_REASON_CHARS else r[:SHORT_REASON_CHARS] + '...'}"
                     for n, r in items)


def round_metrics(round_record: dict[str, Any]) -> dict[str, int | float]:
    """What Flower logs as the round's aggregated MetricRecord: clients, each objective's mean
    reward, the KL and the mean lambda per objective (the full record goes to metrics.jsonl)."""
    names = [key.split("/", 1)[1] for key in round_record if key.startswith("reward/")]
    return {"clients": int(round_record["clients"]),
            **{f"reward/{name}": float(round_record[f"reward/{name}"]) for name in names},
            "kl": float(round_record["kl"]),
            **{f"lambda/{name}": float(x) for name, x in zip(names, round_record["lambda_mean"])}}


@dataclass
class RoundResult:
    round: int
    arrays: ArrayRecord
    client_records: list[dict[str, Any]]
    round_record: dict[str, Any]
    ledger: ContributionLedger | None = None  # the defence's state after this round, for the run directory


@dataclass
class _Round:
    """What configure_train decided for the round in progress."""

    sampled: list[int] = field(default_factory=list)
    bytes_down: int = 0
    update_bound: float = math.inf  # the largest accepted update norm, set once per round
    # The instructions sent: the Grid gives each its message id when it pushes it, which is how
    # an error the SuperLink sends on a node's behalf (src_node_id = the SuperLink's own id, e.g.
    # "Node Unavailable" for a node that stopped sending heartbeats) is traced to that node.
    sent: list[Message] = field(default_factory=list)

    def destination(self, reply: Message) -> int | None:
        """The node the instruction that ``reply`` answers was sent to (None: not one of ours)."""
        reply_to = reply.metadata.reply_to_message_id
        for msg in self.sent:
            if reply_to and msg.metadata.message_id == reply_to:
                return int(msg.metadata.dst_node_id)
        return None


class FirmFedAvg(FedAvg):
    """FIRM's server: robust aggregation of LoRA adapters plus the per-round records FIRM logs."""

    def __init__(
        self,
        config: FirmConfig,
        *,
        on_round_end: Callable[[RoundResult], None],
        round_offset: int = 0,
        schema: ReplySchema | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        ledger: ContributionLedger | None = None,
    ):
        # Sampling is done here (configure_train); FIRM evaluates with `firm eval`.
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=config.min_clients,
                         min_available_nodes=config.min_clients)
        self.config = config
        self.schema = reply_schema(config) if schema is None else schema
        self.on_round_end = on_round_end
        self.round_offset = round_offset
        self.algorithm = config.algorithm
        self.sleep = sleep
        self.clock = clock
        self._global: ArrayRecord | None = None
        self._round = _Round()
        # each node's cumulative pull away from the others (firm.federation.defence); kept across rounds
        self.ledger = ContributionLedger(config.contribution_budget) if ledger is None else ledger

    # ---- sampling ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        firm_round = self.round_offset + server_round
        config[ROUND_KEY] = firm_round
        config["server-round"] = server_round
        self._global = arrays
        connected = wait_for_nodes(grid, self.config.num_clients, self.config.node_wait, self.sleep, self.clock)
        if len(connected) < self.config.min_clients:
            reason = (f"only {len(connected)} node(s) connected after waiting {self.config.node_wait:g} s, "
                      f"fewer than min_clients ({self.config.min_clients})")
            raise RoundFailed(f"round {firm_round}: {reason}", self.failed_round_record(firm_round, [], [], reason))
        sampled = connected
        if len(connected) > self.config.num_clients:  # never more than the federation's size
            sampled = sorted(random.Random(firm_round).sample(connected, self.config.num_clients))
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        messages = list(self._construct_messages(record, sampled, MessageType.TRAIN))
        num_parameters = sum(int(np.prod(a.shape)) for a in arrays.values())
        self._round = _Round(sampled=sampled, bytes_down=arrayrecord_bytes(arrays), sent=messages,
                             update_bound=update_bound(self.config, num_parameters))
        return messages

    # ---- the expected reply -------------------------------------------------------------------
    def expected_upload(self) -> dict[str, TensorSpec]:
        """Tensor names, shapes and dtypes a client must send back: the global adapter's."""
        assert self._global is not None, "configure_train sets the global adapter"
        return {k: (tuple(a.shape), a.dtype) for k, a in self._global.items()}

    def global_arrays(self) -> dict[str, np.ndarray]:
        assert self._global is not None, "configure_train sets the global adapter"
        return {k: v.numpy() for k, v in self._global.items()}

    def update_norms(self, upload: dict[str, np.ndarray]) -> list[float]:
        """The L2 distance of each adapter in an upload from the global adapter."""
        return [l2_distance(upload, self.global_arrays())]

    def reference_upload(self) -> dict[str, np.ndarray]:
        """What a client that did not move would upload (an update is the upload less this)."""
        return self.global_arrays()

    def flat_updates(self, uploads: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """Each upload less the reference upload, as one float64 vector (the defence's view)."""
        reference = self.reference_upload()
        flat = np.concatenate([np.asarray(reference[k], np.float64).ravel() for k in reference])
        return [np.concatenate([np.asarray(u[k], np.float64).ravel() for k in reference]) - flat for u in uploads]

    def review(self, msg: Message) -> tuple[str | None, list[float], dict[str, np.ndarray]]:
        """(why the reply is rejected or None, its update norms, its decoded tensors). Never raises."""
        try:
            reason = check_reply(msg.content, self.expected_upload(), self.schema)
            if reason is not None:
                return reason, [], {}
            record = next(iter(msg.content.array_records.values()))
            upload = {k: decode(v) for k, v in record.items()}
            norms = self.update_norms(upload)
            bound = self._round.update_bound
            if max(norms) > bound:
                return f"update norm {max(norms):.4g} exceeds the bound {bound:.4g} (max_update_norm)", norms, {}
            return None, norms, upload
        except Exception as err:  # a reply must never end the round: whatever breaks, reject it
            return f"unreadable reply ({type(err).__name__}: {err})", [], {}

    def combine(self, averaged: ArrayRecord, client_lambdas: np.ndarray) -> tuple[ArrayRecord, dict[str, Any]]:
        """The new global adapter from the aggregate of the replies, and the round's lambda
        statistics. FIRM: the aggregate itself; lambda drift = spread across clients."""
        return averaged, {"lambda_mean": client_lambdas.mean(0).tolist(),
                          "lambda_std": client_lambdas.std(0).tolist()}  # client disagreement drift

    def failed_round_record(self, firm_round: int, failed: list[tuple[int, str]], rejected: list[tuple[int, str]],
                            reason: str) -> dict[str, Any]:
        return {"type": "round-failed", "round": firm_round, "algorithm": self.algorithm, "reason": reason,
                "failed": [{"node_id": int(n), "reason": clean_text(r)} for n, r in failed],
                "rejected": [{"node_id": int(n), "reason": clean_text(r)} for n, r in rejected]}

    # ---- one round ------------------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        firm_round = self.round_offset + server_round
        sampled = set(self._round.sampled)
        valid: list[tuple[Message, list[float]]] = []
        failed: list[tuple[int, str]] = []
        rejected: list[tuple[int, str]] = []
        answered: set[int] = set()
        uploads: list[dict[str, np.ndarray]] = []
        attributed = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            source = "client error"
            if msg.has_error() and node not in sampled and self._round.destination(msg) is not None:
                node, source = self._round.destination(msg), "SuperLink"  # an error it sent for a sampled node
            attributed.append((node, source, msg))
        counts = Counter(node for node, _, _ in attributed)
        for node, source, msg in attributed:
            if node not in sampled:
                rejected.append((node, "node was not sampled"))
                continue
            answered.add(node)
            if counts[node] > 1:  # which of them is honest cannot be told: none counts, and it is recorded
                if (node, DUPLICATE_REASON.format(counts[node])) not in rejected:
                    rejected.append((node, DUPLICATE_REASON.format(counts[node])))
                continue
            if msg.has_error():
                failed.append((node, f"{source}: {client_error_summary(msg.error.reason)}"))
                continue
            reason, norms, upload = self.review(msg)
            if reason is None:
                valid.append((msg, norms))
                uploads.append(upload)
            else:
                rejected.append((node, clean_text(reason)))
                log(WARNING, "round %s: rejected reply from node %s: %s", firm_round, node, clean_text(reason))
        for node in sorted(sampled - answered):
            failed.append((node, f"no reply within round_timeout ({self.config.round_timeout:g} s)"))
        for node, reason in failed:
            log(WARNING, "round %s: node %s failed: %s", firm_round, node, reason)
        if len(valid) < self.config.min_clients:
            reason = f"{len(valid)} usable replies, fewer than min_clients ({self.config.min_clients})"
            detail = short_reasons(failed + rejected) or "no replies arrived"
            raise RoundFailed(f"round {firm_round}: {reason} ({detail})",
                              self.failed_round_record(firm_round, failed, rejected, reason))

        # Records keep the arrival order; every float sum runs in an order fixed by the replies'
        # content, so a resumed run is bit for bit the same as one that never stopped.
        canonical = sorted(range(len(valid)), key=lambda i: upload_digest(uploads[i]))
        client_arrays = [next(iter(m.content.array_records.values())) for m, _ in valid]
        limits = self.ledger.limit([int(m.metadata.src_node_id) for m, _ in valid], self.flat_updates(uploads))
        limited = [uploads[i] for i in canonical if not limits or limits[i].kept]
        dtypes = {k: np.dtype(spec[1]) for k, spec in self.expected_upload().items()}
        aggregate = aggregate_arrays(limited, self.config.aggregator, self.config.trim_fraction, dtypes)
        averaged = ArrayRecord({k: Array(v) for k, v in aggregate.items()})
        avg = {k: v.numpy() for k, v in averaged.items()}
        distances = [l2_distance(upload, avg) for upload in uploads]
        limit_of = {limit.node: limit for limit in limits}

        client_records = []
        lambdas = []
        for (msg, norms), adapter, distance in zip(valid, client_arrays, distances):
            metric = dict(next(iter(msg.content.metric_records.values())))
            lambdas.append(metric["lambda_mean"])
            record = {
                "type": "client",
                "round": firm_round,
                "node_id": int(msg.metadata.src_node_id),
                **metric,
                "bytes_down": self._round.bytes_down,
                "bytes_up": arrayrecord_bytes(adapter),
                "adapter_distance": distance,
                "update_norm": max(norms),
            }
            if record["node_id"] in limit_of:  # the slow-poisoning defence's account of this node
                limit = limit_of[record["node_id"]]
                record.update({"contribution_kept": int(limit.kept), "contribution_deviation": limit.deviation,
                               "contribution_cumulative": limit.cumulative, "contribution_budget": limit.budget})
            if "samples" in msg.content.config_records:  # opt-in (--sample-responses)
                samples = msg.content.config_records["samples"]
                record["samples"] = [{"prompt": p, "response": r}
                                     for p, r in zip(samples["prompts"], samples["responses"])]
            client_records.append(record)
        arrays, lambda_stats = self.combine(averaged, np.asarray([lambdas[i] for i in canonical], dtype=np.float64))
        ordered = [client_records[i] for i in canonical]
        round_record = {
            "type": "round",
            "round": firm_round,
            "algorithm": self.algorithm,
            "aggregator": self.config.aggregator,
            "clients": len(valid),
            "failed": [{"node_id": n, "reason": r} for n, r in failed],
            "rejected": [{"node_id": n, "reason": r} for n, r in rejected],
            "left_out": [limit.node for limit in limits if not limit.kept],
            **{key: float(np.mean([c[key] for c in ordered]))
               for key in self.schema.metrics if key.startswith("reward/")},
            "kl": float(np.mean([c["kl"] for c in ordered])),
            **lambda_stats,
            "adapter_distance": float(np.mean([c["adapter_distance"] for c in ordered])),
            "update_norm": float(np.mean([c["update_norm"] for c in ordered])),
            "update_bound": self._round.update_bound,
            "skipped_steps": int(sum(c["skipped_steps"] for c in ordered)),
            "bytes_down_per_client": self._round.bytes_down,
            "bytes_up_per_client": float(np.mean([c["bytes_up"] for c in ordered])),
        }
        self.on_round_end(RoundResult(firm_round, arrays, client_records, round_record, self.ledger))
        return arrays, MetricRecord(round_metrics(round_record))


# ---- FSMGDA: the server-side multi-gradient baseline (its math: firm.fsmgda.server) --------------
class FsmgdaFedAvg(FirmFedAvg):
    """Each client uploads M adapters (one local update per objective) packed in one
    ArrayRecord; the server aggregates them per objective, solves the min-norm problem on the
    aggregated updates and applies the combination. M times FIRM's upload."""

    def __init__(self, config: FirmConfig, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.num_objectives = len(config.reward_specs())
        self.beta = config.effective_beta()
        self.preference = config.preference_vector()

    def expected_upload(self) -> dict[str, TensorSpec]:
        single = super().expected_upload()
        return pack_objectives([single] * self.num_objectives)

    def reference_upload(self) -> dict[str, np.ndarray]:
        return pack_objectives([self.global_arrays()] * self.num_objectives)

    def update_norms(self, upload: dict[str, np.ndarray]) -> list[float]:
        """One norm per objective's adapter."""
        reference = self.global_arrays()
        return [l2_distance(part, reference) for part in split_objectives(upload, self.num_objectives)]

    def combine(self, averaged: ArrayRecord, client_lambdas: np.ndarray) -> tuple[ArrayRecord, dict[str, Any]]:
        global_adapter = {k: v.astype(np.float64) for k, v in self.global_arrays().items()}
        per_objective = split_objectives({k: v.numpy() for k, v in averaged.items()}, self.num_objectives)
        new, weights = fsmgda_combine(global_adapter, per_objective, self.beta, self.preference)
        record = ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in new.items()})
        # One lambda, chosen by the server: no client disagreement by construction.
        return record, {"lambda_mean": weights.tolist(), "lambda_std": [0.0] * self.num_objectives}


def make_strategy(config: FirmConfig, **kwargs: Any) -> FirmFedAvg:
    """The strategy the config's algorithm needs."""
    cls = FsmgdaFedAvg if config.algorithm_spec().per_objective_upload else FirmFedAvg
    return cls(config, **kwargs)
