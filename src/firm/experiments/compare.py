"""`firm compare`: several algorithms (firm, mgda, linear, fsmgda, ...) on the same data,
partitions and seeds. Per algorithm and partition the table reports the final reward per
objective, the hypervolume of the final reward vector, bytes up and down per client per round,
client disagreement drift (spread of lambda across clients, adapter distance from the average)
and smoothness (spread of the round-to-round reward changes), KL and response length beside
the rewards, and then firm against each other algorithm on every claim's metric: the paired
difference over shared seeds, its interval and a verdict (firm.stats)."""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from firm.config import ALGORITHMS
from firm.experiments.execute import execute_plan
from firm.experiments.metrics import RunResult, Stat, aggregate
from firm.experiments.plan import ExperimentError, ExperimentOptions, base_eval_path, plan_compare, warn_seeds
from firm.experiments.report import finish_experiment, format_number, format_stat, markdown_table
from firm.plots import plot_compare
from firm.heldout import pooled_gain
from firm.stats import compare_table, smallest_wilcoxon_p


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


# Equivalence margins in each metric's own units, fixed before any run of the decisive experiment
# (EXPERIMENTS.md states them): a difference inside the margin is too small to matter. Rewards are
# Bradley-Terry scores whose per-response spread is 0.4-0.7, so 0.02 is about 3-5 % of it.
EQUIVALENCE_MARGINS = {"final_reward": 0.02, "hypervolume": 0.005, "lambda_drift": 0.01,
                       "step_geometry/lambda_step_spread": 0.01, "adapter_distance": 0.01, "update_cosine": 0.005,
                       "smoothness": 0.01, "step_geometry/lambda_total_variation": 0.2}
# Metrics fixed by construction (the same on every seed): compared without a test.
DETERMINISTIC_METRICS = ("bytes_up_per_client", "bytes_down_per_client")


def equivalence_margin(key: str) -> float:
    """The margin of a metric key ('final_reward/helpful' falls under 'final_reward')."""
    if key in EQUIVALENCE_MARGINS:
        return EQUIVALENCE_MARGINS[key]
    head = key.split("/")[0]
    if head in EQUIVALENCE_MARGINS:
        return EQUIVALENCE_MARGINS[head]
    raise KeyError(f"no equivalence margin fixed for metric {key!r}")


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


def gain_table(results: Sequence[RunResult], groups: Sequence[str], base: dict[str, Any]) -> tuple[str, dict]:
    """Each algorithm's held-out gain over the untrained policy: mean paired gain per objective,
    pooled over its seeds, with a prompt-level 95% interval, and how many seeds' own interval
    excludes 0."""
    names = list(base["rewards"])
    rows, data = [], {}
    for g in groups:
        runs = [r for r in results if r.run.group == g and r.evaluation is not None]
        if not runs:
            continue
        pooled = pooled_gain(base, [r.evaluation for r in runs])
        data[g] = pooled
        cells = []
        for n in names:
            above = sum(r.summary["heldout_gain"][n]["ci_low"] > 0 for r in runs)
            gain = pooled[n]
            cells.append(f"{gain['gain']:+.4f} [{gain['ci_low']:+.4f}, {gain['ci_high']:+.4f}] ({above}/{len(runs)})")
        kl = np.mean([r.summary["final_kl"] for r in runs])
        rows.append([g, str(len(runs)), *cells, f"{kl:.3f}"])
    samples = base["samples_per_prompt"]
    text = (f"### Held-out gain over the untrained policy\n\nThe untrained policy (adapter off) and every final "
            f"adapter scored on the same {base['num_prompts']} held-out prompts x {samples} samples with the same "
            f"seed. Each cell: the mean paired gain (adapter minus untrained), pooled over the algorithm's seeds, "
            f"its 95% interval (bootstrap over prompts), and (k/n) the seeds whose own interval lies above 0. "
            f"Untrained policy: " + ", ".join(f"{n} {base['rewards'][n]:.4f}" for n in names) + ".\n\n"
            + markdown_table(["algorithm", "seeds", *[f"gain {n}" for n in names], "final KL"], rows))
    return text, data


