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
    for r in rounds:
        assert len(r["lambda_std"]) == 2 and r["clients"] == 2 and r["rejected"] == []
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


def test_resume_continues_after_the_last_round(finished_run, tiny_policy_dir, tmp_path):
    import shutil

    run_dir = tmp_path / "resumed"
    shutil.copytree(finished_run, run_dir)
    # An interrupted round 3 left a stray client record behind: resume must drop it.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"type": "client", "round": 3, "partition-id": 0}) + "\n")
    assert main(["train", "--resume", str(run_dir), "--num-rounds", "3"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records if r["type"] == "round"] == [1, 2, 3]
    assert len([r for r in records if r["type"] == "client" and r["round"] == 3]) == 2
    assert (run_dir / "adapters/round-003/adapter_model.safetensors").is_file()
    # the first two rounds are untouched
    assert (run_dir / "adapters/round-002/adapter_model.safetensors").read_bytes() == (
        finished_run / "adapters/round-002/adapter_model.safetensors").read_bytes()


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
