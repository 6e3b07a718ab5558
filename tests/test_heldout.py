"""The held-out before/after comparison (firm.heldout): paired gains with a prompt-level
bootstrap interval, refusal of evaluations that are not paired."""

from __future__ import annotations

import numpy as np
import pytest

from firm.config import ConfigError
from firm.heldout import format_gains, gain_excludes_zero, paired_gain, prompt_means


def evaluation(rewards: np.ndarray, samples: int, **pairing) -> dict:
    n = rewards.shape[0]
    return {"rewards": {"helpful": float(rewards[:, 0].mean()), "harmless": float(rewards[:, 1].mean())},
            "pairing": {"seed": 1234, "num_prompts": n // samples, "samples_per_prompt": samples, **pairing},
            "per_response": {"prompt_index": [i // samples for i in range(n)], "rewards": rewards.tolist(),
                             "kl": [0.0] * n}}


def test_prompt_means_average_each_prompts_samples():
    assert prompt_means([1, 3, 10, 20, 5, 7], [0, 0, 1, 1, 2, 2]).tolist() == [2, 15, 6]


def test_gain_is_the_mean_paired_difference_and_its_interval_resamples_prompts():
    rng = np.random.default_rng(0)
    prompt_effect = rng.normal(0, 1, size=(40, 1, 2)).repeat(3, axis=1).reshape(120, 2)  # shared by both
    base = prompt_effect + rng.normal(0, 0.1, size=(120, 2))
    tuned = base + np.array([0.5, 0.0]) + rng.normal(0, 0.1, size=(120, 2))
    gains = paired_gain(evaluation(base, 3), evaluation(tuned, 3))
    # independent reference: the mean over responses of tuned - base (equal samples per prompt)
    expected = (tuned - base).mean(axis=0)
    assert gains["helpful"]["gain"] == pytest.approx(expected[0])
    assert gains["harmless"]["gain"] == pytest.approx(expected[1])
    assert gains["helpful"]["pairs"] == 120 and gains["helpful"]["prompts"] == 40
    # a real gain of 0.5 with per-prompt noise ~0.08: the interval excludes 0; none for harmless
    assert gain_excludes_zero(gains["helpful"]) and gains["helpful"]["ci_low"] > 0.4
    assert not gain_excludes_zero(gains["harmless"])
    # pairing removes the prompt effect: unpaired, the 0.5 would drown in the prompts' spread of 1
    assert gains["helpful"]["ci_high"] - gains["helpful"]["ci_low"] < 0.1
    assert "helpful" in format_gains(gains) and "->" in format_gains(gains)


def test_evaluations_that_are_not_paired_are_refused():
    rewards = np.zeros((6, 2))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        paired_gain(evaluation(rewards, 2, max_new_tokens=32), evaluation(rewards, 2, max_new_tokens=16))
    shuffled = evaluation(rewards, 2)
    shuffled["per_response"]["prompt_index"] = [1, 1, 0, 0, 2, 2]
    with pytest.raises(ConfigError, match="order"):
        paired_gain(evaluation(rewards, 2), shuffled)
    old = evaluation(rewards, 2)
    del old["per_response"]
    with pytest.raises(ConfigError, match="per-response"):
        paired_gain(old, evaluation(rewards, 2))
