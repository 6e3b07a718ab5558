"""Do the helpfulness and harmlessness rewards pull against each other where they should?

Multi-objective alignment only has something to balance if the objectives conflict. On
requests a careful assistant declines ("decline/*" in the embedded prompt set), a reply
that complies in detail should look helpful and harmful at once, so across sampled replies
the two rewards should correlate negatively. On ordinary requests ("ordinary/*") a good
reply is both, so the correlation should not be negative.

The script samples replies from the default policy (settings of the "default" preset),
scores them with both rewards and reports, per group, the Pearson and Spearman correlation
over all replies, the within-prompt correlation (each prompt's mean removed, so that only
the difference between replies to the same request counts), and a 95% bootstrap interval
over prompts for the pooled Pearson correlation.

Sampled replies can only show a conflict the policy acts out: a policy that never refuses
gives the rewards no refusal to disagree about. So the script also counts how many sampled
replies refuse, and scores a few fixed refusals for every prompt (the refusal contrast):
how often a refusal scores lower on helpfulness than a sampled reply to the same prompt,
higher on harmlessness, and both at once (a trade-off the two rewards disagree on).

    python studies/reward_conflict.py                            # 24 prompts x 4 samples per group
    python studies/reward_conflict.py --prompts-per-group 60 --samples 2 --json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import defaultdict

import numpy as np

from _policy_batch import add_generation_flags, sampling_config
from firm.models import load_policy
from firm.prompts import load_embedded_prompts
from firm.rewards import build_reward
from firm.rewards.pairwise import pearson_spearman
from firm.sampling import generate


# Fixed refusals scored against every prompt; their mean reward stands for "decline".
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I won't help with this request, because it could cause real harm.",
    "I can't assist with that. If you are going through something difficult, please talk to someone you trust.",
)
# Opening phrases of a refusal, for counting how often the policy itself declines.
REFUSAL_PATTERN = re.compile(r"\b(I'?m sorry|I am sorry|I can'?t|I cannot|I won'?t|I will not|I'?m not able|"
                             r"I am not able|I'?m unable|I must decline)\b", re.IGNORECASE)


def refusal_contrast(helpful: np.ndarray, harmless: np.ndarray, prompt_ids: np.ndarray,
                     refusal_helpful: np.ndarray, refusal_harmless: np.ndarray) -> dict:
    """Each sampled reply against the refusal score of its prompt (``refusal_*[prompt_id]``):
    the share of replies a refusal beats on harmlessness, loses to on helpfulness, and both;
    and the mean change of each reward when the reply is swapped for a refusal."""
    helpful_change = np.asarray(refusal_helpful)[prompt_ids] - np.asarray(helpful)
    harmless_change = np.asarray(refusal_harmless)[prompt_ids] - np.asarray(harmless)
    return {
        "refusal_less_helpful": float((helpful_change < 0).mean()),
        "refusal_more_harmless": float((harmless_change > 0).mean()),
        "trade_off": float(((helpful_change < 0) & (harmless_change > 0)).mean()),
        "mean_helpful_change": float(helpful_change.mean()),
        "mean_harmless_change": float(harmless_change.mean()),
    }


def within_prompt_centered(values: np.ndarray, prompt_ids: np.ndarray) -> np.ndarray:
    """Subtract each prompt's mean, leaving only the differences between its replies."""
    centered = values.astype(np.float64).copy()
    for prompt_id in np.unique(prompt_ids):
        rows = prompt_ids == prompt_id
        centered[rows] -= centered[rows].mean()
    return centered


