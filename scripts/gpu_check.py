"""Does a FIRM client round run on a CUDA GPU, in float32 and bfloat16, and how fast?

A check for a machine with a GPU, not a test (CI has none). It needs no model hub and no
packaged weights: the policy is a randomly initialised Llama with SmolLM2-135M's shape (30
blocks, 576 wide) over the offline tokenizer the tests build, and the two rewards are small
random sequence classifiers loaded through the reward interface (local directories), so
every piece that moves tensors between devices runs: generation, the reference pass with the
adapter off, reward scoring, the critic, the per-objective gradients, the MGDA weights, the
step, `firm eval`'s scoring. Random weights mean the replies are noise; what it checks is
that nothing breaks, the numbers stay finite, lambda stays on the simplex and only LoRA moves.

    PYTHONPATH=src python scripts/gpu_check.py --json gpu_check.json
    PYTHONPATH=src python scripts/gpu_check.py --devices cpu --dtypes float32     # same on a CPU
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from firm.config import FirmConfig
from firm.evaluate import EvalConfig, evaluate
from firm.models import MultiObjectiveValueHead, add_lora, lora_parameters, load_policy, resolve_device
from firm.prompts import load_prompts
from firm.rewards import build_rewards, clear_reward_cache
from firm.testing import build_tiny_tokenizer
from firm.trainer import FirmLocalTrainer


def save_models(root: Path) -> tuple[str, list[str]]:
    """A SmolLM2-135M-shaped random policy and two small random reward classifiers, saved like
    hub checkpoints. Returns (policy dir, reward dirs)."""

    tokenizer = build_tiny_tokenizer()
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                          num_attention_heads=9, num_key_value_heads=3, **common))
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    rewards = []
    for index in range(2):
        torch.manual_seed(10 + index)
        reward = LlamaForSequenceClassification(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                                            num_attention_heads=4, num_labels=1, **common))
        path = root / f"reward-{index}"
        reward.save_pretrained(path)
        tokenizer.save_pretrained(path)
        rewards.append(str(path))
    return str(root / "policy"), rewards


def client_round(policy_dir: str, reward_dirs: list[str], device: str, dtype: str, args) -> dict:

    cfg = FirmConfig(policy=policy_dir, rewards=",".join(reward_dirs), device=device, dtype=dtype,
                     rollout_batch_size=args.batch_size, ppo_epochs=args.ppo_epochs,
                     max_new_tokens=args.max_new_tokens).validate()
    torch_device = resolve_device(cfg.device)
    clear_reward_cache()
    model, tokenizer = load_policy(cfg.policy, cfg.dtype)
    policy = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules()).to(torch_device)
    rewards = build_rewards(cfg.reward_specs(), device=str(torch_device))
    value_head = MultiObjectiveValueHead(model.config.hidden_size, len(rewards))
    trainer = FirmLocalTrainer(policy, tokenizer, value_head, rewards, cfg)
    lora_before = {name: p.detach().clone() for name, p in lora_parameters(policy).items()}
    base_before = {name: p.detach().clone() for name, p in policy.named_parameters() if "lora_" not in name}
    prompts = load_prompts("embedded")
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    seconds = []
    for round_index in range(args.rounds):
        torch.manual_seed(round_index)
        started = time.perf_counter()
        stats = trainer.train_round(prompts, random.Random(round_index))
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    lambdas = np.array(stats.lambdas)
    problems = []
    if stats.skipped_steps or not stats.steps:
        problems.append(f"{stats.skipped_steps} skipped of {stats.steps} steps")
    if not (np.all(lambdas >= 0) and np.allclose(lambdas.sum(1), 1)):
        problems.append("lambda left the simplex")
    if not all(np.isfinite(stats.policy_losses + stats.value_losses)):
        problems.append("non-finite loss")
    if not any(not torch.equal(p, lora_before[n]) for n, p in lora_parameters(policy).items()):
        problems.append("LoRA did not move")
    if any(not torch.equal(p, base_before[n]) for n, p in policy.named_parameters() if "lora_" not in n):
        problems.append("a base weight moved")
    if {p.device.type for p in policy.parameters()} != {torch_device.type}:
        problems.append("parameters on several devices")
    return {
        "device": str(torch_device), "dtype": dtype,
        "gpu": torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else None,
        "batch": args.batch_size, "ppo_epochs": args.ppo_epochs, "max_new_tokens": args.max_new_tokens,
        "steps_per_round": stats.steps, "round_seconds": [round(s, 2) for s in seconds],
        "peak_gpu_memory_gb": (round(torch.cuda.max_memory_allocated(torch_device) / 2**30, 2)
                               if torch_device.type == "cuda" else None),
        "mean_lambda": lambdas.mean(0).round(4).tolist(),
        "problems": problems,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="cuda", help="comma-separated, e.g. cuda,cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch-size", type=int, default=16, help="rollout batch (the paper: 16)")
    parser.add_argument("--ppo-epochs", type=int, default=3, help="(the paper: 3)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per setting; the first one warms up")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()


    results = []
    with tempfile.TemporaryDirectory() as tmp:
        policy_dir, reward_dirs = save_models(Path(tmp))
        for device in args.devices.split(","):
            for dtype in args.dtypes.split(","):
                result = client_round(policy_dir, reward_dirs, device, dtype, args)
                results.append(result)
                print(json.dumps(result), flush=True)
            evaluation = evaluate(EvalConfig(policy=policy_dir, rewards=",".join(reward_dirs), num_prompts=16,
                                             max_new_tokens=16, temperature=0.7, seed=0, show_samples=0,
                                             device=device))
            finite = all(np.isfinite(list(evaluation["rewards"].values())))
            results.append({"device": device, "eval_rewards": evaluation["rewards"], "problems": [] if finite else
                            ["non-finite eval reward"]})
            print(json.dumps(results[-1]), flush=True)
    failed = [r for r in results if r["problems"]]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print("FAILED: " + "; ".join(f"{r['device']}: {r['problems']}" for r in failed) if failed else "all checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
