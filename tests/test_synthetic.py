"""`firm synthetic`: the problem's Pareto set, the metrics, the algorithms against hand-written
updates and the pipeline's own solver / server step, and the command's flags and errors."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy import optimize

from firm.cli import build_parser, main
from firm.cli.flags import field_docs, flag_name
from firm.config import ConfigError
from firm.fsmgda.server import fsmgda_combine
from firm.mgda import solve_weights
from firm.synthetic import SyntheticConfig
from firm.synthetic.algorithms import run_algorithm
from firm.synthetic.metrics import exact_mgda, knob_metrics, run_metrics
from firm.synthetic.problem import Problem

SMALL = dict(seeds=3, dim=6, num_clients=4, rounds=6, preference_sweep=())


def small(**overrides) -> SyntheticConfig:
    return SyntheticConfig(**{**SMALL, **overrides}).validate()


@pytest.mark.parametrize("heterogeneity", ["iid", "skewed"])
def test_pareto_set_formula_matches_a_brute_force_scalarised_solve(heterogeneity):
    config = small(heterogeneity=heterogeneity, num_objectives=3, conflict_angle=100.0)
    problem = Problem.build(config)
    weights = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.6, 0.4, 0.0]])
    formula = problem.pareto_points(weights)
    for s in range(config.seeds):
        for k, t in enumerate(weights):
            def scalarised(x):  # the t-weighted average of the clients' objectives, from their definition
                diff = x - problem.optima[s]  # (N, M, d)
                per = 0.5 * np.einsum("nmi,nmij,nmj->nm", diff, problem.hessians[s], diff)
                return float(per.mean(axis=0) @ t)
            found = optimize.minimize(scalarised, np.zeros(config.dim), method="BFGS", options={"gtol": 1e-11}).x
            assert np.allclose(formula[s, k], found, atol=1e-6)
    # objective m's own optimum is o_m, also with skewed clients (their offsets cancel)
    assert np.allclose(formula[:, 1], problem.global_optima[:, 0], atol=1e-10)


def test_conflict_angle_and_norm_imbalance_are_exact_at_x0():
    config = small(conflict_angle=30.0, norm_imbalance=4.0, heterogeneity="skewed")
    problem = Problem.build(config)
    g = -problem.global_gradients(np.zeros((config.seeds, config.dim)))  # (S, M, d)
    norms = np.linalg.norm(g, axis=-1)
    assert np.allclose(norms[:, 0] / norms[:, 1], 4.0)
    cosine = np.einsum("si,si->s", g[:, 0], g[:, 1]) / norms.prod(axis=1)
    assert np.allclose(cosine, math.cos(math.radians(30.0)))


def test_stationarity_gap_is_zero_on_the_pareto_set_and_positive_off_it():
    problem = Problem.build(small())
    on = problem.pareto_points(np.array([[0.3, 0.7]]))[:, 0]
    gap_on, _ = problem.stationarity_terms(on, exact_mgda)
    assert np.all(gap_on < 1e-20)
    distance, t = problem.nearest_pareto_point(on)
    assert np.all(distance < 1e-6) and np.allclose(t[:, 0], 0.3, atol=1e-4)
    off = on + 0.05 * np.random.default_rng(0).standard_normal(on.shape)
    gap_off, direction = problem.stationarity_terms(off, exact_mgda)
    assert np.all(gap_off > 1e-6) and np.allclose(gap_off, (direction**2).sum(axis=1))
    assert np.all(problem.nearest_pareto_point(off)[0] > 1e-3)


def test_with_one_sgd_step_and_no_noise_firm_beta_0_is_mgda_and_linear_is_fixed_weights():
    config = small(local_steps=1, optimizer="sgd", noise=0.0, preference=(0.3, 0.7))
    problem = Problem.build(config)
    firm = run_algorithm(problem, config, "firm", beta=0.0)
    mgda = run_algorithm(problem, config, "mgda")
    assert np.array_equal(firm.x, mgda.x) and np.array_equal(firm.client_lambdas, mgda.client_lambdas)

    # IID clients without noise each see the global gradients: one step is the global MGDA step
    x = np.zeros((config.seeds, config.dim))
    for r in range(config.rounds):
        grads = problem.global_gradients(x)
        lam = np.stack([solve_weights(g @ g.T, beta=0.0, preference=(0.3, 0.7)) for g in grads])
        x = x - config.sgd_lr * np.einsum("sm,smi->si", lam, grads)
        assert np.allclose(mgda.x[r + 1], x, rtol=1e-12, atol=1e-14)

    linear = run_algorithm(problem, config, "linear")
    x = np.zeros((config.seeds, config.dim))
    for r in range(config.rounds):
        x = x - config.sgd_lr * np.einsum("m,smi->si", np.array([0.3, 0.7]), problem.global_gradients(x))
        assert np.allclose(linear.x[r + 1], x, rtol=1e-12, atol=1e-14)
    assert np.all(linear.client_lambdas == np.array([0.3, 0.7]))
    assert not np.allclose(linear.x[-1], mgda.x[-1])  # the two differ, so the test can fail


def test_fsmgda_is_the_pipelines_server_step():
    config = small(local_steps=2, noise=0.5, heterogeneity="skewed")
    problem = Problem.build(config)
    run = run_algorithm(problem, config, "fsmgda")
    s, n, m, d = problem.shape
    x = np.zeros((s, d))
    for r in range(config.rounds):
        noise = problem.noise(r, config.local_steps)
        averaged = []
        for obj in range(m):  # each objective's pass from the same x, plain SGD with weights e_obj
            local = np.repeat(x[:, None], n, axis=1)
            for k in range(config.local_steps):
                local = local - config.sgd_lr * (problem.client_gradients(local)[:, :, obj] + noise[:, k, :, obj])
            averaged.append(local.mean(axis=1))
        deltas = np.stack(averaged, axis=1) - x[:, None]  # (S, M, d)
        for i in range(s):
            # the same result from the pipeline's combine and from the 2-objective min-norm formula
            new, lam = fsmgda_combine({"x": x[i]}, [{"x": a[i]} for a in averaged], 0.0, (0.5, 0.5))
            d1, d2 = deltas[i]
            t = np.clip((d2 - d1) @ d2 / ((d1 - d2) @ (d1 - d2)), 0, 1)
            assert np.allclose(lam, [t, 1 - t]) and np.allclose(new["x"], x[i] + t * d1 + (1 - t) * d2)
            assert np.array_equal(run.server_lambdas[r, i], lam)
            x[i] = new["x"]
        assert np.array_equal(run.x[r + 1], x)


def test_three_objectives_and_adam_run_and_give_finite_metrics():
    config = small(num_objectives=3, conflict_angle=110.0, optimizer="adam", local_steps=2)
    problem = Problem.build(config)
    for algorithm, beta in (("firm", 0.1), ("mgda", 0.0), ("linear", 0.0), ("fsmgda", 0.0)):
        metrics = run_metrics(problem, run_algorithm(problem, config, algorithm, beta))
        for key, value in metrics.items():
            if not key.startswith("_"):
                assert value.shape == (3,) and np.all(np.isfinite(value)), (algorithm, key)
        assert metrics["_gap_curve"][-1].mean() < metrics["_gap_curve"][0].mean()


def test_knob_metrics():
    p = np.array([0.1, 0.5, 0.9])
    positions = np.array([[0.2, 0.4, 0.4], [0.5, 0.4, 0.4], [0.7, 0.4, 0.4]])  # seed 0 follows p, 1-2 do not move
    out = knob_metrics(p, positions)
    assert np.allclose(out["knob_spearman"], [1.0, 0.0, 0.0])
    assert np.isclose(out["knob_error"][0], (0.1 + 0.0 + 0.2) / 3)


def test_every_knob_is_a_documented_flag():
    docs = field_docs(SyntheticConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(SyntheticConfig)}
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["synthetic"]
    text = sub.format_help()
    for f in dataclasses.fields(SyntheticConfig):
        assert flag_name(f.name) in text and docs[f.name].split()[0] in text


@pytest.mark.parametrize("flags, words", [
    (["--noise", "-1"], "noise must be >= 0"),
    (["--conflict-angle", "0"], "conflict_angle must be in (0, 180)"),
    (["--conflict-angle", "180"], "conflict_angle must be in (0, 180)"),
    (["--local-steps", "0"], "local_steps must be >= 1"),
    (["--seeds", "many"], "seeds expects a int"),
    (["--optimizer", "rmsprop"], "optimizer must be one of"),
    (["--num-objectives", "3", "--conflict-angle", "150"], "conflict_angle must be <= 120.0"),
    (["--preference", "0.2,0.2"], "preference must sum to 1"),
])
def test_bad_flags_give_one_line_errors(flags, words, capsys, tmp_path):
    assert main(["synthetic", "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err
    assert not (tmp_path / "out").exists()


def test_command_writes_results_table_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["synthetic", "--out", str(out), "--seeds", "3", "--rounds", "4", "--dim", "5", "--num-clients", "3",
                 "--preference-sweep", "0.2", "--bootstrap", "200"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"firm b=0.01", "firm b=0.1", "firm b=1", "mgda", "linear", "fsmgda"}
    assert results["sweep"] == [0.2, 0.5]
    assert "Claim 5 preference knob" in (out / "table.md").read_text()
    for name in ("lambda.png", "spread.png", "front.png", "gap.png"):
        assert (out / name).stat().st_size > 5000


def test_configuration_compares_firm_with_each_baseline_and_calls_identical_runs_equivalent():
    from firm.synthetic.grid import run_configuration

    config = small(betas=(0.0, 1.0), preference_sweep=(0.2,), bootstrap=200, seeds=4)
    result = run_configuration(config)
    rows = {(c.metric, c.a, c.b): c for table in result["tables"].values() for c in table}
    same = rows[("lambda_tv", "firm b=0", "mgda")]  # beta = 0 is MGDA: identical on every seed
    assert same.verdict == "equivalent" and "identical" in same.reason
    assert ("pareto_distance", "firm b=1", "fsmgda") in rows and ("knob_error", "firm b=1", "linear") in rows
    assert ("lambda_tv", "firm b=1", "linear") not in rows  # linear's lambda is fixed: no such comparison
    assert np.all(result["metrics"]["firm b=0"]["knob_spearman"] == 0)  # beta = 0 ignores p