def compare_tables(results: Sequence[RunResult], partitions: Sequence[str], groups: Sequence[str],
                   primary: Sequence[tuple[str, str, str]] = (), base: dict[str, Any] | None = None
                   ) -> tuple[str, dict[str, Any]]:
    names = results[0].summary["objectives"]
    metrics = compare_metrics(names)
    keys = [m[0] for m in metrics]
    reference = reference_algorithm(groups)
    text, aggregates, verdicts, primaries, gains = [], {}, {}, {}, {}
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
        in_partition = [r for r in results if r.run.partition == partition]
        if base is not None:
            gain_text, gains[partition] = gain_table(in_partition, groups, base)
            text.append("\n" + gain_text)
        if primary:
            primaries[partition] = primary_verdicts(in_partition, primary, metrics)
            n = min((c["n"] for c in primaries[partition] if "n" in c), default=0)
            tested = sum(bool(c.get("holm_tested")) for c in primaries[partition])
            smallest = smallest_wilcoxon_p(n, tested)
            text.append("\n### Primary comparisons (named before the run; Holm over these only)\n\n"
                        + (f"With {n} paired seeds and Holm over {tested} comparisons the smallest possible adjusted "
                           f"p is {smallest:.3g} ({tested} x the smallest Wilcoxon p, {smallest_wilcoxon_p(n):.3g}): "
                           "no difference can be confirmed or refuted at this size, only shown equivalent.\n\n"
                           if n > 0 and smallest >= 0.05 else "")
                        + markdown_table(["comparison", "metric", "margin", "difference [95% CI] verdict", "reason"],
                                         [[f"{c['a']} vs {c['b']}", c["metric"],
                                           f"{c['margin']:g}" if "margin" in c else "", c["text"],
                                           c.get("reason", "")] for c in primaries[partition]]))
        others = [g for g in groups if g != reference]
        if others:
            judged = [(key, label, claim, higher) for key, label, claim, higher in metrics if claim]
            cells = paired_verdicts(in_partition, reference, others, judged, exploratory=bool(primary))
            verdicts[partition] = {other: {key: cells[(other, key)] for key, *_ in judged} for other in others}
            verdict_rows = [[f"({claim}) {label}", "higher" if higher else "lower",
                             *[cells[(other, key)]["text"] for other in others]]
                            for key, label, claim, higher in judged]
            family = ("exploratory: uncorrected p-values, leads for the next experiment rather than verdicts"
                      if primary else "Holm-corrected over this table")
            text.append(f"\n### {reference} against the others ({partition}; {family})\n\n"
                        f"Each cell: the mean paired difference {reference} minus the other over the shared seeds, "
                        "its paired bootstrap 95% interval, and the verdict (firm.stats): confirmed / refuted when "
                        "the Wilcoxon test and the interval agree the difference goes the claimed / the other way; "
                        "equivalent inside the margin fixed before the run (TOST; EQUIVALENCE_MARGINS, in the "
                        "metric's own units); else not separable. Bytes are fixed by construction and compared "
                        "without a test. (n): the claim of the paper the row tests.\n\n"
                        + markdown_table(["metric", "better is", *[f"{reference} vs {o}" for o in others]],
                                         verdict_rows))
            constant = constant_lambda_algorithms(others)
            if constant:
                text.append(f"\nlambda drift of {' and '.join(constant)} is 0 by construction (linear: lambda = p "
                            "fixed; fsmgda: one lambda chosen by the server); for them the drift claim rests on the "
                            "adapter distance.\n")
    return "\n".join(text), {"aggregates": aggregates, "verdicts": verdicts, "reference_algorithm": reference,
                              "primary": primaries, "heldout_gain": gains,
                              "equivalence_margins": EQUIVALENCE_MARGINS}


def comparison_row(by_seed: dict[str, dict[int, dict]], a: str, b: str, key: str, higher: bool,
                   primary: bool) -> dict[str, Any] | str:
    """The firm.stats row comparing group a with b on a metric over the seeds both ran, or why
    there is none."""
    seeds = sorted(set(by_seed.get(a, {})) & set(by_seed.get(b, {})))
    if len(seeds) < 2:
        return "needs >= 2 seeds"
    va = [metric_value(by_seed[a][s], key) for s in seeds]
    vb = [metric_value(by_seed[b][s], key) for s in seeds]
    if any(v is None for v in va + vb):
        return missing_note(key)
    row = {"metric": key, "a": a, "b": b, "values_a": va, "values_b": vb, "better": "higher" if higher else "lower",
           "primary": primary}
    if key in DETERMINISTIC_METRICS:
        row["deterministic"] = True
    else:
        row["margin"] = equivalence_margin(key)
    return row


