"""`firm compare`: several algorithms (firm, mgda, linear, fsmgda, ...) on the same data,
partitions and seeds. Per algorithm and partition the table reports the final reward per
objective, the hypervolume of the final reward vector, bytes up and down per client per round,
client disagreement drift (spread of lambda across clients, adapter distance from the average)
and smoothness (spread of the round-to-round reward changes), KL and response length beside
the rewards, and then firm against each other algorithm on every claim's metric: the paired
difference over shared seeds, its interval and a verdict (firm.stats)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from firm.config import ALGORITHMS
from firm.experiments.execute import execute_plan
from firm.experiments.metrics import RunResult, Stat, aggregate
from firm.experiments.plan import ExperimentOptions, plan_compare, warn_seeds
from firm.experiments.report import finish_experiment, format_number, format_stat, markdown_table
from firm.plots import plot_compare
from firm.stats import compare_table


def reference_algorithm(groups: Sequence[str]) -> str:
    """FIRM's claims are about firm: the first firm group (at the first of several betas);
    without firm the first algorithm is the reference."""
    return next((g for g in groups if g == "firm" or g.startswith("firm (")), groups[0])


# Metrics of the compare table: (key, label, claim, higher is better). A claim of "" marks a
# metric that explains the others (KL, length, gradient geometry): in the table, not judged.
def compare_metrics(names: Sequence[str]) -> list[tuple[str, str, str, bool]]:
    metrics = [(f"final_reward/{n}", f"final reward {n}", "4", True) for n in names]
    metrics.append(("hypervolume", "hypervolume", "4", True))
    metrics += [("final_kl", "final KL to the base", "", False),
                ("final_response_tokens", "final response tokens", "", False),
                ("bytes_up_per_client", "bytes up / client / round", "1", False),
                ("bytes_down_per_client", "bytes down / client / round", "1", False),
                ("lambda_drift", "lambda drift (std across clients)", "3", False),
                ("step_geometry/lambda_step_spread", "lambda spread across clients per local step", "3", False),
                ("adapter_distance", "adapter distance from mean", "3", False),
                ("update_cosine", "cosine between client updates", "3", True)]
    metrics += [(f"smoothness/{n}", f"smoothness {n} (std of changes)", "2", False) for n in names]
    metrics += [("step_geometry/lambda_total_variation", "lambda total variation per client-round", "2", False),
                ("step_geometry/gram_distance", "Gram distance D per step", "", False),
                ("step_geometry/norm_ratio", "gradient norm ratio per step", "", False),
                ("step_geometry/cosine", "gradient cosine per step", "", False)]
    return metrics


def metric_value(summary: dict[str, Any], key: str) -> float | None:
    head, _, tail = key.partition("/")
    return summary[head][tail] if tail else summary[key]


# Why a metric can be missing from a run's summary, by its head ("smoothness/helpful" -> smoothness).
MISSING_NOTES = {"smoothness": "needs >= 3 rounds", "step_geometry": "no per-step records",
                 "update_cosine": "one adapter per client and FedAvg only"}


def missing_note(key: str) -> str:
    return MISSING_NOTES.get(key.split("/")[0], "not measured")


def aggregate_group(results: Sequence[RunResult], keys: Sequence[str]) -> dict[str, Stat]:
    return {key: aggregate([metric_value(r.summary, key) for r in results], missing_note(key)) for key in keys}


def constant_lambda_algorithms(groups: Sequence[str]) -> list[str]:
    """The algorithms among ``groups`` whose lambda cannot differ between clients: fixed weights
    (linear) or one lambda the server chooses (fsmgda)."""
    return [name for name, algorithm in ALGORITHMS.items()
            if name in groups and (algorithm.fixed_weights or algorithm.per_objective_upload)]


def compare_tables(results: Sequence[RunResult], partitions: Sequence[str], groups: Sequence[str]
                   ) -> tuple[str, dict[str, Any]]:
    names = results[0].summary["objectives"]
    metrics = compare_metrics(names)
    keys = [m[0] for m in metrics]
    reference = reference_algorithm(groups)
    text, aggregates, verdicts = [], {}, {}
    for partition in partitions:
        stats = {g: aggregate_group([r for r in results if r.run.group == g and r.run.partition == partition], keys)
                 for g in groups}
        aggregates[partition] = {g: {k: s.to_dict() for k, s in st.items()} for g, st in stats.items()}
        header = ["algorithm", "seeds", *[m[1] for m in metrics], "wall s / run"]
        rows = []
        for g in groups:
            runs = [r for r in results if r.run.group == g and r.run.partition == partition]
            walls = [r.summary["wall_seconds"] for r in runs if r.summary.get("wall_seconds") is not None]
            rows.append([g, str(len(runs)), *[format_stat(stats[g][k], k) for k in keys],
                         f"{np.mean(walls):.0f}" if walls else "n/a"])
        text.append(f"## partition: {partition}\n\n" + markdown_table(header, rows))
        others = [g for g in groups if g != reference]
        if others:
            in_partition = [r for r in results if r.run.partition == partition]
            judged = [(key, label, claim, higher) for key, label, claim, higher in metrics if claim]
            cells = paired_verdicts(in_partition, reference, others, judged)
            verdicts[partition] = {other: {key: cells[(other, key)] for key, *_ in judged} for other in others}
            verdict_rows = [[f"({claim}) {label}", "higher" if higher else "lower",
                             *[cells[(other, key)]["text"] for other in others]]
                            for key, label, claim, higher in judged]
            text.append(f"\n### {reference} against the others ({partition})\n\n"
                        f"Each cell: the mean paired difference {reference} minus the other over the shared seeds, "
                        "its paired bootstrap 95% interval, and the verdict (firm.stats): confirmed / refuted when "
                        "the Holm-corrected Wilcoxon test (over this table) and the interval agree the difference "
                        "goes the claimed / the other way; equivalent inside a 5% margin (TOST); else not "
                        "separable. With 3 seeds no Wilcoxon p can go below 0.25, so nothing is confirmed or "
                        "refuted at that size. (n): the claim of the paper the row tests.\n\n"
                        + markdown_table(["metric", "better is", *[f"{reference} vs {o}" for o in others]],
                                         verdict_rows))
            constant = constant_lambda_algorithms(others)
            if constant:
                text.append(f"\nlambda drift of {' and '.join(constant)} is 0 by construction (linear: lambda = p "
                            "fixed; fsmgda: one lambda chosen by the server); for them the drift claim rests on the "
                            "adapter distance.\n")
    return "\n".join(text), {"aggregates": aggregates, "verdicts": verdicts, "reference_algorithm": reference}


def paired_verdicts(results: Sequence[RunResult], reference: str, others: Sequence[str],
                    metrics: Sequence[tuple[str, str, str, bool]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (other algorithm, metric): the paired comparison of ``reference`` against it on the
    seeds both ran, Holm-corrected over every comparison of the table (firm.stats)."""
    by_seed = {g: {r.run.seed: r.summary for r in results if r.run.group == g} for g in [reference, *others]}
    rows, cells = [], {}
    for other in others:
        seeds = sorted(set(by_seed[reference]) & set(by_seed[other]))
        for key, _label, _claim, higher in metrics:
            a = [metric_value(by_seed[reference][s], key) for s in seeds]
            b = [metric_value(by_seed[other][s], key) for s in seeds]
            if len(seeds) < 2 or any(v is None for v in a + b):
                why = "needs >= 2 seeds" if len(seeds) < 2 else missing_note(key)
                cells[(other, key)] = {"verdict": "n/a", "text": f"n/a ({why})"}
                continue
            rows.append({"metric": key, "a": reference, "b": other, "values_a": a, "values_b": b,
                         "better": "higher" if higher else "lower"})
    if rows:
        for comparison in compare_table(rows):
            cells[(comparison.b, comparison.metric)] = {
                **comparison.to_dict(),
                "text": (f"{format_number(comparison.mean_diff, comparison.metric)} "
                         f"[{format_number(comparison.ci_low, comparison.metric)}, "
                         f"{format_number(comparison.ci_high, comparison.metric)}] {comparison.verdict}")}
    return cells


def run_compare(options: ExperimentOptions, algorithms: Sequence[str], partitions: Sequence[str],
                betas: Sequence[float] = ()) -> int:
    """Plan, run (or reuse) and report the runs of `firm compare`; the exit code."""
    out = options.out
    runs = plan_compare(options.train, out, algorithms, partitions, options.seeds, betas)
    planned_groups = list(dict.fromkeys(run.group for run in runs))
    warn_seeds(options.seeds)
    failures = execute_plan(runs, options.train.flags, dry_run=options.dry_run, eval_prompts=options.eval_prompts,
                            eval_samples=options.eval_samples)
    if options.dry_run:
        return 0

    def build(results, reference):
        groups = [g for g in planned_groups if any(r.run.group == g for r in results)]
        tables, extra = compare_tables(results, partitions, groups)
        return tables, extra, lambda: plot_compare(results, partitions, groups, out)

    return finish_experiment("compare", options, runs, failures,
                             {"algorithms": list(algorithms), "partitions": list(partitions), "betas": list(betas)},
                             build)


__all__ = ["compare_metrics", "compare_tables", "constant_lambda_algorithms", "paired_verdicts", "reference_algorithm",
           "run_compare"]
