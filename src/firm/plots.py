"""Plots of a run, read from its metrics.jsonl (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from firm.rundir import RunDir  # noqa: E402


def _by_type(records: list[dict]) -> tuple[list[dict], list[dict]]:
    rounds = sorted((r for r in records if r.get("type") == "round"), key=lambda r: r["round"])
    clients = [r for r in records if r.get("type") == "client"]
    return rounds, clients


def reward_names(records: list[dict]) -> list[str]:
    for r in records:
        if r.get("type") == "round":
            return [k.split("/", 1)[1] for k in r if k.startswith("reward/")]
    return []


def plot_rewards(rounds: list[dict], clients: list[dict], names: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    per_client: dict[int, list[dict]] = defaultdict(list)
    for c in clients:
        per_client[c["partition-id"]].append(c)
    for ax, name in zip(axes[0], names):
        key = f"reward/{name}"
        for pid, recs in sorted(per_client.items()):
            recs = sorted(recs, key=lambda r: r["round"])
            ax.plot([r["round"] for r in recs], [r[key] for r in recs], lw=0.8, alpha=0.45, marker=".",
                    label=f"client {pid}")
        ax.plot([r["round"] for r in rounds], [r[key] for r in rounds], color="black", lw=2.2, marker="o",
                label="mean over clients")
        ax.set_title(f"reward: {name}")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("mean raw reward of sampled responses")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lambdas(clients: list[dict], names: list[str], path: Path) -> None:
    """lambda per client per round; one panel per objective (for two objectives the second
    panel is 1 - the first, so only the first is drawn)."""
    shown = names[:1] if len(names) == 2 else names
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 3.6), squeeze=False)
    per_client: dict[int, list[dict]] = defaultdict(list)
    for c in clients:
        per_client[c["partition-id"]].append(c)
    for m, (ax, name) in enumerate(zip(axes[0], shown)):
        for pid, recs in sorted(per_client.items()):
            recs = sorted(recs, key=lambda r: r["round"])
            ax.plot([r["round"] for r in recs], [r["lambda_mean"][m] for r in recs], marker="o", label=f"client {pid}")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"lambda[{name}] per client (mean over steps)")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_drift(rounds: list[dict], names: list[str], path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = [r["round"] for r in rounds]
    for m, name in enumerate(names):
        ax1.plot(xs, [r["lambda_std"][m] for r in rounds], marker="o", label=f"std of lambda[{name}]")
    ax1.set_title("client disagreement: spread of lambda across clients")
    ax1.set_xlabel("round")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.plot(xs, [r["adapter_distance"] for r in rounds], marker="o", color="tab:red")
    ax2.set_title("mean L2 distance of client adapters from their average")
    ax2.set_xlabel("round")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_run(run: RunDir) -> list[Path]:
    records = run.read_metrics()
    rounds, clients = _by_type(records)
    if not rounds:
        return []
    names = reward_names(records)
    out = run.plots_dir
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "rewards.png", out / "lambda.png", out / "drift.png"]
    plot_rewards(rounds, clients, names, paths[0])
    plot_lambdas(clients, names, paths[1])
    plot_drift(rounds, names, paths[2])
    return paths