def comparison_text(comparison) -> str:
    return (f"{format_number(comparison.mean_diff, comparison.metric)} "
            f"[{format_number(comparison.ci_low, comparison.metric)}, "
            f"{format_number(comparison.ci_high, comparison.metric)}] {comparison.verdict}"
            + (" (exploratory)" if comparison.exploratory else ""))


def paired_verdicts(results: Sequence[RunResult], reference: str, others: Sequence[str],
                    metrics: Sequence[tuple[str, str, str, bool]], exploratory: bool = False
                    ) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (other algorithm, metric): the paired comparison of ``reference`` against it on the
    seeds both ran (firm.stats): Holm-corrected over the table, or, when primary comparisons were
    named before the run (``exploratory``), uncorrected and labelled exploratory."""
    by_seed = {g: {r.run.seed: r.summary for r in results if r.run.group == g} for g in [reference, *others]}
    rows, cells = [], {}
    for other in others:
        for key, _label, _claim, higher in metrics:
            row = comparison_row(by_seed, reference, other, key, higher, primary=not exploratory)
            if isinstance(row, str):
                cells[(other, key)] = {"verdict": "n/a", "text": f"n/a ({row})"}
            else:
                rows.append(row)
    if rows:
        for comparison in compare_table(rows):
            cells[(comparison.b, comparison.metric)] = {**comparison.to_dict(), "text": comparison_text(comparison)}
    return cells


def primary_verdicts(results: Sequence[RunResult], primary: Sequence[tuple[str, str, str]],
                     metrics: Sequence[tuple[str, str, str, bool]]) -> list[dict[str, Any]]:
    """The comparisons named before the run, Holm-corrected over these only."""
    by_seed: dict[str, dict[int, dict]] = {}
    for r in results:
        by_seed.setdefault(r.run.group, {})[r.run.seed] = r.summary
    direction = {key: higher for key, _label, _claim, higher in metrics}
    rows, cells = [], []
    for a, b, key in primary:
        if key not in direction:
            raise ExperimentError(f"primary comparison {a} vs {b}: unknown metric {key!r}; choose from "
                                  f"{', '.join(direction)}")
        row = comparison_row(by_seed, a, b, key, direction[key], primary=True)
        cells.append({"a": a, "b": b, "metric": key, "row": row})
        if not isinstance(row, str):
            rows.append(row)
    table = iter(compare_table(rows)) if rows else iter(())
    out = []
    for cell in cells:
        if isinstance(cell["row"], str):
            out.append({"a": cell["a"], "b": cell["b"], "metric": cell["metric"], "verdict": "n/a",
                        "text": f"n/a ({cell['row']})"})
        else:
            comparison = next(table)
            out.append({**comparison.to_dict(), "text": comparison_text(comparison)})
    return out


def run_compare(options: ExperimentOptions, algorithms: Sequence[str], partitions: Sequence[str],
                betas: Sequence[float] = ()) -> int:
    """Plan, run (or reuse) and report the runs of `firm compare`; the exit code."""
    out = options.out
    runs = plan_compare(options.train, out, algorithms, partitions, options.seeds, betas)
    planned_groups = list(dict.fromkeys(run.group for run in runs))
    unknown = sorted({name for a, b, _ in options.primary for name in (a, b)} - set(planned_groups))
    if unknown:
        raise ExperimentError(f"--primary names {', '.join(unknown)}, not among the planned groups "
                              f"({', '.join(planned_groups)})")
    warn_seeds(options.seeds)
    failures = execute_plan(runs, options.train.flags, dry_run=options.dry_run, out=options.out,
                            eval_prompts=options.eval_prompts,
                            eval_samples=options.eval_samples)
    if options.dry_run:
        return 0

    base_path = base_eval_path(out, options.eval_prompts, options.eval_samples)

    def build(results, reference):
        groups = [g for g in planned_groups if any(r.run.group == g for r in results)]
        base = json.loads(base_path.read_text()) if options.eval_prompts and base_path.exists() else None
        tables, extra = compare_tables(results, partitions, groups, options.primary, base)
        return tables, extra, lambda: plot_compare(results, partitions, groups, out)

    return finish_experiment("compare", options, runs, failures,
                             {"algorithms": list(algorithms), "partitions": list(partitions), "betas": list(betas),
                              "primary": [list(c) for c in options.primary]},
                             build)


__all__ = ["compare_metrics", "compare_tables", "constant_lambda_algorithms", "paired_verdicts", "reference_algorithm",
           "run_compare"]
