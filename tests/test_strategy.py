"""FirmFedAvg on hand-made client replies: equal-weight robust aggregation, the reply schema
from the server's config, rejected and failed replies, and hostile (attack) replies.

The replies are real ``flwr.app.Message`` objects: an instruction message is built the way
FedAvg builds it (which needs the process's TaskIdentity, set here as the ServerApp runtime
sets it), and each reply is ``Message(content, reply_to=instruction)``, so its
``metadata.src_node_id`` is the instruction's destination node, as in a real round. Every
number the strategy records is checked against a hand computation with numpy.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from firm.config import ConfigError, FirmConfig
from firm.federation.protocol import ROUND_KEY, check_metrics, reply_schema
from firm.federation.strategy import (FederationError, FirmFedAvg, FsmgdaFedAvg, RoundFailed, RoundResult,
                                      aggregate_arrays, arrayrecord_bytes, check_reply, client_error_summary,
                                      honest_step_ceiling, update_bound, wait_for_nodes)
from firm.trainer import RoundStats, StepRecord, max_local_steps, summarize

TENSOR_SHAPES = {"layer.lora_A.weight": (2, 3), "layer.lora_B.weight": (3, 2), "head.lora_A.weight": (4,)}
# The tests' federation: 3 clients, rollout batches of 8 (so num-examples is at most 8), the
# default embedded rewards (objectives helpful and harmless), updates accepted up to L2 1.0.
BASE = dict(num_clients=3, rollout_batch_size=8, rollouts_per_round=1, max_update_norm=1.0)


@pytest.fixture(autouse=True)
def server_task_identity(monkeypatch):
    """Instruction messages read run/node/task ids from the running process's identity."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


class FakeGrid:
    """The part of flwr's Grid that configure_train uses."""

    def __init__(self, node_ids: list[int]):
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def make_config(**overrides) -> FirmConfig:
    return FirmConfig(**{**BASE, **overrides}).validate()


def random_adapter(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.normal(size=shape)).astype(np.float32) for k, shape in TENSOR_SHAPES.items()}


GLOBAL = random_adapter(9)


def make_adapter(seed: int) -> dict[str, np.ndarray]:
    """A client's honest upload: the global adapter plus a small local update (L2 about 0.05)."""
    update = random_adapter(seed, scale=0.0125)
    return {k: (GLOBAL[k] + update[k]).astype(np.float32) for k in TENSOR_SHAPES}


def make_metrics(lambda_mean: list[float], reward: float, kl: float, num_examples: int = 8, skipped: int = 0) -> dict:
    """Every metric key an honest client sends (firm.trainer.summarize + the client app's three)."""
    return {
        "reward/helpful": reward,
        "reward/harmless": -reward,
        "kl": kl,
        "response_tokens": 4.0,
        "lambda_mean": lambda_mean,
        "lambda_last": lambda_mean,
        "grad_cosine": [0.1],
        "policy_loss": 0.0,
        "value_loss": 0.5,
        "approx_kl": 0.01,
        "clipfrac": 0.0,
        "steps": 4 - skipped,
        "skipped_steps": skipped,
        "num-examples": num_examples,
        "partition-id": 0,
        "kl_coef": 0.05,
        "preference": [0.5, 0.5],
        # per local step: 4 steps, the skipped ones first (zeros, not taken)
        "step_lambda": [0.0, 0.0] * skipped + list(lambda_mean) * (4 - skipped),
        "step_gram_distance": [0.5] * 4,
        "step_cosine": [0.1] * 4,
        "step_norm_ratio": [0.9] * 4,
        "step_taken": [0.0] * skipped + [1.0] * (4 - skipped),
    }


def instruction(node_id: int) -> Message:
    return Message(content=RecordDict(), dst_node_id=node_id, message_type="train")


def reply(node_id: int, adapter: dict[str, np.ndarray], metrics: dict, **config_records) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: torch.from_numpy(np.array(v, copy=True)) for k, v in adapter.items()}),
        "metrics": MetricRecord(metrics),
        **config_records,
    })
    return Message(content, reply_to=instruction(node_id))


def error_reply(node_id: int, reason: str) -> Message:
    return Message(Error(code=0, reason=reason), reply_to=instruction(node_id))


