"""An experiment's report: numbers and mean ± std as text, markdown tables, and the files
table.md and results.json (plus the experiment's plots) in the experiment directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from firm.experiments.execute import TRAIN_LOG, Failure
from firm.experiments.metrics import (REFERENCE_MARGIN_FRACTION, RunResult, Stat,
                                      add_hypervolumes_and_wall_times, read_results, reference_point)
from firm.experiments.plan import ExperimentOptions, PlannedRun, base_eval_path

TablesBuilder = Callable[[Sequence[RunResult], Sequence[float]], tuple[str, dict[str, Any], Callable[[], list[Path]]]]
"""``build(results, reference)`` of one experiment: (its tables as markdown, its entries of
results.json, a function that draws its plots and returns their paths)."""


# ---- text ---------------------------------------------------------------------------------------
def format_number(value: float, key: str = "") -> str:
    if key.startswith("bytes"):
        return f"{value:,.0f}"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def format_stat(stat: Stat, key: str = "") -> str:
    if stat.mean is None:
        return f"n/a ({stat.note})"
    if stat.std is None:
        return f"{format_number(stat.mean, key)} (1 seed)"
    return f"{format_number(stat.mean, key)} ± {format_number(stat.std, key)}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def reference_text(names: Sequence[str], reference: Sequence[float], fixed: bool) -> str:
    point = ", ".join(f"{n} = {v:.4g}" for n, v in zip(names, reference))
    how = ("fixed by --reference-point" if fixed else
           "per objective the lowest reward that any round record or final reward of any run of this experiment "
           "shows, minus "
           f"{REFERENCE_MARGIN_FRACTION:.0%} of that objective's observed range; comparable within this "
           "experiment only")
    return f"Hypervolume reference point: ({point}): {how}."


def run_entry(result: RunResult) -> dict[str, Any]:
    run = result.run
    return {"group": run.group, "algorithm": run.algorithm, "partition": run.partition, "seed": run.seed,
            "preference": None if run.preference is None else list(run.preference), "beta": run.beta,
            "effective_beta": run.config.effective_beta(), "run_dir": str(run.run_dir), **result.summary}


# ---- files --------------------------------------------------------------------------------------
def finish_experiment(kind: str, options: ExperimentOptions, runs: Sequence[PlannedRun],
                      failures: Sequence[Failure], settings: dict[str, Any], build: TablesBuilder) -> int:
    """Read the finished runs of ``compare`` or ``pareto``, score their hypervolumes against
    one reference point, and write tables, results.json and plots; the exit code."""
    base_path = base_eval_path(options.out, options.eval_prompts, options.eval_samples)
    base = json.loads(base_path.read_text()) if options.eval_prompts and base_path.exists() else None
    results = read_results(runs, failures, options.eval_prompts, options.eval_samples, base)
    if results:
        names = results[0].summary["objectives"]
        fixed_reference = options.reference_point
        reference = fixed_reference or reference_point([r.rounds for r in results], names,
                                                       finals=[r.summary["final_reward"] for r in results])
        add_hypervolumes_and_wall_times(results, reference)
        tables, extra, plot = build(results, reference)
        config = runs[0].config
        settings = {**settings, "seeds": list(options.seeds), "train_flags": list(options.train.flags),
                    "num_rounds": config.num_rounds, "num_clients": config.num_clients,
                    "policy": config.policy, "rewards": config.rewards}
        write_outputs(options.out, kind, options.command, settings, names, reference,
                      fixed_reference is not None, results, failures, tables, extra, plot)
    return report_failures(failures, results, options.out)


def write_outputs(out: Path, experiment: str, command: str, settings: dict[str, Any], names: Sequence[str],
                  reference: Sequence[float], fixed: bool, results: Sequence[RunResult], failures: Sequence[Failure],
                  tables: str, extra: dict[str, Any], plot: Callable[[], list[Path]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    header = [f"# firm {experiment}: {out}", "", f"Command: `{command}`", "",
              f"Settings: {json.dumps(settings)}.", "", reference_text(names, reference, fixed), "",
              f"Final reward: {results[0].summary['final_reward_source']}.", "",
              "Values are mean ± sample std (ddof 1) over seeds; smoothness = std over rounds of the round-to-round "
              "change of the mean reward (lower = smoother); lambda drift = mean over rounds of the std of lambda "
              "across clients; bytes are per client per round, as the server's counters logged them.", ""]
    if failures:
        header += ["FAILED runs (left out of every number below): "
                   + "; ".join(f"{f.run.describe()}: {f.reason}" for f in failures), ""]
    (out / "table.md").write_text("\n".join(header) + "\n" + tables)
    plots = plot()
    payload = {"experiment": experiment, "command": command, "settings": settings,
               "reference_point": dict(zip(names, reference)), "reference_point_fixed": fixed,
               "runs": [run_entry(r) for r in results],
               "failures": [{"run": f.run.describe(), "run_dir": str(f.run.run_dir), "reason": f.reason,
                             "log_tail": f.log_tail} for f in failures],
               "plots": [str(p.relative_to(out)) for p in plots], **extra}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out / 'table.md'}, {out / 'results.json'} and {', '.join(p.name for p in plots)}")


def report_failures(failures: Sequence[Failure], results: Sequence[RunResult], out: Path) -> int:
    if not results:
        print(f"error: no run completed; nothing to summarise in {out}", file=sys.stderr)
    if failures:
        print(f"error: {len(failures)} run(s) failed:", file=sys.stderr)
        for f in failures:
            print(f"  {f.run.describe()}: {f.reason} (log: {f.run.run_dir / TRAIN_LOG})", file=sys.stderr)
    return 1 if failures or not results else 0


__all__ = ["TablesBuilder", "finish_experiment", "format_number", "format_stat", "markdown_table",
           "reference_text", "report_failures", "run_entry", "write_outputs"]
