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
from scipy import sparse

from firm.rewards.backbones import load_base
from firm.rewards.descriptor import PROBE_HEAD_FILE, new_descriptor
from firm.rewards.encoding import encode_pairs
from firm.rewards.errors import RewardModelError
from firm.rewards.fit_config import FitConfig
from firm.rewards.fitted import FittedRewardModel
from firm.rewards.frozen_blocks import probe_features
from firm.rewards.pairs import PreferencePair, prompt_group_key
from firm.rewards.pairwise import length_strata
from firm.rewards.trunk import SharedTrunk


def fit_linear_bradley_terry(differences: np.ndarray, l2: float,
                             sample_weight: np.ndarray | None = None) -> np.ndarray:
    """w minimising  mean_i log(1 + exp(-d_i . w)) + l2 / 2 |w|^2  over feature differences
    d_i = f(chosen_i) - f(rejected_i) (a dense array or a scipy sparse matrix). No intercept: an offset cancels within a pair.
    ``sample_weight`` (one per pair, mean 1 to keep the meaning of l2) reweights the pairs.

    Solved by scikit-learn's logistic regression on the pairs (label 1) and their mirror
    images (label 0): its objective C * sum(loss) + |w|^2 / 2 over the 2n rows is the one
    above, scaled, when C = 1 / (2 n l2)."""
    from sklearn.linear_model import LogisticRegression  # deferred: seconds to import, only fits need it

    if l2 <= 0:
        raise ValueError(f"l2 must be positive, got {l2}")
    n = differences.shape[0]
    rows = sparse.vstack([differences, -differences]).tocsr() if sparse.issparse(differences) \
        else np.concatenate([differences, -differences])
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    weights = None if sample_weight is None else np.concatenate([sample_weight, sample_weight])
    solver = LogisticRegression(C=1.0 / (2 * n * l2), fit_intercept=False, max_iter=10_000, tol=1e-8)
    return solver.fit(rows, labels, sample_weight=weights).coef_[0]


def length_covariate(chosen_chars: Sequence[int], rejected_chars: Sequence[int]) -> np.ndarray:
    """[n, 1] the length covariate of each pair: log(1 + chosen characters) - log(1 + rejected
    characters), divided by the spread of log(1 + characters) over all the responses so that it
    is on the scale of the standardised features (and of the L2 penalty)."""
    chosen, rejected = np.log1p(np.asarray(chosen_chars, float)), np.log1p(np.asarray(rejected_chars, float))
    scale = np.concatenate([chosen, rejected]).std() + 1e-6
    return ((chosen - rejected) / scale)[:, None]