def npy_size(array: np.ndarray) -> int:
    """Bytes of the array as Flower serialises them (.npy: header + raw data)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return len(buffer.getvalue())


def global_record(adapter: dict[str, np.ndarray] = GLOBAL) -> ArrayRecord:
    return ArrayRecord({k: torch.from_numpy(np.array(v, copy=True)) for k, v in adapter.items()})


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def make_strategy(round_offset: int = 0, nodes=(11, 12, 13), cls=FirmFedAvg, **overrides):
    """A strategy that has sent round 1 (configure_train) to ``nodes``."""
    results: list[RoundResult] = []
    clock = FakeClock()  # sampling waits on this clock, not the wall's
    strategy = cls(make_config(**overrides), on_round_end=results.append, round_offset=round_offset,
                   sleep=clock.sleep, clock=clock)
    list(strategy.configure_train(1, global_record(), ConfigRecord(), FakeGrid(list(nodes))))
    return strategy, results


CLIENTS = {  # node id -> (adapter seed, lambda_mean, reward, kl)
    11: (0, [0.2, 0.8], 1.0, 0.5),
    12: (1, [0.5, 0.5], 2.0, 1.0),
    13: (2, [0.9, 0.1], 4.0, 3.0),
}


def client_replies(nodes=tuple(CLIENTS)) -> list[Message]:
    return [reply(n, make_adapter(CLIENTS[n][0]), make_metrics(*CLIENTS[n][1:])) for n in nodes]


def expected_average(nodes) -> dict[str, np.ndarray]:
    adapters = [make_adapter(CLIENTS[n][0]) for n in nodes]
    return {k: np.mean([a[k].astype(np.float64) for a in adapters], axis=0) for k in TENSOR_SHAPES}


def l2(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2)) for k in b))


def assert_adapter(arrays: ArrayRecord, expected: dict[str, np.ndarray]) -> None:
    got = arrays.to_torch_state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == torch.float32
        np.testing.assert_allclose(got[key].numpy(), value, rtol=1e-6, atol=1e-7)


# ---- averaging and bookkeeping ----------------------------------------------------------------
def test_average_is_the_equal_weight_mean_whatever_num_examples_says():
    strategy, results = make_strategy()
    replies = [reply(n, make_adapter(CLIENTS[n][0]), make_metrics(*CLIENTS[n][1:], num_examples=e))
               for n, e in zip(CLIENTS, (1, 2, 8))]
    arrays, _ = strategy.aggregate_train(1, replies)

    assert_adapter(arrays, expected_average(CLIENTS))
    [result] = results
    assert result.arrays is arrays


def test_client_records_carry_distance_update_norm_bytes_and_metrics():
    strategy, results = make_strategy()
    strategy.aggregate_train(1, client_replies())
    [result] = results
    average = expected_average(CLIENTS)

    assert [c["node_id"] for c in result.client_records] == list(CLIENTS)
    distances, norms = [], []
    for record in result.client_records:
        seed, lambda_mean, reward, kl = CLIENTS[record["node_id"]]
        adapter = make_adapter(seed)
        distances.append(l2(adapter, average))
        norms.append(l2(adapter, GLOBAL))
        assert record["adapter_distance"] == pytest.approx(distances[-1], abs=1e-6)  # from the float32 average
        assert record["update_norm"] == pytest.approx(norms[-1], rel=1e-6)
        # What travels is each tensor as .npy: float32 data plus numpy's header.
        payload = sum(a.size * 4 for a in adapter.values())
        assert record["bytes_up"] == sum(npy_size(a) for a in adapter.values())
        assert payload < record["bytes_up"] <= payload + 128 * len(adapter)
        assert record["type"] == "client" and record["round"] == 1
        assert record["lambda_mean"] == lambda_mean
        assert record["reward/helpful"] == reward and record["kl"] == kl

    round_record = result.round_record
    assert round_record["type"] == "round" and round_record["clients"] == 3
    assert round_record["rejected"] == [] and round_record["failed"] == []
    assert round_record["aggregator"] == "fedavg" and round_record["update_bound"] == 1.0
    assert round_record["adapter_distance"] == pytest.approx(np.mean(distances), abs=1e-6)
    assert round_record["update_norm"] == pytest.approx(np.mean(norms), rel=1e-6)
    lambdas = np.array([CLIENTS[n][1] for n in CLIENTS])
    assert round_record["lambda_mean"] == pytest.approx(lambdas.mean(0).tolist())
    assert round_record["lambda_std"] == pytest.approx(lambdas.std(0).tolist())
    assert round_record["reward/helpful"] == pytest.approx(np.mean([CLIENTS[n][2] for n in CLIENTS]))
    assert round_record["reward/harmless"] == pytest.approx(-np.mean([CLIENTS[n][2] for n in CLIENTS]))
    assert round_record["kl"] == pytest.approx(np.mean([CLIENTS[n][3] for n in CLIENTS]))
    assert round_record["bytes_up_per_client"] == pytest.approx(np.mean([c["bytes_up"] for c in result.client_records]))


def test_configure_train_sends_to_every_connected_node_and_records_bytes_down_and_the_firm_round():
    results: list[RoundResult] = []
    strategy = FirmFedAvg(make_config(), on_round_end=results.append, round_offset=4)
    arrays = global_record()
    assert arrayrecord_bytes(arrays) == sum(npy_size(a) for a in GLOBAL.values())

    messages = list(strategy.configure_train(2, arrays, ConfigRecord({"beta": 0.01}), FakeGrid([11, 12, 13])))

    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13]
    sent = messages[0].content["config"]
    assert sent[ROUND_KEY] == 6 and sent["server-round"] == 2 and sent["beta"] == 0.01
    strategy.aggregate_train(2, client_replies())
    [result] = results
    expected_down = sum(npy_size(a) for a in GLOBAL.values())
    assert all(c["bytes_down"] == expected_down for c in result.client_records)
    assert result.round_record["bytes_down_per_client"] == expected_down
    assert result.round == 6 and all(c["round"] == 6 for c in result.client_records)


def test_configure_train_never_samples_more_nodes_than_the_federation_has_clients():
    strategy = FirmFedAvg(make_config(num_clients=2, min_clients=2), on_round_end=lambda r: None)
    messages = list(strategy.configure_train(1, global_record(), ConfigRecord(), FakeGrid([11, 12, 13, 14])))
    assert len({m.metadata.dst_node_id for m in messages}) == 2


# ---- node sampling: a bounded wait ------------------------------------------------------------
class GrowingGrid:
    """Nodes that connect one per second of the fake clock."""

    def __init__(self, clock: FakeClock, nodes: list[int]):
        self.clock, self.nodes = clock, nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes[: 1 + int(self.clock.now)]


def test_wait_for_nodes_returns_when_all_connect_or_when_the_wait_is_over():
    clock = FakeClock()
    assert wait_for_nodes(GrowingGrid(clock, [1, 2, 3]), want=3, wait_s=60, sleep=clock.sleep, clock=clock) == [1, 2, 3]
    assert clock.now == 2.0  # returned as soon as the third node connected

    clock = FakeClock()
    assert wait_for_nodes(FakeGrid([5, 4]), want=3, wait_s=2.5, sleep=clock.sleep, clock=clock) == [4, 5]
    assert clock.now == 2.5 and clock.sleeps == [1.0, 1.0, 0.5]  # bounded: Flower's own wait has no limit


def test_too_few_connected_nodes_stop_the_round_with_a_record():
    clock = FakeClock()
    strategy = FirmFedAvg(make_config(min_clients=2, node_wait=3), on_round_end=lambda r: None,
                          sleep=clock.sleep, clock=clock)
    with pytest.raises(RoundFailed, match=r"only 1 node\(s\) connected after waiting 3 s, fewer than min_clients \(2\)") as info:
        strategy.configure_train(1, global_record(), ConfigRecord(), FakeGrid([11]))
    assert info.value.record["type"] == "round-failed" and info.value.record["round"] == 1


# ---- robust aggregators -----------------------------------------------------------------------
def test_aggregators_match_flowers_median_and_trimmed_mean_rules():
    uploads = [{"w": np.array([v, 10.0 * v], dtype=np.float32)} for v in (1.0, 2.0, 4.0, 100.0)]
    dtypes = {"w": np.dtype(np.float32)}
    np.testing.assert_allclose(aggregate_arrays(uploads, "fedavg", 0.25, dtypes)["w"], [26.75, 267.5])
    np.testing.assert_allclose(aggregate_arrays(uploads, "median", 0.25, dtypes)["w"], [3.0, 30.0])
    # 0.25 of 4 replies: one cut from each end per coordinate, the mean of the middle two
    np.testing.assert_allclose(aggregate_arrays(uploads, "trimmed-mean", 0.25, dtypes)["w"], [3.0, 30.0])
    assert aggregate_arrays(uploads, "median", 0.25, dtypes)["w"].dtype == np.float32


@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean"])
def test_a_robust_aggregator_ignores_one_client_within_the_bound(aggregator):
    nodes = (11, 12, 13, 14)
    # the aggregator's rule alone: the slow-poisoning defence (tests/test_defence.py) is off
    strategy, results = make_strategy(nodes=nodes, num_clients=4, aggregator=aggregator, min_clients=3,
                                      contribution_budget=0)
    replies = client_replies() + [reply(14, {k: GLOBAL[k] + 0.2 for k in TENSOR_SHAPES}, make_metrics([0.5, 0.5], 0, 0))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert results[0].round_record["rejected"] == []  # within the bound, but it does not move the median
    stacked = {k: np.stack([make_adapter(CLIENTS[n][0])[k] for n in CLIENTS] + [GLOBAL[k] + 0.2]) for k in GLOBAL}
    if aggregator == "median":
        expected = {k: np.median(v.astype(np.float64), axis=0) for k, v in stacked.items()}
    else:
        expected = {k: np.sort(v.astype(np.float64), axis=0)[1:3].mean(0) for k, v in stacked.items()}
    assert_adapter(arrays, expected)
    assert l2({k: v.numpy() for k, v in arrays.to_torch_state_dict().items()}, GLOBAL) < 0.1


def test_settings_that_make_a_robust_aggregator_a_plain_mean_are_config_errors():
    with pytest.raises(ConfigError, match="trim_fraction 0 is a plain mean"):
        make_config(aggregator="trimmed-mean", trim_fraction=0.0, min_clients=3)
    for aggregator in ("median", "trimmed-mean"):  # a round of 1 or 2 replies would average them
        with pytest.raises(ConfigError, match=f"aggregator {aggregator} needs min_clients >= 3"):
            make_config(aggregator=aggregator, min_clients=2)
    make_config(aggregator="trimmed-mean", trim_fraction=0.2, min_clients=3)  # cuts one of 3: the median
    with pytest.raises(ConfigError, match="aggregator must be one of"):
        make_config(aggregator="krum")
    with pytest.raises(ConfigError, match="min_clients must be between 1 and num_clients"):
        make_config(min_clients=4)


# ---- attack replies, and other malformed ones -----------------------------------------------------
def _scaled(adapter):
    return {k: v * 1e6 for k, v in adapter.items()}


def _with(**changes):
    def mutate(metrics):
        metrics = dict(metrics)
        for key, value in changes.items():
            if value is _DROP:
                metrics.pop(key)
            else:
                metrics[key] = value
        return metrics
    return mutate


_DROP = object()

ATTACKS = [
    # (name, node, adapter change, metric change, extra records, what the rejection reason says)
    ("adapter x 10^6", 12, _scaled, None, {}, "exceeds the bound 1 (max_update_norm)"),
    ("num-examples 10^9", 12, None, _with(**{"num-examples": 10**9}), {},
     "metric num-examples is not finite or beyond +-1e+06 (1000000000)"),
    ("num-examples negative", 12, None, _with(**{"num-examples": -5}), {}, "num-examples must be a whole number"),
    ("num-examples zero", 12, None, _with(**{"num-examples": 0}), {}, "num-examples must be a whole number"),
    ("first reply with an extra metric key", 11, None, _with(evil=1.0), {},
     "metric keys differ from the server's schema (missing [], unexpected ['evil'])"),
    ("lambda_mean of the wrong length", 12, None, _with(lambda_mean=[0.2, 0.3, 0.5]), {},
     "metric lambda_mean must be a list of 2, got a list of 3"),
    ("missing kl", 13, None, _with(kl=_DROP), {}, "missing ['kl']"),
    ("NaN adapter", 12, lambda a: {**a, "layer.lora_B.weight": np.full((3, 2), np.nan, np.float32)}, None, {},
     "adapter tensor layer.lora_B.weight has non-finite values"),
    ("NaN metric", 13, None, _with(kl=float("nan")), {}, "metric kl is not finite"),
    ("lambda_mean off the simplex", 12, None, _with(lambda_mean=[2.0, -1.0]), {}, "lambda_mean is not a probability vector"),
    ("a number where a list belongs", 12, None, _with(grad_cosine=0.1), {}, "grad_cosine must be a list of 1, got a number"),
    ("skipped_steps 10^9", 12, None, _with(skipped_steps=10**9), {}, "metric skipped_steps is not finite or beyond +-1e+06"),
    ("skipped_steps 7", 12, None, _with(skipped_steps=7), {}, "skipped_steps must be a whole number from 0 to 6"),
    ("float64 adapter", 12, lambda a: {k: v.astype(np.float64) for k, v in a.items()}, None, {},
     "declares shape (2, 3) and dtype float64, expected (2, 3) float32"),
    ("missing adapter tensor", 12, lambda a: {k: v for k, v in a.items() if k != "head.lora_A.weight"}, None, {},
     "missing ['head.lora_A.weight']"),
    ("unasked-for samples", 12, None, None, {"samples": ConfigRecord({"prompts": ["p"], "responses": ["r"]})},
     "sent samples the server did not ask for"),
    ("an extra config record", 12, None, None, {"notes": ConfigRecord({"x": 1})}, "unexpected config record(s) ['notes']"),
]


@pytest.mark.parametrize("name, node, adapter_change, metric_change, records, reason", ATTACKS,
                         ids=[a[0] for a in ATTACKS])
def test_attack_reply_is_rejected_with_its_reason_and_the_honest_replies_aggregated(
        name, node, adapter_change, metric_change, records, reason):
    strategy, results = make_strategy()
    replies = []
    for n in CLIENTS:  # the attacker's reply may come first: the schema is the server's, not the first reply's
        adapter, metrics = make_adapter(CLIENTS[n][0]), make_metrics(*CLIENTS[n][1:])
        if n == node:
            adapter = adapter_change(adapter) if adapter_change else adapter
            metrics = metric_change(metrics) if metric_change else metrics
            replies.append(reply(n, adapter, metrics, **records))
        else:
            replies.append(reply(n, adapter, metrics))

    arrays, _ = strategy.aggregate_train(1, replies)

    [result] = results
    [rejected] = result.round_record["rejected"]
    assert rejected["node_id"] == node and reason in rejected["reason"], rejected
    honest = [n for n in CLIENTS if n != node]
    assert [c["node_id"] for c in result.client_records] == honest
    assert result.round_record["clients"] == 2
    assert_adapter(arrays, expected_average(honest))
    assert l2({k: v.numpy() for k, v in arrays.to_torch_state_dict().items()}, GLOBAL) < 0.1


def test_all_replies_claiming_zero_examples_end_the_round_cleanly_not_with_zero_division():
    strategy, results = make_strategy()
    replies = [reply(n, make_adapter(CLIENTS[n][0]), make_metrics(*CLIENTS[n][1:], num_examples=0)) for n in CLIENTS]
    with pytest.raises(RoundFailed, match=r"round 1: 0 usable replies, fewer than min_clients \(1\)") as info:
        strategy.aggregate_train(1, replies)
    record = info.value.record
    assert record["type"] == "round-failed"
    assert [r["node_id"] for r in record["rejected"]] == list(CLIENTS)
    assert all("num-examples" in r["reason"] for r in record["rejected"])
    assert results == []


def test_an_unreadable_reply_is_rejected_not_raised():
    strategy, results = make_strategy()
    replies = client_replies()
    broken = ArrayRecord({k: Array(dtype="float32", shape=tuple(shape), stype="numpy.ndarray", data=b"garbage")
                          for k, shape in TENSOR_SHAPES.items()})
    replies[1] = Message(RecordDict({"arrays": broken, "metrics": MetricRecord(make_metrics([0.5, 0.5], 0, 0))}),
                         reply_to=instruction(12))
    strategy.aggregate_train(1, replies)
    [rejected] = results[0].round_record["rejected"]
    assert rejected["node_id"] == 12 and "is not a .npy payload" in rejected["reason"]


@pytest.mark.parametrize("hostile_first", [True, False])
def test_a_node_that_replies_twice_has_neither_reply_used_and_a_node_not_sampled_is_rejected(hostile_first):
    strategy, results = make_strategy(nodes=(11, 12))
    poisoned = reply(12, {k: GLOBAL[k] + 0.2 for k in TENSOR_SHAPES}, make_metrics([0.5, 0.5], 0, 0))
    honest = client_replies((11, 12))
    replies = ([honest[0], poisoned, honest[1]] if hostile_first else honest + [poisoned]) \
        + [reply(13, make_adapter(2), make_metrics([0.5, 0.5], 0, 0))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert results[0].round_record["rejected"] == [{"node_id": 12, "reason": "sent 2 replies this round; none is used"},
                                                   {"node_id": 13, "reason": "node was not sampled"}]
    assert [c["node_id"] for c in results[0].client_records] == [11]
    assert_adapter(arrays, expected_average([11]))


# ---- failed and silent clients ----------------------------------------------------------------
def test_client_error_and_timed_out_node_are_recorded_and_the_round_goes_on():
    strategy, results = make_strategy(nodes=(11, 12, 13, 14), num_clients=4, round_timeout=90)
    replies = client_replies((11, 13)) + [error_reply(12, "out of memory")]  # 14 never answers
    strategy.aggregate_train(1, replies)
    [result] = results
    assert result.round_record["failed"] == [{"node_id": 12, "reason": "client error: out of memory"},
                                             {"node_id": 14, "reason": "no reply within round_timeout (90 s)"}]
    assert result.round_record["rejected"] == [] and result.round_record["clients"] == 2


def test_a_node_unavailable_error_from_the_superlink_is_recorded_for_the_dead_node():
    """A node that stops sending heartbeats gets its instruction answered by the SuperLink itself:
    an error reply whose src_node_id is the SuperLink's own id (1), made by Flower's own function.
    It is traced to the sampled node through the message it replies to, not rejected as a stranger."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    strategy, results = make_strategy(nodes=(11, 12, 13, 14), num_clients=4, round_timeout=90)
    for msg in strategy._round.sent:  # what the Grid does when it pushes them
        msg.metadata.__dict__["_message_id"] = msg.object_id
    sent = {int(m.metadata.dst_node_id): m for m in strategy._round.sent}
    unavailable = create_message_error_unavailable_res_message(sent[14].metadata, "node_unavail")
    assert unavailable.metadata.src_node_id == SUPERLINK_NODE_ID
    strategy.aggregate_train(1, client_replies((11, 12, 13)) + [unavailable])
    record = results[0].round_record
    assert record["rejected"] == [] and record["clients"] == 3
    [failed] = record["failed"]
    assert failed["node_id"] == 14 and failed["reason"].startswith("SuperLink: Error: Node Unavailable"), failed


