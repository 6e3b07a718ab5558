"""FirmFedAvg on hand-made client replies.

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
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from firm.federation.protocol import ROUND_KEY
from firm.federation.strategy import FederationError, FirmFedAvg, FsmgdaFedAvg, RoundResult, arrayrecord_bytes

TENSOR_SHAPES = {"layer.lora_A.weight": (2, 3), "layer.lora_B.weight": (3, 2), "head.lora_A.weight": (4,)}


@pytest.fixture(autouse=True)
def server_task_identity(monkeypatch):
    """Instruction messages read run/node/task ids from the running process's identity."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


class FakeGrid:
    """The part of flwr's Grid that FedAvg.configure_train uses."""

    def __init__(self, node_ids: list[int]):
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def make_adapter(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=shape).astype(np.float32) for k, shape in TENSOR_SHAPES.items()}


def make_metrics(num_examples: int, lambda_mean: list[float], reward: float, kl: float, skipped: int = 0) -> dict:
    return {
        "reward/helpful": reward,
        "reward/harmless": -reward,
        "kl": kl,
        "lambda_mean": lambda_mean,
        "lambda_last": lambda_mean,
        "skipped_steps": skipped,
        "num-examples": num_examples,
        "partition-id": 0,
    }


def instruction(node_id: int) -> Message:
    return Message(content=RecordDict(), dst_node_id=node_id, message_type="train")


def reply(node_id: int, adapter: dict[str, np.ndarray], metrics: dict) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: torch.from_numpy(v.copy()) for k, v in adapter.items()}),
        "metrics": MetricRecord(metrics),
    })
    return Message(content, reply_to=instruction(node_id))


def error_reply(node_id: int, reason: str) -> Message:
    return Message(Error(code=0, reason=reason), reply_to=instruction(node_id))


