"""A node loads or writes what the server names only with its own node config's consent: models
(allow-server-models), prompt files (allow-server-paths), the run directory (allow-server-run-dir)."""

from __future__ import annotations

import json

import pytest
from flwr.app import ArrayRecord, Context, Message, RecordDict

import firm.federation.client_app as client_app
from firm.config import FirmConfig
from firm.federation.client_app import train_reply
from firm.federation.client_state import client_state_dir
from firm.federation.node_policy import NodePolicyError, check_server_models, server_models
from firm.federation.protocol import ROUND_KEY, config_to_record


def config(**overrides) -> FirmConfig:
    return FirmConfig(**overrides).validate()


def test_built_in_models_need_no_consent_and_every_other_model_does(tmp_path):
    assert server_models(config()) == []  # embedded policy, embedded rewards
    assert server_models(config(rewards="relevance,civility")) == []
    named = config(policy="someone/model", rewards=f"hf:someone/reward,embedded:harmless,{tmp_path}")
    assert server_models(named) == ["policy 'someone/model'", "reward 'hf:someone/reward'", f"reward '{tmp_path}'"]
    with pytest.raises(NodePolicyError, match="asks this node to load policy 'someone/model', reward 'hf:someone/reward'"):
        check_server_models(named, {})
    with pytest.raises(NodePolicyError, match="allow-server-models=true"):
        check_server_models(named, {"allow-server-models": "no"})
    check_server_models(named, {"allow-server-models": "true"})


def test_the_node_process_environment_can_give_the_consent_and_the_node_config_overrides_it(monkeypatch):
    named = config(policy="someone/model")
    monkeypatch.setenv("FIRM_NODE_ALLOW", "allow-server-run-dir, allow-server-models")
    check_server_models(named, {})
    with pytest.raises(NodePolicyError):
        check_server_models(named, {"allow-server-models": "false"})
    monkeypatch.setenv("FIRM_NODE_ALLOW", "allow-server-run-dir")
    with pytest.raises(NodePolicyError):
        check_server_models(named, {})


def test_a_node_refuses_a_server_named_policy_before_loading_anything(monkeypatch, server_task_identity):
    def forbidden(*args, **kwargs):
        raise AssertionError("the node loaded the model the server named")

    monkeypatch.setattr(client_app, "get_policy", forbidden)
    cfg = config(policy="/srv/evil-model", rewards="relevance,civility")
    record = config_to_record(cfg)
    record[ROUND_KEY] = 1
    msg = Message(RecordDict({"arrays": ArrayRecord(), "config": record}), dst_node_id=5, message_type="train")
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    answer = train_reply(msg, context)
    assert answer.has_error()
    assert "NodePolicyError: the server asks this node to load policy '/srv/evil-model'" in answer.error.reason


def test_client_state_goes_under_the_servers_run_dir_only_with_consent(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({}))
    cfg = config(run_dir=str(run))
    assert client_state_dir(cfg, {"partition-id": 1}) is None  # in memory: nothing written or deleted there
    assert client_state_dir(cfg, {"partition-id": 1, "allow-server-run-dir": "true"}) == run / "clients" / "1"
    own = tmp_path / "own-state"
    assert client_state_dir(cfg, {"state-dir": str(own)}) == own  # the node's own directory always wins


@pytest.fixture
def server_task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


# ---- `flwr run` with a bad run-config value: one line, a failed run, nothing written ----------------
@pytest.mark.parametrize("key, value, message", [("num-rounds", 0, "run config: num-rounds must be >= 1, got 0"),
                                                 ("num-rounds", "two", "num-rounds expects a int, got 'two'"),
                                                 ("seed", -1, "seed must be from 0 to 2^32 - 1")])
def test_a_bad_run_config_value_under_flwr_run_ends_the_run_with_one_line(tmp_path, monkeypatch, key, value, message):
    import firm.federation.server_app as server_app
    from firm.federation.protocol import run_config_defaults

    class Exited(Exception):
        pass

    def fake_exit(code, text):
        raise Exited(code, text)

    monkeypatch.setattr(server_app, "flwr_exit", fake_exit)
    monkeypatch.setenv(server_app.RUN_ROOT_ENV, str(tmp_path / "runs"))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={**run_config_defaults(), key: value, "run-dir": "r"})
    with pytest.raises(Exited) as info:
        server_app.main(grid=None, context=context)
    code, text = info.value.args
    assert code == 201  # Flower's ServerApp exception: the process exits 1, the run's status is failed
    assert text.startswith("FIRM run refused: ") and message in text and "\n" not in text
    assert not (tmp_path / "runs").exists()
