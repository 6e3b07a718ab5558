"""Where can FIRM, MGDA and linear weights differ at all? The gradient geometry of the real
pipeline, measured without training.

Two client types hold only one prompt group each: "decline" (requests a careful assistant
refuses) and "ordinary". For each type and each setting of the reward / advantage normalisation,
the study rolls out batches of the type's prompts with the embedded policy at its initial
adapter, scores them with the embedded rewards, and takes FIRM steps at learning rate 0 (the
gradients and the Gram matrix are computed exactly as in training; nothing moves). It reports,
per type and setting, the distributions of
- D = |g_1 - g_2|^2 / tr G (0: collinear gradients, every weighting gives the same step);
- the gradient norm ratio (smallest / largest; MGDA's lambda is 0.5 exactly when it is 1);
- the cosine between the objectives' gradients;
- MGDA's lambda (beta = 0);
and the lambda spread between the two types (half the difference of their lambdas: the std of
two clients) when each solves with beta = 0, 0.01, 0.1 and 1. Where D is large and the spread
at beta = 0 is large, the regularizer has something to do; where the norms are equal, MGDA
equals linear weights with p = (0.5, 0.5).

    .venv/bin/python studies/gradient_geometry.py --batches 4 --batch-size 8 --out experiments/gradient_geometry
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from _policy_batch import fresh_value_head, seeded_policy
from firm.config import build_config
from firm.mgda import gram_geometry, solve_weights
from firm.models import adapter_state, load_adapter_state
from firm.prompts import load_embedded_prompts
from firm.trainer import FirmLocalTrainer

BETAS = (0.0, 0.01, 0.1, 1.0)
SETTINGS = {"normalised (default)": {"normalize_rewards": True, "whiten_advantages": True},
            "raw rewards and advantages": {"normalize_rewards": False, "whiten_advantages": False}}
GROUPS = ("decline", "ordinary")


def type_grams(group: str, setting: dict, batches: int, batch_size: int, seed: int, policy, tokenizer,
               rewards, start) -> list[np.ndarray]:
    """The Gram matrices of ``batches`` rollouts of one client type, at the initial adapter."""
    config = build_config("default", {"rollout_batch_size": batch_size, "num_minibatches": 1, "ppo_epochs": 1,
                                      "learning_rate": 0.0, **setting})
    load_adapter_state(policy, start)
    value_head = fresh_value_head(policy, rewards)
    trainer = FirmLocalTrainer(policy, tokenizer, value_head, rewards, config)
    shard = [p for p in load_embedded_prompts() if p.group == group]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    grams = []
    for _ in range(batches):
        stats = trainer.train_round(shard, rng)  # one rollout, one step at lr 0: the gradients, no update
        grams += [record.gram for record in stats.step_records if record.taken]
    return grams


def describe(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "min": float(array.min()), "max": float(array.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4, help="rollout batches per client type and setting")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="experiments/gradient_geometry")
    args = parser.parse_args()
    started = time.perf_counter()
    config = build_config("default")
    policy, tokenizer, rewards = seeded_policy(config, args.seed)
    start = adapter_state(policy)
    results: dict[str, dict] = {}
    for name, setting in SETTINGS.items():
        grams = {group: type_grams(group, setting, args.batches, args.batch_size, args.seed, policy, tokenizer,
                                   rewards, start) for group in GROUPS}
        per_type = {}
        for group, matrices in grams.items():
            geometry = [gram_geometry(g) for g in matrices]
            per_type[group] = {
                "D": describe([float(d[0]) for d, _, _ in geometry]),
                "norm_ratio": describe([r for _, _, r in geometry]),
                "cosine": describe([float(c[0]) for _, c, _ in geometry]),
                "mgda_lambda_1": describe([float(solve_weights(g, 0.0)[0]) for g in matrices]),
            }
        spread = {}
        for beta in BETAS:
            gaps = [abs(float(solve_weights(a, beta)[0] - solve_weights(b, beta)[0])) / 2
                    for a in grams["decline"] for b in grams["ordinary"]]
            spread[str(beta)] = describe(gaps)
        results[name] = {"per_type": per_type, "lambda_spread_between_types": spread}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": f"studies/gradient_geometry.py --batches {args.batches} --batch-size {args.batch_size} "
                         f"--seed {args.seed}", "wall_seconds": round(time.perf_counter() - started, 1),
              "results": results}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"Command: `.venv/bin/python {record['command']}` ({record['wall_seconds']:.0f} s)", "",
             "| setting | client type | D = |g1-g2|^2/trG | norm ratio (min/max) | cosine | MGDA lambda_helpful |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, result in results.items():
        for group, stats in result["per_type"].items():
            cells = [f"{stats[k]['mean']:.3f} ± {stats[k]['std']:.3f}" for k in ("D", "norm_ratio", "cosine",
                                                                                  "mgda_lambda_1")]
            lines.append(f"| {name} | {group} | " + " | ".join(cells) + " |")
    lines += ["", "lambda spread between the two client types (half the gap of their lambda_helpful), "
              "mean ± std over batch pairs:", "", "| setting | " + " | ".join(f"beta {b}" for b in BETAS) + " |",
              "| --- |" + " --- |" * len(BETAS)]
    for name, result in results.items():
        spread = result["lambda_spread_between_types"]
        lines.append(f"| {name} | " + " | ".join(f"{spread[str(b)]['mean']:.4f} ± {spread[str(b)]['std']:.4f}"
                                                 for b in BETAS) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