def test_a_client_error_is_recorded_as_its_message_without_flowers_traceback():
    flower_reason = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()"
                     "\x1b[39m (pid=1)\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                     "firm.federation.client_state.ClientStateError: state.safetensors cannot be read\n\n"
                     "Exception ClientAppException occurred. Message: state.safetensors cannot be read'>")
    assert client_error_summary(flower_reason) == "state.safetensors cannot be read"
    assert client_error_summary("Traceback:\n  File x\nValueError: bad\n") == "ValueError: bad"
    assert client_error_summary("") == "no reason given"
    assert len(client_error_summary("x" * 10_000)) == 200


def test_fewer_usable_replies_than_min_clients_raise_round_failed_naming_nodes_and_reasons():
    strategy, results = make_strategy(round_offset=2, min_clients=2)
    bad = make_adapter(0)
    bad["head.lora_A.weight"][0] = np.inf
    replies = [reply(11, bad, make_metrics(*CLIENTS[11][1:])), error_reply(12, "worker crashed"),
               reply(13, make_adapter(2), make_metrics(*CLIENTS[13][1:]))]

    with pytest.raises(RoundFailed) as info:
        strategy.aggregate_train(1, replies)

    message = str(info.value)
    assert isinstance(info.value, FederationError)
    assert message.startswith("round 3: 1 usable replies, fewer than min_clients (2)")
    assert "node 11" in message and "head.lora_A.weight" in message
    assert "node 12" in message and "worker crashed" in message
    record = info.value.record
    assert record["failed"] == [{"node_id": 12, "reason": "client error: worker crashed"}]
    assert [r["node_id"] for r in record["rejected"]] == [11]
    assert results == []


