"""Which block and pooling of the frozen SmolLM2 should the harmless probe read?

The shipped harmless reward is a linear Bradley-Terry head on SmolLM2-135M-Instruct's block 12
(see docs/reward-models.md). This script re-opens that choice on the training part of the
harmless pairs only: it extracts, once, pooled states of every block up to ``--num-layers``
for every pair, then scores a fixed list of candidate probes by 5-fold cross-validation over
prompts, repeated over 3 shuffles of the prompts into folds (one shuffle moves the accuracy by
about 0.01, as much as the candidates differ). The held-out part is only scored with
``--show-heldout``, and only to report the candidate that cross-validation picked.

    python studies/harmless_probe_study.py                         # about 6 min features + 8 min CV
    python studies/harmless_probe_study.py --cache harmless-states.npz --show-heldout
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from firm.rewards.backbones import load_base, transformer_blocks
from firm.rewards.encoding import collate, encode_pairs, length_sorted_batches
from firm.rewards.fit_config import FitConfig
from firm.rewards.frozen_blocks import pool_response_states
from firm.rewards.pairs import load_pairs, prompt_group_key, split_by_prompt
from firm.rewards.probe_fit import fit_linear_bradley_terry

POOLINGS = ("last", "mean", "first8")  # last token; mean over response tokens; mean of the first 8 of them
FIRST_TOKENS = 8
L2_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
FOLDS, REPEATS = 5, 3
LAST_MEAN = ("last", "mean")
# (name, blocks, poolings, how): "single" fits one probe on the concatenated features,
# "ensemble" averages the standardised scores of one probe per block.
CANDIDATES = [
    *[(f"block {block}, last+mean", [block], LAST_MEAN, "single") for block in (4, 5, 6, 7, 8, 12)],
    ("block 12, last+mean+first8", [12], POOLINGS, "single"),
    ("blocks 4-8 concatenated, last+mean", [4, 5, 6, 7, 8], LAST_MEAN, "single"),
    ("blocks 4,6,8,10,12 concatenated, last+mean", [4, 6, 8, 10, 12], LAST_MEAN, "single"),
    ("blocks 4-8 ensemble, last+mean", [4, 5, 6, 7, 8], LAST_MEAN, "ensemble"),
    ("blocks 4-12 ensemble, last+mean", list(range(4, 13)), LAST_MEAN, "ensemble"),
]


def extract(data: str, num_layers: int, threads: int) -> dict[str, np.ndarray]:
    """Pooled states [pairs, blocks, poolings, hidden] of chosen and rejected replies, the
    prompt group of each pair, and how many of the pairs (first) are the training part."""
    torch.set_num_threads(threads)
    train, test = split_by_prompt(load_pairs(data), 0.2, 0)
    pairs = train + test
    # The shipped reward's input format (its fit command in docs/reward-models.md).
    config = FitConfig(backbone="smollm2", num_layers=num_layers, chat_template=True, head="probe",
                       max_response_tokens=160)
    base, tokenizer = load_base("smollm2", None, num_layers)
    base.eval()
    fmt = config.input_format()
    chosen, rejected = encode_pairs(tokenizer, fmt, pairs)
    captured: dict[int, torch.Tensor] = {}
    for block, module in enumerate(transformer_blocks(base)):
        module.register_forward_hook(lambda m, i, output, block=block: captured.__setitem__(
            block, output[0] if isinstance(output, tuple) else output))

    def pooled(examples) -> np.ndarray:
        out = np.zeros((len(examples), num_layers, len(POOLINGS), base.config.hidden_size), np.float32)
        for batch in length_sorted_batches([len(ids) for ids, _ in examples], 16):
            with torch.no_grad():
                base(**collate([examples[index] for index in batch], tokenizer.pad_token_id, fmt.kind))
            for row, index in enumerate(batch):
                ids, types = examples[index]
                response = torch.tensor(types, dtype=torch.bool).nonzero()[:, 0]
                for block in range(num_layers):
                    states = captured[block][row, : len(ids)].float()
                    # "last" and "mean" exactly as the shipped probe pools them
                    out[index, block, :2] = pool_response_states(states, types).view(2, -1)
                    out[index, block, 2] = states[response[:FIRST_TOKENS]].mean(0)
        return out

    started = time.perf_counter()
    features = {"chosen": pooled(chosen), "rejected": pooled(rejected)}
    print(f"states of {len(pairs)} pairs, {num_layers} blocks: {time.perf_counter() - started:.0f} s", flush=True)
    return {**features, "groups": np.array([prompt_group_key(pair.prompt) for pair in pairs]),
            "n_train": np.array(len(train))}


def shuffled_group_folds(groups: np.ndarray, repeat: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """5 folds that never split a prompt group; each repeat deals the groups differently."""
    distinct = sorted(set(groups.tolist()))
    order = np.random.default_rng(repeat).permutation(len(distinct))
    fold_of = {group: order[position] % FOLDS for position, group in enumerate(distinct)}
    fold = np.array([fold_of[group] for group in groups])
    return [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in range(FOLDS)]


def accuracy(scores: np.ndarray) -> float:
    return float(((scores > 0) + 0.5 * (scores == 0)).mean())


class Study:
    def __init__(self, cache: dict[str, np.ndarray]):
        self.fit = fit_linear_bradley_terry
        self.chosen, self.rejected = cache["chosen"].astype(np.float64), cache["rejected"].astype(np.float64)
        self.n = int(cache["n_train"])
        self.folds = [shuffled_group_folds(cache["groups"][: self.n], repeat) for repeat in range(REPEATS)]

    def differences(self, blocks, poolings) -> np.ndarray:
        """Standardised (chosen - rejected) features; scale from the training part only."""
        columns = [POOLINGS.index(name) for name in poolings]
        pick = lambda f: f[:, [b - 1 for b in blocks]][:, :, columns].reshape(len(f), -1)  # noqa: E731
        chosen, rejected = pick(self.chosen), pick(self.rejected)
        scale = np.concatenate([chosen[: self.n], rejected[: self.n]]).std(0) + 1e-6
        return (chosen - rejected) / scale

    def out_of_fold(self, differences: np.ndarray, l2: float) -> list[np.ndarray]:
        train = differences[: self.n]
        scores = []
        for folds in self.folds:
            repeat_scores = np.zeros(self.n)
            for fit_rows, score_rows in folds:
                repeat_scores[score_rows] = train[score_rows] @ self.fit(train[fit_rows], l2)
            scores.append(repeat_scores)
        return scores

    def probe(self, differences: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, float]:
        """Out-of-fold scores at the L2 with the best mean CV accuracy, and the held-out scores of
        the probe refitted at that L2 on the whole training part (divided by the spread of its
        training scores, so that ensembled probes count alike), and that L2."""
        by_l2 = {l2: self.out_of_fold(differences, l2) for l2 in L2_GRID}
        best = max(by_l2, key=lambda l2: (np.mean([accuracy(s) for s in by_l2[l2]]), l2))
        weights = self.fit(differences[: self.n], best)
        return by_l2[best], differences[self.n:] @ weights / (differences[: self.n] @ weights).std(), best

    def candidate(self, blocks, poolings, how) -> tuple[float, float, str]:
        """(mean CV accuracy, held-out accuracy, chosen L2 as text)."""
        if how == "single":
            cv_scores, heldout, l2 = self.probe(self.differences(blocks, poolings))
            return np.mean([accuracy(s) for s in cv_scores]), accuracy(heldout), f"{l2:g}"
        summed_cv, summed_heldout, l2s = [np.zeros(self.n) for _ in range(REPEATS)], 0.0, []
        for block in blocks:
            cv_scores, heldout, l2 = self.probe(self.differences([block], poolings))
            summed_cv = [total + s / s.std() for total, s in zip(summed_cv, cv_scores)]
            summed_heldout = summed_heldout + heldout
            l2s.append(f"{l2:g}")
        return np.mean([accuracy(s) for s in summed_cv]), accuracy(summed_heldout), "/".join(l2s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/hh-rlhf/harmless-base-test-a.jsonl.gz")
    parser.add_argument("--num-layers", type=int, default=12, help="blocks to extract (default 12)")
    parser.add_argument("--cache", type=Path, default=None, help="npz of extracted states: read if present, else written")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--show-heldout", action="store_true",
                        help="also print each candidate's held-out accuracy (after choosing by CV)")
    args = parser.parse_args()

    if args.cache is not None and args.cache.is_file():
        cache = dict(np.load(args.cache))
    else:
        cache = extract(args.data, args.num_layers, args.threads)
        if args.cache is not None:
            np.savez(args.cache, **cache)
    available = cache["chosen"].shape[1]
    study = Study(cache)
    results = []
    for name, blocks, poolings, how in CANDIDATES:
        if max(blocks) > available:
            print(f"{name}: skipped (states of {available} blocks extracted)")
            continue
        cv, heldout, l2 = study.candidate(blocks, poolings, how)
        results.append((cv, name, heldout))
        print(f"{name:44s} CV {cv:.3f} (L2 {l2})" + (f"   held-out {heldout:.3f}" if args.show_heldout else ""),
              flush=True)
    if not results:
        raise SystemExit(f"no candidate fits in the {available} extracted blocks: raise --num-layers")
    cv, name, heldout = max(results)
    print(f"picked by CV: {name} (CV {cv:.3f})" + (f"; held-out {heldout:.3f} on {len(cache['groups']) - study.n} pairs"
                                                   if args.show_heldout else ""))


if __name__ == "__main__":
    main()
