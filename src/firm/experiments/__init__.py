"""The experiment harness behind `firm compare` and `firm pareto`.

Both commands plan a grid of `firm train` runs, run them one after the other, read every run's
``metrics.jsonl`` and write a table, a results file and plots into the experiment directory:

- ``firm compare`` (compare.py) runs several algorithms on the same data, partitions and seeds
  and reports, per algorithm, final rewards, hypervolume, bytes, client drift and smoothness.
- ``firm pareto`` (pareto.py) sweeps preference vectors and reports the front of final rewards,
  its hypervolume and whether the points follow the order of the preferences.

The modules, in the order of one experiment: plan.py (which runs, where, how far each got),
execute.py (the `firm train` / `firm eval` subprocesses), metrics.py (what the runs measured and
the statistics over seeds), report.py (table.md and results.json); the plots are in firm.plots.
The command line (argparse, the flags after ``--``) is firm.cli.experiments; this package never
imports firm.cli.
"""

from firm.experiments.compare import compare_tables, run_compare
from firm.experiments.execute import Failure, eval_command, execute_plan, train_command
from firm.experiments.metrics import (REFERENCE_MARGIN_FRACTION, RunResult, Stat, aggregate,
                                      client_update_cosine, hypervolume, rank_correlation, read_results,
                                      read_round_records, reference_point, smoothness, step_geometry,
                                      summarize_run, update_cosine)
from firm.experiments.pareto import MIN_PREFERENCES, default_preferences, order_follows, pareto_tables, run_pareto
from firm.experiments.plan import (HARNESS_FLAGS_COMPARE, HARNESS_FLAGS_PARETO, MIN_SEEDS_FOR_CLAIMS,
                                   ExperimentError, ExperimentOptions, PlannedRun, TrainSettings, base_eval_path,
                                   eval_path, expected_config, plan_compare, plan_pareto, plan_run, run_status)

__all__ = ["ExperimentError", "ExperimentOptions", "Failure", "HARNESS_FLAGS_COMPARE", "HARNESS_FLAGS_PARETO",
           "MIN_PREFERENCES", "MIN_SEEDS_FOR_CLAIMS", "PlannedRun", "REFERENCE_MARGIN_FRACTION", "RunResult", "Stat",
           "TrainSettings", "aggregate", "base_eval_path", "eval_path", "client_update_cosine", "compare_tables", "default_preferences", "eval_command",
           "execute_plan", "expected_config", "hypervolume", "order_follows", "pareto_tables", "plan_compare",
           "plan_pareto", "plan_run", "rank_correlation", "read_results", "read_round_records", "reference_point",
           "run_compare", "run_pareto", "run_status", "smoothness", "step_geometry", "summarize_run", "train_command",
           "update_cosine"]
