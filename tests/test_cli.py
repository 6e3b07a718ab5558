"""The CLI end to end on tiny models: a 2-client x 2-round Flower simulation, resume, eval, and
clear errors on bad input that leave an existing run untouched."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from firm.cli import main

TINY = [
    "--num-clients", "2", "--num-rounds", "2", "--rollout-batch-size", "2", "--max-new-tokens", "4",
    "--ppo-epochs", "1", "--num-minibatches", "1", "--max-prompt-tokens", "32", "--rewards", "relevance,civility",
]


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_policy_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    code = main(["train", "--policy", tiny_policy_dir, "--run-dir", str(run_dir), *TINY])
    assert code == 0
    return run_dir


@pytest.fixture(scope="module")
def straight_run(tiny_policy_dir, tmp_path_factory):
    """The same run as finished_run, but 3 rounds in one go."""
    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    assert main(["train", "--policy", tiny_policy_dir, "--run-dir", str(run_dir), *TINY, "--num-rounds", "3"]) == 0
    return run_dir


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close(got, expected, where: str) -> None:
    """Equal, numbers bit for bit (recursing into lists and dicts)."""
    if isinstance(expected, dict):
        assert set(got) == set(expected), where
        for key in expected:
            assert_close(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_close(g, e, f"{where}[{i}]")
    else:
        assert got == expected, f"{where}: {got!r} != {expected!r}"


def by_round_and_partition(records: list[dict]) -> dict:
    """Records keyed by what identifies them across runs (node ids are random per simulation)."""
    return {(r["type"], r["round"], r.get("partition-id")): {k: v for k, v in r.items() if k != "node_id"}
            for r in records}


def assert_same_as_straight_run(records: list[dict], run_dir: Path, straight_run: Path) -> None:
    """A resumed run's metrics equal the straight 3-round run's, and every adapter bit for bit."""
    resumed, straight = by_round_and_partition(records), by_round_and_partition(read_records(straight_run))
    assert set(resumed) == set(straight)
    for key, record in straight.items():
        assert_close(resumed[key], record, str(key))
    for adapter in ("round-000", "round-001", "round-002", "round-003"):
        assert (run_dir / "adapters" / adapter / "adapter_model.safetensors").read_bytes() == (
            straight_run / "adapters" / adapter / "adapter_model.safetensors").read_bytes(), adapter


def test_simulation_writes_the_run_directory(finished_run, tiny_policy_dir):
    records = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in records if r["type"] == "client"]
    rounds = [r for r in records if r["type"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert sorted((c["round"], c["partition-id"]) for c in clients) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for c in clients:
        assert set(c) >= {"reward/relevance", "reward/civility", "kl", "lambda_mean", "lambda_last", "grad_cosine",
                          "skipped_steps", "bytes_up", "bytes_down", "adapter_distance"}
        assert math.isclose(sum(c["lambda_mean"]), 1.0, abs_tol=1e-9)
        assert min(c["lambda_mean"]) >= 0
    for c in clients:  # the honest updates of the tiny run sit below the auto bound
        assert 0 < c["update_norm"] <= rounds[0]["update_bound"]
    for r in rounds:
        assert len(r["lambda_std"]) == 2 and r["clients"] == 2 and r["rejected"] == [] and r["failed"] == []
        # LoRA r=16 on the tiny Llama (hidden 32; v_proj is 16 wide: 2 KV heads of 8), per layer:
        # q: A 16x32 + B 32x16, v: A 16x32 + B 16x16 -> 1792 floats; 2 layers; float32; and Flower
        # serialises each of the 8 tensors as .npy with a 128-byte header.
        assert r["bytes_up_per_client"] == r["bytes_down_per_client"] == 2 * 1792 * 4 + 8 * 128
    config = json.loads((finished_run / "config.json").read_text())
    assert config["policy"] == tiny_policy_dir and config["num_rounds"] == 2
    assert json.loads((finished_run / "state.json").read_text())["completed_rounds"] == 2
    for name in ("rewards.png", "lambda.png", "drift.png"):
        assert (finished_run / "plots" / name).stat().st_size > 1000


def test_round_adapters_load_with_peft(finished_run, tiny_policy_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    initial = load_file(str(finished_run / "adapters/round-000/adapter_model.safetensors"))
    final = load_file(str(finished_run / "adapters/round-002/adapter_model.safetensors"))
    assert initial.keys() == final.keys()
    assert any(not torch.equal(initial[k], final[k]) for k in final), "training did not change the adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    model = PeftModel.from_pretrained(base, str(finished_run / "adapters/round-002"))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    for key, value in final.items():
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], value)


def test_resume_continues_exactly_as_a_run_that_never_stopped(finished_run, straight_run, tmp_path):
    import shutil

    from safetensors.torch import load_file

    run_dir = tmp_path / "resumed"
    shutil.copytree(finished_run, run_dir)  # a copy: its clients must keep their state in the copy
    for partition in ("0", "1"):  # each client's critic, reward statistics and KL controller, after round 2
        assert sorted(p.name for p in (run_dir / "clients" / partition).iterdir()) == [
            "round-001.safetensors", "round-002.safetensors"]
    # An interrupted round 3 left a stray client record and a torn line behind: resume drops the
    # record and moves the torn line to metrics.jsonl.torn.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"type": "client", "round": 3, "partition-id": 0}) + "\n" + '{"type": "cli')
    assert main(["train", "--resume", str(run_dir), "--num-rounds", "3"]) == 0

    records = read_records(run_dir)
    assert [r["round"] for r in records if r["type"] == "round"] == [1, 2, 3]
    assert len([r for r in records if r["type"] == "client" and r["round"] == 3]) == 2
    assert (run_dir / "metrics.jsonl.torn").read_text() == '{"type": "cli\n'
    # the first two rounds are untouched, and the original run was not written to
    assert (run_dir / "adapters/round-002/adapter_model.safetensors").read_bytes() == (
        finished_run / "adapters/round-002/adapter_model.safetensors").read_bytes()
    assert not (finished_run / "clients/0/round-003.safetensors").exists()
    assert (run_dir / "clients/0/round-003.safetensors").is_file()

    # 2 rounds + resume for 1 = 3 rounds straight: every metric, and every adapter, bit for bit.
    assert_same_as_straight_run(records, run_dir, straight_run)
    for partition in ("0", "1"):  # and each client's state after round 3
        final = load_file(str(run_dir / "clients" / partition / "round-003.safetensors"))
        expected = load_file(str(straight_run / "clients" / partition / "round-003.safetensors"))
        assert final.keys() == expected.keys()
        assert all(torch.equal(final[k], expected[k]) for k in expected), partition


def test_a_round_without_enough_replies_stops_cleanly_with_the_resume_command(finished_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "broken clients"
    shutil.copytree(finished_run, run_dir)
    for partition in ("0", "1"):  # both clients fail at the start of round 3
        (run_dir / "clients" / partition / "round-002.safetensors").write_bytes(b"not a state file")
    before = snapshot(run_dir)
    capsys.readouterr()

    assert main(["train", "--resume", str(run_dir), "--num-rounds", "3"]) == 1

    err = capsys.readouterr().err
    assert "Traceback" not in err
    last_two = err.rstrip("\n").splitlines()[-2:]
    assert last_two[0].startswith("error: the run stopped after round 2 of 3: round 3: 0 usable replies, "
                                  "fewer than min_clients (1)")
    assert "client error: ClientStateError: client state" in last_two[0] and "round-002.safetensors" in last_two[0]
    assert last_two[1] == f"resume with: firm train --resume '{run_dir}'"
    after = snapshot(run_dir)
    # nothing written before is lost: only the state, the config's round count and the log's new line differ
    assert set(before) <= set(after)
    changed = {name for name in before if after[name] != before[name]}
    assert changed == {"state.json", "config.json", "metrics.jsonl"}
    assert after["metrics.jsonl"].startswith(before["metrics.jsonl"])
    [failed] = [json.loads(line) for line in after["metrics.jsonl"][len(before["metrics.jsonl"]):].splitlines()]
    assert failed["type"] == "round-failed" and failed["round"] == 3 and len(failed["failed"]) == 2
    assert sorted(f["reason"].split("/clients/")[1].split("/")[0] for f in failed["failed"]) == ["0", "1"]
    assert all(f["reason"].startswith("client error: ClientStateError: client state ") and
               "round-002.safetensors cannot be read (SafetensorError" in f["reason"] for f in failed["failed"])
    state = json.loads(after["state.json"])
    assert state["completed_rounds"] == 2 and "0 usable replies" in state["error"]


def test_eval_scores_an_adapter(finished_run, tiny_policy_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval", "--adapter", str(finished_run / "adapters/round-002"), "--num-prompts", "3",
                 "--max-new-tokens", "4", "--rewards", "relevance,civility", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["num_prompts"] == 3
    assert set(result["rewards"]) == {"relevance", "civility"}
    assert math.isfinite(result["kl"])
    assert len(result["samples"]) == 3
    assert tiny_policy_dir in result["model"]  # the base model came from the run's config
    # the settings used are in the JSON, and what came from the run is said, not silent
    assert result["settings"]["max_new_tokens"] == 4 and result["settings"]["policy"] == tiny_policy_dir
    assert result["settings_from_run"] == ["eval_fraction", "policy", "prompts", "temperature"]
    printed = capsys.readouterr().out
    assert f"settings from the adapter's run ({finished_run}): policy={tiny_policy_dir}" in printed


def test_eval_of_a_copied_adapter_uses_its_config_and_writes_its_card(finished_run, tiny_policy_dir, tmp_path,
                                                                      capsys):
    import shutil

    copy = tmp_path / "shared" / "adapter"
    shutil.copytree(finished_run / "adapters/round-002", copy)
    card = (copy / "README.md").read_text()
    # firm train's own held-out before/after is in the final adapter's card already
    assert "round 2 of 2" in card and "`firm eval` on 16 prompts x 2 samples" in card
    assert json.loads((copy / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_policy_dir
    code = main(["eval", "--adapter", str(copy), "--num-prompts", "2", "--max-new-tokens", "4",
                 "--rewards", "relevance,civility", "--write-card"])
    assert code == 0
    assert f"base from the adapter's config and card: policy={tiny_policy_dir}" in capsys.readouterr().out
    card = (copy / "README.md").read_text()
    assert "`firm eval` on 2 prompts x 1 samples" in card and "16 prompts" not in card
    assert "| reward relevance |" in card.split("## Held-out evaluation")[1]


def test_help_shows_each_default_once(capsys):
    for command in (["train"], ["eval"], ["compare"], ["pareto"], ["reward", "fit"], ["synthetic"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps help lines
        assert "(default: None)" not in text, command
        assert "default: 3] (default" not in text, command
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("[default: 3]") == 1  # --num-rounds
    assert "--preset {default,learning,paper,simple-rewards} named set of settings [default: 'default']" in text
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "[default: the adapter's run's, else 32]" in text  # --max-new-tokens


def test_the_help_formatter_shows_a_zero_default_and_no_empty_one():
    from firm.cli.flags import OneLineParser

    parser = OneLineParser(prog="x")
    parser.add_argument("--count", type=int, default=0, help="how many")
    parser.add_argument("--item", action="append", default=[], help="one item")
    parser.add_argument("--name", default="", help="a name")
    text = " ".join(parser.format_help().split())
    assert "how many [default: 0]" in text
    assert "one item --name" in text and "a name" in text and text.count("[default") == 1


def test_train_ends_with_a_paired_heldout_before_after(finished_run, capsys):
    record = json.loads((finished_run / "heldout.json").read_text())
    assert record["adapter"].endswith("round-002")
    assert record["num_prompts"] == 16 and record["samples_per_prompt"] == 2
    for name in ("relevance", "civility"):
        gain = record["gains"][name]
        assert gain["pairs"] == 32 and gain["prompts"] == 16
        assert gain["ci_low"] <= gain["gain"] <= gain["ci_high"]
        assert gain["base"] == pytest.approx(record["base"]["rewards"][name])
        assert gain["adapter"] == pytest.approx(record["final"]["rewards"][name])
    assert record["base"]["model"].endswith("(base)") and "round-002" in record["final"]["model"]
    assert record["base"]["pairing"] == record["final"]["pairing"]
    assert (finished_run / "plots" / "heldout.png").stat().st_size > 0


def test_heldout_can_be_switched_off(tiny_policy_dir, tmp_path, capsys):
    run_dir = tmp_path / "no-heldout"
    assert main(["train", "--policy", tiny_policy_dir, "--run-dir", str(run_dir), *TINY, "--num-rounds", "1",
                 "--heldout-prompts", "0"]) == 0
    assert not (run_dir / "heldout.json").exists()
    assert "held-out" not in capsys.readouterr().out


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--preference", "0.5,0.6"], "sum"),
        (["--preference", "1.0"], "length"),
        (["--preference=-0.5,1.5"], "negative"),
        (["--preference", "a,b"], "comma-separated numbers"),
        (["--beta=-0.1"], "beta must be >= 0"),
        (["--beta", "nan"], "beta must be finite"),
        (["--rewards", "civility"], "at least 2 objectives"),
        (["--rewards", "civility,no-such-reward"], "no-such-reward"),
        (["--num-clients", "0"], "num_clients must be >= 1"),
        (["--algorithm", "sgd"], "algorithm must be one of"),
        (["--num-rounds", "two"], "num_rounds expects a int"),
        (["--prompts", "/no/such/prompts.jsonl"], "/no/such/prompts.jsonl"),
        (["--policy", "/no/such/model"], "/no/such/model"),
        (["--device", "gpu"], "device must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_settings_fail_with_a_clear_message(args, message, capsys, tmp_path):
    code = main(["train", "--run-dir", str(tmp_path / "run"), "--rewards", "relevance,civility", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "run").exists(), "a failed start must not create a run directory"


def test_asking_for_a_missing_gpu_fails_before_anything_is_written(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["train", "--run-dir", str(tmp_path / "run"), "--rewards", "relevance,civility", "--device", "cuda"])
    assert code == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_simulation_gives_each_client_the_gpu_only_when_the_run_uses_one(monkeypatch):
    import torch

    from firm.federation.simulation import simulation_backend_config
    from firm.config import FirmConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_only = simulation_backend_config(FirmConfig(), cpus=2)
    assert cpu_only["client_resources"] == {"num_cpus": 2, "num_gpus": 0.0}
    assert cpu_only["init_args"]["num_gpus"] == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with_gpu = simulation_backend_config(FirmConfig(device="auto"), cpus=16)
    assert with_gpu["client_resources"] == {"num_cpus": 16, "num_gpus": 1.0}
    assert with_gpu["init_args"]["num_gpus"] == 2
    assert simulation_backend_config(FirmConfig(device="cpu"), cpus=16)["client_resources"]["num_gpus"] == 0.0


def test_malformed_prompt_file_names_file_and_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "fine"}\n{"prompt": \n')
    code = main(["train", "--prompts", str(prompts), "--num-clients", "1", "--run-dir", str(tmp_path / "run"),
                 "--rewards", "relevance,civility"])
    assert code == 2
    assert f"{prompts}:3" in capsys.readouterr().err


def test_existing_run_is_never_overwritten(finished_run, capsys):
    before = snapshot(finished_run)
    code = main(["train", "--run-dir", str(finished_run), *TINY, "--policy", "embedded"])
    assert code == 2
    assert "already holds a run" in capsys.readouterr().err
    assert snapshot(finished_run) == before


def test_resume_rejects_changed_settings_and_missing_dirs(finished_run, tmp_path, capsys):
    before = snapshot(finished_run)
    assert main(["train", "--resume", str(finished_run), "--beta", "0.5"]) == 2
    assert "only --num-rounds may change" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert snapshot(finished_run) == before


def test_eval_rejects_a_directory_that_is_not_an_adapter(tmp_path, capsys):
    assert main(["eval", "--adapter", str(tmp_path)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


KILL_AT_STATE_WRITE = """
import os, signal, sys
from firm.rundir import RunDir
write_state = RunDir.write_state
def killed(self, completed_rounds, **extra):
    if completed_rounds == {round}:  # round {round}'s adapter, metrics and ledger are written; its state is not
        os.kill(os.getpid(), signal.SIGKILL)
    write_state(self, completed_rounds, **extra)
