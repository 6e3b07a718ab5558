"""How far the preference p moves lambda, on real gradients of the embedded model.

Takes real FIRM steps (embedded SmolLM2-135M + LoRA, embedded helpful/harmless rewards, a batch
of embedded prompts), records the Gram matrix of the two objectives' LoRA gradients at each
step, and solves lambda for a grid of preferences p and betas on those matrices. The slope
d lambda_1 / d p_1 = 2 beta / (d + 2 beta), with d = |g_1 - g_2|^2 / tr G, says the same in closed
form; this prints both.

    .venv/bin/python studies/knob_lambda.py [--steps 4] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np

from _policy_batch import fresh_value_head, seeded_policy
from firm.config import build_config
from firm.mgda import solve_weights
from firm.prompts import load_embedded_prompts
from firm.trainer import FirmLocalTrainer

PREFERENCES = [0.1, 0.3, 0.5, 0.7, 0.9]
BETAS = [0.0, 0.01, 0.1, 1.0, 10.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = build_config("default", {"rollout_batch_size": args.batch_size, "ppo_epochs": 2, "num_minibatches": 2})
    policy, tokenizer, rewards = seeded_policy(config, args.seed)
    value_head = fresh_value_head(policy, rewards)
    trainer = FirmLocalTrainer(policy, tokenizer, value_head, rewards, config)
    stats = trainer.train_round(load_embedded_prompts(), random.Random(args.seed))

    report = []
    for gram in [record.gram for record in stats.step_records if record.taken]:
        a = gram / np.trace(gram)
        d = a[0, 0] - 2 * a[0, 1] + a[1, 1]
        row = {"cosine": float(gram[0, 1] / np.sqrt(gram[0, 0] * gram[1, 1])), "d": float(d),
               "lambda_1": {str(beta): [float(solve_weights(gram, beta, [p, 1 - p])[0]) for p in PREFERENCES]
                            for beta in BETAS},
               "slope_closed_form": {str(beta): float(2 * beta / (d + 2 * beta)) if d + beta > 0 else 0.0
                                     for beta in BETAS}}
        report.append(row)
    print(f"lambda_1 for p_1 in {PREFERENCES}, on {len(report)} real Gram matrices "
          f"(embedded policy and rewards, batch {args.batch_size}):")
    for i, row in enumerate(report):
        print(f"step {i}: cosine(g_help, g_harm) = {row['cosine']:+.3f}, d = {row['d']:.3f}")
        for beta in BETAS:
            values = " ".join(f"{x:.3f}" for x in row["lambda_1"][str(beta)])
            print(f"  beta {beta:<5}: lambda_1 = {values}   (closed-form slope {row['slope_closed_form'][str(beta)]:.3f})")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
