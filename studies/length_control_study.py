"""Which probe head should a reward ship, when "the longer answer wins" is a strong rule?

Reads the pooled trunk states that studies/cache_trunk_features.py cached for the TRAINING pairs
of one pair file (split by prompt, test fraction 0.2, seed 0: the held-out part is never read
here), or with ``--ngram DATA`` the hashed n-gram features of the ngram head
(firm.rewards.ngram) of that file's training pairs, and scores candidate linear Bradley-Terry heads by 5-fold cross-validation over prompt
groups. Each candidate's L2 strength is picked on the same folds by the selection rule below, so
all candidates get the same (small) optimism.

Candidates, for each cached block:
* plain: the Bradley-Terry probe as shipped before (length is free to leak in through the states);
* length covariate, dropped: the log-length difference is fitted beside the features and left out
  when scoring (AlpacaEval's length control);
* length covariate, kept: the same fit, scored with the length term (the most accurate model, and
  an explicit length counter);
* length-balanced: the plain probe with pairs weighted so that pairs whose chosen answer is shorter
  weigh as much, in all, as pairs whose chosen answer is longer.

Reported per candidate: accuracy, accuracy where the chosen answer is shorter / longer, their mean
(length-controlled), and the "longer wins" rule's accuracy on the same pairs.

Selection rule, fixed before any number was seen: the targets are accuracy >= max(rule + 0.02,
--target-accuracy) and length-controlled >= 0.62; the candidate whose worse shortfall against the
two targets is smallest (min of the two margins, largest) wins; the L2 of each candidate is picked
by the same rule.

    python studies/length_control_study.py --cache CACHE/helpful --target-accuracy 0.70
    python studies/length_control_study.py --cache CACHE/harmless --target-accuracy 0.66
    python studies/length_control_study.py --ngram ../shared/data/alpaca-eval/gpt4-pairs-a.jsonl.gz --l2 3e-4,1e-3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from firm.rewards.fit_config import FitConfig
from firm.rewards.ngram import ngram_features
from firm.rewards.pairs import load_pairs, prompt_group_key, split_by_prompt
from firm.rewards.pairwise import length_strata
from firm.rewards.probe_fit import fit_with_dropped_covariates, length_covariate

L2_GRID = (0.3, 1.0, 3.0, 10.0)
FOLDS = 5
CONTROLLED_TARGET = 0.62
VARIANTS = ("plain", "length covariate, dropped", "length covariate, kept", "length-balanced")


def load_cache(folder: Path) -> dict[str, np.ndarray]:
    """Concatenate the chunk files (in chunk order) of one cache folder."""
    chunks = [dict(np.load(path)) for path in sorted(folder.glob("chunk*.npz"))]
    if not chunks:
        raise SystemExit(f"{folder}: no chunk files; run studies/cache_trunk_features.py first")
    merged = {key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0] if key != "blocks"}
    merged["blocks"] = chunks[0]["blocks"]
    return merged


def group_folds(groups: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """5 folds that never split a prompt group (groups dealt round-robin in a seeded order)."""
    distinct = sorted(set(groups.tolist()))
    order = np.random.default_rng(0).permutation(len(distinct))
    fold_of = {group: order[position] % FOLDS for position, group in enumerate(distinct)}
    fold = np.array([fold_of[group] for group in groups])
    return [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in range(FOLDS)]


def metrics(margins: np.ndarray, chosen_chars: np.ndarray, rejected_chars: np.ndarray) -> dict[str, float]:
    wins = np.where(margins > 0, 1.0, np.where(margins == 0, 0.5, 0.0))
    shorter, longer, controlled = length_strata(wins, chosen_chars > rejected_chars, chosen_chars < rejected_chars)
    return {"accuracy": float(wins.mean()), "chosen_shorter": float(shorter), "chosen_longer": float(longer),
            "length_controlled": float(controlled)}


class Study:
    def __init__(self, cache: dict[str, np.ndarray], target_accuracy: float):
        self.cache = cache
        self.chosen_chars, self.rejected_chars = cache["chosen_chars"], cache["rejected_chars"]
        self.folds = group_folds(cache["groups"])
        self.covariate = length_covariate(self.chosen_chars, self.rejected_chars)
        rule = np.sign(self.covariate[:, 0])
        self.rule = metrics(rule, self.chosen_chars, self.rejected_chars)
        self.targets = (max(self.rule["accuracy"] + 0.02, target_accuracy), CONTROLLED_TARGET)
        longer = self.chosen_chars > self.rejected_chars
        # length-balanced: each stratum (and the equal-length pairs, with the longer one) weighs half
        share = longer.mean()
        self.balanced = np.where(longer, 0.5 / share, 0.5 / (1 - share))

    def shortfall(self, result: dict[str, float]) -> float:
        """The smaller of the two margins to the targets (negative: a target missed)."""
        return min(result["accuracy"] - self.targets[0], result["length_controlled"] - self.targets[1])

    def block_differences(self, columns: list[int]) -> np.ndarray:
        chosen = self.cache["chosen"][:, columns].reshape(len(self.chosen_chars), -1).astype(np.float64)
        rejected = self.cache["rejected"][:, columns].reshape(len(self.chosen_chars), -1).astype(np.float64)
        scale = np.concatenate([chosen, rejected]).std(0) + 1e-6
        return (chosen - rejected) / scale

    def out_of_fold(self, differences: np.ndarray, variant: str, l2: float) -> np.ndarray:
        covariates = self.covariate if variant.startswith("length covariate") else None
        weights = self.balanced if variant == "length-balanced" else None
        margins = np.zeros(differences.shape[0])
        for fit_rows, score_rows in self.folds:
            w, beta = fit_with_dropped_covariates(
                differences[fit_rows], None if covariates is None else covariates[fit_rows], l2,
                None if weights is None else weights[fit_rows])
            margins[score_rows] = differences[score_rows] @ w
            if variant == "length covariate, kept":
                margins[score_rows] += covariates[score_rows] @ beta
        return margins

    def candidate(self, differences, variant: str, l2_grid: tuple[float, ...]) -> dict[str, float]:
        results = []
        for l2 in l2_grid:
            result = {**metrics(self.out_of_fold(differences, variant, l2), self.chosen_chars, self.rejected_chars),
                      "l2": l2}
            results.append(result)
        return max(results, key=lambda result: (self.shortfall(result), result["l2"]))


def ngram_cache(data: str) -> dict[str, np.ndarray]:
    """What ``load_cache`` gives, for the ngram head: the sparse feature differences of the training pairs."""
    train, _ = split_by_prompt(load_pairs(data), 0.2, 0)
    config = FitConfig(head="ngram")
    chosen = ngram_features([p.chosen for p in train], config.ngram_features, config.ngram_max)
    rejected = ngram_features([p.rejected for p in train], config.ngram_features, config.ngram_max)
    return {"differences": (chosen - rejected).tocsr(), "blocks": np.array([]),
            "chosen_chars": np.array([len(p.chosen) for p in train]),
            "rejected_chars": np.array([len(p.rejected) for p in train]),
            "groups": np.array([prompt_group_key(p.prompt) for p in train])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=None, help="folder of cache_trunk_features.py chunks")
    parser.add_argument("--ngram", default=None, help="a pair file: study the ngram head on its training pairs")
    parser.add_argument("--l2", default=None, help="comma-separated L2 strengths (default: %s)" % (L2_GRID,))
    parser.add_argument("--target-accuracy", type=float, default=0.70)
    parser.add_argument("--blocks", default=None, help="comma-separated blocks to try (default: all cached)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    if (args.cache is None) == (args.ngram is None):
        raise SystemExit("give one of --cache and --ngram")
    cache = load_cache(args.cache) if args.cache is not None else ngram_cache(args.ngram)
    cached = [int(block) for block in cache["blocks"]]
    blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else cached
    l2_grid = tuple(float(v) for v in args.l2.split(",")) if args.l2 else L2_GRID
    inputs = ([(f"block {block}", [cached.index(block)]) for block in blocks] if args.cache is not None
              else [("ngram", None)])
    study = Study(cache, args.target_accuracy)
    n = len(study.chosen_chars)
    print(f"{args.cache or args.ngram}: {n} training pairs, {len(set(cache['groups'].tolist()))} prompt groups; "
          f"targets: accuracy >= {study.targets[0]:.3f}, length-controlled >= {study.targets[1]:.2f}")
    rule = study.rule
    print(f"{'candidate':44s} {'L2':>5s} {'acc':>6s} {'shorter':>8s} {'longer':>7s} {'LC':>6s} {'worst margin':>12s}")
    print(f"{'rule: the longer answer wins':44s} {'':>5s} {rule['accuracy']:6.3f} {rule['chosen_shorter']:8.3f} "
          f"{rule['chosen_longer']:7.3f} {rule['length_controlled']:6.3f} {study.shortfall(rule):12.3f}")
    table = []
    for label, columns in inputs:
        differences = cache["differences"] if columns is None else study.block_differences(columns)
        for variant in VARIANTS:
            started = time.perf_counter()
            result = study.candidate(differences, variant, l2_grid)
            name = f"{label}, {variant}"
            table.append({"candidate": name, **result, "worst_margin": study.shortfall(result)})
            print(f"{name:44s} {result['l2']:5g} {result['accuracy']:6.3f} {result['chosen_shorter']:8.3f} "
                  f"{result['chosen_longer']:7.3f} {result['length_controlled']:6.3f} "
                  f"{study.shortfall(result):12.3f}   ({time.perf_counter() - started:.0f}s)", flush=True)
    best = max(table, key=lambda row: row["worst_margin"])
    print(f"picked by the rule: {best['candidate']} (L2 {best['l2']:g})")
    if args.json is not None:
        args.json.write_text(json.dumps({"pairs": n, "rule": rule, "targets": study.targets, "table": table,
                                         "picked": best}, indent=2) + "\n")


if __name__ == "__main__":
    main()
