"""Regularized MGDA: the weights FIRM uses to combine per-objective policy gradients.

Given the Gram matrix ``G_ij = <g_i, g_j>`` of the M per-objective gradients, FIRM picks

    lambda* = argmin_{l in simplex}  l^T (G / tr G) l  +  beta * ||l - p||^2

and steps along ``sum_m lambda*_m g_m``. With ``beta = 0`` this is MGDA (Desideri 2012; Sener &
Koltun 2018): the min-norm point of the convex hull of the gradients, a common descent
direction. The ``beta`` term pulls lambda towards the user's preference ``p``, which keeps
the weights from jumping between vertices from one step to the next (the noisy-gradient
failure mode of plain MGDA) and lets a client state how much it cares about each objective.

Why divide by the trace: gradient norms change by orders of magnitude during training and
between models, so ``l^T G l`` has no fixed scale. After ``G / tr G`` the quadratic term is
dimensionless (its entries are at most 1), so ``beta`` means the same thing at every step and
for every model: the solution is invariant to ``G -> c G`` for every ``c > 0``.

Closed form for M = 2. With ``l = (t, 1 - t)`` and ``A = G / tr G`` the objective is the 1-D
quadratic ``t^2 A11 + 2 t (1 - t) A12 + (1 - t)^2 A22 + 2 beta (t - p1)^2``, whose derivative
vanishes at

    t = (A22 - A12 + 2 beta p1) / (A11 - 2 A12 + A22 + 2 beta),

clipped to [0, 1]. The denominator is ``||g1 - g2||^2 / tr G + 2 beta``; when it is zero
(``beta = 0`` and ``g1 = g2``) the objective is flat and every t is optimal, so we return p.

For M > 2 we solve the same convex QP exactly by enumerating supports S (the set of non-zero
weights): on each S we solve the equality-constrained KKT system, and accept the first S whose
solution is non-negative and whose multipliers for the indices outside S are non-negative. A
convex QP's KKT points are exactly its minimisers, and the true support is one of the
``2^M - 1`` candidates, so the search is exact and terminates. That count is why M is limited
to ``MAX_ENUMERATION_OBJECTIVES``.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from firm.numbers import finite_number

MAX_ENUMERATION_OBJECTIVES = 16
"""Largest M the support enumeration accepts. Its worst case (a vertex solution, found last)
solves 2^16 - 1 = 65535 small KKT systems: several seconds on one CPU core at M = 16."""

PREFERENCE_SUM_TOLERANCE = 1e-6
SYMMETRY_RELATIVE_TOLERANCE = 1e-6
PSD_RELATIVE_TOLERANCE = 1e-5
"""The smallest eigenvalue of G / tr G may be this negative (float32 Gram rounding)."""

KKT_ACCEPT_TOLERANCE = 1e-9
"""A support is accepted as soon as its KKT violation (normalised units) is at most this."""
KKT_GIVE_UP_TOLERANCE = 1e-6
"""If no support gets this close to the KKT conditions, the solver raises instead of guessing."""


def _to_float64_array(value: Any, name: str) -> np.ndarray:
    """Return a float64 numpy copy of a numpy array, torch tensor or nested list."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().double().numpy()
    try:
        return np.array(value, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numeric, got {type(value).__name__}: {error}") from error


def validate_preference(preference: Any, num_objectives: int) -> np.ndarray:
    """Check a preference vector and return it as a float64 copy that sums to exactly 1.

    ``None`` means the uniform preference ``1/M``. Raises ValueError when the vector has the
    wrong length, a negative or non-finite entry, or does not sum to 1 (tolerance 1e-6).
    """
    if isinstance(num_objectives, bool) or not isinstance(num_objectives, (int, np.integer)):
        raise ValueError(f"num_objectives must be an int, got {num_objectives!r}")
    if num_objectives < 1:
        raise ValueError(f"num_objectives must be >= 1, got {num_objectives}")
    if preference is None:
        return np.full(num_objectives, 1.0 / num_objectives)
    p = _to_float64_array(preference, "preference")
    if p.ndim != 1 or p.shape[0] != num_objectives:
        raise ValueError(
            f"preference must have length {num_objectives} (one weight per objective), "
            f"got shape {p.shape}"
        )
    if not np.all(np.isfinite(p)):
        raise ValueError(f"preference must be finite, got {p.tolist()}")
    if np.any(p < 0):
        raise ValueError(f"preference must be non-negative, got {p.tolist()}")
    total = float(p.sum())
    if abs(total - 1.0) > PREFERENCE_SUM_TOLERANCE:
        raise ValueError(f"preference must sum to 1, got sum {total!r} for {p.tolist()}")
    return p / total


def check_beta(beta: Any) -> float:
    """beta as a float; ValueError unless it is a finite number >= 0 (the solver's domain)."""
    if isinstance(beta, bool):
        raise ValueError(f"beta must be a number, got {beta!r}")
    return finite_number(beta, "beta", minimum=0.0)


def _validate_square_symmetric(gram: Any) -> np.ndarray:
    """Check shape, finiteness and symmetry; return the symmetrised float64 matrix."""
    g = _to_float64_array(gram, "gram")
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"gram must be square, got shape {g.shape}")
    if g.shape[0] < 1:
        raise ValueError("gram must have at least one objective, got shape (0, 0)")
    if not np.all(np.isfinite(g)):
        raise ValueError("gram must have finite entries, got NaN or inf")
    asymmetry = float(np.max(np.abs(g - g.T)))
    tolerance = SYMMETRY_RELATIVE_TOLERANCE * float(np.max(np.abs(g))) + 1e-12
    if asymmetry > tolerance:
        raise ValueError(
            f"gram must be symmetric, got max |G - G^T| = {asymmetry:.3g} "
            f"(tolerance {tolerance:.3g})"
        )
    return 0.5 * (g + g.T)


