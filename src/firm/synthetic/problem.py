"""The federated quadratic problem with a known Pareto set, for a batch of seeds at once.

Client c's objective m is ``f_mc(x) = 0.5 (x - a_mc)^T H_mc (x - a_mc)``; the global objective
is their average ``F_m = mean_c f_mc = 0.5 x^T Hbar_m x - b_m^T x + const`` with
``Hbar_m = mean_c H_mc`` and ``b_m = mean_c H_mc a_mc``. Its Pareto set is exactly
``{x*(t) : t in simplex}`` with ``(sum_m t_m Hbar_m) x*(t) = sum_m t_m b_m`` (every
Pareto-stationary point of strictly convex objectives is Pareto optimal, and x*(t) is the
minimiser of the t-weighted sum).

Construction (per seed, x0 = 0): objective m has Hessian ``g_m Q_m diag(e) Q_m^T`` (e log-spaced
in [1, condition], Q_m a random rotation) and optimum ``o_m = (Q_m diag(e) Q_m^T)^{-1} v_m`` where
the unit vectors v_m have pairwise angle ``conflict_angle``; then ``-grad F_m(x0) = g_m v_m``:
the descent directions at x0 meet at exactly that angle and their norms are g_1 = norm_imbalance,
g_m = 1 otherwise. IID clients have the global objective. Skewed clients weight their favoured
objective (c mod M) by ``skew`` (weights renormalised to average 1 over clients) and their optima
are offset by ``a_mc = o_m + H_mc^{-1} e_mc`` with ``sum_c e_mc = 0``, so the global optimum of
F_m stays exactly o_m.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from firm.synthetic.config import SyntheticConfig

PROBLEM_STREAM = 1
NOISE_STREAM = 2


def _rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _equiangular(num: int, angle_degrees: float) -> np.ndarray:
    """num unit vectors in R^num with pairwise cosine cos(angle) (rows)."""
    c = math.cos(math.radians(angle_degrees))
    gram = (1 - c) * np.eye(num) + c * np.ones((num, num))
    values, vectors = np.linalg.eigh(gram)
    return vectors * np.sqrt(np.clip(values, 0, None))  # rows r_i with r_i . r_j = gram_ij


def _compositions(parts: int, total: int):
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in _compositions(parts - 1, total - first):
            yield (first,) + rest


def simplex_grid(num_objectives: int, steps: int) -> np.ndarray:
    """All t on the simplex with entries in {0, 1/steps, ..., 1}, shape (K, M)."""
    return np.array(list(_compositions(num_objectives, steps)), dtype=np.float64) / steps


@dataclass
class Problem:
    """Arrays over seeds S, clients N, objectives M and dimension d."""

    hessians: np.ndarray  # (S, N, M, d, d) client Hessians H_mc
    optima: np.ndarray  # (S, N, M, d) client optima a_mc
    global_optima: np.ndarray  # (S, M, d) o_m, the minimiser of F_m
    noise_scale: np.ndarray  # (S, N, M) per-coordinate std of the gradient noise
    seeds: tuple[int, ...]

    @classmethod
    def build(cls, config: SyntheticConfig) -> "Problem":
        s_count, n, m, d = config.seeds, config.num_clients, config.num_objectives, config.dim
        seeds = tuple(range(config.first_seed, config.first_seed + s_count))
        hessians = np.empty((s_count, n, m, d, d))
        optima = np.empty((s_count, n, m, d))
        global_optima = np.empty((s_count, m, d))
        eig = np.logspace(0.0, math.log10(config.condition), d)
        directions = _equiangular(m, config.conflict_angle)
        scale = np.ones(m)
        scale[0] = config.norm_imbalance
        weights = np.ones((n, m))
        if config.heterogeneity == "skewed":
            weights[np.arange(n), np.arange(n) % m] = config.skew
            weights /= weights.mean(axis=0, keepdims=True)
        for i, seed in enumerate(seeds):
            rng = np.random.default_rng([seed, PROBLEM_STREAM])
            basis = _rotation(rng, d)[:, :m]
            for obj in range(m):
                q = _rotation(rng, d)
                base = (q * eig) @ q.T
                v = basis @ directions[obj]
                o = np.linalg.solve(base, v)
                global_optima[i, obj] = o
                h_bar = scale[obj] * base
                hessians[i, :, obj] = weights[:, obj, None, None] * h_bar
                offsets = np.zeros((n, d))
                if config.heterogeneity == "skewed" and config.client_offset > 0:
                    raw = rng.standard_normal((n, d))
                    raw *= config.client_offset * np.linalg.norm(o) / np.linalg.norm(raw, axis=1, keepdims=True)
                    pulls = np.einsum("nij,nj->ni", hessians[i, :, obj], raw)
                    pulls -= pulls.mean(axis=0)
                    offsets = np.linalg.solve(hessians[i, :, obj], pulls[..., None])[..., 0]
                optima[i, :, obj] = o + offsets
        grad0 = np.einsum("snmij,snmj->snmi", hessians, -optima)
        noise_scale = config.noise * np.linalg.norm(grad0, axis=-1) / math.sqrt(d)
        return cls(hessians, optima, global_optima, noise_scale, seeds)

    # --- sizes and global quantities ---------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        s, n, m, d = self.optima.shape
        return s, n, m, d

    @cached_property
    def hessian_times_optimum(self) -> np.ndarray:  # (S, N, M, d): H_mc a_mc
        return np.einsum("snmij,snmj->snmi", self.hessians, self.optima)

    @cached_property
    def global_hessians(self) -> np.ndarray:  # (S, M, d, d)
        return self.hessians.mean(axis=1)

    @cached_property
    def global_linear(self) -> np.ndarray:  # (S, M, d): b_m
        return self.hessian_times_optimum.mean(axis=1)

    @cached_property
    def global_constant(self) -> np.ndarray:  # (S, M)
        return 0.5 * np.einsum("snmi,snmi->sm", self.optima, self.hessian_times_optimum) / self.optima.shape[1]

    def client_gradients(self, x: np.ndarray) -> np.ndarray:
        """grad f_mc at the clients' parameters x (S, N, d): (S, N, M, d)."""
        return np.einsum("snmij,snj->snmi", self.hessians, x) - self.hessian_times_optimum

    def global_values(self, x: np.ndarray) -> np.ndarray:
        """F_m at x (..., S, d): (..., S, M)."""
        quad = 0.5 * np.einsum("...si,smij,...sj->...sm", x, self.global_hessians, x)
        return quad - np.einsum("...si,smi->...sm", x, self.global_linear) + self.global_constant

    def global_gradients(self, x: np.ndarray) -> np.ndarray:
        """grad F_m at x (..., S, d): (..., S, M, d)."""
        return np.einsum("smij,...sj->...smi", self.global_hessians, x) - self.global_linear

    @cached_property
    def minimum_values(self) -> np.ndarray:  # (S, M): min F_m = F_m(o_m)
        values = np.stack([self.global_values(self.global_optima[:, m])[:, m] for m in range(self.shape[2])], 1)
        return values

    def noise(self, round_index: int, local_steps: int) -> np.ndarray:
        """The gradient noise of one round (S, tau, N, M, d), the same for every algorithm."""
        s, n, m, d = self.shape
        draws = np.stack([np.random.default_rng([seed, NOISE_STREAM, round_index]).standard_normal(
            (local_steps, n, m, d)) for seed in self.seeds])
        return draws * self.noise_scale[:, None, :, :, None]

    # --- the Pareto set ------------------------------------------------------------------------
    def pareto_points(self, weights: np.ndarray) -> np.ndarray:
        """x*(t) for t in weights (S, K, M) or (K, M): (S, K, d)."""
        t = np.broadcast_to(weights, (self.shape[0],) + weights.shape[-2:])
        lhs = np.einsum("skm,smij->skij", t, self.global_hessians)
        rhs = np.einsum("skm,smi->ski", t, self.global_linear)
        return np.linalg.solve(lhs, rhs[..., None])[..., 0]

    @cached_property
    def front_grid(self) -> np.ndarray:  # (K, M)
        return simplex_grid(self.shape[2], 1000 if self.shape[2] == 2 else 60)

    @cached_property
    def front_points(self) -> np.ndarray:  # (S, K, d)
        return self.pareto_points(self.front_grid)

    def nearest_pareto_point(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance from x (S, d) to the Pareto set and the weights t of the nearest point (S, M).

        A grid on the simplex, then two rounds of a finer grid around the best point (resolution
        1e-5 of the weights for M = 2)."""
        m = self.shape[2]
        dist = np.linalg.norm(self.front_points - x[:, None], axis=-1)
        best = self.front_grid[np.argmin(dist, axis=1)]  # (S, M)
        width = 1.0 / (1000 if m == 2 else 60)
        for _ in range(2):
            local = simplex_grid(m, 20 if m == 2 else 21) - 1.0 / m  # offsets in the simplex's plane, 0 included
            candidates = np.clip(best[:, None] + (2 if m == 2 else 3) * width * local[None], 0, None)
            candidates /= candidates.sum(-1, keepdims=True)
            points = self.pareto_points(candidates)
            dist = np.linalg.norm(points - x[:, None], axis=-1)
            index = np.argmin(dist, axis=1)
            best = candidates[np.arange(len(best)), index]
            width /= 10
        return dist[np.arange(len(best)), index], best

    def stationarity_terms(self, x: np.ndarray, solve) -> tuple[np.ndarray, np.ndarray]:
        """At x (S, d): the Pareto-stationarity gap min_l |sum_m l_m grad F_m|^2 (S,) and the exact
        global MGDA descent direction -sum_m l*_m grad F_m (S, d). ``solve(gram)`` returns l*."""
        grads = self.global_gradients(x)
        gram = np.einsum("smi,sli->sml", grads, grads)
        lam = np.stack([solve(g) for g in gram])
        direction = -np.einsum("sm,smi->si", lam, grads)
        return np.einsum("si,si->s", direction, direction), direction