def bootstrap_pearson_ci(helpful: np.ndarray, harmless: np.ndarray, prompt_ids: np.ndarray,
                         resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the pooled Pearson correlation, resampling whole prompts
    (replies to one prompt are not independent)."""
    rng = np.random.default_rng(seed)
    unique = np.unique(prompt_ids)
    rows_of = {prompt_id: np.flatnonzero(prompt_ids == prompt_id) for prompt_id in unique}
    estimates = []
    for _ in range(resamples):
        rows = np.concatenate([rows_of[p] for p in rng.choice(unique, size=len(unique), replace=True)])
        value = pearson_spearman(helpful[rows], harmless[rows])[0]
        if not np.isnan(value):
            estimates.append(value)
    low, high = np.percentile(estimates, [2.5, 97.5])
    return float(low), float(high)


def length_residual(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """What is left of ``values`` after a least-squares line in log(1 + length) is removed."""
    design = np.column_stack([np.ones(len(lengths)), np.log1p(lengths)])
    coefficients, *_ = np.linalg.lstsq(design, values, rcond=None)
    return values - design @ coefficients


def group_report(helpful: list[float], harmless: list[float], prompt_ids: list[int], replies: list[str],
                 refusal_helpful: np.ndarray, refusal_harmless: np.ndarray) -> dict:
    helpful_array, harmless_array = np.asarray(helpful), np.asarray(harmless)
    ids, length_array = np.asarray(prompt_ids), np.array([len(reply) for reply in replies], dtype=np.float64)
    pearson, spearman = pearson_spearman(helpful_array, harmless_array)
    within, _ = pearson_spearman(within_prompt_centered(helpful_array, ids), within_prompt_centered(harmless_array, ids))
    # Both rewards lean on reply length (in opposite directions), which alone makes them
    # correlate negatively; the partial correlation shows what remains without it.
    partial, _ = pearson_spearman(length_residual(helpful_array, length_array),
                                  length_residual(harmless_array, length_array))
    return {
        "responses": len(helpful), "prompts": len(set(prompt_ids)),
        "pearson": pearson, "spearman": spearman, "within_prompt_pearson": within,
        "length_partial_pearson": partial,
        "helpful_vs_length_spearman": pearson_spearman(helpful_array, length_array)[1],
        "harmless_vs_length_spearman": pearson_spearman(harmless_array, length_array)[1],
        "pearson_ci95": bootstrap_pearson_ci(helpful_array, harmless_array, ids),
        "mean_helpful": float(helpful_array.mean()), "mean_harmless": float(harmless_array.mean()),
        "sampled_refusal_rate": float(np.mean([bool(REFUSAL_PATTERN.search(reply)) for reply in replies])),
        "refusal_contrast": refusal_contrast(helpful_array, harmless_array, ids, refusal_helpful, refusal_harmless),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--helpful", default="embedded:helpful", help="helpfulness reward spec")
    parser.add_argument("--harmless", default="embedded:harmless", help="harmlessness reward spec")
    parser.add_argument("--prompts-per-group", type=int, default=24)
    parser.add_argument("--samples", type=int, default=4, help="sampled replies per prompt")
    add_generation_flags(parser)
    parser.add_argument("--examples", type=int, default=2, help="replies to print per group")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args()

    config = sampling_config(args)
    rng = random.Random(args.seed)
    by_group: dict[str, list] = defaultdict(list)
    for prompt in load_embedded_prompts():
        by_group[prompt.group].append(prompt)
    chosen = {group: rng.sample(by_group[group], min(args.prompts_per_group, len(by_group[group])))
              for group in ("decline", "ordinary")}

    policy, tokenizer = load_policy(config.policy, dtype=config.dtype)
    helpful_reward, harmless_reward = build_reward(args.helpful), build_reward(args.harmless)
    started = time.perf_counter()
    reports, examples = {}, {}
    for group, prompts in chosen.items():
        jobs = [(prompt_id, prompt) for prompt_id, prompt in enumerate(prompts) for _ in range(args.samples)]
        helpful, harmless, ids, replies = [], [], [], []
        for start in range(0, len(jobs), args.batch_size):
            batch = jobs[start:start + args.batch_size]
            batch_prompts = [prompt for _, prompt in batch]
            responses = generate(policy, tokenizer, batch_prompts, config).responses
            helpful += helpful_reward.score(batch_prompts, responses).tolist()
            harmless += harmless_reward.score(batch_prompts, responses).tolist()
            ids += [prompt_id for prompt_id, _ in batch]
            replies += [(prompt.text, response) for prompt, response in zip(batch_prompts, responses)]
        # Every refusal against every prompt; a prompt's refusal score is the mean over REFUSALS.
        refusal_prompts = [prompt for prompt in prompts for _ in REFUSALS]
        refusal_texts = [refusal for _ in prompts for refusal in REFUSALS]
        refusal_helpful, refusal_harmless = (
            reward.score(refusal_prompts, refusal_texts).numpy().reshape(len(prompts), -1).mean(1)
            for reward in (helpful_reward, harmless_reward))
        reports[group] = group_report(helpful, harmless, ids, [response for _, response in replies],
                                      refusal_helpful, refusal_harmless)
        order = np.argsort(np.asarray(helpful) - np.asarray(harmless))
        examples[group] = [{"prompt": replies[i][0], "response": replies[i][1], "helpful": helpful[i],
                            "harmless": harmless[i]} for i in list(order[-args.examples:])[::-1]]

    if args.json:
        print(json.dumps({"helpful": args.helpful, "harmless": args.harmless, "max_new_tokens": config.max_new_tokens,
                          "samples_per_prompt": args.samples, "groups": reports, "examples": examples}, indent=2))
        return
    print(f"{args.helpful} vs {args.harmless}; {args.samples} samples per prompt, max_new_tokens "
          f"{config.max_new_tokens}, temperature {config.temperature} ({time.perf_counter() - started:.0f} s)")
    for group, report in reports.items():
        low, high = report["pearson_ci95"]
        print(f"{group:9s} {report['responses']:4d} replies / {report['prompts']:3d} prompts: "
              f"Pearson {report['pearson']:+.3f} (95% CI {low:+.3f} to {high:+.3f}), "
              f"Spearman {report['spearman']:+.3f}, within-prompt Pearson {report['within_prompt_pearson']:+.3f}, "
              f"length-partialled Pearson {report['length_partial_pearson']:+.3f} (reward vs length Spearman: "
              f"helpful {report['helpful_vs_length_spearman']:+.2f}, harmless {report['harmless_vs_length_spearman']:+.2f}); "
              f"mean helpful {report['mean_helpful']:+.2f}, harmless {report['mean_harmless']:+.2f}")
        contrast = report["refusal_contrast"]
        print(f"    sampled replies that refuse: {report['sampled_refusal_rate']:.2f}; a fixed refusal instead of a "
              f"sampled reply is less helpful in {contrast['refusal_less_helpful']:.2f} of replies "
              f"(mean change {contrast['mean_helpful_change']:+.2f}), more harmless in "
              f"{contrast['refusal_more_harmless']:.2f} ({contrast['mean_harmless_change']:+.2f}), both in "
              f"{contrast['trade_off']:.2f}")
        for example in examples[group]:
            print(f"    most helpful-over-harmless: helpful {example['helpful']:+.2f} harmless {example['harmless']:+.2f}"
                  f" | {example['prompt'][:60]!r} -> {example['response'][:100]!r}")


if __name__ == "__main__":
    main()
