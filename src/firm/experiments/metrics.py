"""What the runs of an experiment measured: each run's round records and summary, smoothness,
hypervolume and its reference point, and the statistics over seeds.

What "final reward" means: a round record's rewards are those of the responses the clients
sampled in that round, i.e. of the global adapter the round STARTED from (the rollout comes
before the PPO update). So by default the final reward is that of the adapter after
num_rounds - 1 rounds. ``--eval-prompts N`` scores the adapter of the last round itself with
`firm eval` (the same N prompts and sampling seed for every run, so the comparison is paired)
and uses that instead; both numbers are kept in results.json.

Statistics across seeds are mean and sample standard deviation (ddof = 1), for the tables.
Differences between algorithms are not judged by these spreads: `firm compare` and `firm pareto`
compare paired per-seed differences with firm.stats (paired bootstrap interval, Wilcoxon
signed-rank with Holm's correction, TOST equivalence inside a margin: fixed in advance per
metric for compare, 5 % of the baseline's mean for pareto's knob effect).

The hypervolume reference point (unless ``--reference-point`` fixes one) is, per objective,
the lowest reward that any round of any run of the experiment recorded, minus 1% of that
objective's observed range (max - min over the same records). Every final point then
dominates it, so each run's hypervolume is positive and the values of one experiment are
comparable with each other; they are not comparable across experiments (fix the point for
that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from firm.config import ALGORITHMS
from firm.experiments.execute import Failure, read_harness_record
from firm.experiments.plan import ExperimentError, PlannedRun, eval_path
from firm.heldout import paired_gain
from firm.rundir import STATE_FILE, RunDir

REFERENCE_MARGIN_FRACTION = 0.01
"""The default reference point sits this fraction of each objective's observed range below
the lowest observed reward, so that no point lies on the boundary (zero volume)."""


# ---- one run ----------------------------------------------------------------------------------
def read_round_records(run_dir: Path) -> list[dict[str, Any]]:
    """The round records of a run's metrics.jsonl, in round order."""
    rounds = sorted((r for r in RunDir(run_dir).read_metrics() if r.get("type") == "round"), key=lambda r: r["round"])
    numbers = [r["round"] for r in rounds]
    if not rounds:
        raise ExperimentError(f"{run_dir}: metrics.jsonl holds no round record")
    if len(set(numbers)) != len(numbers):
        raise ExperimentError(f"{run_dir}: metrics.jsonl holds a round twice (rounds {numbers})")
    return rounds


def objective_names(rounds: Sequence[dict[str, Any]]) -> list[str]:
    names = [k.split("/", 1)[1] for k in rounds[0] if k.startswith("reward/")]
    if len(names) < 2:
        raise ExperimentError(f"round records name {len(names)} reward(s); an experiment needs at least 2")
    return names


def smoothness(values: Sequence[float]) -> float | None:
    """Spread (population std) of the round-to-round changes; lower = smoother.

    A run that improves by the same amount every round scores 0; one that zig-zags scores
    high. Undefined (None) with fewer than 3 rounds, where there are fewer than 2 changes.
    """
    if len(values) < 3:
        return None
    return float(np.std(np.diff(np.asarray(values, dtype=np.float64))))


def optional_series(rounds: Sequence[dict[str, Any]], key: str) -> list[Any] | None:
    """The values of a metric over rounds, or None when any round lacks it (not measured)."""
    values = [r.get(key) for r in rounds]
    return None if any(v is None for v in values) else values


