"""The exact metrics of claims 2-5, per seed, from a Run.

claim 2, smoothness: ``lambda_tv`` (per client, total variation of lambda over every local
    step and round, sum_t sum_m |lambda_t - lambda_{t-1}|, mean over clients) and
    ``objective_jitter`` (std over the second half of the rounds of the round-to-round change of
    each global objective, divided by its range F_m(x0) - min F_m, mean over objectives).
claim 3, client drift: ``lambda_spread`` (std of lambda across clients at every step, mean over
    steps and objectives) and ``update_cosine`` (cosine between the FedAvg update
    x_{r+1} - x_r and the exact global MGDA direction at x_r, mean over the first quarter of the
    rounds: the approach to the front; once at the front the exact direction is ~0 and the
    update is mostly gradient noise, whatever the algorithm).
claim 4, trade-off / stationarity: ``stationarity_gap`` (min over the simplex of
    |sum_m lambda_m grad F_m(x)|^2 at the final x), ``pareto_distance`` (Euclidean distance from
    the final x to the Pareto set) and ``hypervolume`` (of the final point against F(x0), each
    objective divided by its range F_m(x0) - min F_m).
claim 5, the preference knob: ``front_position`` (the weight t_1 of the nearest Pareto point
    x*(t)), and over a sweep of p: ``knob_spearman`` (Spearman's rho between p_1 and t_1 per seed;
    0 when the position does not move) and ``knob_error`` (mean |t_1 - p_1|).
The exact global MGDA weights are ``firm.mgda.solve_weights(G, beta=0)`` on the global Gram matrix.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as scipy_stats

from firm.mgda import solve_weights
from firm.synthetic.algorithms import Run
from firm.synthetic.problem import Problem

LAMBDA_METRICS = ("lambda_tv", "lambda_spread")
"""Defined only where clients choose lambda (firm, mgda; linear's are 0 by construction)."""


def exact_mgda(gram: np.ndarray) -> np.ndarray:
    return solve_weights(gram, beta=0.0)


def run_metrics(problem: Problem, run: Run) -> dict[str, np.ndarray]:
    """Every per-seed metric of one run (arrays of shape (S,)), plus curves for the plots."""
    rounds = run.x.shape[0] - 1
    values = problem.global_values(run.x)  # (R + 1, S, M)
    initial, minimum = values[0], problem.minimum_values
    span = initial - minimum
    out: dict[str, np.ndarray] = {}

    lam = run.client_lambdas.reshape((-1,) + run.client_lambdas.shape[2:])  # (T, S, N, M)
    if np.all(np.isfinite(lam)):
        out["lambda_tv"] = np.abs(np.diff(lam, axis=0)).sum(axis=(0, 3)).mean(axis=1)
        out["lambda_spread"] = lam.std(axis=2).mean(axis=(0, 2))
    change = np.diff(values, axis=0) / span  # (R, S, M)
    out["objective_jitter"] = change[rounds // 2:].std(axis=0).mean(axis=1)

    gaps, cosines = [], []
    for r in range(rounds + 1):
        gap, direction = problem.stationarity_terms(run.x[r], exact_mgda)
        gaps.append(gap)
        if r < rounds:
            update = run.x[r + 1] - run.x[r]
            norm = np.linalg.norm(update, axis=1) * np.linalg.norm(direction, axis=1)
            cosines.append(np.divide(np.einsum("si,si->s", update, direction), norm,
                                     out=np.full(len(norm), np.nan), where=norm > 0))
    gaps_arr = np.stack(gaps)  # (R + 1, S)
    out["update_cosine"] = np.nanmean(np.stack(cosines)[:max(1, rounds // 4)], axis=0)
    out["_cosine_curve"] = np.stack(cosines)
    out["stationarity_gap"] = gaps_arr[-1]
    distance, position = problem.nearest_pareto_point(run.x[-1])
    out["pareto_distance"] = distance
    out["hypervolume"] = np.prod(np.clip((initial - values[-1]) / span, 0, None), axis=1)
    out["front_position"] = position[:, 0]
    out["_gap_curve"] = gaps_arr
    out["_values"] = values
    return out


def knob_metrics(preferences: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Claim 5 from a sweep: preferences (P,) of objective 1, positions (P, S) of the final points."""
    rho = []
    for column in positions.T:
        if np.ptp(column) == 0:
            rho.append(0.0)  # the final point does not move with p: no response
        else:
            rho.append(float(scipy_stats.spearmanr(preferences, column).statistic))
    return {"knob_spearman": np.array(rho), "knob_error": np.abs(positions - preferences[:, None]).mean(axis=0)}