def test_no_replies_at_all_name_every_sampled_node_as_timed_out():
    strategy, results = make_strategy()
    with pytest.raises(RoundFailed, match="node 11: no reply within round_timeout") as info:
        strategy.aggregate_train(1, [])
    assert [f["node_id"] for f in info.value.record["failed"]] == [11, 12, 13]
    assert results == []


# ---- the schema and the bound come from the server's config ---------------------------------------
def test_reply_schema_comes_from_the_config_and_matches_what_clients_send():
    config = make_config(rewards="relevance,civility", rollouts_per_round=2, sample_responses=3)
    schema = reply_schema(config)
    assert {k for k in schema.metrics if k.startswith("reward/")} == {"reward/relevance", "reward/civility"}
    assert schema.metrics["lambda_mean"] == 2 and schema.metrics["grad_cosine"] == 1 and schema.metrics["kl"] == 0
    assert schema.max_examples == 16 and schema.max_samples == 3
    # What firm.trainer.summarize and the client app produce fits the schema exactly.
    stats = RoundStats(scores=[torch.rand(8, 2)], kl_per_sequence=[torch.rand(8)], response_tokens=[torch.ones(8)],
                       lambdas=[np.array([0.3, 0.7])], cosines=[np.array([0.2])], policy_losses=[0.1],
                       value_losses=[0.2], approx_kls=[0.0], clipfracs=[0.0], steps=1, num_examples=8,
                       step_records=[StepRecord(np.array([0.3, 0.7]), np.array([0.8]), np.array([0.2]), 0.5, True)])
    metrics = summarize(stats, ["relevance", "civility"]) | {"partition-id": 1, "kl_coef": 0.05,
                                                              "preference": [0.5, 0.5]}
    assert check_metrics(schema, metrics) is None
    fsmgda = reply_schema(make_config(algorithm="fsmgda"))
    assert fsmgda.max_steps == 2 * reply_schema(make_config()).max_steps  # one pass per objective


