"""The outputs of `firm synthetic`: results.json, table.md, summary.md (grid) and the plots."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from firm.synthetic.grid import CLAIMS  # noqa: E402

PLOT_REGIMES = ("base", "unequal norms", "skewed clients", "paper")
"""The grid's regimes that get plots (four sets of PNGs keep the committed outputs under 3 MB)."""
COLOURS = {"firm b=0.01": "tab:blue", "firm b=0.1": "tab:cyan", "firm b=1": "tab:purple", "mgda": "tab:red",
           "linear": "tab:green", "fsmgda": "tab:orange"}


def _number(value: float) -> str:
    return "nan" if not np.isfinite(value) else f"{value:.3g}"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def result_json(result: dict) -> dict:
    """The JSON-able part of run_configuration's result (per-seed metrics and comparisons)."""
    metrics = {label: {k: [float(v) for v in values] for k, values in m.items() if not k.startswith("_")}
               for label, m in result["metrics"].items()}
    tables = {claim: [c.to_dict() for c in rows] for claim, rows in result["tables"].items()}
    keys = ("config", "seeds", "preference", "sweep", "wall_seconds")
    return {**{k: result[k] for k in keys}, "metrics": metrics, "comparisons": tables}


def table_markdown(result: dict, title: str) -> str:
    lines = [f"## {title}", ""]
    for claim, rows in result["tables"].items():
        lines += [f"### Claim {claim}", "",
                  "| metric | firm | baseline | firm mean | baseline mean | firm - baseline | 95% CI | Holm p "
                  "| TOST p | verdict |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in rows:
            lines.append(f"| {c.metric} ({c.better} is better) | {c.a} | {c.b} | {_number(c.mean_a)} | "
                         f"{_number(c.mean_b)} | {_number(c.mean_diff)} | [{_number(c.ci_low)}, "
                         f"{_number(c.ci_high)}] | {c.p_holm:.2g} | {c.p_equivalence:.2g} | {c.verdict} |")
        lines.append("")
    return "\n".join(lines)


def summary_markdown(regimes: list[tuple[str, str, dict]]) -> str:
    """Per metric: one row per regime, one column per (firm beta, baseline) comparison."""
    lines = []
    for claim, entries in CLAIMS.items():
        lines += [f"### Claim {claim}", ""]
        for metric, better, _ in entries:
            columns: list[tuple[str, str]] = []
            for _, _, result in regimes:
                for c in result["tables"].get(claim, []):
                    if c.metric == metric and (c.a, c.b) not in columns:
                        columns.append((c.a, c.b))
            if not columns:
                continue
            lines += [f"`{metric}` ({better} is better): firm - baseline, 95% CI, verdict", "",
                      "| regime | " + " | ".join(f"{a} - {b}" for a, b in columns) + " |",
                      "| --- |" + " --- |" * len(columns)]
            for name, _, result in regimes:
                cells = {(c.a, c.b): c for c in result["tables"].get(claim, []) if c.metric == metric}
                row = []
                for key in columns:
                    c = cells.get(key)
                    row.append("-" if c is None else
                               f"{_number(c.mean_diff)} [{_number(c.ci_low)}, {_number(c.ci_high)}] **{c.verdict}**")
                lines.append(f"| {name} | " + " | ".join(row) + " |")
            lines.append("")
    return "\n".join(lines)


# --- plots ---------------------------------------------------------------------------------------
def plot_lambdas(result: dict, path: Path, seed_index: int = 0, clients: int = 5) -> None:
    runs = [r for r in result["runs"].values() if np.all(np.isfinite(r.client_lambdas)) and r.algorithm != "linear"]
    if not runs:
        return
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 1.9 * len(runs)), sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        lam = run.client_lambdas[..., 0]  # (R, tau, S, N)
        steps = lam.shape[0] * lam.shape[1]
        series = lam.reshape(steps, lam.shape[2], lam.shape[3])[:, seed_index]
        for c in range(min(clients, series.shape[1])):
            ax.plot(np.arange(1, steps + 1), series[:, c], lw=0.7, alpha=0.7, label=f"client {c}")
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("lambda_1")
        ax.set_title(f"{run.label}: lambda_1 of clients 0-{min(clients, series.shape[1]) - 1} at every local "
                     f"step (seed {result['seeds'][seed_index]})", fontsize=9)
    axes[-1, 0].set_xlabel("local step (rounds x tau)")
    fig.tight_layout()
    fig.savefig(path, dpi=85)
    plt.close(fig)


