"""Reward at matched KL: each run's held-out reward read off its own reward-KL curve at one KL.

A KL penalty or controller fixes a coefficient or a target, not where a run ends: two algorithms
that end at different KL to the base are two points on different reward-KL curves, so their final
rewards do not compare trade-offs. This study scores chosen round adapters of every run of a
`firm compare` experiment with the experiment's own held-out evaluation (same prompts, samples
and seed as its base evaluation, so everything stays paired), and reads each run at a common KL:
along the rounds in order (the untrained policy at KL 0 first), the first pair of evaluations
between which the run's held-out KL reaches the target, interpolated linearly response by
response. The common KL defaults to the largest that every run reaches (no extrapolation).

Per algorithm it reports the gain over the untrained policy at that KL, pooled over seeds with a
prompt-level 95% interval (firm.heldout.pooled_gain); per seed the paired difference of each
algorithm from the first one (reference); and the seed-level comparison of the reference with
each other algorithm at that KL (firm.stats.compare_table on the per-seed mean rewards, with the
final-reward margin fixed in firm.experiments.compare): exploratory, since the primary
comparisons of the experiment were named on the final adapters, not at matched KL.

    .venv/bin/python studies/matched_kl.py --experiment experiments/decisive_learning --rounds 8,10 \\
        --eval-prompts 30 --eval-samples 4

Evaluations that exist are reused. The round adapters must still be in the runs' directories.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from firm.experiments.compare import equivalence_margin
from firm.experiments.execute import eval_flags
from firm.experiments.plan import base_eval_path
from firm.heldout import check_paired, pooled_gain, prompt_means
from firm.rundir import RunDir
from firm.stats import Comparison, bootstrap_interval, compare_table, paired_differences, smallest_wilcoxon_p


def first_crossing(kls: Sequence[float], target: float) -> tuple[int, float] | None:
    """The first i such that the KL goes from below ``target`` at point i to at least ``target`` at
    point i + 1, and the weight of point i + 1 in the linear interpolation that gives ``target``;
    None when the curve never reaches it."""
    for i in range(len(kls) - 1):
        low, high = kls[i], kls[i + 1]
        if low < target <= high:
            return i, (target - low) / (high - low)
    return None


def at_kl(curve: Sequence[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """An evaluation of the run at held-out KL ``target``: per response, the rewards interpolated
    between the two evaluations of ``curve`` (in round order) between which the KL first reaches
    it. None when the run never reaches it."""
    found = first_crossing([e["kl"] for e in curve], target)
    if found is None:
        return None
    i, w = found
    before, after = curve[i], curve[i + 1]
    check_paired(before, after)
    mixed = copy.deepcopy(after)
    rewards = ((1 - w) * np.asarray(before["per_response"]["rewards"], dtype=np.float64)
               + w * np.asarray(after["per_response"]["rewards"], dtype=np.float64))
    mixed["per_response"]["rewards"] = rewards.tolist()
    mixed["rewards"] = dict(zip(after["rewards"], rewards.mean(axis=0).tolist()))
    mixed["kl"] = target
    mixed["interpolated_between"] = [before.get("round", 0), after.get("round")]
    return mixed


def paired_difference(a: dict[str, Any], b: dict[str, Any], objective: int) -> tuple[float, float, float]:
    """Mean per-prompt difference a - b on one objective and its prompt-level bootstrap interval."""
    check_paired(a, b)
    index = a["per_response"]["prompt_index"]
    diff = (np.asarray(a["per_response"]["rewards"], dtype=np.float64)[:, objective]
            - np.asarray(b["per_response"]["rewards"], dtype=np.float64)[:, objective])
    per_prompt = prompt_means(diff, index)
    low, high = bootstrap_interval(per_prompt)
    return float(per_prompt.mean()), low, high


def seed_level_comparisons(at_target: dict[str, dict[int, dict[str, Any]]], reference: str,
                           names: Sequence[str]) -> list[tuple[Comparison, list[float]]]:
    """Per other algorithm and objective: the reference's mean held-out reward at matched KL minus
    the other's, paired by seed over the seeds both reached it, with firm.stats' interval, test
    and verdict (exploratory: uncorrected), at the final-reward equivalence margin; each with its
    per-seed differences."""
    rows = []
    for other, runs in at_target.items():
        if other == reference:
            continue
        seeds = sorted(set(at_target[reference]) & set(runs))
        if len(seeds) < 2:
            continue
        for name in names:
            rows.append({"metric": f"final_reward/{name}", "a": reference, "b": other, "better": "higher",
                         "values_a": [at_target[reference][s]["rewards"][name] for s in seeds],
                         "values_b": [runs[s]["rewards"][name] for s in seeds],
                         "margin": equivalence_margin(f"final_reward/{name}"), "primary": False})
    if not rows:
        return []
    differences = [paired_differences(row["values_a"], row["values_b"]).tolist() for row in rows]
    return list(zip(compare_table(rows), differences))


def evaluate_round(run: RunDir, round_number: int, prompts: int, samples: int) -> dict[str, Any]:
    """The experiment's held-out evaluation of one round's adapter (reused when it exists)."""
    suffix = f"-x{samples}" if samples > 1 else ""
    out = run.path / f"eval-round-{round_number:03d}-{prompts}prompts{suffix}.json"
    if not out.exists():
        config = run.config()
        command = [sys.executable, "-m", "firm.cli", "eval", "--adapter", str(run.adapter_dir(round_number)),
                   *eval_flags(config, prompts, samples, out)]
        with open(run.path / "study-eval.log", "a") as log:
            log.write(f"=== {' '.join(command)}\n")
            log.flush()
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode:
                raise SystemExit(f"firm eval failed; see {run.path / 'study-eval.log'}")
    result = json.loads(out.read_text())
    result["round"] = round_number
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path, required=True, help="a `firm compare --out` directory")
    parser.add_argument("--rounds", default="8,10", help="rounds to score besides the final one")
    parser.add_argument("--eval-prompts", type=int, default=30)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--kl", type=float, default=None, help="the common KL (default: the largest all runs reach)")
    parser.add_argument("--seeds", default="", help="only these seeds (comma-separated; default: all)")
    args = parser.parse_args(argv)

    base = json.loads(base_eval_path(args.experiment, args.eval_prompts, args.eval_samples).read_text())
    base["round"] = 0
    seeds = {int(s) for s in args.seeds.split(",") if s.strip()}
    curves: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for path in sorted(args.experiment.glob("runs/*/*/seed-*")):
        seed = int(path.name.removeprefix("seed-"))
        if seeds and seed not in seeds:
            continue
        run = RunDir.open(path)
        last = run.config().num_rounds
        rounds = sorted({int(r) for r in args.rounds.split(",") if r.strip()} | {last})
        curves.setdefault(path.parent.name, {})[seed] = [base] + [
            evaluate_round(run, r, args.eval_prompts, args.eval_samples) for r in rounds]

    target = args.kl if args.kl is not None else min(max(e["kl"] for e in curve)
                                                    for runs in curves.values() for curve in runs.values())
    names = list(base["rewards"])
    lines = [f"# Held-out reward at matched KL: {args.experiment}", "",
             f"Common KL {target:.3f} nats per response (the largest every run reaches); each run read where its "
             f"held-out KL first reaches it, interpolated between the rounds named. Untrained policy: "
             + ", ".join(f"{n} {base['rewards'][n]:.4f}" for n in names) + ".", "",
             "## Gain over the untrained policy at matched KL", "",
             "| algorithm | seeds | interpolated between rounds | " + " | ".join(f"gain {n}" for n in names) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
    at_target: dict[str, dict[int, dict[str, Any]]] = {}
    for algorithm, runs in curves.items():
        at_target[algorithm] = {s: e for s, curve in runs.items() if (e := at_kl(curve, target)) is not None}
        evaluations = list(at_target[algorithm].values())
        gains = pooled_gain(base, evaluations)
        where = ", ".join(f"seed {s}: {e['interpolated_between']}" for s, e in at_target[algorithm].items())
        lines.append(f"| {algorithm} | {len(evaluations)} | {where} | " + " | ".join(
            f"{gains[n]['gain']:+.4f} [{gains[n]['ci_low']:+.4f}, {gains[n]['ci_high']:+.4f}]" for n in names) + " |")
    reference = next(iter(at_target))
    lines += ["", f"## Paired differences at matched KL, {reference} minus each other algorithm, per seed", "",
              "Exploratory; prompt-level intervals within one seed say nothing about seed-to-seed variation.", "",
              "| other algorithm | seed | " + " | ".join(f"difference {n}" for n in names) + " |",
              "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for algorithm in at_target:
        if algorithm == reference:
            continue
        for seed in sorted(set(at_target[reference]) & set(at_target[algorithm])):
            cells = [paired_difference(at_target[reference][seed], at_target[algorithm][seed], m)
                     for m in range(len(names))]
            lines.append(f"| {algorithm} | {seed} | " + " | ".join(f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
                                                                   for d, lo, hi in cells) + " |")
    comparisons = seed_level_comparisons(at_target, reference, names)
    if comparisons:
        first = comparisons[0][0]
        lines += ["", f"## Seed-level comparisons at matched KL, {reference} minus each other algorithm", "",
                  f"Exploratory (the primary comparisons were named on the final adapters): the per-seed mean "
                  f"held-out rewards at matched KL, paired by seed; bootstrap 95% interval over seeds, "
                  f"uncorrected Wilcoxon p, equivalence margin {first.margin:g} (TOST). With n = {first.n} "
                  f"seeds the smallest possible Wilcoxon p is {smallest_wilcoxon_p(first.n):.3g}.", "",
                  "| other algorithm | objective | seeds | mean difference [95% CI] | seeds above 0 | p | verdict |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for c, differences in comparisons:
            above = sum(d > 0 for d in differences)
            lines.append(f"| {c.b} | {c.metric.removeprefix('final_reward/')} | {c.n} | {c.mean_diff:+.4f} "
                         f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}] | {above}/{c.n} | {c.p:.3g} | {c.verdict} |")
    report = "\n".join(lines) + "\n"
    (args.experiment / "matched_kl.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