def test_auto_update_bound_is_twice_the_largest_honest_adamw_step():
    config = FirmConfig()  # default: lr 3e-4, 1 rollout of 8 prompts x 2 epochs x 2 minibatches
    # A full batch takes 2 steps per epoch, but a shard of 3 prompts gives minibatches of 1: 3 steps.
    assert max_local_steps(config) == 2 * 3
    # the embedded policy's LoRA (r=16 on q_proj, v_proj of 30 layers): 921,600 parameters
    assert honest_step_ceiling(config, 921_600) == pytest.approx(3e-4 * 6 * 960)
    assert update_bound(config, 921_600) == pytest.approx(2 * 3e-4 * 6 * 960)
    assert update_bound(FirmConfig(max_update_norm=0.5), 921_600) == 0.5
    assert max_local_steps(FirmConfig(rollout_batch_size=2, num_minibatches=1, ppo_epochs=1)) == 1
    assert max_local_steps(FirmConfig(rollout_batch_size=16, num_minibatches=1, ppo_epochs=3, rollouts_per_round=2)) == 6


def test_check_reply_without_a_schema_still_checks_tensors_and_finiteness():
    expected = {"a": ((2, 3), "float32")}

    def content(arrays, metrics=None):
        return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                           "metrics": MetricRecord(metrics or {"num-examples": 1})})

    assert check_reply(content({"a": np.zeros((2, 3), dtype=np.float32)}), expected) is None
    assert "shape (3, 2)" in check_reply(content({"a": np.zeros((3, 2), dtype=np.float32)}), expected)
    assert "do not match" in check_reply(content({"b": np.zeros((2, 3), dtype=np.float32)}), expected)
    assert "not finite" in check_reply(content({"a": np.zeros((2, 3), dtype=np.float32)}, {"x": float("nan")}),
                                       expected)


