"""What sampling from a bfloat16 copy (``sampling_dtype = bfloat16``) changes.

The opt-in samples each rollout from a bfloat16 copy of the merged float32 policy, and keeps
that copy's log-probs as the behaviour log-probs. Two measurements, on the real pipeline (the
embedded SmolLM2 policy and rewards, the default settings):

``tokens`` (paired, per token): for --rollouts rollouts at each of two adapters (the initial one,
where the policy equals the reference, and the one after --warm-rounds float32 FIRM rounds),
sample with the bfloat16 copy and take the float32 policy's log-probs of the same tokens:
- the per-token difference d = logp_bf16 - logp_f32 (mean, mean |d|, 99th percentile, max);
- the first PPO ratio exp(-d): its spread, and the share of tokens outside the clip range
  (0 by construction when the float32 policy samples);
- the per-sequence sum of d, the part of the KL estimate that is rounding, next to the KL
  estimate itself;
- lambda of a FIRM step on the whole rollout, once with the bfloat16 behaviour log-probs and once
  with the float32 ones of the same tokens: |lambda_1 difference| (the effect of the choice
  of behaviour log-probs alone, the tokens held fixed).

``runs`` (paired by seed, end to end): `firm train` on the embedded defaults for each seed, once
as is and once with --sampling-dtype bfloat16, back to back: round-3 rewards, KL and lambda
compared with firm.stats (paired bootstrap interval, Holm-corrected Wilcoxon, TOST at 5 %),
and the wall-time ratio of each pair.

    .venv/bin/python studies/bf16_sampling.py --out experiments/bf16_sampling              # both parts
    .venv/bin/python studies/bf16_sampling.py --parts tokens --rollouts 4 --warm-rounds 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _policy_batch import fresh_value_head, seeded_policy
from firm.config import build_config
from firm.federation.node_policy import client_shard
from firm.gradients import objective_gradients
from firm.models import BFloat16Sampler
from firm.ppo import clipped_surrogate_losses
from firm.sampling import policy_forward
from firm.stats import compare_table
from firm.trainer import FirmLocalTrainer


def first_step_lambda(trainer: FirmLocalTrainer, rollout) -> float:
    """lambda_1 of a FIRM step on the whole rollout (no step taken; reward statistics restored)."""
    saved = copy.deepcopy(trainer.reward_stats)
    advantages, _, _ = trainer.advantages(rollout)
    trainer.reward_stats = saved
    trainer.policy.train()
    logprobs, _ = policy_forward(trainer.policy, rollout.input_ids, rollout.attention_mask, rollout.response_length,
                                 trainer.config.temperature)
    losses, _ = clipped_surrogate_losses(logprobs, rollout.logprobs, advantages, rollout.response_mask,
                                         trainer.config.clip_range)
    flat = objective_gradients(losses, trainer.lora_params)
    return float(trainer.objective_weights((flat @ flat.T).cpu().numpy())[0])


def measure_tokens(trainer: FirmLocalTrainer, shard, rollouts: int, seed: int) -> dict:
    """Paired token-level measurements over ``rollouts`` bfloat16 rollouts at the current adapter."""
    cfg = trainer.config
    diffs, seq_rounding, seq_kl, gaps = [], [], [], []
    rng = random.Random(seed)
    for index in range(rollouts):
        torch.manual_seed(seed + index)
        batch = rng.sample(list(shard), k=min(cfg.rollout_batch_size, len(shard)))
        rollout = trainer.rollout(batch)  # sampled by the bfloat16 copy
        with torch.no_grad():
            own, hidden = policy_forward(trainer.policy, rollout.input_ids, rollout.attention_mask,
                                         rollout.response_length, cfg.temperature)
        mask = rollout.response_mask
        d = (rollout.logprobs - own) * mask
        diffs.append(d[mask.bool()])
        seq_rounding.append(d.sum(-1))
        seq_kl.append(((rollout.logprobs - rollout.ref_logprobs) * mask).sum(-1))
        float32_rollout = copy.copy(rollout)
        float32_rollout.logprobs = own * mask
        float32_rollout.values = trainer.value_head(hidden) * mask.unsqueeze(-1)
        gaps.append(abs(first_step_lambda(trainer, rollout) - first_step_lambda(trainer, float32_rollout)))
    d = torch.cat(diffs).double()
    ratio = torch.exp(-d)
    rounding, kl = torch.cat(seq_rounding).double(), torch.cat(seq_kl).double()
    return {"rollouts": rollouts, "tokens": int(d.numel()), "d_mean": float(d.mean()),
            "d_abs_mean": float(d.abs().mean()), "d_abs_p99": float(d.abs().quantile(0.99)),
            "d_abs_max": float(d.abs().max()), "ratio_std": float(ratio.std()),
            "outside_clip": float(((ratio < 1 - cfg.clip_range) | (ratio > 1 + cfg.clip_range)).double().mean()),
            "seq_rounding_mean": float(rounding.mean()), "seq_rounding_abs_mean": float(rounding.abs().mean()),
            "seq_kl_estimate_mean": float(kl.mean()), "lambda1_gap_mean": float(np.mean(gaps)),
            "lambda1_gap_max": float(np.max(gaps))}


def tokens_part(args) -> dict:
    config = build_config("default", {"sampling_dtype": "bfloat16"})
    policy, tokenizer, rewards = seeded_policy(config, args.seed)
    value_head = fresh_value_head(policy, rewards)
    shard = client_shard(config, {"partition-id": 0, "num-partitions": config.num_clients})
    float32_config = build_config("default")
    warm = FirmLocalTrainer(policy, tokenizer, value_head, rewards, float32_config)
    trainer = FirmLocalTrainer(policy, tokenizer, value_head, rewards, config, reward_stats=warm.reward_stats,
                               sampler=BFloat16Sampler(policy))
    results = {"initial adapter": measure_tokens(trainer, shard, args.rollouts, args.seed)}
    rng = random.Random(args.seed)
    for round_index in range(args.warm_rounds):  # float32 FIRM rounds move the adapter away from 0
        torch.manual_seed(1000 + round_index)
        warm.train_round(shard, rng)
    results[f"after {args.warm_rounds} float32 rounds"] = measure_tokens(trainer, shard, args.rollouts, args.seed + 100)
    return results


METRICS = (("reward/helpful", "higher"), ("reward/harmless", "higher"), ("kl", "lower"), ("lambda_1", "higher"))


def last_round(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    record = [r for r in records if r.get("type") == "round"][-1]
    return {"reward/helpful": record["reward/helpful"], "reward/harmless": record["reward/harmless"],
            "kl": record["kl"], "lambda_1": record["lambda_mean"][0], "round": record["round"]}


def runs_part(args, out: Path) -> dict:
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = {"float32": [], "bfloat16": ["--sampling-dtype", "bfloat16"]}
    finals: dict[str, list[dict]] = {arm: [] for arm in arms}
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    for seed in seeds:
        for arm, flags in arms.items():
            run_dir = out / "runs" / f"{arm}-seed{seed}"
            started = time.perf_counter()
            log = subprocess.run([sys.executable, "-m", "firm.cli", "train", "--run-dir", str(run_dir), "--seed",
                                  str(seed), *flags], capture_output=True, text=True, env=os.environ.copy())
            if log.returncode:
                raise SystemExit(f"firm train {arm} seed {seed} failed ({log.returncode}):\n{log.stderr[-2000:]}")
            seconds[arm].append(time.perf_counter() - started)
            match = re.search(r"wall time (\d+) s", log.stdout + log.stderr)
            finals[arm].append(last_round(run_dir))
            print(f"  {arm} seed {seed}: {seconds[arm][-1]:.0f} s (firm's own {match.group(1) if match else '?'} s) "
                  f"{finals[arm][-1]}", flush=True)
    rows = [{"metric": metric, "a": "bfloat16 sampling", "b": "float32 sampling", "better": better,
             "values_a": [f[metric] for f in finals["bfloat16"]], "values_b": [f[metric] for f in finals["float32"]]}
            for metric, better in METRICS]
    table = [c.to_dict() for c in compare_table(rows)]
    ratios = [b / f for b, f in zip(seconds["bfloat16"], seconds["float32"])]
    return {"seeds": seeds, "finals": finals, "seconds": seconds, "wall_time_ratios": ratios, "comparisons": table,
            "seed_spread_float32": {m: float(np.std([f[m] for f in finals["float32"]], ddof=1)) for m, _ in METRICS}}


def write_tables(results: dict, out: Path) -> str:
    lines = []
    if "tokens" in results:
        lines += ["| adapter | tokens | mean d | mean abs d | p99 abs d | max abs d | ratio std | outside clip "
                  "| per-sequence rounding mean (mean abs) | KL estimate per sequence | lambda_1 gap mean (max) |",
                  "|" + " --- |" * 11]
        for name, r in results["tokens"].items():
            lines.append(f"| {name} | {r['tokens']} | {r['d_mean']:+.4f} | {r['d_abs_mean']:.4f} | {r['d_abs_p99']:.4f} "
                         f"| {r['d_abs_max']:.3f} | {r['ratio_std']:.4f} | {r['outside_clip']:.4f} "
                         f"| {r['seq_rounding_mean']:+.4f} ({r['seq_rounding_abs_mean']:.4f}) "
                         f"| {r['seq_kl_estimate_mean']:+.4f} | {r['lambda1_gap_mean']:.4f} "
                         f"({r['lambda1_gap_max']:.4f}) |")
    if "runs" in results:
        r = results["runs"]
        lines += ["", f"End to end, seeds {r['seeds']} (round {r['finals']['float32'][0]['round']}, bfloat16 minus "
                  "float32 sampling):", "",
                  "| metric | float32 mean | bfloat16 mean | mean difference [95% CI] | seed-to-seed std (float32) "
                  "| Holm p | verdict |", "|" + " --- |" * 7]
        for c in r["comparisons"]:
            lines.append(f"| {c['metric']} | {c['mean_b']:.4f} | {c['mean_a']:.4f} | {c['mean_diff']:+.4f} "
                         f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | {r['seed_spread_float32'][c['metric']]:.4f} "
                         f"| {c['p_holm']:.2f} | {c['verdict']}: {c['reason']} |")
        lines.append(f"\nWall time bfloat16 / float32, pair by pair (back to back): "
                     f"{', '.join(f'{x:.2f}' for x in r['wall_time_ratios'])}")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="tokens,runs", help="comma-separated: tokens, runs")
    parser.add_argument("--rollouts", type=int, default=4, help="tokens: rollouts at each adapter")
    parser.add_argument("--warm-rounds", type=int, default=2, help="tokens: float32 rounds before the second adapter")
    parser.add_argument("--seeds", default="0,1,2,3", help="runs: seeds of the paired firm train runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="experiments/bf16_sampling")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = set(filter(None, args.parts.split(",")))
    unknown = parts - {"tokens", "runs"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}: use tokens, runs")
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results["args"] = vars(args)
    if "tokens" in parts:
        results["tokens"] = tokens_part(args)
        results_file.write_text(json.dumps(results, indent=2))
    if "runs" in parts:
        results["runs"] = runs_part(args, out)
        results_file.write_text(json.dumps(results, indent=2))
    print(write_tables(results, out))


if __name__ == "__main__":
    main()
