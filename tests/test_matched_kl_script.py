"""The pure functions of studies/matched_kl.py (the study itself scores real adapters)."""

import importlib.util
from pathlib import Path

import pytest

from firm.config import ConfigError

STUDIES = Path(__file__).resolve().parents[1] / "studies"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("matched_kl", STUDIES / "matched_kl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluation(kl, rewards, round_number, pairing=None):
    """Two prompts x two samples, two objectives."""
    return {"kl": kl, "round": round_number, "rewards": {"helpful": 0.0, "harmless": 0.0},
            "pairing": pairing or {"seed": 1234, "prompts": "p"},
            "per_response": {"prompt_index": [0, 0, 1, 1], "rewards": rewards}}


def test_first_crossing_is_the_first_segment_that_reaches_the_target(study):
    # the KL goes up, back below the target, and up again: the first crossing counts
    assert study.first_crossing([0.0, 2.0, 4.0, 3.0, 6.0], 3.0) == (1, 0.5)
    assert study.first_crossing([0.0, 2.0, 4.0], 4.0) == (1, 1.0)
    assert study.first_crossing([0.0, 2.0, 4.0], 4.5) is None


def test_at_kl_interpolates_every_response_between_the_two_rounds(study):
    base = evaluation(0.0, [[0, 0]] * 4, 0)
    r8 = evaluation(2.0, [[1, 2], [1, 2], [3, 4], [3, 4]], 8)
    r10 = evaluation(6.0, [[5, 6], [5, 6], [7, 8], [7, 8]], 10)
    mixed = study.at_kl([base, r8, r10], 3.0)  # a quarter of the way from round 8 to round 10
    assert mixed["per_response"]["rewards"] == [[2, 3], [2, 3], [4, 5], [4, 5]]
    assert mixed["rewards"] == {"helpful": 3.0, "harmless": 4.0}
    assert mixed["kl"] == 3.0 and mixed["interpolated_between"] == [8, 10]
    assert r10["per_response"]["rewards"][0] == [5, 6]  # the inputs are untouched
    assert study.at_kl([base, r8, r10], 7.0) is None


def test_at_kl_refuses_evaluations_that_are_not_paired(study):
    base = evaluation(0.0, [[0, 0]] * 4, 0)
    other = evaluation(2.0, [[1, 1]] * 4, 8, pairing={"seed": 99, "prompts": "p"})
    with pytest.raises(ConfigError, match="not paired"):
        study.at_kl([base, other], 1.0)


def test_paired_difference_averages_per_prompt(study):
    a = evaluation(3.0, [[1, 0], [3, 0], [2, 0], [2, 0]], 10)
    b = evaluation(3.0, [[0, 0], [0, 0], [0, 0], [0, 0]], 10)
    mean, low, high = study.paired_difference(a, b, objective=0)
    assert mean == 2.0 and low == 2.0 and high == 2.0


def test_seed_level_comparisons_pair_the_runs_by_seed(study):
    def at(rewards):
        return {"rewards": {"helpful": rewards[0], "harmless": rewards[1]}}
    # the reference is 0.09-0.1 above on helpful on every one of 6 seeds, and within 0.001 on harmless
    reference = {s: at((0.3 + 0.01 * s, 0.5)) for s in range(6)}
    other = {s: at((0.2 + 0.012 * s, 0.5 + (0.001 if s % 2 else -0.001))) for s in range(6)}
    other[6] = at((9.0, 9.0))  # a seed the reference did not reach: not paired, not used
    results = study.seed_level_comparisons({"firm": reference, "mgda": other, "alone": {0: at((0, 0))}},
                                           "firm", ["helpful", "harmless"])
    assert [(c.b, c.metric) for c, _ in results] == [("mgda", "final_reward/helpful"),
                                                     ("mgda", "final_reward/harmless")]
    (helpful, helpful_diffs), (harmless, _) = results
    assert helpful.n == 6 and helpful.mean_diff == pytest.approx(0.095)
    assert helpful_diffs == pytest.approx([0.1 - 0.002 * s for s in range(6)])
    assert helpful.margin == 0.02 and helpful.exploratory
    assert helpful.p == pytest.approx(2 / 2 ** 6) and helpful.verdict == "confirmed"
    assert harmless.mean_diff == pytest.approx(0.0) and harmless.verdict == "equivalent"
    assert study.seed_level_comparisons({"firm": reference}, "firm", ["helpful"]) == []