# ---- FSMGDA: server-side min-norm combination of per-objective updates ----------------------------
def min_norm_two(d1: np.ndarray, d2: np.ndarray) -> float:
    """argmin_{t in [0,1]} |t d1 + (1-t) d2|^2 (MGDA for two vectors, Sener & Koltun 2018)."""
    diff = d1 - d2
    return float(np.clip(np.dot(d2 - d1, d2) / np.dot(diff, diff), 0.0, 1.0))


def test_fsmgda_combines_averaged_objective_updates_with_min_norm_weights():
    strategy, results = make_strategy(nodes=(11, 12), cls=FsmgdaFedAvg, num_clients=2, algorithm="fsmgda", beta=0.0)
    # client c, objective m: its own local update of the global adapter
    local = {(c, m): {k: v + random_adapter(30 + 2 * c + m, scale=0.02)[k] * (1.0 + m) for k, v in GLOBAL.items()}
             for c in (0, 1) for m in (0, 1)}
    replies = []
    for c, node in enumerate((11, 12)):
        packed = {f"objective-{m}/{k}": local[(c, m)][k] for m in (0, 1) for k in TENSOR_SHAPES}
        replies.append(reply(node, packed, make_metrics([0.5, 0.5], 1.0, 0.1, num_examples=1 + 7 * c)))

    arrays, _ = strategy.aggregate_train(1, replies)

    keys = sorted(TENSOR_SHAPES)
    g = np.concatenate([GLOBAL[k].astype(np.float64).ravel() for k in keys])
    averaged = [np.concatenate([(local[(0, m)][k].astype(np.float64) + local[(1, m)][k].astype(np.float64)).ravel()
                                / 2.0 for k in keys]) for m in (0, 1)]  # equal weights, not num-examples
    d1, d2 = averaged[0] - g, averaged[1] - g
    t = min_norm_two(d1, d2)
    assert 0.0 < t < 1.0, "the test updates should give an interior MGDA solution"
    expected = g + t * d1 + (1.0 - t) * d2

    new = arrays.to_torch_state_dict()
    assert sorted(new) == keys  # the global adapter again, not the packed upload
    np.testing.assert_allclose(np.concatenate([new[k].numpy().astype(np.float64).ravel() for k in keys]),
                               expected, rtol=1e-5, atol=1e-6)
    [result] = results
    assert result.arrays is arrays
    assert result.round_record["algorithm"] == "fsmgda"
    assert result.round_record["lambda_mean"] == pytest.approx([t, 1.0 - t], abs=1e-6)
    assert result.round_record["lambda_std"] == [0.0, 0.0]
    upload = sum(npy_size(v.astype(np.float32)) for v in local[(0, 0)].values()) * 2
    assert result.client_records[0]["bytes_up"] == upload
    for c, record in enumerate(result.client_records):  # one norm per objective's adapter; the larger is kept
        assert record["update_norm"] == pytest.approx(max(l2(local[(c, m)], GLOBAL) for m in (0, 1)), rel=1e-5)


