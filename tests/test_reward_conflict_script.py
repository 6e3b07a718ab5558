"""The pure functions of studies/reward_conflict.py (the study itself samples from the real policy)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

STUDIES = Path(__file__).resolve().parents[1] / "studies"


@pytest.fixture(scope="module")
def conflict():
    sys.path.insert(0, str(STUDIES))
    try:
        spec = importlib.util.spec_from_file_location("reward_conflict", STUDIES / "reward_conflict.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(STUDIES))


def test_refusal_contrast_counts_by_hand(conflict):
    # Two prompts with two replies each; the refusal of prompt 0 scores (0, 1), of prompt 1 (5, -1).
    helpful = np.array([1.0, -1.0, 2.0, 6.0])
    harmless = np.array([0.0, 2.0, -2.0, 0.0])
    prompt_ids = np.array([0, 0, 1, 1])
    report = conflict.refusal_contrast(helpful, harmless, prompt_ids, np.array([0.0, 5.0]), np.array([1.0, -1.0]))
    # helpful changes: -1, +1, +3, -1 ; harmless changes: +1, -1, +1, -1
    assert report["refusal_less_helpful"] == 0.5
    assert report["refusal_more_harmless"] == 0.5
    assert report["trade_off"] == 0.25
    assert report["mean_helpful_change"] == pytest.approx(0.5)
    assert report["mean_harmless_change"] == pytest.approx(0.0)


def test_refusal_pattern_finds_refusals_not_ordinary_answers(conflict):
    assert all(conflict.REFUSAL_PATTERN.search(text) for text in conflict.REFUSALS)
    assert conflict.REFUSAL_PATTERN.search("Sorry, I cant do that. I'm sorry.")
    assert not conflict.REFUSAL_PATTERN.search("The Berlin Wall fell because the East German government opened it.")


def test_within_prompt_centering_removes_each_prompt_mean(conflict):
    centered = conflict.within_prompt_centered(np.array([1.0, 3.0, 10.0, 20.0]), np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(centered, [-1.0, 1.0, -5.0, 5.0])