def cosine_similarity_matrix(gram: Any) -> np.ndarray:
    """Cosine between objectives' gradients: ``G_ij / sqrt(G_ii G_jj)``, 0 where G_ii = 0.

    A negative off-diagonal entry means the two objectives pull the policy in conflicting
    directions; that conflict is what MGDA resolves.
    """
    g = _validate_square_symmetric(gram)
    diagonal = np.diag(g)
    if np.any(diagonal < 0):
        raise ValueError(
            f"gram must have a non-negative diagonal (squared norms), got {diagonal.tolist()}"
        )
    norms = np.sqrt(diagonal)
    outer = np.outer(norms, norms)
    cosine = np.divide(g, outer, out=np.zeros_like(g), where=outer > 0)
    return np.clip(cosine, -1.0, 1.0)


def gram_geometry(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per objective pair (i < j): D_ij = |g_i - g_j|^2 / tr G and the cosine; and the ratio of
    the largest to the smallest gradient norm. D near 0 means collinear gradients (every
    weighting is the same step); with two objectives MGDA's lambda_1 = (G_22 - G_12) / (tr G D).
    The norm ratio is smallest / largest, so it stays in [0, 1] when a gradient vanishes."""
    pairs = np.triu_indices(gram.shape[0], k=1)
    diag = np.diag(gram)
    distance = (diag[:, None] + diag[None, :] - 2 * gram)[pairs] / max(float(np.trace(gram)), 1e-300)
    norms = np.sqrt(np.maximum(diag, 0.0))
    ratio = float(norms.min() / norms.max()) if norms.max() > 0 else 0.0
    return distance, cosine_similarity_matrix(gram)[pairs], ratio


def _closed_form_two(a: np.ndarray, beta: float, p: np.ndarray) -> np.ndarray:
    """Exact minimiser for M = 2 (see the module docstring for the derivation)."""
    curvature = a[0, 0] - 2.0 * a[0, 1] + a[1, 1] + 2.0 * beta  # = ||g1-g2||^2/trG + 2 beta
    slope_term = a[1, 1] - a[0, 1] + 2.0 * beta * p[0]
    if curvature <= 1e-15:
        # Flat (beta = 0, g1 = g2 up to rounding): every t gives the same objective, keep p.
        return p.copy()
    t = float(np.clip(slope_term / curvature, 0.0, 1.0))
    return np.array([t, 1.0 - t])


def _enumerate_supports(a: np.ndarray, beta: float, p: np.ndarray) -> np.ndarray:
    """Exact minimiser for any M <= MAX_ENUMERATION_OBJECTIVES by KKT support enumeration.

    Dividing the objective by (1 + beta) does not move the minimiser and keeps every
    quantity O(1), so one absolute tolerance works for every beta: we minimise
    ``l^T Q l - 2 c^T l`` with ``Q = (A + beta I) / (1 + beta)`` and ``c = beta p / (1 + beta)``.

    On a support S the KKT system is ``2 Q_SS l_S - nu 1 = 2 c_S``, ``1^T l_S = 1``; it is solved
    with lstsq, which also covers singular Q (beta = 0, dependent gradients). The point is a
    minimiser iff l_S >= 0 and the multipliers ``mu_i = 2 (Q l)_i - 2 c_i - nu`` of the indices
    outside S are >= 0. Supports are visited largest first (with beta > 0 and an interior
    preference the answer usually has full support).
    """
    num = a.shape[0]
    if num > MAX_ENUMERATION_OBJECTIVES:
        raise ValueError(
            f"support enumeration handles at most {MAX_ENUMERATION_OBJECTIVES} objectives "
            f"(it solves up to 2^M - 1 KKT systems, {2**num - 1} for M={num}), got M={num}"
        )
    q = (a + beta * np.eye(num)) / (1.0 + beta)
    c = beta * p / (1.0 + beta)
    best_weights: np.ndarray | None = None
    best_violation = np.inf
    for size in range(num, 0, -1):
        for support in itertools.combinations(range(num), size):
            s = np.array(support)
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = 2.0 * q[np.ix_(s, s)]
            kkt[:size, size] = -1.0
            kkt[size, :size] = 1.0
            rhs = np.concatenate([2.0 * c[s], [1.0]])
            solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
            residual = float(np.max(np.abs(kkt @ solution - rhs)))
            weights = np.zeros(num)
            weights[s] = solution[:size]
            nu = solution[size]
            multipliers = 2.0 * (q @ weights) - 2.0 * c - nu
            outside = np.setdiff1d(np.arange(num), s)
            violation = max(
                residual,
                float(max(0.0, -weights[s].min())),
                float(max(0.0, -multipliers[outside].min())) if outside.size else 0.0,
            )
            if violation < best_violation:
                best_violation, best_weights = violation, weights
            if violation <= KKT_ACCEPT_TOLERANCE:
                return weights
    if best_weights is None or best_violation > KKT_GIVE_UP_TOLERANCE:
        raise RuntimeError(
            f"no support satisfied the KKT conditions (best violation {best_violation:.3g}); "
            "the Gram matrix is numerically too ill-conditioned for beta = 0, use beta > 0"
        )
    return best_weights


def _project_to_simplex_rounding(weights: np.ndarray) -> np.ndarray:
    """Remove rounding noise: clip tiny negatives and renormalise to sum exactly 1."""
    weights = np.clip(weights, 0.0, None)
    return weights / weights.sum()


def solve_weights(gram: Any, beta: float, preference: Any = None) -> np.ndarray:
    """Regularized MGDA weights: argmin over the simplex of ``l^T (G/trG) l + beta ||l - p||^2``.

    ``gram`` is the M x M Gram matrix of the per-objective gradients (numpy or torch, any
    dtype/device); ``beta`` has no default here (FirmConfig.beta owns it); ``preference`` p
    defaults to uniform. Returns a float64 array on the
    simplex. A zero Gram matrix (all gradients zero) returns p. With beta = 0 and a singular
    G the minimiser may not be unique; any minimiser is returned.
    """
    g = _validate_square_symmetric(gram)
    beta = check_beta(beta)
    num = g.shape[0]
    p = validate_preference(preference, num)
    if num > MAX_ENUMERATION_OBJECTIVES:
        raise ValueError(
            f"solve_weights handles at most {MAX_ENUMERATION_OBJECTIVES} objectives "
            f"(the exact support enumeration grows as 2^M), got M={num}"
        )
    trace = float(np.trace(g))
    if trace == 0.0 and not np.any(g):
        return p.copy()
    if trace <= 0.0:
        raise ValueError(f"gram must be positive semidefinite, got trace {trace:.3g}")
    a = g / trace
    smallest_eigenvalue = float(np.linalg.eigvalsh(a)[0])
    if smallest_eigenvalue < -PSD_RELATIVE_TOLERANCE:
        raise ValueError(
            "gram must be positive semidefinite, got smallest eigenvalue of G/trG = "
            f"{smallest_eigenvalue:.3g}"
        )
    if num == 1:
        return np.ones(1)
    if num == 2:
        weights = _closed_form_two(a, beta, p)
    else:
        weights = _enumerate_supports(a, beta, p)
    return _project_to_simplex_rounding(weights)
