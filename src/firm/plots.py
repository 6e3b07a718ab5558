"""Plots of a run, read from its metrics.jsonl, and of an experiment (`firm compare`,
`firm pareto`), from its runs' summaries (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from firm.rundir import RunDir  # noqa: E402

if TYPE_CHECKING:
    from firm.experiments.metrics import RunResult


def save_figure(fig, path: Path, dpi: int) -> Path:
    """Lay the figure out, write it to ``path`` as PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _by_type(records: list[dict]) -> tuple[list[dict], list[dict]]:
    rounds = sorted((r for r in records if r.get("type") == "round"), key=lambda r: r["round"])
    clients = [r for r in records if r.get("type") == "client"]
    return rounds, clients


def reward_names(records: list[dict]) -> list[str]:
    for r in records:
        if r.get("type") == "round":
            return [k.split("/", 1)[1] for k in r if k.startswith("reward/")]
    return []


# The run's kl metric is the k1 estimate: the sum over response tokens of log pi - log pi_ref at
# the sampled tokens. Unbiased for KL(pi || pi_ref) >= 0, but a single batch's value can be < 0.
KL_TITLE = "KL to the reference (k1 estimate)"
KL_AXIS_LABEL = "nats per response: sum of log p - log p_ref\n(k1, unbiased; one batch can be < 0)"


def rewards_figure(rounds: list[dict], clients: list[dict], names: list[str]):
    """One panel per objective's reward, then the KL to the reference and the response length
    beside them (a reward that rises with the length or the KL says what it bought)."""
    panels = [(f"reward/{n}", f"reward: {n}", "mean raw reward of sampled responses") for n in names]
    panels += [("kl", KL_TITLE, KL_AXIS_LABEL), ("response_tokens", "response length", "tokens")]
    panels = [panel for panel in panels if any(panel[0] in c for c in clients)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
    per_client: dict[int, list[dict]] = defaultdict(list)
    for c in clients:
        per_client[c["partition-id"]].append(c)
    for ax, (key, title, ylabel) in zip(axes[0], panels):
        for pid, recs in sorted(per_client.items()):
            recs = sorted((r for r in recs if key in r), key=lambda r: r["round"])
            ax.plot([r["round"] for r in recs], [r[key] for r in recs], lw=0.8, alpha=0.45, marker=".",
                    label=f"client {pid}")
        means = [(r["round"], np.mean([c[key] for c in clients if c["round"] == r["round"] and key in c]))
                 for r in rounds if any(c["round"] == r["round"] and key in c for c in clients)]
        ax.plot([x for x, _ in means], [y for _, y in means], color="black", lw=2.2, marker="o",
                label="mean over clients")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel, fontsize=8 if key == "kl" else None)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    return fig


def plot_rewards(rounds: list[dict], clients: list[dict], names: list[str], path: Path) -> None:
    save_figure(rewards_figure(rounds, clients, names), path, dpi=110)


def client_preferences(clients: list[dict], server_preference: Sequence[float]) -> dict[int, list[float]]:
    """The preference p each client solved its weights toward: its own (a node-config
    preference, recorded in its records) or else the server's."""
    out: dict[int, list[float]] = {}
    for c in sorted(clients, key=lambda r: r["round"]):
        out[c["partition-id"]] = list(c.get("preference") or server_preference)
    return out


def lambda_figure(clients: list[dict], names: list[str], server_preference: Sequence[float]):
    """lambda per client per round, one panel per objective (for two objectives the second
    panel is 1 - the first, so only the first is drawn), with the preference p it is pulled
    toward as a dashed line: one for the federation, or one per client when clients state their own."""
    shown = names[:1] if len(names) == 2 else names
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 3.6), squeeze=False)
    per_client: dict[int, list[dict]] = defaultdict(list)
    for c in clients:
        per_client[c["partition-id"]].append(c)
    preferences = client_preferences(clients, server_preference)
    shared = len({tuple(p) for p in preferences.values()}) <= 1
    for m, (ax, name) in enumerate(zip(axes[0], shown)):
        for pid, recs in sorted(per_client.items()):
            recs = sorted(recs, key=lambda r: r["round"])
            (line,) = ax.plot([r["round"] for r in recs], [r["lambda_mean"][m] for r in recs], marker="o",
                              label=f"client {pid}")
            if not shared:
                ax.axhline(preferences[pid][m], color=line.get_color(), ls="--", lw=1,
                           label=f"p client {pid} = {preferences[pid][m]:g}")
        if shared:
            p = next(iter(preferences.values()), list(server_preference))[m]
            ax.axhline(p, color="black", ls="--", lw=1, label=f"p = {p:g}")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"lambda[{name}] per client (mean over steps)")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return fig


def plot_lambdas(clients: list[dict], names: list[str], path: Path, server_preference: Sequence[float]) -> None:
    save_figure(lambda_figure(clients, names, server_preference), path, dpi=110)


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
    save_figure(fig, path, dpi=110)


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
    plot_lambdas(clients, names, paths[1], run.config().preference_vector())
    plot_drift(rounds, names, paths[2])
    return paths


