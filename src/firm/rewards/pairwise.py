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
    that only counted characters would reach on these pairs."""

    n_pairs: int
    accuracy: float
    ci95: tuple[float, float]
    mean_margin: float
    ties: int
    length_pearson: float
    length_spearman: float
    longer_chosen_rate: float

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["ci95"] = list(self.ci95)
        return {key: (None if isinstance(value, float) and math.isnan(value) else value)
                for key, value in values.items()}

    def format(self) -> str:
        return (f"pairs {self.n_pairs}  accuracy {self.accuracy:.3f} "
                f"(95% CI {self.ci95[0]:.3f}-{self.ci95[1]:.3f})  mean margin {self.mean_margin:.3f}  "
                f"ties {self.ties}\nreward vs length (chars): Pearson {self.length_pearson:.3f}, "
                f"Spearman {self.length_spearman:.3f}; longer response chosen in "
                f"{self.longer_chosen_rate:.3f} of pairs")


def pearson_spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(Pearson, Spearman) correlation; NaN where either side is constant or has fewer than 2 values."""
    x_array, y_array = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x_array) < 2 or np.std(x_array) == 0 or np.std(y_array) == 0:
        return float("nan"), float("nan")
    return float(stats.pearsonr(x_array, y_array).statistic), float(stats.spearmanr(x_array, y_array).statistic)


def pairwise_report(chosen_scores: Sequence[float], rejected_scores: Sequence[float],
                    chosen_lengths: Sequence[int], rejected_lengths: Sequence[int],
                    n_bootstrap: int = 2000, seed: int = 0) -> PairwiseReport:
    """Accuracy with a percentile-bootstrap 95% interval (pairs resampled with replacement),
    the mean margin r(chosen) - r(rejected), and the reward-length correlations."""
    chosen_array = np.asarray(chosen_scores, dtype=np.float64)
    rejected_array = np.asarray(rejected_scores, dtype=np.float64)
    if len(chosen_array) == 0 or len(chosen_array) != len(rejected_array):
        raise ValueError("need the same, non-zero number of chosen and rejected scores")
    wins = np.where(chosen_array > rejected_array, 1.0, np.where(chosen_array == rejected_array, 0.5, 0.0))
    rng = np.random.default_rng(seed)
    resampled = wins[rng.integers(0, len(wins), size=(n_bootstrap, len(wins)))].mean(axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    lengths = np.concatenate([np.asarray(chosen_lengths), np.asarray(rejected_lengths)])
    pearson, spearman = pearson_spearman(np.concatenate([chosen_array, rejected_array]), lengths)
    chosen_len, rejected_len = np.asarray(chosen_lengths), np.asarray(rejected_lengths)
    longer_chosen = np.where(chosen_len > rejected_len, 1.0, np.where(chosen_len == rejected_len, 0.5, 0.0))
    return PairwiseReport(
        n_pairs=len(wins),
        accuracy=float(wins.mean()),
        ci95=(float(low), float(high)),
        mean_margin=float((chosen_array - rejected_array).mean()),
        ties=int((chosen_array == rejected_array).sum()),
        length_pearson=pearson,
        length_spearman=spearman,
        longer_chosen_rate=float(longer_chosen.mean()),
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
