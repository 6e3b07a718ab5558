"""SyntheticConfig: every knob of `firm synthetic`, with its default (one flag per field)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from firm.config import ALGORITHMS, ConfigError
from firm.mgda import check_beta

HETEROGENEITY = ("iid", "skewed")
OPTIMIZERS = ("sgd", "adam")


@dataclass
class SyntheticConfig:
    # --- the problem ----------------------------------------------------------------------
    seeds: int = 20
    """number of seeds; seed s draws the problem and the gradient noise, shared by every algorithm (paired comparisons)"""
    first_seed: int = 0
    """the seeds are first_seed, first_seed + 1, ..."""
    dim: int = 20
    """dimension d of the parameters x (x0 = 0)"""
    num_clients: int = 10
    """number of federated clients N"""
    num_objectives: int = 2
    """number of objectives M (2 or more; every pairwise conflict angle is the same)"""
    conflict_angle: float = 120.0
    """angle in degrees, in (0, 180), between the objectives' descent directions at x0 (30 = nearly collinear, 120 = conflicting); with M > 2 at most arccos(-1/(M-1))"""
    norm_imbalance: float = 1.0
    """ratio of objective 1's gradient norm at x0 to the other objectives' (1 = equal norms, 4 = 4:1); it scales objective 1, the Pareto set is unchanged"""
    condition: float = 4.0
    """condition number of each objective's Hessian (eigenvalues log-spaced in [1, condition], random rotation per objective)"""
    heterogeneity: str = "iid"
    """iid: every client has the global objectives (clients differ only by their gradient noise); skewed: client c weights objective c mod M by skew and its optima are offset"""
    skew: float = 4.0
    """skewed clients only: how much more a client weights its favoured objective (weights renormalised to average 1 over clients)"""
    client_offset: float = 0.5
    """skewed clients only: size of each client's offset of its optima, relative to the distance from x0 to the optimum (offsets cancel in the global objectives)"""
    noise: float = 1.0
    """gradient noise: its standard deviation relative to the client's gradient norm at x0, so the signal-to-noise ratio at x0 is 1 / noise^2; 0 = exact gradients"""

    # --- the federated optimisation ----------------------------------------------------------
    rounds: int = 100
    """federated rounds (FedAvg of the clients' parameters after each)"""
    local_steps: int = 1
    """local steps tau per round on every client"""
    optimizer: str = "sgd"
    """sgd, or adam (Adam with its state reset every round, as the LLM pipeline does)"""
    sgd_lr: float = 0.05
    """learning rate of sgd"""
    adam_lr: float = 0.01
    """learning rate of adam (betas 0.9, 0.999, eps 1e-8, no weight decay)"""
    algorithms: str = "firm,mgda,linear,fsmgda"
    """comma-separated algorithms to run (firm once per beta)"""
    betas: tuple[float, ...] = (0.01, 0.1, 1.0)
    """FIRM's beta values (strength of the pull of lambda towards p)"""
    preference: tuple[float, ...] = ()
    """preference p over the objectives, comma-separated, summing to 1 (empty = uniform)"""
    preference_sweep: tuple[float, ...] = (0.1, 0.3, 0.7, 0.9)
    """claim 5: first-objective preferences q run besides p (p = (q, (1-q)/(M-1), ...)); empty = no sweep"""

    # --- statistics and output ---------------------------------------------------------------
    grid: bool = False
    """run the regime grid of EXPERIMENTS.md (one factor at a time from the base regime) instead of one configuration"""
    relative_margin: float = 0.05
    """equivalence margin of the two one-sided tests, relative to the baseline's mean"""
    alpha: float = 0.05
    """significance level (Holm-corrected over the comparisons of one table)"""
    bootstrap: int = 10000
    """bootstrap resamples of the paired 95 percent interval"""
    plots: bool = True
    """write the PNG plots"""

    def preference_vector(self, first: float | None = None) -> tuple[float, ...]:
        """p (uniform when unset), or the sweep's p for first-objective weight ``first``."""
        m = self.num_objectives
        if first is not None:
            return (first,) + tuple((1.0 - first) / (m - 1) for _ in range(m - 1))
        return tuple(self.preference) if self.preference else tuple(1.0 / m for _ in range(m))

    def algorithm_names(self) -> list[str]:
        return [a.strip() for a in self.algorithms.split(",") if a.strip()]

    def validate(self) -> "SyntheticConfig":
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        for name in ("seeds", "dim", "num_clients", "rounds", "local_steps", "bootstrap"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.seeds >= 2, f"seeds must be >= 2 for paired statistics, got {self.seeds}")
        need(self.num_objectives >= 2, f"num_objectives must be >= 2, got {self.num_objectives}")
        need(self.num_objectives <= min(self.dim, 8),
             f"num_objectives must be <= min(dim, 8), got {self.num_objectives} with dim {self.dim}")
        for name in ("conflict_angle", "norm_imbalance", "condition", "skew", "client_offset", "noise", "sgd_lr",
                     "adam_lr", "relative_margin", "alpha"):
            need(math.isfinite(getattr(self, name)), f"{name} must be finite, got {getattr(self, name)}")
        need(0 < self.conflict_angle < 180, f"conflict_angle must be in (0, 180) degrees, got {self.conflict_angle}")
        limit = math.degrees(math.acos(-1.0 / (self.num_objectives - 1)))
        need(self.conflict_angle <= limit + 1e-9,
             f"conflict_angle must be <= {limit:.1f} degrees for {self.num_objectives} objectives with equal "
             f"pairwise angles, got {self.conflict_angle}")
        need(self.noise >= 0, f"noise must be >= 0 (relative noise std), got {self.noise}")
        for name in ("norm_imbalance", "sgd_lr", "adam_lr", "relative_margin"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.condition >= 1, f"condition must be >= 1, got {self.condition}")
        need(self.skew >= 1, f"skew must be >= 1, got {self.skew}")
        need(self.client_offset >= 0, f"client_offset must be >= 0, got {self.client_offset}")
        need(0 < self.alpha < 1, f"alpha must be in (0, 1), got {self.alpha}")
        need(self.heterogeneity in HETEROGENEITY,
             f"heterogeneity must be one of {HETEROGENEITY}, got {self.heterogeneity!r}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        names = self.algorithm_names()
        need(bool(names), "algorithms is empty")
        for name in names:
            need(name in ALGORITHMS, f"algorithms: unknown {name!r}, expected some of {tuple(ALGORITHMS)}")
        need(len(set(names)) == len(names), f"algorithms lists one twice: {self.algorithms!r}")
        if "firm" in names:
            need(len(self.betas) >= 1, "betas is empty (firm runs once per beta)")
        for beta in self.betas:
            try:
                check_beta(beta)
            except ValueError as err:
                need(False, f"betas: {err}")
        p = self.preference_vector()
        need(len(p) == self.num_objectives,
             f"preference must have {self.num_objectives} entries (one per objective), got {len(p)}")
        need(all(math.isfinite(v) and v >= 0 for v in p), f"preference must be non-negative, got {p}")
        need(abs(sum(p) - 1) <= 1e-6, f"preference must sum to 1, got {sum(p)!r}")
        for q in self.preference_sweep:
            need(0 <= q <= 1, f"preference_sweep values must be in [0, 1], got {q}")
        return self

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
