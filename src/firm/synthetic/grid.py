"""Run one configuration (every algorithm, the preference sweep, the paired comparisons) or the
regime grid of EXPERIMENTS.md (one factor at a time from a base regime, plus the paper's)."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from firm.config import ALGORITHMS
from firm.stats import compare_table
from firm.synthetic.algorithms import Run, run_algorithm
from firm.synthetic.config import SyntheticConfig
from firm.synthetic.metrics import LAMBDA_METRICS, knob_metrics, run_metrics
from firm.synthetic.problem import Problem

# Each claim's metrics: (metric, better, baselines it is compared with).
CLAIMS: dict[str, list[tuple[str, str, tuple[str, ...]]]] = {
    "2 smoothness": [("lambda_tv", "lower", ("mgda",)),
                     ("objective_jitter", "lower", ("mgda", "linear", "fsmgda"))],
    "3 client drift": [("lambda_spread", "lower", ("mgda",)),
                       ("update_cosine", "higher", ("mgda", "linear", "fsmgda"))],
    "4 trade-off / stationarity": [("stationarity_gap", "lower", ("mgda", "linear", "fsmgda")),
                                   ("pareto_distance", "lower", ("mgda", "linear", "fsmgda")),
                                   ("hypervolume", "higher", ("mgda", "linear", "fsmgda"))],
    "5 preference knob": [("knob_spearman", "higher", ("mgda", "linear", "fsmgda")),
                          ("knob_error", "lower", ("mgda", "linear", "fsmgda"))],
}

# The regime grid: (name, what it is, overrides of the base). The base is SyntheticConfig's
# defaults: conflicting objectives (120 degrees), equal norms, IID clients, tau = 1, SGD, noise 1.
REGIMES: list[tuple[str, str, dict]] = [
    ("base", "conflicting (120 deg), equal norms, IID, tau 1, SGD, noise 1", {}),
    ("collinear", "base with nearly collinear objectives (30 deg)", {"conflict_angle": 30.0}),
    ("unequal norms", "base with norms 4:1", {"norm_imbalance": 4.0}),
    ("skewed clients", "base with skewed clients (skew 4, offsets 0.5)", {"heterogeneity": "skewed"}),
    ("tau 8", "base with 8 local steps per round (13 rounds: 104 gradient steps, as the base's 100)",
     {"local_steps": 8}),
    ("reset Adam", "base with Adam reset every round (lr 0.01)", {"optimizer": "adam"}),
    ("exact gradients", "base without gradient noise", {"noise": 0.0}),
    ("paper", "the LLM pipeline's regime: conflicting, equal norms, skewed clients, tau 8 (13 rounds), reset Adam",
     {"heterogeneity": "skewed", "local_steps": 8, "optimizer": "adam"}),
]
GRID_SWEEP = (0.1, 0.9)
"""The grid's preference sweep (with p_1 = 0.5: p_1 in {0.1, 0.5, 0.9}); every swept point is a
full run of every firm beta, and the solver calls are what the grid's wall time is made of."""


def labels(config: SyntheticConfig) -> list[tuple[str, str, float]]:
    """(label, algorithm, beta) of every run of one configuration."""
    out = []
    for name in config.algorithm_names():
        if ALGORITHMS[name].uses_beta:
            out += [(f"firm b={b:g}", name, b) for b in config.betas]
        else:
            out.append((name, name, 0.0))
    return out


def _depends_on_preference(algorithm: str, beta: float) -> bool:
    spec = ALGORITHMS[algorithm]
    return spec.fixed_weights or spec.solver_beta(beta) > 0


def run_configuration(config: SyntheticConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Every algorithm on every seed, the preference sweep and the paired comparisons."""
    config.validate()
    start = time.perf_counter()
    problem = Problem.build(config)
    p = config.preference_vector()
    runs: dict[str, Run] = {}
    metrics: dict[str, dict[str, np.ndarray]] = {}
    for label, algorithm, beta in labels(config):
        runs[label] = run_algorithm(problem, config, algorithm, beta, p, label)
        metrics[label] = run_metrics(problem, runs[label])
        log(f"  {label}: {time.perf_counter() - start:.0f} s")
    sweep = sorted({round(p[0], 12), *config.preference_sweep})
    if len(sweep) >= 2:
        for label, algorithm, beta in labels(config):
            positions = []
            for q in sweep:
                if abs(q - p[0]) < 1e-12 or not _depends_on_preference(algorithm, beta):
                    positions.append(metrics[label]["front_position"])  # p is not used: the same run
                else:
                    run = run_algorithm(problem, config, algorithm, beta, config.preference_vector(q), label)
                    positions.append(problem.nearest_pareto_point(run.x[-1])[1][:, 0])
            metrics[label].update(knob_metrics(np.array(sweep), np.stack(positions)))
            metrics[label]["_sweep_positions"] = np.stack(positions)
        log(f"  preference sweep: {time.perf_counter() - start:.0f} s")
    tables = compare(config, metrics)
    return {"config": config.to_dict(), "seeds": list(problem.seeds), "preference": list(p), "sweep": sweep,
            "wall_seconds": time.perf_counter() - start, "problem": problem, "runs": runs, "metrics": metrics,
            "tables": tables}


def compare(config: SyntheticConfig, metrics: dict[str, dict[str, np.ndarray]]) -> dict[str, list]:
    """One table per claim: firm (each beta) minus each baseline, Holm-corrected within the table."""
    firms = [label for label in metrics if label.startswith("firm")]
    tables = {}
    for claim, entries in CLAIMS.items():
        rows = []
        for metric, better, baselines in entries:
            for firm in firms:
                for base in baselines:
                    if base in metrics and metric in metrics[firm] and metric in metrics[base]:
                        rows.append({"metric": metric, "a": firm, "b": base, "better": better,
                                     "values_a": metrics[firm][metric], "values_b": metrics[base][metric]})
        if rows:
            tables[claim] = compare_table(rows, config.relative_margin, config.alpha, config.bootstrap)
    return tables


def regime_config(base: SyntheticConfig, overrides: dict) -> SyntheticConfig:
    """A regime of the grid: the base with its overrides, the grid's sweep, and with tau local steps
    ceil(rounds / tau) rounds, so every regime takes the same number of gradient steps."""
    config = dataclasses.replace(base, grid=False, **overrides)
    config.rounds = -(-config.rounds // config.local_steps)
    if base.preference_sweep:
        config.preference_sweep = GRID_SWEEP
    return config.validate()
