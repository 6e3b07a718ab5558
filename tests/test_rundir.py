"""The run directory: creation and resume guards, the metrics log, atomic adapters, plots."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from firm.config import FirmConfig
from firm.models import add_lora, lora_parameters
from firm.plots import plot_run
from firm.rundir import RunDir, RunDirError

torch.set_num_threads(1)


def make_config(**overrides) -> FirmConfig:
    return FirmConfig(**{"num_rounds": 2, "num_clients": 2, **overrides})


def read_tree(path: Path) -> dict[str, bytes]:
    """Every file under path, relative name -> bytes (to prove nothing changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---- create / open ----------------------------------------------------------------------------
def test_create_writes_config_and_state(tmp_path):
    config = make_config(beta=0.25)
    run = RunDir.create(tmp_path / "run", config)

    assert (run.path / "config.json").is_file() and (run.path / "state.json").is_file()
    loaded = run.config()
    assert loaded.beta == 0.25 and loaded.num_rounds == 2
    assert loaded.run_dir == str(tmp_path / "run")
    assert loaded.to_dict() == config.to_dict()
    assert run.completed_rounds == 0
    assert run.read_metrics() == []
    assert run.last_adapter() is None


def test_create_refuses_an_existing_run_and_changes_nothing(tmp_path):
    run = RunDir.create(tmp_path / "run", make_config())
    run.append_metrics([{"type": "round", "round": 1, "kl": 0.5}])
    run.write_state(1)
    before = read_tree(run.path)

    with pytest.raises(RunDirError, match="already holds a run"):
        RunDir.create(tmp_path / "run", make_config(beta=0.9, num_rounds=7))

    assert read_tree(run.path) == before


def test_open_errors_name_what_is_missing(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        RunDir.open(tmp_path / "nowhere")

    run = RunDir.create(tmp_path / "run", make_config())
    assert RunDir.open(run.path).config().to_dict() == run.config().to_dict()

    (run.path / "state.json").unlink()
    with pytest.raises(RunDirError, match="state.json is missing"):
        RunDir.open(run.path)
    (run.path / "config.json").unlink()
    with pytest.raises(RunDirError, match="config.json is missing"):
        RunDir.open(run.path)


# ---- metrics ----------------------------------------------------------------------------------
def test_metrics_round_trip_with_non_finite_values_written_as_null(tmp_path):
    run = RunDir.create(tmp_path / "run", make_config())
    first = {"type": "client", "round": 1, "node_id": 3, "kl": 0.25, "lambda_mean": [0.5, 0.5]}
    second = {"type": "round", "round": 1, "kl": float("nan"), "lambda_std": [float("inf"), 0.0],
              "nested": {"x": float("-inf"), "y": 1.5}, "rejected": []}
    run.append_metrics([first])
    run.append_metrics([second])

    text = (run.path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    for line in text.splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert run.read_metrics() == [
        first,
        {"type": "round", "round": 1, "kl": None, "lambda_std": [None, 0.0], "nested": {"x": None, "y": 1.5},
         "rejected": []},
    ]


def test_numpy_non_finite_values_are_also_written_as_null(tmp_path):
    run = RunDir.create(tmp_path / "run", make_config())
    run.append_metrics([{"round": 1, "a": np.float32("nan"), "b": np.array([1.0, np.nan])}])
    text = (run.path / "metrics.jsonl").read_text()
    assert "NaN" not in text
    assert run.read_metrics() == [{"round": 1, "a": None, "b": [1.0, None]}]


def test_read_metrics_names_file_and_line_of_a_corrupt_record(tmp_path):
    run = RunDir.create(tmp_path / "run", make_config())
    run.append_metrics([{"round": 1}, {"round": 2}])
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "kl": \n')
    with pytest.raises(RunDirError, match=r"metrics\.jsonl:3: not valid JSON"):
        run.read_metrics()


def test_drop_unfinished_rounds_keeps_completed_ones(tmp_path):
    run = RunDir.create(tmp_path / "run", make_config(num_rounds=3))
    records = [
        {"type": "client", "round": 1, "node_id": 1},
        {"type": "round", "round": 1},
        {"type": "client", "round": 2, "node_id": 1},
        {"type": "round", "round": 2},
        {"type": "client", "round": 3, "node_id": 1},  # written by a crashed round 3
    ]
    run.append_metrics(records)
    run.write_state(2)

    assert run.drop_unfinished_rounds() == 1
    assert run.read_metrics() == records[:4]
    unchanged = (run.path / "metrics.jsonl").read_bytes()
    assert run.drop_unfinished_rounds() == 0
    assert (run.path / "metrics.jsonl").read_bytes() == unchanged

    run.write_state(0)
    assert run.drop_unfinished_rounds() == 4
    assert run.read_metrics() == []


@pytest.mark.parametrize("torn", ['{"type": "client", "round": 3, "kl"', '{"type": "client", "round": 3, "kl": \n'],
                         ids=["no newline", "not JSON"])
def test_a_torn_last_line_is_moved_aside_on_resume_and_the_run_continues(tmp_path, torn):
    run = RunDir.create(tmp_path / "run", make_config(num_rounds=3))
    whole = [{"type": "client", "round": 1, "node_id": 1}, {"type": "round", "round": 1}]
    run.append_metrics(whole)
    run.write_state(1)
    with open(run.path / "metrics.jsonl", "a") as f:  # a crash in the middle of round 2's append
        f.write('{"type": "client", "round": 2}\n' + torn)
    with pytest.raises(RunDirError, match="not valid JSON"):
        run.read_metrics()

    assert run.drop_unfinished_rounds() == 1  # the whole round-2 line; the torn one was moved first

    assert run.read_metrics() == whole
    assert (run.path / "metrics.jsonl.torn").read_text() == torn.rstrip("\n") + "\n"
    run.append_metrics([{"type": "round", "round": 2}])  # the run goes on
    assert run.read_metrics() == whole + [{"type": "round", "round": 2}]
    assert run.move_torn_tail() == b""  # a whole log is left alone


def test_a_corrupt_line_before_the_last_is_not_taken_for_a_torn_one(tmp_path):
    run = RunDir.create(tmp_path / "run", make_config())
    (run.path / "metrics.jsonl").write_text('{"round": 1}\n{"round": \n{"round": 1}\n')
    with pytest.raises(RunDirError, match=r"metrics\.jsonl:2: not valid JSON"):
        run.drop_unfinished_rounds()
    assert not (run.path / "metrics.jsonl.torn").exists()


def test_records_of_failed_attempts_survive_resume(tmp_path):
    run = RunDir.create(tmp_path / "run", make_config(num_rounds=3))
    failed = {"type": "round-failed", "round": 2, "reason": "0 usable replies", "failed": [], "rejected": []}
    run.append_metrics([{"type": "round", "round": 1}, {"type": "client", "round": 2}, failed])
    run.write_state(1)
    assert run.drop_unfinished_rounds() == 1
    assert run.read_metrics() == [{"type": "round", "round": 1}, failed]


def test_append_metrics_writes_every_byte_even_when_the_kernel_writes_less(tmp_path, monkeypatch):
    import firm.rundir

    run = RunDir.create(tmp_path / "run", make_config())
    real_write = os.write
    monkeypatch.setattr(firm.rundir.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    records = [{"type": "client", "round": 1, "kl": 0.25}, {"type": "round", "round": 1, "lambda_mean": [0.5, 0.5]}]
    run.append_metrics(records)
    monkeypatch.undo()
    assert run.read_metrics() == records


def test_config_rewrite_is_atomic(tmp_path, monkeypatch):
    import firm.rundir

    run = RunDir.create(tmp_path / "run", make_config(num_rounds=2))
    before = (run.path / "config.json").read_bytes()
    assert (run.path / "config.json").stat().st_mode & 0o777 == 0o644

    def failing_replace(src, dst):
        raise OSError("interrupted")

    monkeypatch.setattr(firm.rundir.os, "replace", failing_replace)
    with pytest.raises(OSError, match="interrupted"):
        run.save_config(make_config(num_rounds=5))
    monkeypatch.undo()
    assert (run.path / "config.json").read_bytes() == before
    assert sorted(p.name for p in run.path.iterdir()) == ["config.json", "state.json"]  # no temp file left
    run.save_config(make_config(num_rounds=5))
    assert run.config().num_rounds == 5


# ---- each client's own state: RUN_DIR/clients/<partition-id>/ ------------------------------------
def client_trainer(seed: int, adaptive: bool = True):
    """The parts of a FirmLocalTrainer whose state survives between rounds."""
    from types import SimpleNamespace

    from firm.models import MultiObjectiveValueHead
    from firm.ppo import AdaptiveKLController, FixedKLController, RunningMeanStd

    torch.manual_seed(seed)
    head = MultiObjectiveValueHead(8, 2)
    with torch.no_grad():
        head.linear.weight.normal_()
    stats = RunningMeanStd(2)
    stats.update(torch.randn(5, 2, dtype=torch.float64) / 3)
    kl = AdaptiveKLController(0.05, 6.0, 10000) if adaptive else FixedKLController(0.05)
    kl.update(float(seed) + 0.123456789, 8)
    return SimpleNamespace(value_head=head, reward_stats=stats, kl_controller=kl, keeps_optimizer_state=False)


def test_client_state_round_trips_exactly_through_the_run_directory(tmp_path):
    from flwr.app import Context, RecordDict

    from firm.federation.client_state import client_state_dir, restore_state, save_state

    run = RunDir.create(tmp_path / "run", make_config())
    config = run.config()
    directory = client_state_dir(config, {"partition-id": 1, "num-partitions": 2, "allow-server-run-dir": "true"})
    assert directory == run.path / "clients" / "1"
    assert client_state_dir(config, {"partition-id": 1, "state-dir": str(tmp_path / "node")}) == tmp_path / "node"
    assert client_state_dir(FirmConfig(run_dir=str(tmp_path / "elsewhere")), {"partition-id": 1}) is None

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    saved = client_trainer(seed=3)
    save_state(context, saved, directory, firm_round=2)
    assert sorted(p.name for p in directory.iterdir()) == ["round-002.safetensors"]

    fresh = client_trainer(seed=7)
    restore_state(context, fresh, directory, firm_round=3)
    assert torch.equal(fresh.value_head.linear.weight, saved.value_head.linear.weight)
    assert torch.equal(fresh.value_head.linear.bias, saved.value_head.linear.bias)
    assert fresh.reward_stats.state_dict() == saved.reward_stats.state_dict()
    assert fresh.kl_controller.state_dict() == saved.kl_controller.state_dict()

    # Round 2 redone after a crash starts from the state after round 1, not the one after round 2.
    first = client_trainer(seed=1)
    save_state(context, first, directory, firm_round=1)
    redo = client_trainer(seed=7)
    restore_state(context, redo, directory, firm_round=2)
    assert redo.kl_controller.state_dict() == first.kl_controller.state_dict()
    untouched = client_trainer(seed=7)
    restore_state(context, untouched, directory, firm_round=1)  # nothing saved before round 1: fresh
    assert untouched.kl_controller.state_dict() == client_trainer(seed=7).kl_controller.state_dict()

    for r in (3, 4):
        save_state(context, client_trainer(seed=r), directory, firm_round=r)
    assert sorted(p.name for p in directory.iterdir()) == ["round-003.safetensors", "round-004.safetensors"]
    save_state(context, client_trainer(seed=6), directory, firm_round=6)  # a client that missed round 5
    assert sorted(p.name for p in directory.iterdir()) == ["round-004.safetensors", "round-006.safetensors"]
    assert len(context.state.array_records) == 0  # on disk, not in Flower's memory


def test_client_state_in_memory_when_the_node_has_no_directory():
    from flwr.app import Context, RecordDict

    from firm.federation.client_state import restore_state, save_state

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    saved = client_trainer(seed=3, adaptive=False)
    save_state(context, saved, None, firm_round=1)
    fresh = client_trainer(seed=7, adaptive=False)
    restore_state(context, fresh, None, firm_round=2)
    assert torch.equal(fresh.value_head.linear.weight, saved.value_head.linear.weight)
    assert fresh.reward_stats.state_dict() == saved.reward_stats.state_dict()
    assert fresh.kl_controller.state_dict() == saved.kl_controller.state_dict()


def test_a_corrupt_client_state_is_an_error_that_names_the_file(tmp_path):
    from flwr.app import Context, RecordDict

    from firm.federation.client_state import ClientStateError, restore_state

    directory = tmp_path / "clients" / "0"
    directory.mkdir(parents=True)
    (directory / "round-001.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ClientStateError, match=r"round-001\.safetensors cannot be read"):
        restore_state(context, client_trainer(seed=0), directory, firm_round=2)


# ---- adapters ---------------------------------------------------------------------------------
def tiny_peft_model(tiny_llama_config):
    """(peft model with a non-trivial adapter, an untouched copy of its base)."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config).eval()
    untouched = copy.deepcopy(base)
    peft_model = add_lora(base, r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    with torch.no_grad():
        for param in lora_parameters(peft_model).values():
            param.normal_(0.0, 0.5)  # lora_B starts at zero: make the adapter matter
    return peft_model.eval(), untouched


def test_saved_adapter_reloads_with_identical_logits(tmp_path, tiny_llama_config):
    peft_model, untouched = tiny_peft_model(tiny_llama_config)
    run = RunDir.create(tmp_path / "run", make_config())

    path = run.save_adapter(1, peft_model)

    assert path == run.path / "adapters" / "round-001"
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    run.write_state(1)
    assert run.last_adapter() == path
    reloaded = PeftModel.from_pretrained(untouched, path).eval()
    input_ids = torch.tensor([[1, 40, 41, 42, 43, 44, 2]])
    with torch.no_grad():
        expected = peft_model(input_ids=input_ids).logits
        actual = reloaded(input_ids=input_ids).logits
        with reloaded.disable_adapter():
            base_logits = reloaded(input_ids=input_ids).logits
    assert torch.equal(actual, expected)
    assert not torch.allclose(base_logits, expected, atol=1e-4), "the adapter should change the logits"


def test_failed_save_leaves_previous_adapter_untouched_and_no_partial_target(tmp_path, tiny_llama_config, monkeypatch):
    peft_model, _ = tiny_peft_model(tiny_llama_config)
    run = RunDir.create(tmp_path / "run", make_config())
    run.save_adapter(1, peft_model)
    adapters = run.path / "adapters"
    before = read_tree(adapters)

    def crash_midway(directory, *args, **kwargs):
        Path(directory, "adapter_config.json").write_text("{}")  # a partial write ...
        raise OSError("disk full")  # ... then the crash

    monkeypatch.setattr(peft_model, "save_pretrained", crash_midway)
    with torch.no_grad():
        for param in lora_parameters(peft_model).values():
            param.add_(1.0)

    with pytest.raises(OSError, match="disk full"):
        run.save_adapter(1, peft_model)  # redoing round 1
    with pytest.raises(OSError, match="disk full"):
        run.save_adapter(2, peft_model)

    assert read_tree(adapters) == before
    assert sorted(p.name for p in adapters.iterdir()) == ["round-001"]


def test_failed_replace_of_a_redone_round_keeps_the_previous_adapter(tmp_path, tiny_llama_config, monkeypatch):
    import firm.rundir

    peft_model, _ = tiny_peft_model(tiny_llama_config)
    run = RunDir.create(tmp_path / "run", make_config())
    run.save_adapter(1, peft_model)
    before = read_tree(run.path / "adapters")

    def failing_replace(src, dst):
        raise OSError("interrupted")

    monkeypatch.setattr(firm.rundir.os, "replace", failing_replace)
    with pytest.raises(OSError, match="interrupted"):
        run.save_adapter(1, peft_model)
    monkeypatch.undo()
    assert read_tree(run.path / "adapters") == before


# ---- plots ------------------------------------------------------------------------------------
def hand_made_metrics() -> list[dict]:
    records = []
    for rnd in (1, 2):
        clients = []
        for pid in (0, 1):
            clients.append({
                "type": "client", "round": rnd, "node_id": 100 + pid, "partition-id": pid,
                "reward/helpful": 0.1 * rnd + pid, "reward/harmless": -0.2 * rnd + pid,
                "kl": 0.01 * rnd, "lambda_mean": [0.3 + 0.2 * pid, 0.7 - 0.2 * pid],
                "adapter_distance": 0.5 / rnd,
            })
        records += clients
        lambdas = np.array([c["lambda_mean"] for c in clients])
        records.append({
            "type": "round", "round": rnd, "clients": 2, "rejected": [],
            "reward/helpful": float(np.mean([c["reward/helpful"] for c in clients])),
            "reward/harmless": float(np.mean([c["reward/harmless"] for c in clients])),
            "kl": 0.01 * rnd, "lambda_mean": lambdas.mean(0).tolist(), "lambda_std": lambdas.std(0).tolist(),
            "adapter_distance": 0.5 / rnd,
        })
    return records


def test_plot_run_writes_three_pngs(tmp_path):
    run = RunDir.create(tmp_path / "run", make_config())
    assert plot_run(run) == []  # nothing to plot before the first round
    run.append_metrics(hand_made_metrics())

    paths = plot_run(run)

    assert sorted(p.name for p in paths) == ["drift.png", "lambda.png", "rewards.png"]
    for path in paths:
        assert path.parent == run.plots_dir
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n"), path


# ---- symbolic links: a run never follows one it did not make ---------------------------------------
def test_create_refuses_a_symlinked_run_dir_and_never_overwrites_a_config(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(elsewhere)
    with pytest.raises(RunDirError, match="link is a symbolic link"):
        RunDir.create(tmp_path / "link", make_config())
    assert list(elsewhere.iterdir()) == []
    # a config.json already there (a file, or a link to someone else's file) is never overwritten
    victim = tmp_path / "victim.json"
    victim.write_text("precious\n")
    for name, make in (("file", lambda p: p.write_text("{}")), ("link", lambda p: p.symlink_to(victim))):
        run = tmp_path / f"with-config-{name}"
        run.mkdir()
        make(run / "config.json")
        with pytest.raises(RunDirError, match="already holds a run"):
            RunDir.create(run, make_config())
        assert not (run / "state.json").exists()
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("entry", ["metrics.jsonl", "adapters", "plots", "clients/0", "server",
                                   "adapters/round-001"])
def test_open_refuses_a_run_dir_with_a_planted_link_where_it_writes(tmp_path, entry):
    run = RunDir.create(tmp_path / "run", make_config())
    target = tmp_path / "target"
    target.mkdir()
    (run.path / entry).parent.mkdir(parents=True, exist_ok=True)
    (run.path / entry).symlink_to(target)
    with pytest.raises(RunDirError, match=f"{entry} is a symbolic link"):
        RunDir.open(run.path)
    assert list(target.iterdir()) == []


def test_metrics_are_never_appended_through_a_link(tmp_path):
    run = RunDir.create(tmp_path / "run", make_config())
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (run.path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(OSError):
        run.append_metrics([{"type": "round", "round": 1}])
    assert victim.read_text() == "precious\n"
