"""The whole fit, as ``firm reward fit`` runs it: load pairs, hold out a prompt-disjoint test
part, fit the head the config asks for, evaluate on the held-out part only, save."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from firm.rewards.errors import RewardModelError
from firm.rewards.fit_config import FitConfig
from firm.rewards.fitted import FittedRewardModel
from firm.rewards.lora_fit import fit_lora
from firm.rewards.pairs import PreferencePair, load_pairs, split_by_prompt
from firm.rewards.pairwise import PairwiseReport, evaluate_pairs
from firm.rewards.ngram import NgramRewardModel, fit_ngram
from firm.rewards.probe_fit import fit_probe


FittedReward = FittedRewardModel | NgramRewardModel


def fit_reward_model(train_pairs: Sequence[PreferencePair], config: FitConfig,
                     log: Callable[[str], None] = print) -> tuple[FittedReward, dict[str, Any]]:
    """Train a Bradley-Terry reward on ``train_pairs`` with the head ``config.head`` names
    (firm.rewards.lora_fit, firm.rewards.probe_fit); return the model and training stats."""
    if len(train_pairs) < config.min_pairs:
        raise RewardModelError(f"{len(train_pairs)} training pairs: at least {config.min_pairs} are needed")
    config.validate()
    fit = {"probe": fit_probe, "ngram": fit_ngram, "lora": fit_lora}[config.head]
    return fit(train_pairs, config, log)


@dataclass
class FitResult:
    """What fit_from_source made: the saved model, its held-out report (None when nothing was
    held out), the pair counts of both parts and the output directory."""

    model: FittedReward
    heldout: PairwiseReport | None
    n_train: int
    n_test: int
    output_dir: Path


Fitter = Callable[[Sequence[PreferencePair], FitConfig, Callable[[str], None]],
                  tuple[FittedReward, dict[str, Any]]]


def fit_from_source(data: str, out_dir: str | Path, config: FitConfig, test_fraction: float = 0.2,
                    split_seed: int = 0, max_train_pairs: int | None = None,
                    log: Callable[[str], None] = print, fit: Fitter | None = None) -> FitResult:
    """Load pairs, hold out a prompt-disjoint test part, fit, evaluate on that part only,
    and save the model with its descriptor and card. What ``firm reward fit`` runs.

    ``fit(train_pairs, config, log)`` replaces ``fit_reward_model`` (a study that fits a head on
    trunk features it cached passes its own; the split, held-out evaluation and saving stay these)."""
    pairs = load_pairs(data)
    try:
        train, test = split_by_prompt(pairs, test_fraction, split_seed)
    except ValueError as error:
        raise RewardModelError(f"{data}: {error}") from None
    available_train = len(train)
    if max_train_pairs is not None and len(train) > max_train_pairs:
        train = random.Random(split_seed).sample(train, max_train_pairs)
    log(f"{data}: {len(pairs)} pairs -> {len(train)} train ({available_train} available), "
        f"{len(test)} held out (by prompt, fraction {test_fraction}, seed {split_seed})")
    model, _ = (fit or fit_reward_model)(train, config, log)

    heldout = None
    if test:
        started = time.perf_counter()
        heldout = evaluate_pairs(model.score_hh, test)
        log(f"held-out ({time.perf_counter() - started:.0f}s): {heldout.format()}")
    model.descriptor["data"] = {
        "source": str(data),
        "n_pairs": len(pairs),
        "n_train": len(train),
        "n_train_available": available_train,
        "n_test": len(test),
        "split": {"by": "first human turn of the prompt (no prompt on both sides)",
                  "test_fraction": test_fraction, "seed": split_seed,
                  "max_train_pairs": max_train_pairs},
    }
    model.descriptor["heldout"] = heldout.as_dict() if heldout is not None else None
    output_dir = model.save(out_dir)
    return FitResult(model, heldout, len(train), len(test), output_dir)