def npy_size(array: np.ndarray) -> int:
    """Bytes of the array as Flower serialises it (.npy: header + raw data)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return len(buffer.getvalue())


def make_strategy(round_offset: int = 0):
    results: list[RoundResult] = []
    strategy = FirmFedAvg(on_round_end=results.append, round_offset=round_offset, algorithm="firm")
    return strategy, results


CLIENTS = {  # node id -> (adapter seed, num-examples, lambda_mean, reward, kl)
    11: (0, 1, [0.2, 0.8], 1.0, 0.5),
    12: (1, 2, [0.5, 0.5], 2.0, 1.0),
    13: (2, 5, [0.9, 0.1], 4.0, 3.0),
}


def client_replies(nodes=tuple(CLIENTS)) -> list[Message]:
    return [reply(n, make_adapter(CLIENTS[n][0]), make_metrics(*CLIENTS[n][1:])) for n in nodes]


def expected_average(nodes) -> dict[str, np.ndarray]:
    weights = np.array([CLIENTS[n][1] for n in nodes], dtype=np.float64)
    adapters = [make_adapter(CLIENTS[n][0]) for n in nodes]
    return {k: sum(w * a[k].astype(np.float64) for w, a in zip(weights, adapters)) / weights.sum()
            for k in TENSOR_SHAPES}


# ---- averaging and bookkeeping ----------------------------------------------------------------
def test_average_is_the_example_weighted_mean_of_client_adapters():
    strategy, results = make_strategy()
    arrays, _ = strategy.aggregate_train(1, client_replies())

    expected = expected_average(CLIENTS)
    averaged = arrays.to_torch_state_dict()
    assert set(averaged) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(averaged[key].numpy(), value, rtol=1e-6, atol=1e-7)
    [result] = results
    assert result.arrays is arrays


def test_client_records_carry_distance_bytes_and_metrics():
    strategy, results = make_strategy()
    strategy.aggregate_train(1, client_replies())
    [result] = results
    average = expected_average(CLIENTS)

    assert [c["node_id"] for c in result.client_records] == list(CLIENTS)
    distances = []
    for record in result.client_records:
        seed, num_examples, lambda_mean, reward, kl = CLIENTS[record["node_id"]]
        adapter = make_adapter(seed)
        distance = math.sqrt(sum(float(np.sum((adapter[k].astype(np.float64) - average[k]) ** 2))
                                 for k in TENSOR_SHAPES))
        distances.append(distance)
        assert record["adapter_distance"] == pytest.approx(distance, rel=1e-6)
        # What travels is each tensor as .npy: float32 data plus numpy's header.
        payload = sum(a.size * 4 for a in adapter.values())
        assert record["bytes_up"] == sum(npy_size(a) for a in adapter.values())
        assert payload < record["bytes_up"] <= payload + 128 * len(adapter)
        assert record["type"] == "client" and record["round"] == 1
        assert record["num-examples"] == num_examples
        assert record["lambda_mean"] == lambda_mean
        assert record["reward/helpful"] == reward and record["kl"] == kl

    round_record = result.round_record
    assert round_record["type"] == "round" and round_record["clients"] == 3 and round_record["rejected"] == []
    assert round_record["adapter_distance"] == pytest.approx(np.mean(distances), rel=1e-6)
    lambdas = np.array([CLIENTS[n][2] for n in CLIENTS])
    assert round_record["lambda_mean"] == pytest.approx(lambdas.mean(0).tolist())
    assert round_record["lambda_std"] == pytest.approx(lambdas.std(0).tolist())
    assert round_record["reward/helpful"] == pytest.approx(np.mean([CLIENTS[n][3] for n in CLIENTS]))
    assert round_record["reward/harmless"] == pytest.approx(-np.mean([CLIENTS[n][3] for n in CLIENTS]))
    assert round_record["kl"] == pytest.approx(np.mean([CLIENTS[n][4] for n in CLIENTS]))
    assert round_record["bytes_up_per_client"] == pytest.approx(np.mean([c["bytes_up"] for c in result.client_records]))


def test_configure_train_records_bytes_down_and_the_firm_round():
    strategy, results = make_strategy(round_offset=4)
    global_adapter = make_adapter(9)
    arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in global_adapter.items()})
    assert arrayrecord_bytes(arrays) == sum(npy_size(a) for a in global_adapter.values())

    config = ConfigRecord({"beta": 0.01})
    messages = list(strategy.configure_train(2, arrays, config, FakeGrid([11, 12, 13])))

    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13]
    sent = messages[0].content["config"]
    assert sent[ROUND_KEY] == 6 and sent["server-round"] == 2 and sent["beta"] == 0.01
    strategy.aggregate_train(2, client_replies())
    [result] = results
    expected_down = sum(npy_size(a) for a in global_adapter.values())
    assert all(c["bytes_down"] == expected_down for c in result.client_records)
    assert result.round_record["bytes_down_per_client"] == expected_down


def test_on_round_end_gets_the_round_number_shifted_by_the_offset():
    strategy, results = make_strategy(round_offset=3)
    strategy.aggregate_train(2, client_replies())
    [result] = results
    assert result.round == 5
    assert result.round_record["round"] == 5
    assert all(c["round"] == 5 for c in result.client_records)


# ---- rejected replies -------------------------------------------------------------------------
def test_reply_with_nan_adapter_is_rejected_and_the_others_averaged():
    strategy, results = make_strategy()
    replies = client_replies()
    bad = make_adapter(CLIENTS[12][0])
    bad["layer.lora_B.weight"][1, 0] = np.nan
    replies[1] = reply(12, bad, make_metrics(*CLIENTS[12][1:]))

    arrays, _ = strategy.aggregate_train(1, replies)

    [result] = results
    [rejected] = result.round_record["rejected"]
    assert rejected["node_id"] == 12
    assert "layer.lora_B.weight" in rejected["reason"] and "non-finite" in rejected["reason"]
    assert result.round_record["clients"] == 2
    assert [c["node_id"] for c in result.client_records] == [11, 13]
    averaged = arrays.to_torch_state_dict()
    for key, value in expected_average([11, 13]).items():
        np.testing.assert_allclose(averaged[key].numpy(), value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("key, value", [("kl", float("nan")), ("lambda_mean", [0.5, float("inf")])])
def test_reply_with_non_finite_metric_is_rejected(key, value):
    strategy, results = make_strategy()
    replies = client_replies()
    metrics = make_metrics(*CLIENTS[13][1:])
    metrics[key] = value
    replies[2] = reply(13, make_adapter(CLIENTS[13][0]), metrics)

    strategy.aggregate_train(1, replies)

    [result] = results
    [rejected] = result.round_record["rejected"]
    assert rejected["node_id"] == 13 and f"metric {key}" in rejected["reason"]
    assert [c["node_id"] for c in result.client_records] == [11, 12]


def test_client_error_reply_is_rejected_with_its_reason():
    strategy, results = make_strategy()
    replies = client_replies((11, 13)) + [error_reply(12, "out of memory")]
    strategy.aggregate_train(1, replies)
    [result] = results
    assert result.round_record["rejected"] == [{"node_id": 12, "reason": "client error: out of memory"}]
    assert result.round_record["clients"] == 2


def test_all_replies_rejected_raises_federation_error_naming_nodes_and_reasons():
    strategy, results = make_strategy(round_offset=2)
    bad = make_adapter(0)
    bad["head.lora_A.weight"][0] = np.inf
    replies = [reply(11, bad, make_metrics(*CLIENTS[11][1:])), error_reply(12, "worker crashed")]

    with pytest.raises(FederationError) as info:
        strategy.aggregate_train(1, replies)

    message = str(info.value)
    assert "round 3" in message
    assert "node 11" in message and "head.lora_A.weight" in message
    assert "node 12" in message and "worker crashed" in message
    assert results == []


def test_no_replies_at_all_raises_federation_error():
    strategy, results = make_strategy()
    with pytest.raises(FederationError, match="no replies arrived"):
        strategy.aggregate_train(1, [])
    assert results == []


# ---- FSMGDA: server-side min-norm combination of per-objective updates ----------------------------
def min_norm_two(d1: np.ndarray, d2: np.ndarray) -> float:
    """argmin_{t in [0,1]} |t d1 + (1-t) d2|^2 (MGDA for two vectors, Sener & Koltun 2018)."""
    diff = d1 - d2
    return float(np.clip(np.dot(d2 - d1, d2) / np.dot(diff, diff), 0.0, 1.0))


def test_fsmgda_combines_averaged_objective_updates_with_min_norm_weights():
    results: list[RoundResult] = []
    strategy = FsmgdaFedAvg(num_objectives=2, beta=0.0, preference=[0.5, 0.5], on_round_end=results.append)
    global_adapter = make_adapter(20)
    strategy.configure_train(1, ArrayRecord({k: torch.from_numpy(v) for k, v in global_adapter.items()}),
                             ConfigRecord(), FakeGrid([11, 12]))
    # client c, objective m: its own local update of the global adapter
    local = {(c, m): {k: v + make_adapter(30 + 2 * c + m)[k] * (1.0 + m) for k, v in global_adapter.items()}
             for c in (0, 1) for m in (0, 1)}
    examples = {0: 1, 1: 3}
    replies = []
    for c, node in enumerate((11, 12)):
        packed = {f"objective-{m}/{k}": local[(c, m)][k] for m in (0, 1) for k in TENSOR_SHAPES}
        replies.append(reply(node, packed, make_metrics(examples[c], [0.5, 0.5], 1.0, 0.1)))

    arrays, _ = strategy.aggregate_train(1, replies)

    keys = sorted(TENSOR_SHAPES)
    g = np.concatenate([global_adapter[k].astype(np.float64).ravel() for k in keys])
    averaged = [np.concatenate([(examples[0] * local[(0, m)][k].astype(np.float64)
                                 + examples[1] * local[(1, m)][k].astype(np.float64)).ravel() / 4.0 for k in keys])
                for m in (0, 1)]
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
    upload = sum(npy_size(v) for v in local[(0, 0)].values()) * 2
    assert result.client_records[0]["bytes_up"] == upload


def test_reply_with_wrong_adapter_tensors_is_rejected_not_fatal():
    from flwr.app import Array, ArrayRecord

    from firm.federation.strategy import check_reply

    global_record = ArrayRecord({"a": Array(np.zeros((2, 3), dtype=np.float32))})
    expected = {k: tuple(v.shape) for k, v in global_record.items()}

    def content(arrays):
        from flwr.app import MetricRecord, RecordDict

        return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                           "metrics": MetricRecord({"num-examples": 1})})

    assert check_reply(content({"a": np.zeros((2, 3), dtype=np.float32)}), expected) is None
    assert "shape (3, 2)" in check_reply(content({"a": np.zeros((3, 2), dtype=np.float32)}), expected)
    assert "do not match" in check_reply(content({"b": np.zeros((2, 3), dtype=np.float32)}), expected)
    assert "do not match" in check_reply(content({"a": np.zeros((2, 3), dtype=np.float32),
                                                  "b": np.zeros(1, dtype=np.float32)}), expected)
