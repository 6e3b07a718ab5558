"""Fit a probe reward on trunk features cached by studies/cache_trunk_features.py, and ship it.

``firm reward fit --head probe`` runs the frozen trunk over every training pair before fitting
the head; on a shared 2-core CPU that is the hour-long part, and the candidate study
(studies/length_control_study.py) already paid for it. This script reuses those cached
features for the training pairs and otherwise runs exactly ``firm reward fit``'s pipeline
(firm.rewards.pipeline.fit_from_source: the same split, the held-out pairs scored by the saved
model itself, descriptor and card written). The cached rows must be the training pairs of the
split in file order; their origins ("file:line") are checked.

    python studies/ship_probe_reward.py --cache CACHE/helpful --block 8 \\
        --data ../shared/data/alpaca-eval/gpt4-pairs-a.jsonl.gz --out src/firm/data/reward_models/helpful \\
        --objective helpful --length-covariate --select-by length-controlled
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Sequence

import torch

from firm.rewards.backbones import BACKBONES
from firm.rewards.fit_config import FitConfig
from firm.rewards.pairs import PreferencePair
from firm.rewards.pipeline import fit_from_source
from firm.rewards.probe_fit import fit_probe_head, probe_model
from firm.rewards.trunk import shared_trunk
from length_control_study import load_cache


def cached_fitter(cache: dict, block: int):
    """A ``fit`` for fit_from_source that reads the cached pooled states of ``block``."""
    column = [int(b) for b in cache["blocks"]].index(block)

    def fit(train_pairs: Sequence[PreferencePair], config: FitConfig, log: Callable[[str], None]):
        origins = [pair.origin for pair in train_pairs]
        if origins != cache["origin"].tolist():
            raise SystemExit("the cached rows are not the training pairs of this split, in file order")
        chosen = torch.from_numpy(cache["chosen"][:, column].astype("float32"))
        rejected = torch.from_numpy(cache["rejected"][:, column].astype("float32"))
        head, stats = fit_probe_head(chosen, rejected, train_pairs, config, log)
        stats["features"] = "pooled block states cached by studies/cache_trunk_features.py (float16)"
        trunk = shared_trunk(config.backbone, config.base_path, config.num_layers)
        return probe_model(trunk.model, trunk.tokenizer, config, head, stats, trunk=trunk), stats

    return fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--block", type=int, required=True, help="the trunk's depth: the block the head reads")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--objective", required=True)
    parser.add_argument("--length-covariate", action="store_true")
    parser.add_argument("--select-by", default="accuracy")
    parser.add_argument("--l2", default="0.3,1,3,10", help="comma-separated L2 strengths")
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="smollm2", help="as the features were cached")
    parser.add_argument("--max-length", type=int, default=256, help="as the features were cached")
    parser.add_argument("--max-response-tokens", type=int, default=96, help="as the features were cached")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    causal = BACKBONES[args.backbone]["kind"] == "causal-lm"
    config = FitConfig(objective=args.objective, backbone=args.backbone, num_layers=args.block, chat_template=causal,
                       max_length=args.max_length,
                       head="probe", probe_l2=tuple(float(v) for v in args.l2.split(",")),
                       length_covariate=args.length_covariate, select_by=args.select_by,
                       max_response_tokens=args.max_response_tokens).validate()
    result = fit_from_source(args.data, args.out, config, fit=cached_fitter(load_cache(args.cache), args.block),
                             log=lambda line: print(line, flush=True))
    print(f"saved {result.output_dir} (trained on {result.n_train} pairs, held out {result.n_test})")


if __name__ == "__main__":
    main()
