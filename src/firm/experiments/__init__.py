"""The experiment harness: `firm compare` and `firm pareto`."""

from firm.experiments.metrics import *  # noqa: F401,F403