def plot_spread(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for run in result["runs"].values():
        if not np.all(np.isfinite(run.client_lambdas)) or run.algorithm == "linear":
            continue
        lam = run.client_lambdas
        spread = lam.std(axis=3).mean(axis=-1).reshape(-1, lam.shape[2])  # (T, S)
        rounds = np.arange(1, spread.shape[0] + 1) / lam.shape[1]
        ax.plot(rounds, spread.mean(axis=1), lw=1, label=run.label, color=COLOURS.get(run.label))
    ax.set_xlabel("round")
    ax.set_ylabel("std of lambda across clients")
    ax.set_title(f"client drift: spread of lambda across clients (mean over {len(result['seeds'])} seeds; "
                 "linear 0)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_front(result: dict, path: Path, seed_index: int = 0) -> None:
    problem = result["problem"]
    points = problem.front_points[seed_index]  # (K, d)
    front = (0.5 * np.einsum("ki,mij,kj->km", points, problem.global_hessians[seed_index], points)
             - points @ problem.global_linear[seed_index].T + problem.global_constant[seed_index])
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    order = np.argsort(front[:, 0])
    ax.plot(front[order, 0], front[order, 1], "k.", ms=1.5, label="true Pareto front")
    for label, m in result["metrics"].items():
        values = m["_values"][:, seed_index]
        ax.plot(values[:, 0], values[:, 1], lw=0.9, alpha=0.85, color=COLOURS.get(label), label=label)
        ax.plot(values[-1, 0], values[-1, 1], "o", ms=4, color=COLOURS.get(label))
    start = next(iter(result["metrics"].values()))["_values"][0, seed_index]
    ax.plot(start[0], start[1], "k*", ms=10, label="F(x0)")
    paths = np.concatenate([m["_values"][:, seed_index, :2] for m in result["metrics"].values()])
    lo, hi = paths.min(axis=0), paths.max(axis=0)
    pad = 0.25 * (hi - lo) + 1e-9
    ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
    ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
    ax.set_xlabel("F_1 (global)")
    ax.set_ylabel("F_2 (global)" + (" (M > 2: projection on F_1, F_2)" if front.shape[1] > 2 else ""))
    ax.set_title(f"global objectives over rounds, seed {result['seeds'][seed_index]}, p = "
                 f"{tuple(round(v, 2) for v in result['preference'])}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_gap(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for label, m in result["metrics"].items():
        gap = m["_gap_curve"]  # (R + 1, S)
        rounds = np.arange(gap.shape[0])
        median = np.median(gap, axis=1)
        ax.plot(rounds, median, lw=1.1, color=COLOURS.get(label), label=label)
        ax.fill_between(rounds, np.percentile(gap, 25, axis=1), np.percentile(gap, 75, axis=1),
                        color=COLOURS.get(label), alpha=0.12)
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("min_l |sum_m l_m grad F_m(x)|^2")
    ax.set_title("Pareto-stationarity gap of the global x (median and quartiles over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_configuration(result: dict, folder: Path, title: str, plots: bool = True, json_file: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if json_file:
        (folder / "results.json").write_text(json.dumps(result_json(result), indent=1))
    (folder / "table.md").write_text(table_markdown(result, title) + "\n")
    if plots:
        plot_lambdas(result, folder / "lambda.png")
        plot_spread(result, folder / "spread.png")
        plot_front(result, folder / "front.png")
        plot_gap(result, folder / "gap.png")


def write_grid(regimes: list[tuple[str, str, dict]], folder: Path, wall: float, command: str,
               plots: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    header = f"Command: `{command}`; wall time {wall:.0f} s.\n\n"
    tables = []
    for name, description, result in regimes:
        # the per-seed numbers of every regime are in the grid's results.json
        write_configuration(result, folder / _slug(name), f"{name}: {description}", plots and name in PLOT_REGIMES,
                            json_file=False)
        tables.append(table_markdown(result, f"Regime {name}: {description}"))
    (folder / "table.md").write_text("# firm synthetic: every paired comparison\n\n" + header + "\n\n".join(tables))
    (folder / "summary.md").write_text("# firm synthetic: summary per claim\n\n" + header + summary_markdown(regimes))
    grid_json = {"command": command, "wall_seconds": wall,
                 "regimes": [{"name": n, "description": d, **result_json(r)} for n, d, r in regimes]}
    (folder / "results.json").write_text(json.dumps(grid_json, separators=(",", ":")))
    (folder / "headline.md").write_text("# firm synthetic: the comparisons EXPERIMENTS.md shows\n\n" + header
                                        + headline_markdown(grid_json))


# The comparisons EXPERIMENTS.md shows per claim (every other one is in summary.md and table.md).
HEADLINES: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("2 smoothness", "lambda_tv", [("firm b=0.01", "mgda"), ("firm b=1", "mgda")]),
    ("2 smoothness", "objective_jitter", [("firm b=0.01", "mgda"), ("firm b=1", "mgda"), ("firm b=1", "linear"),
                                          ("firm b=1", "fsmgda")]),
    ("3 client drift", "lambda_spread", [("firm b=0.01", "mgda"), ("firm b=1", "mgda")]),
    ("3 client drift", "update_cosine", [("firm b=0.01", "mgda"), ("firm b=1", "mgda"), ("firm b=1", "linear"),
                                         ("firm b=1", "fsmgda")]),
    ("4 trade-off / stationarity", "pareto_distance", [("firm b=0.01", "mgda"), ("firm b=1", "mgda"),
                                                       ("firm b=1", "linear"), ("firm b=1", "fsmgda")]),
    ("4 trade-off / stationarity", "stationarity_gap", [("firm b=0.01", "mgda"), ("firm b=1", "mgda"),
                                                        ("firm b=1", "linear"), ("firm b=1", "fsmgda")]),
    ("5 preference knob", "knob_error", [("firm b=0.01", "mgda"), ("firm b=1", "mgda"), ("firm b=0.01", "linear"),
                                         ("firm b=1", "linear")]),
]


def headline_markdown(grid_json: dict) -> str:
    """EXPERIMENTS.md's tables, from the grid's results.json: per claim and metric, one row per
    regime, cells 'firm - baseline [95% CI] verdict'."""
    lines = []
    for claim, metric, pairs in HEADLINES:
        better = ""
        rows = []
        for regime in grid_json["regimes"]:
            found = {(c["a"], c["b"]): c for c in regime["comparisons"].get(claim, []) if c["metric"] == metric}
            cells = []
            for pair in pairs:
                c = found.get(pair)
                better = c["better"] if c else better
                cells.append("-" if c is None else f"{_number(c['mean_diff'])} [{_number(c['ci_low'])}, "
                                                   f"{_number(c['ci_high'])}] {c['verdict']}")
            rows.append(f"| {regime['name']} | " + " | ".join(cells) + " |")
        lines += [f"Claim {claim}, `{metric}` ({better} is better):", "",
                  "| regime | " + " | ".join(f"{a} - {b}" for a, b in pairs) + " |",
                  "| --- |" + " --- |" * len(pairs), *rows, ""]
    return "\n".join(lines)
