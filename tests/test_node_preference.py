"""Per-client preference: a node states its own trade-off (node config preference="0.7,0.3"),
its client checks it and solves its weights toward it, and every client record says which p it
used; nodes that state none use the server's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from firm.api import check_client_preferences, parse_client_preference
from firm.cli import main
from firm.config import ConfigError, FirmConfig
from firm.federation.node_preference import NodePreferenceError, config_for_node, parse_preference

TINY = ["--num-clients", "2", "--num-rounds", "1", "--rollout-batch-size", "2", "--max-new-tokens", "4",
        "--ppo-epochs", "1", "--num-minibatches", "1", "--max-prompt-tokens", "32", "--rewards", "relevance,civility"]


def test_a_node_preference_replaces_the_servers_and_none_keeps_it():
    server = FirmConfig(preference="0.5,0.5")
    assert config_for_node(server, {"partition-id": 0}) is server
    assert config_for_node(server, {"preference": "0.7,0.3"}).preference_vector() == [0.7, 0.3]
    assert config_for_node(server, {"preference": [0.25, 0.75]}).preference_vector() == [0.25, 0.75]
    assert server.preference == "0.5,0.5"  # the server's settings are not changed


@pytest.mark.parametrize("value, message", [
    ("0.7,0.4", "sum to 1"), ("1.0", "length 2"), ("-0.5,1.5", "non-negative"), ("a,b", "comma-separated numbers"),
])
def test_a_bad_node_preference_is_one_line_naming_the_node_config_key(value, message):
    with pytest.raises(NodePreferenceError, match=message) as raised:
        config_for_node(FirmConfig(), {"preference": value})
    assert str(raised.value).startswith("node config preference") and "\n" not in str(raised.value)


def test_fsmgda_refuses_a_node_preference():
    with pytest.raises(NodePreferenceError, match="solves the weights on the server"):
        config_for_node(FirmConfig(algorithm="fsmgda"), {"preference": "0.7,0.3"})


def test_simulated_clients_preferences_are_checked_before_the_run():
    config = FirmConfig(num_clients=2)
    assert parse_client_preference("1=0.7,0.3") == (1, "0.7,0.3")
    assert check_client_preferences({1: "0.7,0.3"}, config) == {1: parse_preference("0.7,0.3", 2, "p")}
    with pytest.raises(ConfigError, match="clients are 0 to 1"):
        check_client_preferences({2: "0.7,0.3"}, config)
    with pytest.raises(ConfigError, match="client 0: node config preference '0.7,0.4'"):
        check_client_preferences({0: "0.7,0.4"}, config)
    with pytest.raises(ConfigError, match="PARTITION_ID=P1,P2"):
        parse_client_preference("0.7,0.3")


def test_bad_client_preference_flag_exits_2_and_writes_nothing(tmp_path, capsys):
    code = main(["train", "--run-dir", str(tmp_path / "run"), *TINY, "--client-preference", "0=0.9,0.2"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: client 0: node config preference '0.9,0.2': preference must sum to 1, got sum 1.1 for [0.9, 0.2]"]
    assert not (tmp_path / "run").exists()


def test_each_client_solves_toward_its_own_preference_on_a_two_client_run(tiny_policy_dir, tmp_path):
    run_dir = tmp_path / "run"
    # beta large: each client's lambda sits on its own p, so which p it used is visible in lambda
    code = main(["train", "--policy", tiny_policy_dir, "--run-dir", str(run_dir), *TINY, "--beta", "1000",
                 "--preference", "0.5,0.5", "--client-preference", "0=0.9,0.1"])
    assert code == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clients = {r["partition-id"]: r for r in records if r["type"] == "client"}
    assert clients[0]["preference"] == [0.9, 0.1]
    assert clients[1]["preference"] == [0.5, 0.5]  # no preference of its own: the server's
    np.testing.assert_allclose(clients[0]["lambda_mean"], [0.9, 0.1], atol=2e-3)
    np.testing.assert_allclose(clients[1]["lambda_mean"], [0.5, 0.5], atol=2e-3)
    assert json.loads((run_dir / "config.json").read_text())["preference"] == "0.5,0.5"