RunDir.write_state = killed
from firm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_during_the_servers_round_writes_resumes_bit_for_bit(straight_run, tiny_policy_dir, tmp_path):
    """SIGKILL of `firm train` itself after round 3's adapter, metrics and ledger are written and before
    state.json says so; the resumed run redoes round 3 and ends exactly as the run that never stopped."""
    import os
    import subprocess
    import sys

    import psutil

    run_dir = tmp_path / "killed"
    work = tmp_path / "work"  # the killed run's processes (Ray's included) work here, so they are found
    work.mkdir()
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", KILL_AT_STATE_WRITE.replace("{round}", "3"), "train", "--policy",
               tiny_policy_dir, "--run-dir", str(run_dir), *TINY, "--num-rounds", "3"]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, timeout=900)
    try:
        assert result.returncode == -9, result.stderr.decode()[-2000:]
        assert json.loads((run_dir / "state.json").read_text())["completed_rounds"] == 2
        assert (run_dir / "adapters/round-003").is_dir()  # written before the kill
        assert any(r["round"] == 3 for r in read_records(run_dir))
    finally:  # the killed run's Ray processes: ours (they work in our folder), ended by their ids
        for proc in psutil.process_iter(["cwd"]):
            if proc.info["cwd"] and proc.info["cwd"].startswith(str(work)):
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass

    assert main(["train", "--resume", str(run_dir)]) == 0

    assert_same_as_straight_run(read_records(run_dir), run_dir, straight_run)


