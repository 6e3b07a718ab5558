"""The experiment harness (`firm compare`, `firm pareto`): summary math on hand-made metrics,
planning and resuming, and real tiny simulations of every algorithm through the harness."""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from firm import experiments as ex
from firm.cli import experiments as cli
from firm.config import ALGORITHMS, build_config
from firm.rundir import RunDir

TINY_TRAIN_FLAGS = ["--rewards", "relevance,civility", "--num-clients", "2", "--num-rounds", "2",
                    "--rollout-batch-size", "2", "--max-new-tokens", "4", "--ppo-epochs", "1",
                    "--num-minibatches", "1", "--max-prompt-tokens", "32"]


def harness_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="firm")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def round_record(number: int, rewards: dict[str, float], lambda_mean=(0.5, 0.5), lambda_std=(0.0, 0.0),
                 distance: float = 0.0, bytes_up: float = 1000.0, bytes_down: int = 1000) -> dict:
    return {"type": "round", "round": number, **{f"reward/{k}": v for k, v in rewards.items()},
            "lambda_mean": list(lambda_mean), "lambda_std": list(lambda_std), "adapter_distance": distance,
            "bytes_up_per_client": bytes_up, "bytes_down_per_client": bytes_down}


def write_fake_run(run_dir: Path, config, rounds: list[dict]) -> None:
    """A completed run directory as `firm train` leaves it (config, state, metrics)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    RunDir(run_dir).save_config(config)
    (run_dir / "state.json").write_text(json.dumps({"completed_rounds": len(rounds)}))
    lines = []
    for r in rounds:  # client records are interleaved, as the server writes them; they must be ignored
        lines.append({"type": "client", "round": r["round"], "reward/a": -99.0, "reward/b": -99.0})
        lines.append(r)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


# ---- summary math -----------------------------------------------------------------------------
def test_smoothness_is_the_spread_of_round_to_round_changes():
    # changes 1, 2, 3: population std sqrt(2/3)
    assert ex.smoothness([0.0, 1.0, 3.0, 6.0]) == pytest.approx(math.sqrt(2 / 3))
    assert ex.smoothness([0.0, 0.5, 1.0, 1.5]) == pytest.approx(0.0)  # steady progress is smooth
    assert ex.smoothness([1.0, 2.0]) is None  # one change has no spread


def test_hypervolume_of_a_staircase_and_of_points_below_the_reference():
    # boxes [0,1]x[0,3], [0,2]x[0,2], [0,3]x[0,1]: 3 + 1*2 + 1*1
    assert ex.hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0]) == pytest.approx(6.0)
    assert ex.hypervolume([[1, 1], [-1, 5]], [0, 0]) == pytest.approx(1.0)  # (-1, 5) adds nothing
    assert ex.hypervolume([[0.5, 0.25]], [0.25, 0.0]) == pytest.approx(0.0625)
    assert ex.hypervolume([[-1, -1]], [0, 0]) == 0.0
    with pytest.raises(ex.ExperimentError, match="non-finite"):
        ex.hypervolume([[float("nan"), 1.0]], [0, 0])


def test_reference_point_is_the_lowest_observed_reward_minus_one_percent_of_the_range():
    runs = [[round_record(1, {"a": 0.2, "b": 5.0}), round_record(2, {"a": 0.6, "b": 4.0})],
            [round_record(1, {"a": 1.2, "b": 4.0})]]
    assert ex.reference_point(runs, ["a", "b"]) == pytest.approx([0.2 - 0.01, 4.0 - 0.01])
    flat = [[round_record(1, {"a": 1.0, "b": 1.0})]]
    assert ex.reference_point(flat, ["a", "b"]) == pytest.approx([1.0 - 1e-6, 1.0 - 1e-6])


def test_summarize_run_reads_round_records_only(tmp_path: Path):
    rounds = [round_record(1, {"a": 0.0, "b": 1.0}, lambda_mean=(0.2, 0.8), lambda_std=(0.1, 0.1), distance=0.5),
              round_record(2, {"a": 1.0, "b": 1.0}, lambda_mean=(0.4, 0.6), lambda_std=(0.3, 0.3), distance=1.5),
              round_record(3, {"a": 3.0, "b": 2.0}, lambda_mean=(0.6, 0.4), lambda_std=(0.2, 0.2), distance=1.0)]
    write_fake_run(tmp_path / "run", build_config("default", {"num_rounds": 3}), list(reversed(rounds)))
    summary = ex.summarize_run(ex.read_round_records(tmp_path / "run"))
    assert summary["rounds"] == [1, 2, 3]
    assert summary["objectives"] == ["a", "b"]
    assert summary["final_reward"] == {"a": 3.0, "b": 2.0}
    assert summary["smoothness"]["a"] == pytest.approx(0.5)  # changes 1, 2
    assert summary["smoothness"]["b"] == pytest.approx(0.5)  # changes 0, 1
    assert summary["lambda_drift"] == pytest.approx(0.2)
    assert summary["drift_curve"] == pytest.approx([0.1, 0.3, 0.2])
    assert summary["adapter_distance"] == pytest.approx(1.0)
    assert summary["lambda_mean_over_rounds"] == pytest.approx([0.4, 0.6])
    assert summary["bytes_up_per_client"] == 1000.0


def test_a_metric_missing_from_the_records_is_reported_as_not_measured():
    rounds = [round_record(1, {"a": 0.0, "b": 1.0}), round_record(2, {"a": 1.0, "b": 1.0})]
    for r in rounds:
        del r["lambda_std"]
    summary = ex.summarize_run(rounds)
    assert summary["lambda_drift"] is None and summary["drift_curve"] is None
    assert ex.aggregate([summary["lambda_drift"]]).note == "not measured"


def test_duplicate_rounds_are_an_error(tmp_path: Path):
    write_fake_run(tmp_path / "run", build_config(), [round_record(1, {"a": 0, "b": 0}), round_record(1, {"a": 0, "b": 0})])
    with pytest.raises(ex.ExperimentError, match="a round twice"):
        ex.read_round_records(tmp_path / "run")


def test_aggregate_uses_the_sample_std():
    stat = ex.aggregate([1.0, 2.0, 3.0])
    assert (stat.mean, stat.std, stat.n) == (2.0, 1.0, 3)
    single = ex.aggregate([4.0])
    assert (single.mean, single.std) == (4.0, None)


def test_rank_correlation_of_preferences_and_rewards():
    prefs = [0.1, 0.3, 0.5, 0.7, 0.9]
    assert ex.rank_correlation(prefs, [1, 2, 3, 4, 5])["rho"] == pytest.approx(1.0)
    assert ex.rank_correlation(prefs, [5, 4, 3, 2, 1])["rho"] == pytest.approx(-1.0)
    # ranks 3,1,2,5,4: sum d^2 = 8, rho = 1 - 6 * 8 / (5 * 24) = 0.6
    assert ex.rank_correlation(prefs, [0.3, 0.1, 0.2, 0.5, 0.4])["rho"] == pytest.approx(0.6)
    assert ex.rank_correlation(prefs, [1, 1, 1, 1, 1])["rho"] is None
    assert ex.order_follows([{"rho": 1.0}, {"rho": 1.0}]) is True
    assert ex.order_follows([{"rho": 0.6}, {"rho": None}]) is False
    assert ex.order_follows([{"rho": 1.0}, {"rho": None}]) is None


# ---- parsing and planning ---------------------------------------------------------------------
def test_flags_after_double_dash_go_to_firm_train():
    args = harness_parser().parse_args(["compare", "--out", "x", "--seeds", "0", "--", "--num-rounds", "3",
                                        "--num-clients", "4"])
    assert args.train_args == ["--num-rounds", "3", "--num-clients", "4"]
    assert args.handler is cli.compare_command
    train = cli.train_settings(args.train_args, ex.HARNESS_FLAGS_COMPARE)
    assert ex.expected_config(train, {}).num_rounds == 3


@pytest.mark.parametrize("flags, match", [(["--seed", "3"], "--seed"), (["--algorithm", "mgda"], "--algorithm"),
                                          (["--run-dir", "x"], "--run-dir"), (["--resume", "x"], "--resume")])
def test_flags_the_harness_sets_are_refused_after_double_dash(flags, match):
    with pytest.raises(ex.ExperimentError, match=match):
        cli.parse_train_flags(flags, ex.HARNESS_FLAGS_COMPARE)


def test_pareto_owns_preference_and_beta_but_compare_passes_them_on():
    with pytest.raises(ex.ExperimentError, match="--beta"):
        cli.parse_train_flags(["--beta", "1.0"], ex.HARNESS_FLAGS_PARETO)
    assert cli.parse_train_flags(["--beta", "1.0"], ex.HARNESS_FLAGS_COMPARE).beta == "1.0"


def test_unknown_train_flags_are_an_error():
    with pytest.raises(ex.ExperimentError, match="not valid `firm train` flags"):
        cli.parse_train_flags(["--no-such-flag", "1"], ex.HARNESS_FLAGS_COMPARE)


def test_list_options_are_validated():
    assert cli.parse_seeds("0, 1,2") == [0, 1, 2]
    with pytest.raises(ex.ExperimentError, match="twice"):
        cli.parse_seeds("0,0")
    with pytest.raises(ex.ExperimentError, match="unknown algorithms: nope"):
        cli.parse_names("firm,nope", ALGORITHMS, "algorithms")
    with pytest.raises(ex.ExperimentError, match=">= 0"):
        cli.parse_betas("0.01,-1")
    assert cli.parse_preferences("", 2)[0] == (0.1, 0.9) and len(cli.parse_preferences("", 2)) == 5
    assert cli.parse_preferences("0.2,0.8;0.8,0.2", 2) == [(0.2, 0.8), (0.8, 0.2)]
    with pytest.raises(ex.ExperimentError, match="0.5,0.6"):
        cli.parse_preferences("0.5,0.6;0.2,0.8", 2)
    with pytest.raises(ex.ExperimentError, match="pass --preferences explicitly"):
        cli.parse_preferences("", 3)
    with pytest.raises(ex.ExperimentError, match="2 objectives"):
        cli.parse_reference_point("0,0,0", 2)


def test_an_unknown_algorithm_stops_before_anything_runs(tmp_path: Path):
    args = harness_parser().parse_args(["compare", "--out", str(tmp_path), "--algorithms", "firm,nope"])
    with pytest.raises(ex.ExperimentError, match="nope"):
        args.handler(args)
    assert not (tmp_path / "runs").exists()


def planned(tmp_path: Path, flags: list[str], **kwargs) -> ex.PlannedRun:
    train = cli.train_settings(flags, ex.HARNESS_FLAGS_COMPARE)
    return ex.plan_run(train, tmp_path / "run", "firm", "firm", "iid", 0, **kwargs)


def test_run_status_reuses_finished_runs_resumes_short_ones_and_refuses_other_settings(tmp_path: Path):
    run = planned(tmp_path, ["--num-rounds", "2", "--beta", "0.5"])
    assert ex.run_status(run) == "new"
    assert ex.train_command(run, "new", ["--beta", "0.5"])[-2:] == ["--beta", "0.5"]
    write_fake_run(run.run_dir, run.config, [round_record(1, {"a": 0, "b": 0}), round_record(2, {"a": 0, "b": 0})])
    assert ex.run_status(run) == "done"

    longer = planned(tmp_path, ["--num-rounds", "3", "--beta", "0.5"])
    assert ex.run_status(longer) == "resume"
    command = ex.train_command(longer, "resume", ["--num-rounds", "3", "--beta", "0.5"])
    assert command[-4:] == ["--resume", str(longer.run_dir), "--num-rounds", "3"]

    other = planned(tmp_path, ["--num-rounds", "2", "--beta", "0.1"])
    with pytest.raises(ex.ExperimentError, match="beta: 0.5 there, 0.1 planned"):
        ex.run_status(other)
    shorter = planned(tmp_path, ["--num-rounds", "1", "--beta", "0.5"])
    with pytest.raises(ex.ExperimentError, match="2 rounds but 1"):
        ex.run_status(shorter)


# ---- whole experiments on hand-made run directories (no training) ------------------------------
def fake_rounds(final: tuple[float, float], lam1: float, drift: float, num_rounds: int = 3) -> list[dict]:
    """Rewards that grow linearly to `final` (smoothness 0), constant lambda and drift."""
    return [round_record(k, {"relevance": final[0] * k / num_rounds, "civility": final[1] * k / num_rounds},
                         lambda_mean=(lam1, 1 - lam1), lambda_std=(drift, drift), distance=drift, bytes_up=1000.0)
            for k in range(1, num_rounds + 1)]


def test_compare_on_finished_runs_writes_table_verdicts_and_plots(tmp_path: Path, capsys):
    flags = ["--rewards", "relevance,civility", "--num-rounds", "3"]
    seeds = range(10)  # enough paired seeds for a Holm-corrected Wilcoxon test to decide
    argv = ["compare", "--out", str(tmp_path), "--algorithms", "firm,mgda", "--partitions", "iid",
            "--seeds", ",".join(map(str, seeds)), "--reference-point", "0,0", "--", *flags]
    args = harness_parser().parse_args(argv)
    train = cli.train_settings(flags, ex.HARNESS_FLAGS_COMPARE)
    for algorithm in ("firm", "mgda"):
        for seed in seeds:
            run = ex.plan_run(train, tmp_path.resolve() / "runs" / "iid" / algorithm / f"seed-{seed}", algorithm,
                              algorithm, "iid", seed)
            drift = 0.01 * (seed + 1) if algorithm == "firm" else 0.3 + 0.02 * seed
            write_fake_run(run.run_dir, run.config, fake_rounds((0.5 + 0.01 * seed, 0.5), 0.5, drift))
    assert args.handler(args) == 0
    assert "done already" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["reference_point"] == {"relevance": 0.0, "civility": 0.0}
    firm = results["aggregates"]["iid"]["firm"]
    assert firm["lambda_drift"] == pytest.approx({"mean": 0.055, "std": np.std(np.arange(1, 11) / 100, ddof=1), "n": 10})
    assert firm["hypervolume"]["mean"] == pytest.approx(np.mean([0.5 * (0.5 + 0.01 * s) for s in seeds]))
    verdicts = results["verdicts"]["iid"]["mgda"]
    # firm's drift is lower on every one of the 10 paired seeds: confirmed after Holm
    assert verdicts["lambda_drift"]["verdict"] == "confirmed" and verdicts["adapter_distance"]["verdict"] == "confirmed"
    assert verdicts["lambda_drift"]["mean_diff"] == pytest.approx(np.mean([0.01 * (s + 1) - 0.3 - 0.02 * s
                                                                           for s in seeds]))
    assert verdicts["lambda_drift"]["ci_high"] < 0
    # the same rewards and bytes on every seed: equivalent, and no test is run on zeros
    assert verdicts["final_reward/relevance"]["verdict"] == "equivalent"
    assert verdicts["bytes_up_per_client"]["verdict"] == "equivalent"
    table = (tmp_path / "table.md").read_text()
    assert "firm vs mgda" in table and "(3) lambda drift" in table and "relevance = 0" in table
    assert "Final reward: last round record" in table
    for name in ("rewards_relevance.png", "rewards_civility.png", "drift.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_pareto_on_finished_runs_reports_fronts_rank_order_and_hypervolume(tmp_path: Path):
    flags = ["--rewards", "relevance,civility", "--num-rounds", "3"]
    argv = ["pareto", "--out", str(tmp_path), "--seeds", "0,1", "--betas", "0.01", "--reference-point", "0,0",
            "--", *flags]
    args = harness_parser().parse_args(argv)
    preferences = cli.parse_preferences("", 2)
    train = cli.train_settings(flags, ex.HARNESS_FLAGS_PARETO)
    runs = ex.plan_pareto(train, tmp_path.resolve(), ["firm", "linear"], [0.01], preferences, "iid", [0, 1])
    assert len(runs) == 2 * 5 * 2
    firm_relevance = dict(zip(preferences, [0.3, 0.1, 0.2, 0.5, 0.4]))  # rho = 0.6
    for run in runs:
        p1 = run.preference[0]
        if run.algorithm == "linear":  # follows the preference exactly, same on both seeds
            rounds = fake_rounds((p1, 1 - p1), p1, 0.0)
        else:
            rounds = fake_rounds((firm_relevance[run.preference], 0.5 + 0.01 * run.seed), 0.5, 0.05)
        write_fake_run(run.run_dir, run.config, rounds)
    assert args.handler(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    linear, firm = results["fronts"]["linear"], results["fronts"]["firm (beta=0.01)"]
    # staircase of (0.1,0.9) (0.3,0.7) (0.5,0.5) (0.7,0.3) (0.9,0.1): .09 + .14 + .10 + .06 + .02
    assert linear["hypervolume"]["mean"] == pytest.approx(0.41)
    assert linear["order_follows_preferences"] is True
    assert linear["rank_correlation"]["relevance"]["rho"] == pytest.approx(1.0)
    # objective 1 gains 0.8 from p_1 = 0.1 to 0.9 on both seeds; 2 seeds cannot make a test decide
    assert linear["knob_effect"]["mean_diff"] == pytest.approx(0.8)
    assert linear["knob_effect"]["verdict"] == "not separable"
    assert linear["lambda_1_range"] == pytest.approx([0.1, 0.9])
    assert firm["rank_correlation"]["relevance"]["rho"] == pytest.approx(0.6)
    assert firm["order_follows_preferences"] is False
    assert firm["lambda_1_range"] == pytest.approx([0.5, 0.5])
    table = (tmp_path / "table.md").read_text()
    assert "firm (beta=0.01)" in table and "+1.00" in table
    assert (tmp_path / "front.png").stat().st_size > 1000 and (tmp_path / "knob.png").exists()


def test_pareto_runs_only_beta_dependent_algorithms_at_every_beta():
    assert ALGORITHMS["firm"].uses_beta
    assert not ALGORITHMS["linear"].uses_beta and not ALGORITHMS["mgda"].uses_beta
    if "fsmgda" in ALGORITHMS:
        assert not ALGORITHMS["fsmgda"].uses_beta


def test_dry_run_plans_without_running(tmp_path: Path, capsys):
    args = harness_parser().parse_args(["pareto", "--out", str(tmp_path), "--seeds", "0", "--betas", "0.01,1", "--dry-run",
                                        "--", "--rewards", "relevance,civility"])
    assert args.handler(args) == 0
    out = capsys.readouterr()
    assert out.out.count(": new") == (2 * 5 + 5)  # firm at two betas, linear once
    assert "--beta 1.0" in out.out and "--preference 0.9,0.1" in out.out
    assert "claims need >= 3 seeds" in out.err.replace("a claim needs", "claims need")
    assert not (tmp_path / "runs").exists()


def test_compare_with_betas_runs_firm_once_per_beta_seed_by_seed(tmp_path: Path, capsys):
    train = cli.train_settings(["--rewards", "relevance,civility"], ex.HARNESS_FLAGS_COMPARE + ("beta",))
    runs = ex.plan_compare(train, tmp_path, ["firm", "mgda", "linear"], ["category"], [0, 1], betas=[0.01, 1.0])
    groups = ["firm (beta=0.01)", "firm (beta=1)", "mgda", "linear"]
    # seeds outer: a compare stopped part-way still holds whole paired seeds
    assert [(r.seed, r.group) for r in runs] == [(s, g) for s in (0, 1) for g in groups]
    assert [r.config.beta for r in runs[:2]] == [0.01, 1.0]
    assert runs[1].run_dir == tmp_path / "runs" / "category" / "firm-beta1" / "seed-0"
    assert "--beta" not in " ".join(runs[2].harness_flags())  # mgda keeps beta 0
    from firm.experiments.compare import reference_algorithm
    assert reference_algorithm(groups) == "firm (beta=0.01)"
    from firm.experiments.plan import eval_path
    assert eval_path(runs[0], 36, 2).name == "eval-round-003-36prompts-x2.json"
    from firm.experiments.execute import eval_command
    assert "--samples-per-prompt 2" in " ".join(eval_command(runs[0], 36, 2))
    # with --betas the harness owns beta: a --beta after -- is refused
    args = harness_parser().parse_args(["compare", "--out", str(tmp_path / "x"), "--betas", "0.01,1", "--dry-run",
                                        "--", "--beta", "0.5"])
    with pytest.raises(ex.ExperimentError, match="--beta"):
        args.handler(args)


# ---- real tiny simulations through the harness --------------------------------------------------
@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory, tiny_policy_dir):
    """Every available algorithm, 2 clients x 2 rounds, seed 0, IID, on a tiny random Llama."""
    out = tmp_path_factory.mktemp("compare")
    argv = ["compare", "--out", str(out), "--partitions", "iid", "--seeds", "0", "--",
            "--policy", tiny_policy_dir, *TINY_TRAIN_FLAGS]
    args = harness_parser().parse_args(argv)
    code = args.handler(args)
    return out, argv, code, json.loads((out / "results.json").read_text())


def test_every_algorithm_completes_a_tiny_simulation(tiny_compare):
    out, _, code, results = tiny_compare
    assert code == 0, results["failures"]
    assert sorted(r["algorithm"] for r in results["runs"]) == sorted(ALGORITHMS)
    for run in results["runs"]:
        assert run["rounds"] == [1, 2]
        assert set(run["final_reward"]) == {"relevance", "civility"}
        assert run["hypervolume"] > 0
        assert run["smoothness"] == {"relevance": None, "civility": None}  # 2 rounds: undefined
    table = (out / "table.md").read_text()
    assert "needs >= 3 rounds" in table and "needs >= 2 seeds" in table
    for name in ("rewards_relevance.png", "rewards_civility.png", "drift.png"):
        assert (out / name).stat().st_size > 1000


def serialized_adapter_bytes(adapter_dir: Path) -> int:
    """What travels for one adapter: each tensor as .npy bytes (Flower's Array format), counted
    independently of Flower from the adapter the run saved."""
    from safetensors.numpy import load_file

    total = 0
    for array in load_file(str(adapter_dir / "adapter_model.safetensors")).values():
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        total += len(buffer.getvalue())
    return total


def test_byte_counters_match_the_adapters_real_size(tiny_compare):
    runs = {r["algorithm"]: r for r in tiny_compare[3]["runs"]}
    adapter_bytes = serialized_adapter_bytes(Path(runs["firm"]["run_dir"]) / "adapters" / "round-002")
    for algorithm, run in runs.items():
        uploads = 2 if algorithm == "fsmgda" else 1  # fsmgda: one adapter's worth per objective (M = 2)
        assert run["bytes_up_per_client"] == uploads * adapter_bytes, algorithm
        assert run["bytes_down_per_client"] == adapter_bytes, algorithm


def test_rerunning_reuses_finished_runs_and_can_score_their_final_adapters(tiny_compare, capsys):
    out, argv, _, _ = tiny_compare
    logs = {p: p.read_text() for p in (out / "runs").rglob("train.log")}
    argv = [*argv[:3], "--algorithms", "firm,linear", "--eval-prompts", "2", *argv[3:]]
    args = harness_parser().parse_args(argv)
    assert args.handler(args) == 0
    assert capsys.readouterr().out.count("done already") == 2
    assert {p: p.read_text() for p in logs} == logs  # no training ran
    results = json.loads((out / "results.json").read_text())
    for run in results["runs"]:
        evaluated = json.loads((Path(run["run_dir"]) / "eval-round-002-2prompts.json").read_text())
        assert evaluated["num_prompts"] == 2
        assert run["final_reward"] == evaluated["rewards"]
        assert run["final_reward_source"].startswith("firm eval of round 2's adapter")
    assert "Final reward: firm eval" in (out / "table.md").read_text()


def test_a_failing_run_is_reported_with_its_log_and_exits_non_zero(tmp_path: Path, capsys):
    args = harness_parser().parse_args(["compare", "--out", str(tmp_path), "--algorithms", "linear",
                                        "--partitions", "iid", "--seeds", "0", "--",
                                        "--policy", str(tmp_path / "no-such-model"), *TINY_TRAIN_FLAGS])
    assert args.handler(args) == 1
    captured = capsys.readouterr()
    failed = captured.out.split("FAILED", 1)[1]
    assert "error:" in failed and "no-such-model" in failed  # the log tail names the cause
    assert "1 run(s) failed" in captured.err and "no run completed" in captured.err


def direct_update_cosine(updates: np.ndarray) -> float:
    """The definition, pair by pair: sum_{c != d} u_c . u_d / sum_{c != d} |u_c| |u_d|."""
    dots = [updates[c] @ updates[d] for c in range(len(updates)) for d in range(len(updates)) if c != d]
    norms = [np.linalg.norm(updates[c]) * np.linalg.norm(updates[d])
             for c in range(len(updates)) for d in range(len(updates)) if c != d]
    return float(np.sum(dots) / np.sum(norms))


@pytest.mark.parametrize("shared", [0.0, 0.5, 3.0])
def test_update_cosine_from_norms_and_distances_equals_the_pairwise_definition(shared: float):
    rng = np.random.default_rng(7)
    updates = shared * rng.normal(size=64) + rng.normal(size=(4, 64)) * rng.uniform(0.5, 2.0, size=(4, 1))
    mean = updates.mean(axis=0)
    norms = np.linalg.norm(updates, axis=1)
    distances = np.linalg.norm(updates - mean, axis=1)
    assert ex.update_cosine(norms, distances) == pytest.approx(direct_update_cosine(updates), abs=1e-12)


def test_update_cosine_limits():
    same = np.tile(np.arange(1.0, 9.0), (3, 1))
    assert ex.update_cosine(np.linalg.norm(same, axis=1), [0.0] * 3) == pytest.approx(1.0)
    opposite = np.stack([np.ones(8), -np.ones(8)])  # mean 0: each update is its own distance
    assert ex.update_cosine(np.linalg.norm(opposite, axis=1), np.linalg.norm(opposite, axis=1)) == pytest.approx(-1.0)
    assert ex.update_cosine([1.0], [0.0]) is None  # one client: no pair
    assert ex.update_cosine([0.0, 0.0], [0.0, 0.0]) is None  # nobody moved


def test_client_update_cosine_is_measured_only_for_one_fedavg_adapter_per_client():
    rng = np.random.default_rng(3)
    rounds, clients, expected = [], [], []
    for number in (1, 2):
        updates = rng.normal(size=(3, 16)) + 1.0
        rounds.append({"round": number, "algorithm": "firm", "aggregator": "fedavg"})
        for update in updates:
            clients.append({"round": number, "update_norm": float(np.linalg.norm(update)),
                            "adapter_distance": float(np.linalg.norm(update - updates.mean(0)))})
        expected.append(direct_update_cosine(updates))
    assert ex.client_update_cosine(rounds, clients) == pytest.approx(np.mean(expected))
    assert ex.client_update_cosine([dict(r, algorithm="fsmgda") for r in rounds], clients) is None
    assert ex.client_update_cosine([dict(r, aggregator="median") for r in rounds], clients) is None
    assert ex.client_update_cosine(rounds, [{k: v for k, v in c.items() if k != "update_norm"} for c in clients]) is None


def test_step_geometry_total_variation_and_spread_by_hand():
    # two clients, one round, three local steps; client 1's step 2 was skipped (not taken)
    clients = [
        {"round": 1, "step_lambda": [0.2, 0.8, 0.6, 0.4, 0.5, 0.5], "step_taken": [1, 1, 1],
         "step_gram_distance": [1.0, 0.5, 0.0], "step_norm_ratio": [0.5, 0.5, 1.0], "step_cosine": [0.0, 0.5, 1.0]},
        {"round": 1, "step_lambda": [0.4, 0.6, 0.4, 0.6, 0.0, 0.0], "step_taken": [1, 1, 0],
         "step_gram_distance": [1.0, 1.0, 9.0], "step_norm_ratio": [1.0, 1.0, 9.0], "step_cosine": [0.0, 0.0, 9.0]},
    ]
    geometry = ex.step_geometry(clients, 2)
    # client 0: |0.4| + |0.4| (step 0->1) + |0.1| + |0.1| (1->2) = 1.0; client 1: 0 over its taken steps
    assert geometry["lambda_total_variation"] == pytest.approx(0.5)
    # std across the 2 clients per step (population): step 0 0.1, step 1 0.1, step 2 only client 0 -> 0
    assert geometry["lambda_step_spread"] == pytest.approx((0.1 + 0.1 + 0.0) / 3)
    assert geometry["gram_distance"] == pytest.approx((1.0 + 0.5 + 0.0 + 1.0 + 1.0) / 5)  # skipped step left out
    assert geometry["cosine"] == pytest.approx(1.5 / 5)


def fake_evaluation(per_response: list[list[float]], samples: int, kl: float = 0.1) -> dict:
    scores = np.asarray(per_response)
    n = len(per_response)
    return {"rewards": {"relevance": float(scores[:, 0].mean()), "civility": float(scores[:, 1].mean())},
            "kl": kl, "response_tokens": 4.0, "num_prompts": n // samples, "samples_per_prompt": samples,
            "pairing": {"seed": 1234, "num_prompts": n // samples, "samples_per_prompt": samples},
            "per_response": {"prompt_index": [i // samples for i in range(n)], "rewards": scores.tolist(),
                             "kl": [kl] * n}}


def test_compare_reports_heldout_gains_over_the_untrained_policy_and_primary_comparisons(tmp_path: Path):
    flags = ["--rewards", "relevance,civility", "--num-rounds", "3"]
    seeds = range(6)
    primary = "firm vs mgda: final_reward/relevance; firm vs mgda: lambda_drift; firm vs mgda: bytes_up_per_client"
    argv = ["compare", "--out", str(tmp_path), "--algorithms", "firm,mgda", "--partitions", "iid",
            "--seeds", ",".join(map(str, seeds)), "--reference-point", "0,0", "--eval-prompts", "3",
            "--eval-samples", "2", "--primary", primary, "--", *flags]
    args = harness_parser().parse_args(argv)
    train = cli.train_settings(flags, ex.HARNESS_FLAGS_COMPARE)
    base_scores = [[0.1 * i, -0.1 * i] for i in range(6)]  # 3 prompts x 2 samples
    (tmp_path / ex.base_eval_path(tmp_path, 3, 2).name).write_text(json.dumps(fake_evaluation(base_scores, 2)))
    for algorithm, lift in (("firm", 0.3), ("mgda", 0.1)):
        for seed in seeds:
            run = ex.plan_run(train, tmp_path.resolve() / "runs" / "iid" / algorithm / f"seed-{seed}", algorithm,
                              algorithm, "iid", seed)
            write_fake_run(run.run_dir, run.config, fake_rounds((0.5, 0.5), 0.5, 0.1 if algorithm == "firm" else 0.2))
            tuned = [[r + lift + 0.01 * seed + 0.001 * i, c] for i, (r, c) in enumerate(base_scores)]
            ex.eval_path(run, 3, 2).write_text(json.dumps(fake_evaluation(tuned, 2)))
    assert args.handler(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    gains = results["heldout_gain"]["iid"]
    # independent reference: the gain is the lift plus the seed offsets' mean plus the per-response offsets' mean
    assert gains["firm"]["relevance"]["gain"] == pytest.approx(0.3 + 0.01 * np.mean(seeds) + 0.001 * 2.5)
    assert gains["mgda"]["relevance"]["gain"] == pytest.approx(0.1 + 0.01 * np.mean(seeds) + 0.001 * 2.5)
    assert gains["firm"]["civility"]["gain"] == pytest.approx(0.0)
    assert gains["firm"]["relevance"]["ci_low"] > 0 and gains["firm"]["relevance"]["seeds"] == 6
    run_entry = next(r for r in results["runs"] if r["group"] == "firm")
    assert run_entry["heldout_gain"]["relevance"]["pairs"] == 6
    # Holm over the two primary comparisons only: 6 seeds, all one sign: p = 2/64 each, Holm 0.0625
    first, second, third = results["primary"]["iid"]
    assert (first["metric"], first["a"], first["b"]) == ("final_reward/relevance", "firm", "mgda")
    assert not first["exploratory"] and first["p_holm"] == pytest.approx(2 * 2 / 64)
    assert first["margin"] == 0.02 and second["margin"] == 0.01
    # a deterministic primary is decided by construction, outside the Holm family
    assert "by construction" in third["reason"] and not third["holm_tested"] and first["holm_tested"]
    # every other comparison is exploratory (uncorrected), bytes are compared without a test
    verdicts = results["verdicts"]["iid"]["mgda"]
    assert verdicts["hypervolume"]["exploratory"] and verdicts["hypervolume"]["p_holm"] == verdicts["hypervolume"]["p"]
    assert "by construction" in verdicts["bytes_up_per_client"]["reason"]
    table = (tmp_path / "table.md").read_text()
    assert "Held-out gain over the untrained policy" in table and "Primary comparisons" in table
    assert "(6/6)" in table and "exploratory" in table
    # 6 seeds would allow p < 0.05 for one test, not under Holm over the two tested: the table says so
    assert "With 6 paired seeds and Holm over 2 comparisons the smallest possible adjusted p is 0.0625" in table


def test_primary_comparisons_are_parsed_and_checked(tmp_path: Path):
    assert cli.parse_primary("firm (beta=1) vs mgda: lambda_drift; firm vs linear: hypervolume") == (
        ("firm (beta=1)", "mgda", "lambda_drift"), ("firm", "linear", "hypervolume"))
    with pytest.raises(ex.ExperimentError, match="not 'A vs B: METRIC'"):
        cli.parse_primary("firm mgda hypervolume")
    with pytest.raises(ex.ExperimentError, match="at most 4"):
        cli.parse_primary("; ".join(f"a vs b: m{i}" for i in range(5)))
    args = harness_parser().parse_args(["compare", "--out", str(tmp_path), "--algorithms", "firm,mgda",
                                        "--primary", "firm vs linear: hypervolume", "--",
                                        "--rewards", "relevance,civility"])
    with pytest.raises(ex.ExperimentError, match="linear, not among the planned groups"):
        args.handler(args)
    assert not (tmp_path / "runs").exists()
