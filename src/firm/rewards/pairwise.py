"""How well a reward orders preference pairs, and how much it merely counts characters."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy import stats

from firm.hh import hh_to_messages
from firm.prompts import Prompt
from firm.rewards.pairs import PreferencePair


@dataclass(frozen=True)
class PairwiseReport:
    """How well a reward orders preference pairs, and how much it merely counts characters.

    ``accuracy`` counts a tie as half a win, so a constant reward scores 0.5 (chance).
    ``length_pearson`` / ``length_spearman`` correlate reward with response length in
    characters over every scored response; ``longer_chosen_rate`` is the accuracy a reward
    that only counted characters would reach on these pairs (the rule "the longer answer wins").

    Length control: the pairs where the chosen response is the shorter one and those where it
    is the longer one (in characters; equal lengths belong to neither) are scored apart
    (``chosen_shorter_*``, ``chosen_longer_*``), and ``length_controlled_accuracy`` is the mean
    of the two, so a reward that only counts characters scores 0.5 whatever the share of
    longer chosen answers. Every ``*_ci95`` is a percentile-bootstrap 95% interval over pairs
    resampled with replacement (one set of resamples for all of them); NaN where a stratum is
    empty."""

    n_pairs: int
    accuracy: float
    ci95: tuple[float, float]
    mean_margin: float
    ties: int
    length_pearson: float
    length_spearman: float
    longer_chosen_rate: float
    longer_rule_ci95: tuple[float, float] = (float("nan"), float("nan"))
    chosen_shorter_pairs: int = 0
    chosen_shorter_accuracy: float = float("nan")
    chosen_shorter_ci95: tuple[float, float] = (float("nan"), float("nan"))
    chosen_longer_pairs: int = 0
    chosen_longer_accuracy: float = float("nan")
    chosen_longer_ci95: tuple[float, float] = (float("nan"), float("nan"))
    length_controlled_accuracy: float = float("nan")
    length_controlled_ci95: tuple[float, float] = (float("nan"), float("nan"))

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        return {key: _json_value(value) for key, value in values.items()}

    def format(self) -> str:
        return (f"pairs {self.n_pairs}  accuracy {self.accuracy:.3f} ({_interval(self.ci95)})  "
                f"mean margin {self.mean_margin:.3f}  ties {self.ties}\n"
                f"chosen shorter: {self.chosen_shorter_accuracy:.3f} ({_interval(self.chosen_shorter_ci95)}, "
                f"{self.chosen_shorter_pairs} pairs)  chosen longer: {self.chosen_longer_accuracy:.3f} "
                f"({_interval(self.chosen_longer_ci95)}, {self.chosen_longer_pairs} pairs)\n"
                f"length-controlled accuracy (mean of the two): {self.length_controlled_accuracy:.3f} "
                f"({_interval(self.length_controlled_ci95)})\n"
                f"rule \"the longer answer wins\": {self.longer_chosen_rate:.3f} ({_interval(self.longer_rule_ci95)}) "
                f"on the same pairs (length-controlled 0.5)\n"
                f"reward vs length (chars): Pearson {self.length_pearson:.3f}, Spearman {self.length_spearman:.3f}")


def _json_value(value: Any) -> Any:
    """NaN becomes None (JSON has no NaN); intervals become lists."""
    if isinstance(value, tuple):
        return [_json_value(item) for item in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _interval(bounds: tuple[float, float]) -> str:
    return f"95% CI {bounds[0]:.3f}-{bounds[1]:.3f}"


def pearson_spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(Pearson, Spearman) correlation; NaN where either side is constant or has fewer than 2 values."""
    x_array, y_array = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x_array) < 2 or np.std(x_array) == 0 or np.std(y_array) == 0:
        return float("nan"), float("nan")
    return float(stats.pearsonr(x_array, y_array).statistic), float(stats.spearmanr(x_array, y_array).statistic)


def _half_wins(better: np.ndarray, worse: np.ndarray) -> np.ndarray:
    """1 where better > worse, 0.5 on a tie, 0 otherwise."""
    return np.where(better > worse, 1.0, np.where(better == worse, 0.5, 0.0))


