"""`firm synthetic`: a controlled federated multi-objective problem with a known Pareto set.

It runs FIRM, MGDA, linear scalarisation and FSMGDA through the weight solver and the server
combine the LLM pipeline uses (firm.mgda.solve_weights, firm.fsmgda.server.fsmgda_combine) on
quadratic objectives, measures the exact metrics of claims 2-5 on many shared seeds and
compares the algorithms with paired statistics (firm.stats).

problem.py: the objectives and their Pareto set; algorithms.py: the federated runs;
metrics.py: the per-seed metrics; grid.py: configurations, regimes and comparisons;
report.py: results.json, table.md and the plots.
"""

from firm.synthetic.config import SyntheticConfig

__all__ = ["SyntheticConfig"]
