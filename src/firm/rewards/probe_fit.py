"""Fitting a "probe" head: a linear Bradley-Terry head on the frozen backbone's features.

With a thousand noisy pairs (HH-RLHF harmlessness), fine-tuning even a few blocks mostly
learns "the shorter reply wins". Keeping the backbone frozen and fitting one regularized
linear direction in its feature space uses what the pretrained model already separates, and
the fit is a convex problem solved in seconds, with its L2 strength picked by
cross-validation over prompts instead of by hand.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from firm.rewards.backbones import load_base
from firm.rewards.descriptor import PROBE_HEAD_FILE, new_descriptor
from firm.rewards.encoding import encode_pairs
from firm.rewards.errors import RewardModelError
from firm.rewards.fit_config import FitConfig
from firm.rewards.fitted import FittedRewardModel
from firm.rewards.frozen_blocks import probe_features
from firm.rewards.pairs import PreferencePair, prompt_group_key


def fit_linear_bradley_terry(differences: np.ndarray, l2: float) -> np.ndarray:
    """w minimising  mean_i log(1 + exp(-d_i . w)) + l2 / 2 |w|^2  over feature differences
    d_i = f(chosen_i) - f(rejected_i). No intercept: an offset cancels within a pair.

    Solved by scikit-learn's logistic regression on the pairs (label 1) and their mirror
    images (label 0): its objective C * sum(loss) + |w|^2 / 2 over the 2n rows is the one
    above, scaled, when C = 1 / (2 n l2)."""
    from sklearn.linear_model import LogisticRegression  # deferred: seconds to import, only fits need it

    if l2 <= 0:
        raise ValueError(f"l2 must be positive, got {l2}")
    n = len(differences)
    rows = np.concatenate([differences, -differences])
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    solver = LogisticRegression(C=1.0 / (2 * n * l2), fit_intercept=False, max_iter=10_000, tol=1e-8)
    return solver.fit(rows, labels).coef_[0]


def cross_validated_accuracy(differences: np.ndarray, groups: Sequence[str], l2: float, folds: int = 5) -> float:
    """Pairwise accuracy of ``fit_linear_bradley_terry`` on held-out folds, split by prompt group."""
    from sklearn.model_selection import GroupKFold  # deferred, as in fit_linear_bradley_terry

    correct = 0
    for train_rows, test_rows in GroupKFold(n_splits=folds).split(differences, groups=list(groups)):
        weights = fit_linear_bradley_terry(differences[train_rows], l2)
        correct += int((differences[test_rows] @ weights > 0).sum())
    return correct / len(differences)


def fit_probe(train_pairs: Sequence[PreferencePair], config: FitConfig,
              log: Callable[[str], None] = print) -> tuple[FittedRewardModel, dict[str, Any]]:
    """Frozen backbone, linear head on [last-token state, mean response state] of its top block.

    Features are standardised on the training pairs; the L2 strength is the one of
    ``config.probe_l2`` with the best 5-fold cross-validated accuracy (folds split by prompt;
    ties go to the stronger pull). The standardisation is folded into the saved head, so a
    reward is one dot product: (w / sd) . f - (w / sd) . mu, centred on the training features."""
    if not config.probe_l2 or min(config.probe_l2) <= 0:
        raise RewardModelError(f"probe L2 strengths must be positive, got {config.probe_l2}")
    started = time.perf_counter()
    base, tokenizer = load_base(config.backbone, config.base_path, config.num_layers)
    fmt = config.input_format()
    chosen, rejected = encode_pairs(tokenizer, fmt, train_pairs)
    chosen_features = probe_features(base, chosen, tokenizer.pad_token_id, fmt.kind)
    rejected_features = probe_features(base, rejected, tokenizer.pad_token_id, fmt.kind)
    log(f"features of {len(train_pairs)} pairs from the frozen {config.backbone} "
        f"({base.config.num_hidden_layers} blocks): {time.perf_counter() - started:.0f}s")
    both = torch.cat([chosen_features, rejected_features]).double()
    mean, scale = both.mean(dim=0), both.std(dim=0) + 1e-6
    differences = ((chosen_features.double() - rejected_features.double()) / scale).numpy()
    groups = [prompt_group_key(pair.prompt) for pair in train_pairs]
    folds = min(5, len(set(groups)))
    if folds < 2:
        raise RewardModelError("a probe needs pairs from at least 2 distinct prompts to cross-validate")
    cv = {l2: cross_validated_accuracy(differences, groups, l2, folds) for l2 in config.probe_l2}
    best = max(cv, key=lambda l2: (cv[l2], l2))
    log("cross-validated accuracy by L2: " + ", ".join(f"{l2:g}: {accuracy:.3f}" for l2, accuracy in cv.items())
        + f" -> L2 {best:g}")
    standardised_weights = fit_linear_bradley_terry(differences, best)
    train_accuracy = float((differences @ standardised_weights > 0).mean())
    weights = torch.from_numpy(standardised_weights) / scale
    head = {"weight": weights.float(), "bias": (-(weights @ mean)).float()}
    stats = {
        "train_seconds": round(time.perf_counter() - started, 1),
        "probe_layer": base.config.num_hidden_layers,
        "pooling": "last token + mean over response tokens",
        "cv_folds": folds,
        "cv_accuracy_by_l2": {f"{l2:g}": round(accuracy, 4) for l2, accuracy in cv.items()},
        "l2": best,
        "train_accuracy": round(train_accuracy, 4),
    }
    log(f"probe fitted: L2 {best:g}, train accuracy {train_accuracy:.3f} ({stats['train_seconds']:.0f}s)")
    descriptor = new_descriptor(config, fmt, stats, f"{PROBE_HEAD_FILE}: linear head (weight [2 x hidden], bias) "
                                                    "on the frozen backbone's pooled top-block states")
    return FittedRewardModel(base, tokenizer, descriptor, probe_head=head), stats