def fit_with_dropped_covariates(differences: np.ndarray, covariates: np.ndarray | None, l2: float,
                                sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(feature weights, covariate weights) of one Bradley-Terry fit on [features | covariates].

    The covariates (e.g. the length difference) take the preference they explain away from the
    features while fitting; scoring with the feature weights alone drops them, the way
    AlpacaEval's length-controlled win rates fit a length term and then set it to zero."""
    if covariates is None or covariates.shape[1] == 0:
        return fit_linear_bradley_terry(differences, l2, sample_weight), np.zeros(0)
    joined = sparse.hstack([differences, sparse.csr_matrix(covariates)]).tocsr() if sparse.issparse(differences) \
        else np.hstack([differences, covariates])
    weights = fit_linear_bradley_terry(joined, l2, sample_weight)
    return weights[: differences.shape[1]], weights[differences.shape[1]:]


def out_of_fold_margins(differences: np.ndarray, groups: Sequence[str], l2: float, folds: int = 5,
                        covariates: np.ndarray | None = None) -> np.ndarray:
    """Margin w . d_i of every pair, from a fit on the folds that did not hold its prompt group
    (covariates fitted and dropped, see fit_with_dropped_covariates)."""
    from sklearn.model_selection import GroupKFold  # deferred, as in fit_linear_bradley_terry

    margins = np.zeros(differences.shape[0])
    for train_rows, test_rows in GroupKFold(n_splits=folds).split(differences, groups=list(groups)):
        weights, _ = fit_with_dropped_covariates(
            differences[train_rows], None if covariates is None else covariates[train_rows], l2)
        margins[test_rows] = differences[test_rows] @ weights
    return margins


def cross_validated_accuracy(differences: np.ndarray, groups: Sequence[str], l2: float, folds: int = 5) -> float:
    """Pairwise accuracy of ``fit_linear_bradley_terry`` on held-out folds, split by prompt group."""
    return float((out_of_fold_margins(differences, groups, l2, folds) > 0).mean())


def length_controlled(margins: np.ndarray, chosen_chars: Sequence[int], rejected_chars: Sequence[int]) -> float:
    """Mean of the accuracies where the chosen response is shorter and where it is longer."""
    chosen, rejected = np.asarray(chosen_chars), np.asarray(rejected_chars)
    wins = np.where(margins > 0, 1.0, np.where(margins == 0, 0.5, 0.0))
    return float(length_strata(wins, chosen > rejected, chosen < rejected)[2])


def fit_probe(train_pairs: Sequence[PreferencePair], config: FitConfig,
              log: Callable[[str], None] = print) -> tuple[FittedRewardModel, dict[str, Any]]:
    """Frozen backbone, linear head on [last-token state, mean response state] of its top block.

    Features are standardised on the training pairs; the L2 strength is the one of
    ``config.probe_l2`` with the best 5-fold cross-validated ``config.select_by`` (folds split
    by prompt; ties go to the stronger pull). With ``config.length_covariate`` the fit also
    weighs the length difference (``length_covariate``), which the saved head leaves out. The
    standardisation is folded into the saved head, so a reward is one dot product:
    (w / sd) . f - (w / sd) . mu, centred on the training features."""
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
    head, stats = fit_probe_head(chosen_features, rejected_features, train_pairs, config, log)
    stats = {"train_seconds": round(time.perf_counter() - started, 1), **stats}
    return probe_model(base, tokenizer, config, head, stats), stats


def probe_model(base, tokenizer, config: FitConfig, head: dict[str, torch.Tensor], stats: dict[str, Any],
                trunk: SharedTrunk | None = None) -> FittedRewardModel:
    """The fitted probe reward: ``head`` on the frozen ``base`` (or on ``trunk``, shared), with its
    descriptor; ``stats`` are the fit's statistics (the probed block is added)."""
    stats = {**stats, "probe_layer": base.config.num_hidden_layers}
    descriptor = new_descriptor(config, config.input_format(), stats,
                                f"{PROBE_HEAD_FILE}: linear head (weight [2 x hidden], bias) on the frozen "
                                "backbone's pooled top-block states")
    return FittedRewardModel(base, tokenizer, descriptor, probe_head=head, trunk=trunk)


def fit_probe_head(chosen_features: torch.Tensor, rejected_features: torch.Tensor,
                   train_pairs: Sequence[PreferencePair], config: FitConfig,
                   log: Callable[[str], None] = print) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The linear head ({"weight", "bias"}) and its fit statistics, from the pooled features of
    the chosen and rejected responses (rows in the order of ``train_pairs``)."""
    both = torch.cat([chosen_features, rejected_features]).double()
    mean, scale = both.mean(dim=0), both.std(dim=0) + 1e-6
    differences = ((chosen_features.double() - rejected_features.double()) / scale).numpy()
    standardised_weights, stats = fit_linear_head(differences, train_pairs, config, "probe", log)
    weights = torch.from_numpy(standardised_weights) / scale
    head = {"weight": weights.float(), "bias": (-(weights @ mean)).float()}
    stats = {"pooling": "last token + mean over response tokens", **stats}
    return head, stats


def fit_linear_head(differences, train_pairs: Sequence[PreferencePair], config: FitConfig, what: str,
                    log: Callable[[str], None] = print) -> tuple[np.ndarray, dict[str, Any]]:
    """Feature weights of a linear Bradley-Terry head on ``differences`` (chosen - rejected, one
    row per pair of ``train_pairs``; dense or sparse) and the fit statistics: the L2 of
    ``config.probe_l2`` with the best 5-fold cross-validated ``config.select_by`` (folds split by
    prompt; ties go to the stronger pull), fitted with the length covariate when the config asks,
    which the returned weights leave out."""
    groups = [prompt_group_key(pair.prompt) for pair in train_pairs]
    chosen_chars, rejected_chars = [len(p.chosen) for p in train_pairs], [len(p.rejected) for p in train_pairs]
    covariates = length_covariate(chosen_chars, rejected_chars) if config.length_covariate else None
    folds = min(5, len(set(groups)))
    if folds < 2:
        raise RewardModelError(f"a {what} head needs pairs from at least 2 distinct prompts to cross-validate")
    margins = {l2: out_of_fold_margins(differences, groups, l2, folds, covariates) for l2 in config.probe_l2}
    cv = {l2: float((m > 0).mean()) for l2, m in margins.items()}
    cv_controlled = {l2: length_controlled(m, chosen_chars, rejected_chars) for l2, m in margins.items()}
    target = cv if config.select_by == "accuracy" else cv_controlled
    best = max(target, key=lambda l2: (target[l2], l2))
    log("cross-validated accuracy (length-controlled) by L2: "
        + ", ".join(f"{l2:g}: {cv[l2]:.3f} ({cv_controlled[l2]:.3f})" for l2 in cv) + f" -> L2 {best:g}")
    weights, covariate_weights = fit_with_dropped_covariates(differences, covariates, best)
    train_accuracy = float((differences @ weights > 0).mean())
    stats: dict[str, Any] = {
        "cv_folds": folds,
        "cv_accuracy_by_l2": {f"{l2:g}": round(accuracy, 4) for l2, accuracy in cv.items()},
        "cv_length_controlled_by_l2": {f"{l2:g}": round(value, 4) for l2, value in cv_controlled.items()},
        "selected_by": config.select_by,
        "l2": best,
        "train_accuracy": round(train_accuracy, 4),
    }
    if covariates is not None:
        stats["length_covariate"] = {
            "definition": "log(1 + chosen chars) - log(1 + rejected chars), over the spread of log(1 + chars)",
            "fitted_weight": round(float(covariate_weights[0]), 4),
            "at_scoring": "dropped",
        }
    log(f"{what} head fitted: L2 {best:g}, train accuracy {train_accuracy:.3f}"
        + (f", length weight {covariate_weights[0]:.3f} (dropped at scoring)" if covariates is not None else ""))
    return weights, stats
