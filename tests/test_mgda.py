"""Regularized MGDA solver against an independent QP solver (cvxpy + Clarabel) and known limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from firm.mgda import (
    MAX_ENUMERATION_OBJECTIVES,
    _closed_form_two,
    _enumerate_supports,
    cosine_similarity_matrix,
    solve_weights,
    validate_preference,
)

cp = pytest.importorskip("cvxpy", reason="cvxpy is the independent QP reference (dev extra)")


def objective(gram: np.ndarray, beta: float, preference: np.ndarray, weights: np.ndarray) -> float:
    a = gram / np.trace(gram)
    return float(weights @ a @ weights + beta * np.sum((weights - preference) ** 2))


def reference_solution(jacobian: np.ndarray, beta: float, preference: np.ndarray) -> np.ndarray:
    """Solve the same QP with cvxpy/Clarabel, written through the gradients J (G = J J^T)."""
    num = jacobian.shape[0]
    trace = float(np.sum(jacobian**2))
    weights = cp.Variable(num)
    cost = cp.sum_squares(jacobian.T @ weights) / trace
    cost = cost + beta * cp.sum_squares(weights - preference)
    problem = cp.Problem(cp.Minimize(cost), [weights >= 0, cp.sum(weights) == 1])
    problem.solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, max_iter=500
    )
    assert problem.status == cp.OPTIMAL, problem.status
    return np.asarray(weights.value, dtype=np.float64)


def random_problem(rng: np.random.Generator, num: int) -> tuple[np.ndarray, np.ndarray]:
    """Gradients J (M x d) with d from 1 (rank one) to M + 2, so singular Grams are included."""
    dim = int(rng.integers(1, num + 3))
    scale = 10.0 ** rng.uniform(-3, 3)  # trace normalisation must make the scale irrelevant
    jacobian = scale * rng.normal(size=(num, dim)) + rng.normal(size=(1, dim)) * rng.uniform(0, 2)
    preference = rng.dirichlet(np.ones(num))
    return jacobian, preference


def assert_on_simplex(weights: np.ndarray, num: int) -> None:
    assert weights.dtype == np.float64 and weights.shape == (num,)
    assert np.all(weights >= 0)
    assert abs(weights.sum() - 1.0) < 1e-12


@pytest.mark.parametrize("beta", [0.0, 0.01, 0.1, 1.0])
@pytest.mark.parametrize("num", [2, 3, 4, 5])
def test_matches_cvxpy_reference(num: int, beta: float) -> None:
    rng = np.random.default_rng(1000 * num + int(beta * 100))
    for _ in range(4):  # 4 x 16 parameter pairs = 64 random problems
        jacobian, preference = random_problem(rng, num)
        gram = jacobian @ jacobian.T
        ours = solve_weights(gram, beta=beta, preference=preference)
        reference = reference_solution(jacobian, beta, preference)
        assert_on_simplex(ours, num)
        f_ours = objective(gram, beta, preference, ours)
        f_reference = objective(gram, beta, preference, reference)
        assert f_ours <= f_reference + 1e-7 * abs(f_reference) + 1e-10
        assert f_ours == pytest.approx(f_reference, rel=1e-7, abs=1e-10)
        if beta > 0:  # strictly convex: the minimiser itself is unique
            np.testing.assert_allclose(ours, reference, atol=1e-5)
        else:  # l may be non-unique, but the min-norm vector G^{1/2} l = J^T l is unique
            scale = np.sqrt(np.trace(gram))
            np.testing.assert_allclose(
                jacobian.T @ ours / scale, jacobian.T @ reference / scale, atol=1e-5
            )


def test_larger_m_matches_cvxpy() -> None:
    rng = np.random.default_rng(7)
    for num, beta in [(8, 0.0), (8, 0.05), (10, 0.01)]:
        jacobian, preference = random_problem(rng, num)
        gram = jacobian @ jacobian.T
        ours = solve_weights(gram, beta=beta, preference=preference)
        reference = reference_solution(jacobian, beta, preference)
        assert objective(gram, beta, preference, ours) == pytest.approx(
            objective(gram, beta, preference, reference), rel=1e-7, abs=1e-10
        )


@pytest.mark.parametrize("beta", [0.0, 0.01, 0.3, 5.0])
def test_closed_form_agrees_with_support_enumeration(beta: float) -> None:
    rng = np.random.default_rng(42)
    for _ in range(30):
        jacobian = rng.normal(size=(2, int(rng.integers(1, 4))))
        if rng.uniform() < 0.3:  # force a vertex solution: one gradient much shorter
            jacobian[0] *= 0.01
        gram = jacobian @ jacobian.T
        a = gram / np.trace(gram)
        preference = rng.dirichlet(np.ones(2))
        closed = _closed_form_two(a, beta, preference)
        enumerated = _enumerate_supports(a, beta, preference)
        assert objective(gram, beta, preference, closed) == pytest.approx(
            objective(gram, beta, preference, enumerated), rel=1e-10, abs=1e-14
        )
        if beta > 0:
            np.testing.assert_allclose(closed, enumerated, atol=1e-9)


def test_closed_form_hand_example() -> None:
    # g1 = (1, 0), g2 = (0, 2): G = diag(1, 4), trG = 5, A = diag(0.2, 0.8), beta = 0:
    # t = (A22 - A12) / (A11 - 2 A12 + A22) = 0.8 / 1.0 = 0.8 -> lambda = (0.8, 0.2),
    # the min-norm point 0.8 * (1, 0) + 0.2 * (0, 2) = (0.8, 0.4) is orthogonal to g1 - g2.
    np.testing.assert_allclose(solve_weights(np.diag([1.0, 4.0]), beta=0.0), [0.8, 0.2], atol=1e-15)
    # beta = 1, p = (0.5, 0.5): t = (0.8 + 2 * 0.5) / (1.0 + 2) = 0.6
    np.testing.assert_allclose(solve_weights(np.diag([1.0, 4.0]), beta=1.0), [0.6, 0.4], atol=1e-15)


def test_huge_beta_returns_preference() -> None:
    rng = np.random.default_rng(3)
    for num in (2, 3, 5):
        jacobian, preference = random_problem(rng, num)
        weights = solve_weights(jacobian @ jacobian.T, beta=1e6, preference=preference)
        np.testing.assert_allclose(weights, preference, atol=1e-5)


def test_orthogonal_equal_norm_gradients_give_half_half() -> None:
    np.testing.assert_allclose(solve_weights(3.0 * np.eye(2), beta=0.0), [0.5, 0.5], atol=1e-15)
    np.testing.assert_allclose(solve_weights(np.eye(3), beta=0.0), [1 / 3] * 3, atol=1e-12)


def test_opposite_gradients_reach_zero_norm() -> None:
    # g1 = -g2: the convex hull contains 0, so the minimal objective is 0 (at lambda = (1/2, 1/2)).
    gram = np.array([[4.0, -4.0], [-4.0, 4.0]])
    weights = solve_weights(gram, beta=0.0, preference=[0.9, 0.1])
    assert objective(gram, 0.0, np.array([0.9, 0.1]), weights) == pytest.approx(0.0, abs=1e-15)
    np.testing.assert_allclose(weights, [0.5, 0.5], atol=1e-15)
    # Same through enumeration with a third gradient: g3 = g1, still zero reachable.
    jacobian = np.array([[1.0, 2.0], [-1.0, -2.0], [1.0, 2.0]])
    gram3 = jacobian @ jacobian.T
    weights3 = solve_weights(gram3, beta=0.0)
    assert objective(gram3, 0.0, np.full(3, 1 / 3), weights3) == pytest.approx(0.0, abs=1e-12)


def test_identical_gradients_flat_case_returns_preference() -> None:
    gram = np.ones((2, 2))
    np.testing.assert_allclose(solve_weights(gram, beta=0.0, preference=[0.3, 0.7]), [0.3, 0.7])


def test_zero_matrix_returns_preference() -> None:
    preference = np.array([0.2, 0.3, 0.5])
    weights = solve_weights(np.zeros((3, 3)), beta=0.1, preference=preference)
    np.testing.assert_array_equal(weights, preference)
    assert weights is not preference
    np.testing.assert_array_equal(solve_weights(np.zeros((2, 2)), beta=0.01), [0.5, 0.5])


def test_single_objective() -> None:
    np.testing.assert_array_equal(solve_weights(np.array([[2.5]]), beta=0.3), [1.0])


@pytest.mark.parametrize("beta", [0.0, 0.01, 1.0])
def test_scale_invariance(beta: float) -> None:
    rng = np.random.default_rng(5)
    for num in (2, 3, 4):
        jacobian = rng.normal(size=(num, 6))
        gram = jacobian @ jacobian.T
        np.testing.assert_allclose(
            solve_weights(gram, beta=beta), solve_weights(1000.0 * gram, beta=beta), atol=1e-10
        )


def test_torch_input_matches_numpy() -> None:
    rng = np.random.default_rng(9)
    jacobian = rng.normal(size=(3, 5))
    gram = jacobian @ jacobian.T
    expected = solve_weights(gram, beta=0.05)
    float32_gram = torch.tensor(gram, dtype=torch.float32, requires_grad=True)
    from_torch = solve_weights(float32_gram, beta=0.05)
    assert isinstance(from_torch, np.ndarray) and from_torch.dtype == np.float64
    np.testing.assert_allclose(from_torch, expected, atol=1e-6)
    from_torch_pref = solve_weights(
        torch.tensor(gram), beta=0.05, preference=torch.tensor([0.2, 0.3, 0.5])
    )
    np.testing.assert_allclose(
        from_torch_pref, solve_weights(gram, beta=0.05, preference=[0.2, 0.3, 0.5]), atol=1e-7
    )


def test_cosine_similarity_matrix() -> None:
    # g1 = (1, 0), g2 = (1, 1), g3 = 0: cos(g1, g2) = 1 / sqrt(2), anything with g3 is 0.
    jacobian = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    cosine = cosine_similarity_matrix(torch.tensor(jacobian @ jacobian.T))
    expected = np.array([[1.0, 2**-0.5, 0.0], [2**-0.5, 1.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(cosine, expected, atol=1e-15)
    with pytest.raises(ValueError, match="non-negative diagonal"):
        cosine_similarity_matrix(np.array([[-1.0, 0.0], [0.0, 1.0]]))


def test_validate_preference() -> None:
    np.testing.assert_array_equal(validate_preference(None, 4), [0.25] * 4)
    np.testing.assert_allclose(validate_preference([0.25, 0.75], 2), [0.25, 0.75])
    with pytest.raises(ValueError, match="length 3"):
        validate_preference([0.5, 0.5], 3)
    with pytest.raises(ValueError, match="non-negative"):
        validate_preference([1.5, -0.5], 2)
    with pytest.raises(ValueError, match="finite"):
        validate_preference([np.nan, 1.0], 2)
    with pytest.raises(ValueError, match="sum to 1"):
        validate_preference([0.5, 0.6], 2)
    with pytest.raises(ValueError, match="num_objectives must be >= 1"):
        validate_preference(None, 0)


def test_too_many_objectives_raises() -> None:
    num = MAX_ENUMERATION_OBJECTIVES + 1
    with pytest.raises(ValueError, match=f"at most {MAX_ENUMERATION_OBJECTIVES} objectives"):
        solve_weights(np.eye(num), beta=0.01)
    with pytest.raises(ValueError, match="2\\^M - 1 KKT systems"):
        _enumerate_supports(np.eye(num) / num, 0.0, np.full(num, 1 / num))


@pytest.mark.parametrize(
    ("gram", "kwargs", "message"),
    [
        (np.ones((2, 3)), {}, r"gram must be square, got shape \(2, 3\)"),
        (np.ones(3), {}, r"gram must be square, got shape \(3,\)"),
        (np.ones((2, 2, 2)), {}, "gram must be square"),
        (np.array([[1.0, 0.5], [0.0, 1.0]]), {}, "gram must be symmetric"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), {}, "finite"),
        (np.array([[np.inf, 0.0], [0.0, 1.0]]), {}, "finite"),
        (np.array([[1.0, 2.0], [2.0, 1.0]]), {}, "positive semidefinite"),
        (np.array([[-1.0, 0.0], [0.0, -1.0]]), {}, "positive semidefinite"),
        (np.eye(2), {"beta": -0.1}, "beta must be >= 0"),
        (np.eye(2), {"beta": float("nan")}, "beta must be finite"),
        (np.eye(2), {"beta": float("inf")}, "beta must be finite"),
        (np.eye(2), {"preference": [1.0]}, "preference must have length 2"),
        (np.eye(2), {"preference": [1.2, -0.2]}, "preference must be non-negative"),
        (np.eye(2), {"preference": [np.inf, 0.0]}, "preference must be finite"),
        (np.eye(2), {"preference": [0.3, 0.3]}, "preference must sum to 1"),
    ],
)
def test_invalid_input_raises(gram: np.ndarray, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        solve_weights(gram, **{"beta": 0.01, **kwargs})


def test_symmetry_tolerance_is_relative_to_scale() -> None:
    # A float32-rounding asymmetry on a huge-norm Gram is accepted ...
    gram = 1e8 * np.array([[1.0, 0.3], [0.3 + 1e-9, 1.0]])
    assert_on_simplex(solve_weights(gram, beta=0.01), 2)
    # ... but the same absolute asymmetry on a tiny Gram is a real asymmetry.
    with pytest.raises(ValueError, match="symmetric"):
        solve_weights(1e-8 * np.array([[1.0, 0.3], [0.5, 1.0]]), beta=0.01)
