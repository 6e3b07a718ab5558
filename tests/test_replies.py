"""Hostile replies built against the payload, the numbers and the text a client sends: each is
rejected with its reason (or cleaned), the round goes on with the honest replies, under every
aggregator. The replies reuse tests/test_strategy.py's hand-made round (3 honest clients)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from firm.federation.replies import (MAX_REPORTED_MAGNITUDE, REASON_CHARS, SAMPLE_TEXT_CHARS, clean_text, decode,
                                     number_problem, payload_problem)
from test_strategy import (CLIENTS, GLOBAL, TENSOR_SHAPES, assert_adapter, client_replies, error_reply,
                           expected_average, instruction, make_adapter, make_metrics, make_strategy, reply,
                           server_task_identity)  # noqa: F401  (the fixture)

AGGREGATORS = ("fedavg", "median", "trimmed-mean")


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def forged(declared_shape, declared_dtype: str, payload: bytes) -> Array:
    """An Array whose declared shape and dtype say one thing and whose .npy bytes another."""
    return Array(dtype=declared_dtype, shape=tuple(declared_shape), stype="numpy.ndarray", data=payload)


def reply_with_tensor(node: int, key: str, array: Array) -> Message:
    tensors = {k: Array(np.array(v, copy=True)) for k, v in make_adapter(CLIENTS[node][0]).items()}
    tensors[key] = array
    return Message(RecordDict({"arrays": ArrayRecord(tensors), "metrics": MetricRecord(make_metrics(*CLIENTS[node][1:]))}),
                   reply_to=instruction(node))


KEY = "layer.lora_B.weight"  # shape (3, 2), float32
FORGED = [
    ("float64 payload declared float32", forged((3, 2), "float32", npy(np.zeros((3, 2), np.float64))),
     "its payload holds (3, 2) float64"),
    ("(1, 1) payload declared (3, 2)", forged((3, 2), "float32", npy(np.zeros((1, 1), np.float32))),
     "its payload holds (1, 1) float32"),
    ("payload with trailing bytes", forged((3, 2), "float32", npy(np.zeros((3, 2), np.float32)) + b"\0" * 8),
     "bytes, its header and shape need"),
    ("truncated payload", forged((3, 2), "float32", npy(np.zeros((3, 2), np.float32))[:-4]),
     "bytes, its header and shape need"),
    ("Fortran-ordered payload", forged((3, 2), "float32", npy(np.asfortranarray(np.arange(6, dtype=np.float32)
                                                                                .reshape(3, 2)))), "Fortran order"),
    ("not a .npy payload", forged((3, 2), "float32", b"garbage" * 8), "is not a .npy payload"),
    ("declared shape wrong, payload right", forged((2, 3), "float32", npy(np.zeros((3, 2), np.float32))),
     "declares shape (2, 3)"),
    ("another serialisation type", Array(dtype="float32", shape=(3, 2), stype="torch.pickle",
                                         data=npy(np.zeros((3, 2), np.float32))), "is serialised as 'torch.pickle'"),
    ("NaN in the payload", forged((3, 2), "float32", npy(np.full((3, 2), np.nan, np.float32))), "non-finite values"),
]


@pytest.mark.parametrize("aggregator", AGGREGATORS)
@pytest.mark.parametrize("name, array, reason", FORGED, ids=[f[0] for f in FORGED])
def test_a_payload_that_differs_from_its_declaration_is_rejected_and_the_round_goes_on(name, array, reason,
                                                                                       aggregator):
    # 4 nodes: a robust aggregator needs 3 usable replies (min_clients) after the forged one is out
    strategy, results = make_strategy(nodes=(11, 12, 13, 14), num_clients=4, aggregator=aggregator,
                                      min_clients=1 if aggregator == "fedavg" else 3)
    replies = client_replies() + [reply(14, make_adapter(3), make_metrics([0.5, 0.5], 1.0, 1.0))]
    replies[1] = reply_with_tensor(12, KEY, array)
    strategy.aggregate_train(1, replies)  # before: np.stack raised ValueError and the run ended
    [rejected] = results[0].round_record["rejected"]
    assert rejected["node_id"] == 12 and reason in rejected["reason"], rejected
    assert [c["node_id"] for c in results[0].client_records] == [11, 13, 14]


def test_an_honest_reply_decodes_to_exactly_its_tensors():
    value = np.arange(6, dtype=np.float32).reshape(3, 2)
    array = Array(value)
    assert payload_problem(KEY, array, (3, 2), "float32") is None
    np.testing.assert_array_equal(decode(array), value)
    assert decode(array).dtype == np.float32


# ---- numbers and text ----------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, reason", [
    ("kl", 1.7e308, "metric kl is not finite or beyond +-1e+06"),
    ("reward/helpful", -2e6, "metric reward/helpful is not finite or beyond"),
    ("step_norm_ratio", [0.9, 0.9, 0.9, 1e300], "metric step_norm_ratio is not finite or beyond +-1e+06 (an entry"),
    ("kl", float("inf"), "metric kl is not finite"),
])
def test_a_metric_beyond_the_stated_limit_is_rejected_so_the_round_means_stay_finite(key, value, reason):
    strategy, results = make_strategy()
    replies = client_replies()
    metrics = make_metrics(*CLIENTS[12][1:]) | {key: value}
    replies[1] = reply(12, make_adapter(CLIENTS[12][0]), metrics)
    strategy.aggregate_train(1, replies)
    [rejected] = results[0].round_record["rejected"]
    assert rejected["node_id"] == 12 and reason in rejected["reason"], rejected
    assert np.isfinite(results[0].round_record["kl"])


def test_number_bounds_are_inclusive_and_refuse_booleans():
    assert number_problem("kl", MAX_REPORTED_MAGNITUDE) is None
    assert number_problem("kl", -MAX_REPORTED_MAGNITUDE) is None
    assert "holds a bool" in number_problem("kl", True)


def test_samples_longer_than_the_cap_are_rejected_and_the_cap_counts_characters():
    strategy, results = make_strategy(sample_responses=2)
    replies = client_replies()
    huge = "x" * (20 * 1024 * 1024)  # two 20 MB strings were accepted before
    samples = ConfigRecord({"prompts": [huge, "p"], "responses": [huge, "r"]})
    replies[1] = reply(12, make_adapter(CLIENTS[12][0]), make_metrics(*CLIENTS[12][1:]), samples=samples)
    fits = ConfigRecord({"prompts": ["é" * SAMPLE_TEXT_CHARS], "responses": ["r"]})
    replies[2] = reply(13, make_adapter(CLIENTS[13][0]), make_metrics(*CLIENTS[13][1:]), samples=fits)
    strategy.aggregate_train(1, replies)
    [rejected] = results[0].round_record["rejected"]
    assert rejected == {"node_id": 12, "reason": f"a sample prompt has {20 * 1024 * 1024} characters, more than "
                                                 f"{SAMPLE_TEXT_CHARS}"}
    [kept] = [c for c in results[0].client_records if c["node_id"] == 13]
    assert kept["samples"] == [{"prompt": "é" * SAMPLE_TEXT_CHARS, "response": "r"}]


def test_a_huge_rejection_reason_is_stored_cut_to_200_characters():
    strategy, results = make_strategy()
    replies = client_replies()
    metrics = make_metrics(*CLIENTS[12][1:]) | {"k" * 1_000_000: 1.0}  # a 1 MB metric key
    replies[1] = reply(12, make_adapter(CLIENTS[12][0]), metrics)
    strategy.aggregate_train(1, replies)
    [rejected] = results[0].round_record["rejected"]
    assert rejected["node_id"] == 12 and len(rejected["reason"]) <= REASON_CHARS
    assert rejected["reason"].startswith("metric keys differ from the server's schema")


def test_client_errors_lose_every_terminal_escape_and_control_character():
    strategy, results = make_strategy()
    reason = ("ValueError: \x1b]0;owned title\x07bad \x1b[2J\x1b[Hinput\x1b[31m red\x1b[0m \x07\x08\x1bc"
              "\x9b6n end" + "!" * 5000)
    replies = client_replies((11, 13)) + [error_reply(12, reason)]
    strategy.aggregate_train(1, replies)
    [failed] = results[0].round_record["failed"]
    text = failed["reason"]
    assert text.startswith("client error: ValueError: bad input red 6n end!")
    assert not any(ord(ch) < 32 or 0x7f <= ord(ch) <= 0x9f for ch in text), repr(text)
    assert len(text) <= len("client error: ") + REASON_CHARS


def test_clean_text_keeps_ordinary_text_and_marks_a_cut():
    assert clean_text("line one\nline\ttwo") == "line one line two"
    assert clean_text("abcdef", limit=5) == "ab..."
    assert clean_text("naïve — ünïcode ✓") == "naïve — ünïcode ✓"


def test_the_honest_average_is_unchanged_by_the_checks():
    strategy, results = make_strategy()
    arrays, _ = strategy.aggregate_train(1, client_replies())
    assert_adapter(arrays, expected_average(CLIENTS))
    assert set(GLOBAL) == set(TENSOR_SHAPES)