def test_fsmgda_rejects_an_upload_whose_one_objective_adapter_is_too_far():
    strategy, results = make_strategy(nodes=(11, 12), cls=FsmgdaFedAvg, num_clients=2, algorithm="fsmgda")
    honest = {f"objective-{m}/{k}": make_adapter(m)[k] for m in (0, 1) for k in TENSOR_SHAPES}
    hostile = dict(honest, **{"objective-1/layer.lora_A.weight": GLOBAL["layer.lora_A.weight"] + 5.0})
    strategy.aggregate_train(1, [reply(11, honest, make_metrics([0.5, 0.5], 0, 0)),
                                 reply(12, hostile, make_metrics([0.5, 0.5], 0, 0))])
    [rejected] = results[0].round_record["rejected"]
    assert rejected["node_id"] == 12 and "exceeds the bound" in rejected["reason"]


@pytest.mark.parametrize("key, value, reason", [
    ("step_lambda", [0.5, 0.5] * 3, "step_lambda must be a list of 8 (4 steps)"),
    ("step_taken", [1.0, 1.0, 1.0, 0.0], "step_taken must hold 4 ones"),
    ("step_lambda", [0.9, 0.9] * 4, "step_lambda at step 0 is not a probability vector"),
    ("step_norm_ratio", 0.9, "step_norm_ratio must be a list of 4"),
])
def test_per_step_lists_must_match_the_step_counts(key, value, reason):
    from firm.federation.protocol import check_metrics, reply_schema

    schema = reply_schema(FirmConfig(rewards="a,b", rollout_batch_size=8, num_minibatches=2, ppo_epochs=2),
                          ["helpful", "harmless"])
    honest = make_metrics([0.5, 0.5], 1.0, 0.1)
    assert check_metrics(schema, honest) is None
    assert reason in check_metrics(schema, {**honest, key: value})


