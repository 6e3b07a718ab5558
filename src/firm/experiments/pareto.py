"""`firm pareto`: preference vectors p swept for firm (at one or more beta) and linear. The
table reports the front of final rewards, its hypervolume, and whether the points follow the
order of the preferences (Spearman rank correlation of p_m and the final reward of objective m)."""

from __future__ import annotations

import sys
from typing import Any, Sequence

from firm.experiments.execute import execute_plan
from firm.experiments.metrics import RunResult, Stat, aggregate, hypervolume, rank_correlation
from firm.experiments.plan import ExperimentError, ExperimentOptions, format_vector, plan_pareto, warn_seeds
from firm.experiments.report import finish_experiment, format_stat, markdown_table
from firm.plots import plot_pareto
from firm.stats import compare_table

MIN_PREFERENCES = 5


def default_preferences(num_objectives: int) -> list[tuple[float, ...]]:
    """Five preferences from 'mostly objective 2' to 'mostly objective 1' (two objectives)."""
    if num_objectives != 2:
        raise ExperimentError(f"there are {num_objectives} objectives: pass --preferences explicitly "
                              "(vectors separated by ';', e.g. '0.6,0.2,0.2;0.2,0.6,0.2;...')")
    return [(w, round(1.0 - w, 10)) for w in (0.1, 0.3, 0.5, 0.7, 0.9)]


def pareto_tables(results: Sequence[RunResult], groups: Sequence[str], preferences: Sequence[tuple[float, ...]],
                  seeds: Sequence[int], reference: Sequence[float]) -> tuple[str, dict[str, Any], dict[str, list]]:
    """The tables, the entries of results.json, and the points per group (for the plots)."""
    names = results[0].summary["objectives"]
    points: dict[str, list[dict[str, Any]]] = {}
    point_rows, fronts = [], {}
    for group in groups:
        rows = []
        for preference in preferences:
            runs = [r for r in results if r.run.group == group and r.run.preference == preference]
            if not runs:
                continue
            rows.append({
                "preference": preference,
                "label": "p=" + format_vector(preference),
                "seeds": [r.run.seed for r in runs],
                "reward": [aggregate([r.summary["final_reward"][n] for r in runs]) for n in names],
                "lambda_1": aggregate([None if r.summary["lambda_mean_over_rounds"] is None
                                       else r.summary["lambda_mean_over_rounds"][0] for r in runs]),
            })
        points[group] = rows
        for row in rows:
            point_rows.append([group, format_vector(row["preference"]), str(len(row["seeds"])),
                               *[format_stat(s) for s in row["reward"]], format_stat(row["lambda_1"])])
        front = pareto_front_summary(group, rows, results, names, seeds, reference)
        fronts[group] = front
    judge_knobs(fronts)
    front_rows = [front_row(group, front, names) for group, front in fronts.items()]
    text = ("## points (final reward per preference)\n\n"
            + markdown_table(["algorithm", "preference", "seeds", *[f"final reward {n}" for n in names],
                              f"lambda[{names[0]}] (mean over rounds)"], point_rows)
            + "\n## fronts\n\n"
            "hypervolume: of each seed's set of final points (one per preference), mean ± std over seeds. "
            "rho_m: Spearman rank correlation of the preference weight p_m and the final reward of objective m "
            "over the preferences (on the seed means; +1 = the points follow the order of the preferences). "
            "knob effect: objective 1's final reward at the largest p_1 minus at the smallest, paired over seeds, "
            "with its bootstrap 95% interval and verdict (firm.stats; Holm over the fronts). lambda range: how far "
            "the weights actually used moved.\n\n"
            + markdown_table(["algorithm", "front hypervolume", *[f"rho_{n} (p-value)" for n in names],
                              "rho per seed (mean ± std)", "order follows preferences",
                              f"{names[0]}: knob effect", f"lambda[{names[0]}] range"], front_rows))
    return text, {"fronts": fronts, "points": {g: [point_entry(r) for r in rows] for g, rows in points.items()}}, points


def point_entry(row: dict[str, Any]) -> dict[str, Any]:
    return {"preference": list(row["preference"]), "seeds": row["seeds"],
            "reward": [s.to_dict() for s in row["reward"]], "lambda_1": row["lambda_1"].to_dict()}


def pareto_front_summary(group: str, rows: Sequence[dict[str, Any]], results: Sequence[RunResult],
                         names: Sequence[str], seeds: Sequence[int], reference: Sequence[float]) -> dict[str, Any]:
    """Hypervolume of each seed's front, rank correlations, and whether the knob moves objective 1."""
    per_seed_hv, per_seed_rho = [], []
    for seed in seeds:
        runs = sorted((r for r in results if r.run.group == group and r.run.seed == seed),
                      key=lambda r: r.run.preference)
        if len(runs) != len(rows) or len(runs) < 2:  # an incomplete front is not comparable
            continue
        finals = [[r.summary["final_reward"][n] for n in names] for r in runs]
        per_seed_hv.append(hypervolume(finals, reference))
        per_seed_rho.append(rank_correlation([r.run.preference[0] for r in runs], [f[0] for f in finals])["rho"])
    correlations = ([rank_correlation([r["preference"][m] for r in rows], [r["reward"][m].mean for r in rows])
                     for m in range(len(names))] if len(rows) >= 2 else [])
    by_p1 = sorted(rows, key=lambda r: r["preference"][0])
    lambdas = [r["lambda_1"].mean for r in rows if r["lambda_1"].mean is not None]
    return {
        "hypervolume": aggregate(per_seed_hv).to_dict(),
        "rank_correlation": dict(zip(names, correlations)),
        "rho_per_seed": aggregate(per_seed_rho, "constant rewards on a seed: no order").to_dict(),
        "order_follows_preferences": order_follows(correlations),
        "knob_pairs": knob_pairs(group, results, names[0], by_p1[0]["preference"], by_p1[-1]["preference"])
        if len(by_p1) >= 2 else None,
        "lambda_1_range": [min(lambdas), max(lambdas)] if lambdas else None,
    }


