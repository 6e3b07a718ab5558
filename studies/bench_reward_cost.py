"""How much does rewarding a rollout batch cost next to generating it?

FIRM scores every sampled batch with each objective's reward model. If scoring cost as
much as sampling, the rewards would double the price of a PPO step; the target is that
rewarding a batch with every objective takes at most 0.15 x the time the default policy took to
generate it. This script generates a batch of embedded prompts with the default policy and
settings (``firm.config`` preset "default"), then scores it with each reward alone and with all
of them in turn, as the trainer does, and prints the times and their ratio to generation
(median over --repeats after a warm-up). Probe rewards on one frozen trunk share its forward
pass (firm.rewards.trunk); every timed call starts from a cold trunk, so a reward timed alone
pays for the trunk and the objectives scored after the first one on the same batch do not.

    python studies/bench_reward_cost.py                       # the shipped embedded rewards
    python studies/bench_reward_cost.py --rewards embedded:helpful,civility --threads 2
    python studies/bench_reward_cost.py --causal-lm-reward    # also time a SmolLM2-135M reward head

``--causal-lm-reward`` times a SmolLM2-135M sequence classifier (the other backbone
``firm reward fit`` offers) on the same batch: its cost does not depend on its training,
so an untrained head measures it.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from _policy_batch import add_generation_flags, sampling_config
from firm.models import load_policy
from firm.prompts import load_embedded_prompts
from firm.rewards import build_reward
from firm.rewards.backbones import load_base
from firm.rewards.fitted import FittedRewardModel
from firm.rewards.trunk import forget_trunk_features
from firm.sampling import generate


def median_seconds(action, repeats: int) -> float:
    """Median wall time of ``action()`` over ``repeats`` runs, after one untimed warm-up."""
    action()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rewards", default=None, help="comma-separated reward specs (default: the config's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.15,
                        help="largest acceptable ratio of scoring (all objectives) to generation time")
    add_generation_flags(parser)
    parser.add_argument("--causal-lm-reward", action="store_true",
                        help="also time a SmolLM2-135M scalar-head reward on the same batch")
    args = parser.parse_args()

    config = sampling_config(args, **({"rewards": args.rewards} if args.rewards is not None else {}))
    prompts = random.Random(args.seed).sample(load_embedded_prompts(), args.batch_size)
    policy, tokenizer = load_policy(config.policy, dtype=config.dtype)
    rewards = {spec: build_reward(spec) for spec in config.reward_specs()}

    batch: list = []

    def sample() -> None:
        batch[:] = generate(policy, tokenizer, prompts, config).responses

    generation_seconds = median_seconds(sample, args.repeats)
    responses = list(batch)
    mean_words = sum(len(r.split()) for r in responses) / len(responses)
    print(f"threads {torch.get_num_threads()}, batch {len(prompts)} prompts, max_new_tokens "
          f"{config.max_new_tokens}, temperature {config.temperature} (mean response {mean_words:.0f} words)")
    print(f"generate (policy {config.policy}): {generation_seconds:.2f} s")

    def cold(action):
        def run():
            forget_trunk_features()
            return action()
        return run

    scoring = {spec: median_seconds(cold(lambda r=reward: r.score(prompts, responses)), args.repeats)
               for spec, reward in rewards.items()}
    for spec, seconds in scoring.items():
        print(f"score    {spec} alone: {seconds:.3f} s")
    total = median_seconds(cold(lambda: [reward.score(prompts, responses) for reward in rewards.values()]),
                           args.repeats)
    ratio = total / generation_seconds
    verdict = "meets" if ratio <= args.target else "misses"
    print(f"all rewards in turn (as the trainer scores a batch): {total:.3f} s = {ratio:.3f} x generation "
          f"({verdict} the {args.target:g} target); the rewards timed alone add up to {sum(scoring.values()):.3f} s")

    if args.causal_lm_reward:
        model, reward_tokenizer = load_base("smollm2", None)
        causal = FittedRewardModel(model, reward_tokenizer, {
            "objective": "untrained-smollm2", "backbone": "smollm2",
            "input_format": {"kind": "causal-lm", "max_length": 256, "max_response_tokens": 192}})
        seconds = median_seconds(lambda: causal.score(prompts, responses), args.repeats)
        print(f"score    SmolLM2-135M reward head (one objective): {seconds:.3f} s = "
              f"{seconds / generation_seconds:.3f} x generation; two such rewards: "
              f"{2 * seconds / generation_seconds:.3f} x")


if __name__ == "__main__":
    main()
