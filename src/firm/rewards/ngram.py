"""An "ngram" head: a linear Bradley-Terry reward on hashed word n-grams of the response.

No neural trunk: the response is cut into words and punctuation, its 1- and 2-grams are hashed
into ``ngram_features`` buckets (scikit-learn's HashingVectorizer, so there is no vocabulary to
store), counts become log(1 + count) and the vector is scaled to unit length (so it does not
grow with the response). The head is one weight per bucket, fitted like the probe head
(firm.rewards.probe_fit: L2 by cross-validation over prompts, optionally beside a length
covariate that is dropped at scoring). Scoring a batch costs milliseconds, and the unit-length
vector carries no length of its own: what the head rewards is which words, not how many.

It reads the response only, not the prompt; it rewards the wording and the form of good
answers, and like every bag of words it can be gamed by a policy that learns to stuff them in.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from firm.hh import as_hh_prompt
from firm.rewards.card import model_card
from firm.rewards.descriptor import NGRAM_HEAD_FILE, new_descriptor, read_descriptor, write_descriptor
from firm.rewards.errors import RewardModelError
from firm.rewards.fit_config import FitConfig
from firm.rewards.pairs import PreferencePair
from firm.rewards.probe_fit import fit_linear_head

TOKEN_PATTERN = r"(?u)\b\w+\b|[^\w\s]"


def ngram_features(texts: Sequence[str], n_features: int, ngram_max: int):
    """[N, n_features] sparse rows: log(1 + count) of each hashed 1..ngram_max-gram, unit length."""
    from sklearn.feature_extraction.text import HashingVectorizer  # deferred: seconds to import
    from sklearn.preprocessing import normalize

    vectorizer = HashingVectorizer(ngram_range=(1, ngram_max), n_features=n_features, alternate_sign=False,
                                   norm=None, lowercase=True, token_pattern=TOKEN_PATTERN)
    counts = vectorizer.transform(list(texts)).astype(np.float64)
    counts.data = np.log1p(counts.data)
    return normalize(counts)


class NgramRewardModel:
    """The fitted "ngram" reward; same surface as FittedRewardModel (score, score_hh, save, load)."""

    def __init__(self, weights: np.ndarray, descriptor: dict[str, Any]):
        self.weights = np.asarray(weights, dtype=np.float64)
        self.descriptor = descriptor
        self.name: str = descriptor["objective"]
        fit = descriptor["fit_config"]
        self.n_features, self.ngram_max = int(fit["ngram_features"]), int(fit["ngram_max"])
        if self.weights.shape != (self.n_features,):
            raise RewardModelError(f"ngram head: expected {self.n_features} weights, got {self.weights.shape}")

    def __repr__(self) -> str:
        return f"NgramRewardModel(name={self.name!r}, buckets={self.n_features})"

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> torch.Tensor:
        """Rewards [B] (float32, CPU); the prompts are only checked for count."""
        hh_prompts = [prompt.hh_text() if hasattr(prompt, "hh_text") else as_hh_prompt(prompt) for prompt in prompts]
        return self.score_hh(hh_prompts, responses)

    def score_hh(self, hh_prompts: Sequence[str], responses: Sequence[str], batch_size: int = 0) -> torch.Tensor:
        if len(hh_prompts) != len(responses):
            raise ValueError(f"{len(hh_prompts)} prompts but {len(responses)} responses")
        scores = ngram_features(responses, self.n_features, self.ngram_max) @ self.weights
        return torch.as_tensor(np.asarray(scores), dtype=torch.float32).reshape(-1)

    def save(self, directory: str | Path) -> Path:
        """Write the non-zero weights, ``firm_reward.json`` and README.md."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        nonzero = np.flatnonzero(self.weights)
        save_file({"index": torch.from_numpy(nonzero.astype(np.int32)),
                   "weight": torch.from_numpy(self.weights[nonzero].astype(np.float32))}, directory / NGRAM_HEAD_FILE)
        write_descriptor(directory, self.descriptor)
        (directory / "README.md").write_text(model_card(self.descriptor))
        return directory

    @classmethod
    def load(cls, path: str | Path) -> "NgramRewardModel":
        from safetensors.torch import load_file

        directory = Path(path)
        descriptor = read_descriptor(directory)
        file = directory / NGRAM_HEAD_FILE
        if not file.is_file():
            raise RewardModelError(f"{directory}: ngram reward model without its {NGRAM_HEAD_FILE}")
        stored = load_file(file)
        if set(stored) != {"index", "weight"} or stored["index"].shape != stored["weight"].shape:
            raise RewardModelError(f"{file}: expected 'index' and 'weight' of one length")
        n_features = int(descriptor["fit_config"]["ngram_features"])
        index = stored["index"].numpy()
        if len(index) and (index.min() < 0 or index.max() >= n_features):
            raise RewardModelError(f"{file}: bucket index outside 0..{n_features - 1}")
        weights = np.zeros(n_features)
        weights[index] = stored["weight"].double().numpy()
        return cls(weights, descriptor)


def fit_ngram(train_pairs: Sequence[PreferencePair], config: FitConfig,
              log: Callable[[str], None] = print) -> tuple[NgramRewardModel, dict[str, Any]]:
    """Fit the n-gram head on ``train_pairs``: L2 from ``config.probe_l2`` by 5-fold
    cross-validated ``config.select_by`` over prompts, length covariate per config."""
    started = time.perf_counter()
    chosen = ngram_features([p.chosen for p in train_pairs], config.ngram_features, config.ngram_max)
    rejected = ngram_features([p.rejected for p in train_pairs], config.ngram_features, config.ngram_max)
    differences = (chosen - rejected).tocsr()
    weights, fit_stats = fit_linear_head(differences, train_pairs, config, "ngram", log)
    stats: dict[str, Any] = {
        "train_seconds": round(time.perf_counter() - started, 1),
        "features": f"hashed 1-{config.ngram_max} word/punctuation grams of the response, log(1 + count), unit length",
        "nonzero_weights": int(np.count_nonzero(weights)),
        **fit_stats,
    }
    descriptor = new_descriptor(config, config.input_format(), stats,
                                f"{NGRAM_HEAD_FILE}: weight of each hashed n-gram bucket (non-zero ones: index, weight)")
    return NgramRewardModel(weights, descriptor), stats