@pytest.mark.parametrize("change, message", [
    ({"lora_r": 8}, "LoRA r is 8 but the run's adapter round-002 has 16"),
    ({"lora_target_modules": "q_proj"}, "LoRA target_modules is ['q_proj'] but the run's adapter round-002 has"),
    ({"rewards": "civility,relevance"}, "the objectives are ['civility', 'relevance'] but the run's rounds were "
                                        "trained on ['relevance', 'civility']"),
    ({"algorithm": "linear"}, "algorithm is 'linear' but the run's rounds were trained with 'firm'"),
    ({"num_rounds": True}, "num_rounds expects a int, got True"),
])
def test_resume_refuses_a_config_json_that_no_longer_describes_the_run(finished_run, tmp_path, capsys, change,
                                                                       message):
    import shutil

    run_dir = tmp_path / "edited"
    shutil.copytree(finished_run, run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, **change}))
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--num-rounds", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert snapshot(run_dir) == before


def test_print_config_on_resume_prints_the_resumed_settings_and_writes_nothing(finished_run, capsys):
    before = snapshot(finished_run)
    capsys.readouterr()
    assert main(["train", "--resume", str(finished_run), "--num-rounds", "3", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_rounds"] == 3 and printed["rewards"] == "relevance,civility"
    assert snapshot(finished_run) == before