def knob_pairs(group: str, results: Sequence[RunResult], name: str, lowest: tuple[float, ...],
               highest: tuple[float, ...]) -> dict[str, Any] | None:
    """Objective 1's final reward at the largest p_1 and at the smallest, per shared seed: the
    paired sample the knob's effect is judged on (None with fewer than 2 shared seeds)."""
    at = {p: {r.run.seed: r.summary["final_reward"][name] for r in results
              if r.run.group == group and r.run.preference == p} for p in (lowest, highest)}
    seeds = sorted(set(at[lowest]) & set(at[highest]))
    if len(seeds) < 2:
        return None
    return {"metric": f"final_reward/{name} at p_1 = {highest[0]:g} minus at {lowest[0]:g}", "a": group, "b": group,
            "values_a": [at[highest][s] for s in seeds], "values_b": [at[lowest][s] for s in seeds],
            "better": "higher"}


def judge_knobs(fronts: dict[str, dict[str, Any]]) -> None:
    """Each front gains ``knob_effect``: does objective 1 gain when p_1 goes from its smallest to
    its largest value? Paired over seeds, Holm-corrected over the fronts of the table."""
    judged = [g for g, f in fronts.items() if f.get("knob_pairs")]
    comparisons = compare_table([fronts[g]["knob_pairs"] for g in judged]) if judged else []
    for group, front in fronts.items():
        front["knob_effect"] = {"verdict": "n/a (needs >= 2 preferences and 2 shared seeds)"}
    for group, comparison in zip(judged, comparisons):
        fronts[group]["knob_effect"] = comparison.to_dict()


def order_follows(correlations: Sequence[dict[str, Any]]) -> bool | None:
    """True when every objective's final reward has exactly the order of its preference weight
    (rho = +1); False when one has not; None when that cannot be told (constant rewards)."""
    known = [c["rho"] for c in correlations if c["rho"] is not None]
    if any(rho < 1 - 1e-9 for rho in known):
        return False
    return True if known and len(known) == len(correlations) else None


def knob_text(effect: dict[str, Any]) -> str:
    if "mean_diff" not in effect:
        return effect["verdict"]
    return f"{effect['mean_diff']:+.4g} [{effect['ci_low']:+.4g}, {effect['ci_high']:+.4g}] {effect['verdict']}"


def front_row(group: str, front: dict[str, Any], names: Sequence[str]) -> list[str]:
    def rho_text(c: dict[str, Any] | None) -> str:
        if not c or c["rho"] is None:
            return "n/a" + (f" ({c['note']})" if c else "")
        return f"{c['rho']:+.2f} ({c['p_value']:.2g})"

    hv = front["hypervolume"]
    seeds_rho = front["rho_per_seed"]
    lam = front["lambda_1_range"]
    return [group, format_stat(Stat(hv["mean"], hv["std"], hv["n"], hv.get("note", ""))),
            *[rho_text(front["rank_correlation"].get(n)) for n in names],
            format_stat(Stat(seeds_rho["mean"], seeds_rho["std"], seeds_rho["n"], seeds_rho.get("note", ""))),
            {True: "yes", False: "no", None: "n/a"}[front["order_follows_preferences"]],
            knob_text(front["knob_effect"]),
            "n/a" if lam is None else f"{lam[0]:.3f} .. {lam[1]:.3f}"]


def run_pareto(options: ExperimentOptions, algorithms: Sequence[str], betas: Sequence[float],
               preferences: Sequence[tuple[float, ...]], partition: str) -> int:
    """Plan, run (or reuse) and report the runs of `firm pareto`; the exit code."""
    out = options.out
    runs = plan_pareto(options.train, out, algorithms, betas, preferences, partition, options.seeds)
    warn_seeds(options.seeds)
    if len(preferences) < MIN_PREFERENCES:
        print(f"warning: {len(preferences)} preferences; a front needs >= {MIN_PREFERENCES} to say much",
              file=sys.stderr)
    failures = execute_plan(runs, options.train.flags, dry_run=options.dry_run, out=options.out,
                            eval_prompts=options.eval_prompts,
                            eval_samples=options.eval_samples)
    if options.dry_run:
        return 0

    def build(results, reference):
        groups = list(dict.fromkeys(r.group for r in runs if any(x.run.group == r.group for x in results)))
        tables, extra, points = pareto_tables(results, groups, preferences, options.seeds, reference)
        return tables, extra, lambda: plot_pareto(points, results[0].summary["objectives"], out)

    return finish_experiment("pareto", options, runs, failures,
                             {"algorithms": list(algorithms), "betas": list(betas),
                              "preferences": [list(p) for p in preferences], "partition": partition}, build)


__all__ = ["MIN_PREFERENCES", "default_preferences", "order_follows", "pareto_front_summary", "pareto_tables",
           "run_pareto"]
