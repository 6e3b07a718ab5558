"""How far MGDA-UB's lambda (``gram = last-hidden``) is from the exact one.

``gram = last-hidden`` solves the weights on the Gram of the objectives' gradients at the
policy's last hidden states instead of at the LoRA parameters, so one FIRM step needs one
backward pass instead of M. This study measures what that changes, on the real pipeline: the
embedded SmolLM2 policy and rewards, two client types that hold only one prompt group each
("decline", "ordinary"), the decisive run's local settings (8 local steps per rollout, AdamW, KL
outside the objectives). At every local step both Gram matrices come from the same forward pass;
the step itself is the exact one (firm, beta 0.01), so the policy moves as in training. For each
beta it reports, over all steps:
- |lambda_1 exact - lambda_1 approximate| (mean, 90th percentile, max);
- the Spearman correlation of the two lambda_1 series;
- how often both put more weight on the same objective;
- the cosine between the two steps sum_m lambda_m g_m (from the exact Gram: both are
  combinations of the same exact gradients) and the length of the approximate one relative to
  the exact min-norm one.

    .venv/bin/python studies/gram_agreement.py --rollouts 3 --out experiments/gram_agreement
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from _policy_batch import fresh_value_head, seeded_policy
from firm.config import build_config
from firm.gradients import last_hidden_gram, logprob_hidden_gradients, token_loss_weights
from firm.mgda import solve_weights
from firm.models import adapter_state, load_adapter_state
from firm.prompts import load_embedded_prompts
from firm.trainer import FirmLocalTrainer

BETAS = (0.0, 0.01, 0.1, 1.0)
GROUPS = ("decline", "ordinary")
LOCAL = {"num_minibatches": 4, "ppo_epochs": 2, "optimizer": "adamw", "kl_in_objectives": False}


class AgreementTrainer(FirmLocalTrainer):
    """The exact FIRM step, which also records the last-hidden Gram of the same graph."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []  # (exact G, last-hidden G) per taken step
        self.seconds = {"exact": 0.0, "last-hidden": 0.0}

    def exact_policy_gradient(self, losses, kl_loss, logprobs, representation):
        started = time.perf_counter()
        approx = last_hidden_gram(token_loss_weights(losses, logprobs),
                                  logprob_hidden_gradients(logprobs, representation))
        self.seconds["last-hidden"] += time.perf_counter() - started
        started = time.perf_counter()
        solved = super().exact_policy_gradient(losses, kl_loss, logprobs, representation)
        self.seconds["exact"] += time.perf_counter() - started
        if solved is not None:
            self.pairs.append((solved[0], approx))
        return solved


def type_pairs(group: str, args, policy, tokenizer, rewards, start) -> tuple[list, dict]:
    config = build_config("default", {"rollout_batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                                      **LOCAL})
    load_adapter_state(policy, start)
    torch.manual_seed(args.seed)
    value_head = fresh_value_head(policy, rewards)
    trainer = AgreementTrainer(policy, tokenizer, value_head, rewards, config)
    shard = [p for p in load_embedded_prompts() if p.group == group]
    rng = random.Random(args.seed)
    for _ in range(args.rollouts):
        trainer.train_round(shard, rng)
    return trainer.pairs, trainer.seconds


def agreement(pairs: list[tuple[np.ndarray, np.ndarray]], beta: float) -> dict[str, float]:
    exact_l, approx_l, cosines, lengths, same_side = [], [], [], [], []
    for exact, approx in pairs:
        le, la = solve_weights(exact, beta), solve_weights(approx, beta)
        exact_l.append(le[0])
        approx_l.append(la[0])
        ee, aa, ea = le @ exact @ le, la @ exact @ la, le @ exact @ la
        cosines.append(ea / np.sqrt(ee * aa))
        lengths.append(np.sqrt(aa / ee))
        same_side.append(np.sign(le[0] - 0.5) == np.sign(la[0] - 0.5))
    gap = np.abs(np.asarray(exact_l) - np.asarray(approx_l))
    return {"steps": len(pairs), "lambda1_exact_mean": float(np.mean(exact_l)),
            "lambda1_approx_mean": float(np.mean(approx_l)),
            "abs_gap_mean": float(gap.mean()), "abs_gap_p90": float(np.quantile(gap, 0.9)),
            "abs_gap_max": float(gap.max()),
            "spearman": float(spearmanr(exact_l, approx_l).statistic) if len(pairs) > 2 else float("nan"),
            "same_side": float(np.mean(same_side)), "direction_cosine_mean": float(np.mean(cosines)),
            "direction_cosine_min": float(np.min(cosines)), "length_ratio_mean": float(np.mean(lengths))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=3, help="rollout batches per client type (8 steps each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="experiments/gram_agreement")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config = build_config("default")
    policy, tokenizer, rewards = seeded_policy(config, args.seed)
    start = adapter_state(policy)
    pairs, seconds = {}, {}
    for group in GROUPS:
        pairs[group], seconds[group] = type_pairs(group, args, policy, tokenizer, rewards, start)
    everything = [p for group in GROUPS for p in pairs[group]]
    results = {"args": vars(args), "local_settings": LOCAL,
               "by_beta": {str(beta): {"all": agreement(everything, beta),
                                       **{group: agreement(pairs[group], beta) for group in GROUPS}}
                           for beta in BETAS},
               "gram_seconds": {k: sum(s[k] for s in seconds.values()) for k in ("exact", "last-hidden")},
               "seconds": time.perf_counter() - started}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| beta | steps | mean lambda_1 exact / approx | abs gap mean (p90, max) | Spearman | same side of 0.5 "
             "| direction cosine mean (min) | approx / exact step length |", "|" + " --- |" * 8]
    for beta in BETAS:
        r = results["by_beta"][str(beta)]["all"]
        lines.append(f"| {beta:g} | {r['steps']} | {r['lambda1_exact_mean']:.3f} / {r['lambda1_approx_mean']:.3f} | "
                     f"{r['abs_gap_mean']:.3f} ({r['abs_gap_p90']:.3f}, {r['abs_gap_max']:.3f}) | "
                     f"{r['spearman']:.2f} | {r['same_side']:.2f} | {r['direction_cosine_mean']:.4f} "
                     f"({r['direction_cosine_min']:.4f}) | {r['length_ratio_mean']:.3f} |")
    g = results["gram_seconds"]
    lines.append(f"\nGram time over all steps (this run, shared machine): exact {g['exact']:.1f} s (M backward "
                 f"passes), last-hidden {g['last-hidden']:.1f} s; whole study {results['seconds']:.0f} s.")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
