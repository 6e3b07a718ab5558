"""What the run plots say: the KL estimator is named on its axis, and lambda is drawn against
the preference p it is pulled toward (one line, or one per client with their own p)."""

from __future__ import annotations

import matplotlib.pyplot as plt

from firm.plots import KL_AXIS_LABEL, client_preferences, lambda_figure, rewards_figure

CLIENTS = [
    {"type": "client", "round": r, "partition-id": pid, "reward/helpful": -1.0 + 0.1 * r, "reward/harmless": 0.5,
     "kl": -0.01 * pid, "response_tokens": 10.0, "lambda_mean": [0.4 + 0.1 * pid, 0.6 - 0.1 * pid]}
    for r in (1, 2) for pid in (0, 1)
]
ROUNDS = [{"type": "round", "round": r} for r in (1, 2)]


def dashed_lines(ax) -> dict[str, float]:
    return {line.get_label(): line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"}


def test_the_kl_axis_names_its_estimator():
    fig = rewards_figure(ROUNDS, CLIENTS, ["helpful", "harmless"])
    kl_axis = next(ax for ax in fig.axes if ax.get_title().startswith("KL"))
    assert "k1" in kl_axis.get_title() and kl_axis.get_ylabel() == KL_AXIS_LABEL and "< 0" in KL_AXIS_LABEL
    plt.close(fig)


def test_lambda_plot_draws_the_shared_preference():
    fig = lambda_figure(CLIENTS, ["helpful", "harmless"], [0.7, 0.3])
    assert dashed_lines(fig.axes[0]) == {"p = 0.7": 0.7}
    plt.close(fig)


def test_lambda_plot_draws_each_clients_own_preference():
    clients = [{**c, "preference": [0.9, 0.1] if c["partition-id"] == 0 else [0.2, 0.8]} for c in CLIENTS]
    assert client_preferences(clients, [0.5, 0.5]) == {0: [0.9, 0.1], 1: [0.2, 0.8]}
    fig = lambda_figure(clients, ["helpful", "harmless"], [0.5, 0.5])
    assert dashed_lines(fig.axes[0]) == {"p client 0 = 0.9": 0.9, "p client 1 = 0.2": 0.2}
    plt.close(fig)