def test_a_submitted_run_dir_stays_inside_the_run_root(tmp_path):
    from firm.federation.server_app import confine_run_dir

    root = tmp_path / "runs"
    assert confine_run_dir("exp/a", "default", root) == root.resolve() / "exp" / "a"
    assert confine_run_dir(str(root / "b"), "default", root) == root.resolve() / "b"
    assert confine_run_dir("", "paper", root).parent == root.resolve()
    assert confine_run_dir("", "paper", root).name.startswith("paper-")
    for outside in ("/etc/firm", "../elsewhere", "exp/../../elsewhere"):
        with pytest.raises(ConfigError, match="outside the run root"):
            confine_run_dir(outside, "default", root)


def test_a_node_decides_its_prompts_and_samples_not_the_server(tmp_path):
    from firm.federation.node_policy import NodePolicyError, client_shard, samples_allowed

    config = make_config(prompts=str(tmp_path / "secret.jsonl"), sample_responses=5)
    with pytest.raises(NodePolicyError, match="asks this node to read the local file"):
        client_shard(config, {"partition-id": 0, "num-partitions": 2})
    assert samples_allowed(config, {}) == 0  # the node never agreed to send samples
    assert samples_allowed(config, {"sample-responses": 2}) == 2  # the node's cap wins
    assert samples_allowed(make_config(sample_responses=1), {"sample-responses": 4}) == 1
    with pytest.raises(NodePolicyError, match="sample-responses must be a whole number"):
        samples_allowed(config, {"sample-responses": "many"})