def plot_heldout(gains: dict[str, dict[str, float]], num_prompts: int, samples: int, path: Path) -> Path:
    """Held-out reward per objective, untrained policy beside the final adapter, with the paired
    gain and its 95% interval written above each pair (firm.heldout)."""
    names = list(gains)
    fig, ax = plt.subplots(figsize=(1.8 + 1.8 * len(names), 3.6))
    xs = np.arange(len(names))
    ax.bar(xs - 0.18, [gains[n]["base"] for n in names], width=0.36, label="untrained policy", color="tab:gray")
    ax.bar(xs + 0.18, [gains[n]["adapter"] for n in names], width=0.36, label="final adapter", color="tab:blue")
    top = max(max(gains[n]["base"], gains[n]["adapter"]) for n in names)
    for x, n in zip(xs, names):
        g = gains[n]
        ax.annotate(f"{g['gain']:+.3f}\n[{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]", (x, top), ha="center",
                    va="bottom", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(xs, names)
    ax.set_ylabel("mean reward (held-out)")
    ax.set_title(f"held-out: {num_prompts} prompts x {samples} samples, paired gain [95% CI]", fontsize=9)
    ax.margins(y=0.35)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path, dpi=110)


# ---- experiments ----------------------------------------------------------------------------
def mean_std_curves(curves: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    array = np.asarray(curves, dtype=np.float64)
    return array.mean(0), (array.std(0, ddof=1) if len(array) > 1 else np.zeros(array.shape[1]))


def plot_band(ax, xs, curves, label: str) -> None:
    mean, std = mean_std_curves(curves)
    (line,) = ax.plot(xs, mean, marker="o", ms=3, label=f"{label} (n={len(curves)})")
    if len(curves) > 1:
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def plot_compare(results: Sequence[RunResult], partitions: Sequence[str], groups: Sequence[str],
                 out: Path) -> list[Path]:
    """rewards_<objective>.png (one panel per partition, one curve per algorithm, mean +- std
    over seeds) and drift.png (spread of lambda and adapter distance per round)."""
    names = results[0].summary["objectives"]
    paths = []
    panels = [(f"reward/{n}", f"rewards_{safe_name(n)}.png", f"final-round mean reward: {n}") for n in names]
    for key, filename, title in panels:
        fig, axes = plt.subplots(1, len(partitions), figsize=(5 * len(partitions), 3.6), squeeze=False)
        for ax, partition in zip(axes[0], partitions):
            for group in groups:
                runs = [r for r in results if r.run.group == group and r.run.partition == partition]
                if runs:
                    plot_band(ax, runs[0].summary["rounds"], [r.summary["reward_curve"][key.split("/", 1)[1]]
                                                                for r in runs], group)
            ax.set_title(f"{key.split('/', 1)[1]} ({partition})")
            ax.set_xlabel("round")
            ax.set_ylabel("mean reward of sampled responses")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{title}; band = ± std over seeds", fontsize=9)
        paths.append(save_figure(fig, out / filename, dpi=90))

    fig, axes = plt.subplots(2, len(partitions), figsize=(5 * len(partitions), 6.4), squeeze=False)
    for column, partition in enumerate(partitions):
        for row, (key, ylabel) in enumerate((("drift_curve", "std of lambda across clients"),
                                             ("adapter_distance_curve", "adapter distance from mean"))):
            ax = axes[row][column]
            for group in groups:
                runs = [r for r in results if r.run.group == group and r.run.partition == partition
                        and r.summary[key] is not None]
                if runs:
                    plot_band(ax, runs[0].summary["rounds"], [r.summary[key] for r in runs], group)
            ax.set_title(f"{ylabel} ({partition})", fontsize=9)
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("client disagreement drift per round; band = ± std over seeds", fontsize=9)
    paths.append(save_figure(fig, out / "drift.png", dpi=90))
    return paths


def plot_pareto(points: dict[str, list[dict[str, Any]]], names: Sequence[str], out: Path) -> list[Path]:
    """front.png: final (reward 1, reward 2) per preference, error bars = std over seeds;
    knob.png: lambda_1 actually used (mean over rounds) against the preference p_1.

    ``points`` holds, per group, one row per preference: "preference", "label" (written next to
    the point), "reward" (a Stat per objective) and "lambda_1" (a Stat)."""
    fig, ax = plt.subplots(figsize=(6, 4.6))
    for group, rows in points.items():
        xs = [r["reward"][0].mean for r in rows]
        ys = [r["reward"][1].mean for r in rows]
        xerr = [r["reward"][0].std or 0.0 for r in rows]
        yerr = [r["reward"][1].std or 0.0 for r in rows]
        container = ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", ms=4, capsize=2, lw=1, label=group)
        for row, x, y in zip(rows, xs, ys):
            ax.annotate(row["label"], (x, y), fontsize=6, xytext=(3, 3),
                        textcoords="offset points", color=container[0].get_color())
    ax.set_xlabel(f"final reward: {names[0]}")
    ax.set_ylabel(f"final reward: {names[1]}")
    ax.set_title("final rewards per preference (error bars: ± std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths = [save_figure(fig, out / "front.png", dpi=90)]

    fig, ax = plt.subplots(figsize=(5, 4))
    for group, rows in points.items():
        rows = [r for r in rows if r["lambda_1"].mean is not None]
        if rows:
            ax.errorbar([r["preference"][0] for r in rows], [r["lambda_1"].mean for r in rows],
                        yerr=[r["lambda_1"].std or 0.0 for r in rows], marker="o", ms=4, capsize=2, label=group)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="lambda = p")
    ax.set_xlabel(f"preference p[{names[0]}]")
    ax.set_ylabel(f"lambda[{names[0]}], mean over rounds and clients")
    ax.set_title("does the preference move the weights?", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, out / "knob.png", dpi=90))
    return paths