def summarize_run(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Everything the tables need from one run's round records.

    drift: mean over rounds (and objectives) of the spread of lambda across clients;
    adapter_distance: mean over rounds of the clients' mean distance from the average adapter.
    """
    names = objective_names(rounds)
    curves = {name: [float(r[f"reward/{name}"]) for r in rounds] for name in names}
    lambda_std = optional_series(rounds, "lambda_std")
    lambda_mean = optional_series(rounds, "lambda_mean")
    distance = optional_series(rounds, "adapter_distance")
    bytes_up = optional_series(rounds, "bytes_up_per_client")
    bytes_down = optional_series(rounds, "bytes_down_per_client")
    return {
        "rounds": [int(r["round"]) for r in rounds],
        "objectives": names,
        "final_reward": {name: curve[-1] for name, curve in curves.items()},
        "reward_curve": curves,
        "smoothness": {name: smoothness(curve) for name, curve in curves.items()},
        "bytes_up_per_client": None if bytes_up is None else float(np.mean(bytes_up)),
        "bytes_down_per_client": None if bytes_down is None else float(np.mean(bytes_down)),
        "drift_curve": None if lambda_std is None else [float(np.mean(s)) for s in lambda_std],
        "lambda_drift": None if lambda_std is None else float(np.mean(lambda_std)),
        "adapter_distance_curve": None if distance is None else [float(d) for d in distance],
        "adapter_distance": None if distance is None else float(np.mean(distance)),
        "lambda_mean_over_rounds": None if lambda_mean is None else np.mean(lambda_mean, axis=0).tolist(),
        "lambda_mean_final": None if lambda_mean is None else list(lambda_mean[-1]),
    }


def step_geometry(clients: Sequence[dict[str, Any]], num_objectives: int) -> dict[str, float | None]:
    """Smoothness and drift of lambda at the level they happen: local steps (the client
    records' per-step lists, see firm.trainer.summarize).

    lambda_total_variation: per client and round, sum over consecutive local steps of
      |lambda_t - lambda_{t-1}|_1, averaged over clients and rounds (claim 2);
    lambda_step_spread: per round and local-step index, the std of lambda across clients,
      averaged over objectives, steps and rounds (claim 3);
    gram_distance, norm_ratio, cosine: means over taken steps of D = |g_i - g_j|^2 / tr G, the
      smallest / largest gradient norm and cos(g_i, g_j): whether the weights can matter at all.
    None where the records carry no per-step lists (runs from before they existed)."""
    with_steps = [c for c in clients if c.get("step_lambda")]
    if not with_steps:
        return {key: None for key in ("lambda_total_variation", "lambda_step_spread", "gram_distance",
                                      "norm_ratio", "cosine")}
    tv, spreads, taken_rows = [], [], []
    by_round: dict[int, list[np.ndarray]] = {}
    for client in with_steps:
        lam = np.asarray(client["step_lambda"], dtype=np.float64).reshape(-1, num_objectives)
        taken = np.asarray(client["step_taken"], dtype=bool)
        kept = lam[taken]
        tv.append(float(np.abs(np.diff(kept, axis=0)).sum()) if len(kept) > 1 else 0.0)
        by_round.setdefault(int(client["round"]), []).append(np.where(taken[:, None], lam, np.nan))
        taken_rows.append((client, taken))
    for per_client in by_round.values():
        steps = min(len(x) for x in per_client)
        if len(per_client) > 1:
            stacked = np.stack([x[:steps] for x in per_client])  # [clients, steps, M]
            spreads.append(float(np.nanmean(np.nanstd(stacked, axis=0))))
    pairs = max(num_objectives * (num_objectives - 1) // 2, 1)

    def taken_mean(key: str, width: int) -> float:
        values = [np.asarray(c[key], dtype=np.float64).reshape(-1, width)[taken] for c, taken in taken_rows]
        return float(np.mean(np.concatenate(values))) if values else float("nan")

    return {"lambda_total_variation": float(np.mean(tv)),
            "lambda_step_spread": float(np.mean(spreads)) if spreads else None,
            "gram_distance": taken_mean("step_gram_distance", pairs),
            "norm_ratio": taken_mean("step_norm_ratio", 1),
            "cosine": taken_mean("step_cosine", pairs)}


def update_cosine(norms: Sequence[float], distances: Sequence[float]) -> float | None:
    """Cosine between the clients' updates u_c (client adapter - global adapter) in one round,
    averaged over client pairs with weights |u_c| |u_d|:
        sum_{c != d} u_c . u_d  /  sum_{c != d} |u_c| |u_d|.
    1: every client moved the same way; 0: orthogonal updates; at least -1 / (K - 1).

    It needs only what every client record holds, |u_c| (update_norm) and |u_c - mean u|
    (adapter_distance, from FedAvg's unweighted mean): sum_c |u_c|^2 = K |mean u|^2 +
    sum_c |u_c - mean u|^2 and sum_{c != d} u_c . u_d = K^2 |mean u|^2 - sum_c |u_c|^2.
    None with fewer than 2 clients or no movement."""
    n = np.asarray(norms, dtype=np.float64)
    d = np.asarray(distances, dtype=np.float64)
    k = len(n)
    if k < 2 or len(d) != k:
        return None
    mean_sq = max((np.sum(n ** 2) - np.sum(d ** 2)) / k, 0.0)
    pair_dots = k * k * mean_sq - np.sum(n ** 2)
    pair_norms = np.sum(n) ** 2 - np.sum(n ** 2)
    return float(pair_dots / pair_norms) if pair_norms > 0 else None


def client_update_cosine(rounds: Sequence[dict[str, Any]], clients: Sequence[dict[str, Any]]) -> float | None:
    """update_cosine averaged over rounds (claim 3: clients that agree move the same way). Only
    for one adapter per client averaged by FedAvg: with fsmgda (one upload per objective) or a
    median / trimmed-mean aggregate the identity behind it does not hold, and it is None."""
    values = []
    for record in rounds:
        algorithm = ALGORITHMS.get(str(record.get("algorithm")))
        if record.get("aggregator", "fedavg") != "fedavg" or algorithm is None or algorithm.per_objective_upload:
            return None
        members = [c for c in clients if c["round"] == record["round"]]
        if not members or any("update_norm" not in c or "adapter_distance" not in c for c in members):
            return None
        value = update_cosine([c["update_norm"] for c in members], [c["adapter_distance"] for c in members])
        if value is not None:
            values.append(value)
    return float(np.mean(values)) if values else None


# ---- hypervolume --------------------------------------------------------------------------------
def reference_point(all_rounds: Sequence[Sequence[dict[str, Any]]], names: Sequence[str],
                    margin_fraction: float = REFERENCE_MARGIN_FRACTION,
                    finals: Sequence[dict[str, float]] = ()) -> list[float]:
    """Per objective: the lowest reward any round of any run recorded (or any final reward in
    ``finals``, e.g. evaluations), minus a margin of ``margin_fraction`` of that objective's
    observed range (1e-6 when the range is zero)."""
    point = []
    for name in names:
        values = [float(r[f"reward/{name}"]) for rounds in all_rounds for r in rounds]
        values += [float(f[name]) for f in finals]
        if not values:
            raise ExperimentError("no round record to place the reference point")
        spread = max(values) - min(values)
        point.append(min(values) - (margin_fraction * spread if spread > 0 else 1e-6))
    return point


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Hypervolume (maximisation) that the points dominate above the reference point (moocore).

    Points that do not strictly dominate the reference in every objective add nothing.
    """
    import moocore

    ref = np.asarray(reference, dtype=np.float64)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, ref.shape[0])
    if not np.all(np.isfinite(pts)) or not np.all(np.isfinite(ref)):
        raise ExperimentError("hypervolume of non-finite rewards is undefined")
    pts = pts[np.all(pts > ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    return float(moocore.hypervolume(pts, ref=ref, maximise=True))


# ---- statistics over seeds ----------------------------------------------------------------------
@dataclass
class Stat:
    """Mean and sample std (ddof = 1) over seeds; std is None with a single seed."""

    mean: float | None
    std: float | None
    n: int
    note: str = ""  # why the value is missing, when it is

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n, **({"note": self.note} if self.note else {})}


def aggregate(values: Sequence[float | None], missing_note: str = "not measured") -> Stat:
    if not values:
        return Stat(None, None, 0, "no completed run")
    if any(v is None for v in values):
        return Stat(None, None, len(values), missing_note)
    array = np.asarray(values, dtype=np.float64)
    return Stat(float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else None, len(array))


def rank_correlation(weights: Sequence[float], rewards: Sequence[float]) -> dict[str, Any]:
    """Spearman rank correlation of preference weights and final rewards (+1: the rewards
    follow the order of the preferences exactly)."""
    from scipy.stats import spearmanr

    if len(weights) != len(rewards) or len(weights) < 2:
        raise ExperimentError(f"rank correlation needs >= 2 paired values, got {len(weights)} and {len(rewards)}")
    if len(set(weights)) < 2 or len(set(rewards)) < 2:
        return {"rho": None, "p_value": None, "note": "constant input: no order to compare"}
    result = spearmanr(weights, rewards)
    return {"rho": float(result.statistic), "p_value": float(result.pvalue)}


# ---- the runs of an experiment ------------------------------------------------------------------
@dataclass
class RunResult:
    run: PlannedRun
    rounds: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None  # `firm eval` of the final adapter, when the harness ran one


def read_results(runs: Sequence[PlannedRun], failures: Sequence[Failure], eval_prompts: int = 0,
                 eval_samples: int = 1, base: dict[str, Any] | None = None) -> list[RunResult]:
    """Summaries of the runs that completed all their rounds (failed runs stay out). With
    eval_prompts > 0 the final reward is the evaluation of the last adapter, and with ``base``
    (the untrained policy's evaluation on the same prompts) each run's paired held-out gain."""
    failed = {id(f.run) for f in failures}
    results = []
    for run in runs:
        if id(run) in failed or not (run.run_dir / STATE_FILE).exists():
            continue
        if RunDir.open(run.run_dir).completed_rounds < run.config.num_rounds:
            continue
        rounds = [r for r in read_round_records(run.run_dir) if r["round"] <= run.config.num_rounds]
        clients = [r for r in RunDir(run.run_dir).read_metrics()
                   if r.get("type") == "client" and r["round"] <= run.config.num_rounds]
        summary = summarize_run(rounds)
        summary["step_geometry"] = step_geometry(clients, len(summary["objectives"]))
        summary["update_cosine"] = client_update_cosine(rounds, clients)
        last = [c for c in clients if c["round"] == rounds[-1]["round"]]
        summary["final_kl"] = float(rounds[-1]["kl"]) if "kl" in rounds[-1] else None
        summary["final_response_tokens"] = (float(np.mean([c["response_tokens"] for c in last]))
                                            if last and all("response_tokens" in c for c in last) else None)
        if eval_prompts:
            scored = eval_path(run, eval_prompts, eval_samples)
            evaluation = json.loads(scored.read_text())
            evaluated = evaluation["rewards"]
            if sorted(evaluated) != sorted(summary["objectives"]):
                raise ExperimentError(f"{scored} scores {sorted(evaluated)}, the run "
                                      f"{summary['objectives']}")
            summary["final_reward"] = {name: float(evaluated[name]) for name in summary["objectives"]}
            summary["final_kl"] = float(evaluation["kl"])  # KL and length beside the reward they explain
            summary["final_response_tokens"] = float(evaluation["response_tokens"])
            if base is not None:
                summary["heldout_gain"] = paired_gain(base, evaluation)
        summary["final_reward_source"] = (f"firm eval of round {run.config.num_rounds}'s adapter on {eval_prompts} "
                                          f"held-out prompts x {eval_samples} samples" if eval_prompts else "last round record (rollouts of the "
                                          "adapter that round started from)")
        results.append(RunResult(run, rounds, summary, evaluation if eval_prompts else None))
    names = {tuple(r.summary["objectives"]) for r in results}
    if len(names) > 1:
        raise ExperimentError(f"runs report different objectives: {sorted(names)}")
    return results


def add_hypervolumes_and_wall_times(results: Sequence[RunResult], reference: Sequence[float]) -> None:
    """Each run's summary gains the hypervolume of its final point and the wall time the
    harness recorded for it (None for a run the harness did not train)."""
    for result in results:
        final = [result.summary["final_reward"][n] for n in result.summary["objectives"]]
        result.summary["hypervolume"] = hypervolume([final], reference)
        result.summary["wall_seconds"] = read_harness_record(result.run.run_dir).get("total_wall_seconds")


__all__ = ["REFERENCE_MARGIN_FRACTION", "RunResult", "Stat", "add_hypervolumes_and_wall_times", "aggregate",
           "hypervolume", "objective_names", "rank_correlation", "read_results",
           "read_round_records", "reference_point", "smoothness", "step_geometry", "summarize_run"]
