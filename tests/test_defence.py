"""The defence against slow poisoning (firm.federation.defence) and robust aggregation sized by
the replies that arrived. The 20-round attacks run through the real strategy with
studies/poisoning_drift.py, the script that gives the numbers in docs/deployment.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from firm.federation.defence import (MIN_REPLIES, ContributionLedger, LedgerError, ledger_file, load_ledger,
                                     save_ledger, trim_count, trimmed_mean)

STUDIES = Path(__file__).resolve().parents[1] / "studies"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("poisoning_drift", STUDIES / "poisoning_drift.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the 20-round same-direction attacker, just inside the update bound -------------------------------
@pytest.mark.parametrize("aggregator", ["fedavg", "median", "trimmed-mean"])
@pytest.mark.parametrize("attackers", [1, 2])
def test_a_same_direction_attacker_moves_the_global_adapter_less_than_one_bound_in_20_rounds(study, aggregator,
                                                                                              attackers):
    drift = study.simulate(aggregator, num_clients=6, attackers=attackers, silent=0, rounds=20)
    assert drift < 1.0, f"{attackers} of 6 attackers moved the global adapter {drift:.2f} x the bound"


def test_one_silent_honest_node_does_not_open_the_door(study):
    for aggregator in ("median", "trimmed-mean"):
        assert study.simulate(aggregator, num_clients=6, attackers=1, silent=1, rounds=20) < 1.0


def test_without_the_defence_the_same_attacks_steer_the_run(study):
    """The measurement can fail: with contribution_budget = 0 the attacks of the test above win."""
    off = {"contribution_budget": 0}
    assert study.simulate("fedavg", 6, 1, 0, 20, settings=off) > 3.0  # 0.999 / 6 per round, 20 rounds
    assert study.simulate("trimmed-mean", 6, 2, 0, 20, settings=off) > 3.0
    assert study.simulate("median", 6, 2, 0, 20, settings=off) > 1.0


def test_honest_clients_alone_are_never_left_out_and_nothing_drifts(study):
    ledger = ContributionLedger(2.0)
    rng = np.random.default_rng(3)
    for _ in range(30):
        common = rng.normal(size=2000)
        updates = [0.3 * (common + rng.normal(size=2000)) / np.sqrt(4000) for _ in range(6)]
        assert all(limit.kept for limit in ledger.limit(list(range(6)), updates))
    assert abs(study.simulate("fedavg", 6, 0, 0, 20)) < 0.05


# ---- the ledger -------------------------------------------------------------------------------------
def test_a_node_that_keeps_pushing_one_way_is_left_out_once_its_budget_is_used():
    ledger = ContributionLedger(2.0)
    rng = np.random.default_rng(0)
    push = np.zeros(1000)
    push[0] = 1.0
    kept_rounds = []
    for r in range(1, 21):
        updates = [0.1 * rng.normal(size=1000) / np.sqrt(1000) for _ in range(5)] + [push]
        limits = ledger.limit([1, 2, 3, 4, 5, 99], updates)
        assert all(limit.kept for limit in limits[:5])
        if limits[5].kept:
            kept_rounds.append(r)
        assert limits[5].cumulative <= limits[5].budget + 1e-9
    # its deviation (about 1) fits only once the budget 2 x 0.14 x sqrt(r) has grown past it, and
    # again when it has grown by another 1
    assert kept_rounds and kept_rounds[0] > 1 and len(kept_rounds) <= 2
    assert ledger.accounts[99].deviation[0] == pytest.approx(len(kept_rounds), rel=0.05)


def test_the_defence_is_off_with_too_few_replies_or_factor_zero():
    updates = [np.ones(4), np.zeros(4), -np.ones(4)]
    assert ContributionLedger(0.0).limit([1, 2, 3], updates) == []
    assert ContributionLedger(2.0).limit([1, 2], updates[:MIN_REPLIES - 1]) == []


def test_the_ledger_survives_the_run_directory_exactly(tmp_path):
    ledger = ContributionLedger(2.0)
    rng = np.random.default_rng(1)
    for r in range(1, 5):
        ledger.limit([7, 8, 9, 10], [rng.normal(size=50) for _ in range(4)])
        save_ledger(tmp_path, r, ledger)
    # the last two are kept: a round redone after a crash starts from the one before it
    assert sorted(p.name for p in (tmp_path / "server").iterdir()) == ["ledger-round-003.safetensors",
                                                                       "ledger-round-004.safetensors"]
    loaded = load_ledger(tmp_path, 4, 2.0)
    assert set(loaded.accounts) == {7, 8, 9, 10}
    for node, account in ledger.accounts.items():
        np.testing.assert_array_equal(loaded.accounts[node].deviation, account.deviation)
        assert loaded.accounts[node].scale_sq == account.scale_sq
    # the same next round, decision for decision, from memory and from disk
    updates = [rng.normal(size=50) for _ in range(4)]
    assert ledger.limit([7, 8, 9, 10], updates) == loaded.limit([7, 8, 9, 10], updates)
    assert load_ledger(tmp_path, 0, 2.0).accounts == {}


def test_an_unreadable_ledger_names_its_file(tmp_path):
    path = ledger_file(tmp_path, 2)
    path.parent.mkdir()
    path.write_bytes(b"not safetensors")
    with pytest.raises(LedgerError, match="ledger-round-002.safetensors: the contribution ledger cannot be read"):
        load_ledger(tmp_path, 2, 2.0)


# ---- trimmed mean sized by the replies that arrived -----------------------------------------------------
@pytest.mark.parametrize("replies, fraction, cut", [(3, 0.25, 1), (4, 0.25, 1), (5, 0.25, 1), (8, 0.25, 2),
                                                     (3, 0.1, 1), (10, 0.45, 4), (4, 0.45, 1)])
def test_trimmed_mean_cuts_at_least_one_reply_at_each_end(replies, fraction, cut):
    assert trim_count(replies, fraction) == cut
    values = np.arange(replies, dtype=np.float64)[:, None] ** 2
    np.testing.assert_allclose(trimmed_mean(values, fraction), np.sort(values, axis=0)[cut:replies - cut].mean(0))


def test_a_trimmed_mean_of_three_replies_is_their_median_not_their_mean():
    values = np.array([[0.0], [1.0], [100.0]])
    assert trimmed_mean(values, 0.25)[0] == 1.0  # before: int(0.25 x 3) = 0 cut, the mean 33.7
