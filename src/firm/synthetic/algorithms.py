"""The four algorithms on the synthetic problem, vectorised over seeds and clients.

The weights come from the code the LLM pipeline runs, nothing re-implemented beside it:
firm and mgda call ``firm.mgda.solve_weights(gram, beta, p)`` on each client's Gram matrix at
every local step (mgda with beta = 0, as ``Algorithm.solver_beta`` says); linear uses the fixed
preference p (``Algorithm.fixed_weights``); fsmgda's clients run one pass per objective and the
server steps with ``firm.fsmgda.server.fsmgda_combine`` (``Algorithm.per_objective_upload``).
After each round the server averages the clients' parameters (FedAvg).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from firm.config import ALGORITHMS
from firm.fsmgda.server import fsmgda_combine
from firm.mgda import solve_weights
from firm.synthetic.config import SyntheticConfig
from firm.synthetic.problem import Problem


class Sgd:
    def __init__(self, lr: float):
        self.lr = lr

    def step(self, x: np.ndarray, grad: np.ndarray) -> np.ndarray:
        return x - self.lr * grad


class Adam:
    """Adam (no weight decay); a new instance each round is the reset the LLM pipeline does."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.t, self.m, self.v = 0, 0.0, 0.0

    def step(self, x: np.ndarray, grad: np.ndarray) -> np.ndarray:
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        m_hat = self.m / (1 - b1**self.t)
        v_hat = self.v / (1 - b2**self.t)
        return x - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def make_optimizer(config: SyntheticConfig):
    return Sgd(config.sgd_lr) if config.optimizer == "sgd" else Adam(config.adam_lr)


@dataclass
class Run:
    """One algorithm's trajectory on every seed."""

    label: str
    algorithm: str
    beta: float
    preference: tuple[float, ...]
    x: np.ndarray  # (R + 1, S, d) global parameters after each round (x[0] = x0)
    client_lambdas: np.ndarray  # (R, tau, S, N, M) the clients' weights (NaN for fsmgda)
    server_lambdas: np.ndarray  # (R, S, M) fsmgda's server weights (NaN for the others)


def client_weights(gradients: np.ndarray, algorithm: str, beta: float, preference: np.ndarray) -> np.ndarray:
    """Each client's lambda at one local step from its per-objective gradients (S, N, M, d)."""
    spec = ALGORITHMS[algorithm]
    s, n, m, _ = gradients.shape
    if spec.fixed_weights:
        return np.broadcast_to(preference, (s, n, m)).copy()
    gram = np.einsum("snmi,snli->snml", gradients, gradients)
    solver_beta = spec.solver_beta(beta)
    flat = gram.reshape(s * n, m, m)
    return np.stack([solve_weights(g, beta=solver_beta, preference=preference) for g in flat]).reshape(s, n, m)


def run_algorithm(problem: Problem, config: SyntheticConfig, algorithm: str, beta: float = 0.0,
                  preference: tuple[float, ...] | None = None, label: str | None = None) -> Run:
    spec = ALGORITHMS[algorithm]
    p = np.asarray(preference if preference is not None else config.preference_vector(), dtype=np.float64)
    s, n, m, d = problem.shape
    rounds, tau = config.rounds, config.local_steps
    x = np.zeros((s, d))
    xs = [x]
    client_lambdas = np.full((rounds, tau, s, n, m), np.nan)
    server_lambdas = np.full((rounds, s, m), np.nan)
    for r in range(rounds):
        noise = problem.noise(r, tau)  # (S, tau, N, M, d)
        if spec.per_objective_upload:
            averaged = []
            for obj in range(m):  # one pass per objective from the same global x, fresh optimiser
                local = np.repeat(x[:, None], n, axis=1)
                optimizer = make_optimizer(config)
                for k in range(tau):
                    grad = problem.client_gradients(local)[:, :, obj] + noise[:, k, :, obj]
                    local = optimizer.step(local, grad)
                averaged.append(local.mean(axis=1))
            new_x = np.empty_like(x)
            for i in range(s):
                new, weights = fsmgda_combine({"x": x[i]}, [{"x": avg[i]} for avg in averaged],
                                              spec.solver_beta(beta), p)
                new_x[i], server_lambdas[r, i] = new["x"], weights
            x = new_x
        else:
            local = np.repeat(x[:, None], n, axis=1)
            optimizer = make_optimizer(config)
            for k in range(tau):
                grads = problem.client_gradients(local) + noise[:, k]
                lam = client_weights(grads, algorithm, beta, p)
                client_lambdas[r, k] = lam
                local = optimizer.step(local, np.einsum("snm,snmi->sni", lam, grads))
            x = local.mean(axis=1)
        xs.append(x)
    name = label or (f"firm b={beta:g}" if spec.uses_beta else algorithm)
    return Run(name, algorithm, float(beta), tuple(float(v) for v in p), np.stack(xs), client_lambdas,
               server_lambdas)