def _stratum_mean(wins: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``wins`` over the rows where ``mask`` holds, along the last axis (NaN where none do)."""
    counts = mask.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, (wins * mask).sum(axis=-1) / np.maximum(counts, 1), np.nan)


def _percentile_interval(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[~np.isnan(samples)]
    if len(samples) == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


def length_strata(wins: np.ndarray, chosen_longer: np.ndarray, chosen_shorter: np.ndarray) -> tuple[
        np.ndarray, np.ndarray, np.ndarray]:
    """(accuracy where the chosen answer is shorter, where it is longer, their mean), along the last axis."""
    shorter = _stratum_mean(wins, chosen_shorter)
    longer = _stratum_mean(wins, chosen_longer)
    return shorter, longer, (shorter + longer) / 2


def pairwise_report(chosen_scores: Sequence[float], rejected_scores: Sequence[float],
                    chosen_lengths: Sequence[int], rejected_lengths: Sequence[int],
                    n_bootstrap: int = 2000, seed: int = 0) -> PairwiseReport:
    """Accuracy overall and within the two length strata, each with a percentile-bootstrap 95%
    interval (pairs resampled with replacement), the mean margin r(chosen) - r(rejected), the
    reward-length correlations and the accuracy of the rule "the longer answer wins"."""
    chosen_array = np.asarray(chosen_scores, dtype=np.float64)
    rejected_array = np.asarray(rejected_scores, dtype=np.float64)
    if len(chosen_array) == 0 or len(chosen_array) != len(rejected_array):
        raise ValueError("need the same, non-zero number of chosen and rejected scores")
    chosen_len, rejected_len = np.asarray(chosen_lengths), np.asarray(rejected_lengths)
    if len(chosen_len) != len(chosen_array) or len(rejected_len) != len(chosen_array):
        raise ValueError("need one chosen and one rejected length per pair")
    wins = _half_wins(chosen_array, rejected_array)
    rule = _half_wins(chosen_len, rejected_len)
    longer, shorter = chosen_len > rejected_len, chosen_len < rejected_len
    rows = np.random.default_rng(seed).integers(0, len(wins), size=(n_bootstrap, len(wins)))
    shorter_acc, longer_acc, controlled = length_strata(wins, longer, shorter)
    boot_shorter, boot_longer, boot_controlled = length_strata(wins[rows], longer[rows], shorter[rows])
    pearson, spearman = pearson_spearman(np.concatenate([chosen_array, rejected_array]),
                                         np.concatenate([chosen_len, rejected_len]))
    return PairwiseReport(
        n_pairs=len(wins),
        accuracy=float(wins.mean()),
        ci95=_percentile_interval(wins[rows].mean(axis=1)),
        mean_margin=float((chosen_array - rejected_array).mean()),
        ties=int((chosen_array == rejected_array).sum()),
        length_pearson=pearson,
        length_spearman=spearman,
        longer_chosen_rate=float(rule.mean()),
        longer_rule_ci95=_percentile_interval(rule[rows].mean(axis=1)),
        chosen_shorter_pairs=int(shorter.sum()),
        chosen_shorter_accuracy=float(shorter_acc),
        chosen_shorter_ci95=_percentile_interval(boot_shorter),
        chosen_longer_pairs=int(longer.sum()),
        chosen_longer_accuracy=float(longer_acc),
        chosen_longer_ci95=_percentile_interval(boot_longer),
        length_controlled_accuracy=float(controlled),
        length_controlled_ci95=_percentile_interval(boot_controlled),
    )


HHScorer = Callable[[Sequence[str], Sequence[str]], torch.Tensor]


def evaluate_pairs(score_hh: HHScorer, pairs: Sequence[PreferencePair], batch_size: int = 64,
                   n_bootstrap: int = 2000, seed: int = 0) -> PairwiseReport:
    """Score both sides of every pair with ``score_hh(hh_prompts, responses)`` and report."""
    if not pairs:
        raise ValueError("no pairs to evaluate")
    chosen_scores: list[float] = []
    rejected_scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        prompts = [pair.prompt for pair in batch]
        scores = score_hh(prompts + prompts, [p.chosen for p in batch] + [p.rejected for p in batch])
        scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
        chosen_scores += scores[: len(batch)].tolist()
        rejected_scores += scores[len(batch):].tolist()
    return pairwise_report(chosen_scores, rejected_scores, [len(p.chosen) for p in pairs],
                           [len(p.rejected) for p in pairs], n_bootstrap, seed)


def hh_scorer(reward: Any) -> HHScorer:
    """Adapt any reward (``score(prompts, responses)`` on ``firm.prompts.Prompt``) to the HH
    prompt strings that pair files hold. Fitted models take HH text directly."""
    if hasattr(reward, "score_hh"):
        return reward.score_hh

    def score(hh_prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        prompts = [Prompt(messages=hh_to_messages(text), category="eval") for text in hh_prompts]
        return reward.score(prompts, list(responses))

    return score
