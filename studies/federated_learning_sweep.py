"""Which settings make federated training raise the held-out rewards? A fast sweep for a GPU.

Each setting trains K clients for R rounds with the ClientApp's own round
(`firm.federation.client_app.run_local_update`: rollouts, PPO epochs, the FIRM step, the client's
kept state) and averages their adapters (FedAvg over equal shards), all in one process: only
Flower's transport is left out, so many settings run side by side on one GPU within minutes.
Every ``--eval-every`` rounds the global adapter is scored by `firm eval`'s `evaluate` on the
held-out prompts and paired with the untrained policy's evaluation (firm.heldout.paired_gain:
gain per objective with a prompt-level 95 % interval). A setting whose final gains both have
intervals above 0 *learns*; `firm train` with the same flags is what confirms it.

    python studies/federated_learning_sweep.py --out OUT --device cuda --deadline-s 420 \
        --settings cpu-lr3e-4,cpu-lr1e-3,paper-lr1e-3

Each setting runs in its own process and writes OUT/<setting>.json after every evaluation, so a
sweep cut short by its deadline still reports every round it scored.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

# Flags on top of the embedded defaults. "cpu-*": the size one run on the 2-core CPU can afford
# in about 30 minutes (2 clients, 16 prompts x 24 tokens, 4 PPO epochs x 2 minibatches, AdamW
# kept across rounds); "paper-*": the paper's per-client sizes with its 8 clients.
CPU_SIZE = dict(num_clients=2, rollout_batch_size=16, max_new_tokens=24, ppo_epochs=4, num_minibatches=2,
                optimizer="adamw", kl_coef=0.01)
PAPER_SIZE = dict(num_clients=8, rollout_batch_size=16, max_new_tokens=128, ppo_epochs=3, num_minibatches=1,
                  optimizer="adamw", kl_coef=0.01)
SETTINGS: dict[str, dict] = {
    "cpu-lr1e-4": {**CPU_SIZE, "learning_rate": 1e-4},
    "cpu-lr3e-4": {**CPU_SIZE, "learning_rate": 3e-4},
    "cpu-lr1e-3": {**CPU_SIZE, "learning_rate": 1e-3},
    "cpu-lr3e-4-kl0.05": {**CPU_SIZE, "learning_rate": 3e-4, "kl_coef": 0.05},
    "cpu-lr3e-4-2rollouts": {**CPU_SIZE, "learning_rate": 3e-4, "rollouts_per_round": 2},
    "cpu-lr3e-4-batch32": {**CPU_SIZE, "learning_rate": 3e-4, "rollout_batch_size": 32, "num_minibatches": 4},
    "cpu-lr3e-4-reset": {**CPU_SIZE, "learning_rate": 3e-4, "optimizer": "adamw-reset"},
    "cpu-lr3e-4-48tokens": {**CPU_SIZE, "learning_rate": 3e-4, "max_new_tokens": 48},
    "paper-lr3e-4": {**PAPER_SIZE, "learning_rate": 3e-4},
    "paper-lr1e-3": {**PAPER_SIZE, "learning_rate": 1e-3},
}


def evaluation(adapter: Path | None, cfg, args) -> dict:
    from firm.evaluate import EvalConfig, evaluate

    return evaluate(EvalConfig(adapter=str(adapter) if adapter else None, policy=cfg.policy, prompts=cfg.prompts,
                               eval_fraction=cfg.eval_fraction, rewards=cfg.rewards, num_prompts=args.eval_prompts,
                               samples_per_prompt=args.eval_samples, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, batch_size=args.eval_batch, device=args.device,
                               show_samples=4))


def run_setting(name: str, args) -> None:
    """Train one setting until its rounds or the deadline run out; score the global adapter."""
    from flwr.app import Context, RecordDict

    from firm.config import FirmConfig
    from firm.federation.client_app import run_local_update
    from firm.models import adapter_state, get_policy

    deadline = float(args.deadline)
    cfg = FirmConfig(**{**SETTINGS[name], "num_rounds": args.rounds, "device": args.device, "seed": args.seed}
                     ).validate()
    out = args.out / f"{name}.json"
    record = {"setting": name, "overrides": SETTINGS[name], "seed": args.seed, "curve": [], "round_seconds": []}
    policy, _ = get_policy(cfg)
    global_adapter = adapter_state(policy)  # the fresh LoRA: B = 0, so the untrained policy
    contexts = [Context(run_id=1, node_id=k, node_config={"partition-id": k, "num-partitions": cfg.num_clients},
                        state=RecordDict(), run_config={}) for k in range(cfg.num_clients)]
    base = evaluation(None, cfg, args)
    record["base"] = {"rewards": base["rewards"], "samples": base["samples"]}
    eval_seconds = 0.0
    for firm_round in range(1, cfg.num_rounds + 1):
        round_seconds = max(record["round_seconds"], default=0.0)
        if time.time() + round_seconds + 2 * eval_seconds > deadline:
            break
        start = time.time()
        uploads = [run_local_update(cfg, global_adapter, context, firm_round)[0] for context in contexts]
        global_adapter = {k: torch.stack([u[k] for u in uploads]).mean(0) for k in global_adapter}  # FedAvg
        record["round_seconds"].append(time.time() - start)
        if firm_round % args.eval_every == 0 or firm_round == cfg.num_rounds:
            start = time.time()
            record["curve"].append(score_round(name, firm_round, global_adapter, policy, base, cfg, args))
            eval_seconds = time.time() - start
            out.write_text(json.dumps(record, indent=1) + "\n")
    trained = len(record["round_seconds"])
    if trained and (not record["curve"] or record["curve"][-1]["round"] != trained):
        record["curve"].append(score_round(name, trained, global_adapter, policy, base, cfg, args))
    record["learns"] = bool(record["curve"]) and all(g["ci_low"] > 0 for k, g in record["curve"][-1]["gains"].items()
                                                      if k != "kl")
    out.write_text(json.dumps(record, indent=1) + "\n")


def score_round(name, firm_round, global_adapter, policy, base, cfg, args) -> dict:
    from firm.heldout import paired_gain
    from firm.models import load_adapter_state

    load_adapter_state(policy, global_adapter)
    adapter_dir = args.out / "adapters" / f"{name}-round-{firm_round:03d}"
    policy.save_pretrained(adapter_dir)
    tuned = evaluation(adapter_dir, cfg, args)
    shutil.rmtree(adapter_dir)  # scored; a sweep's adapters are not kept (the device returns few files)
    gains = paired_gain(base, tuned)
    print(f"{name} round {firm_round}: " + "; ".join(
        f"{k} {g['gain']:+.4f} [{g['ci_low']:+.4f}, {g['ci_high']:+.4f}]" for k, g in gains.items() if k != "kl")
        + f"; KL {tuned['kl']:.3f}", flush=True)
    return {"round": firm_round, "gains": {k: v for k, v in gains.items() if k != "kl"}, "kl": tuned["kl"],
            "response_tokens": tuned["response_tokens"], "samples": tuned["samples"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--settings", default="cpu-lr3e-4,cpu-lr1e-3",
                        help=f"comma-separated, from {', '.join(SETTINGS)}")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-prompts", type=int, default=30)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--eval-batch", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline-s", type=float, default=420.0, help="wall-clock budget of the whole sweep")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per setting's process")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        torch.set_num_threads(args.threads)
        run_setting(args.one, args)
        return 0
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    from firm.models import resolve_policy_path

    resolve_policy_path(SETTINGS[names[0]].get("policy", "embedded"))  # dequantize the shipped model once, here
    deadline = time.time() + args.deadline_s
    passed = list(argv if argv is not None else sys.argv[1:])
    children = []
    for name in names:
        log = open(args.out / f"{name}.log", "w")
        children.append((name, subprocess.Popen([sys.executable, __file__, *passed, "--one", name,
                                                 "--deadline", repr(deadline)], stdout=log, stderr=subprocess.STDOUT,
                                                env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})))
    failed = [name for name, child in children if child.wait() != 0]
    report(names, args.out)
    return 1 if failed else 0


def report(names: list[str], out: Path) -> None:
    lines = ["| setting | round | gain per objective [95% CI] | KL | tokens | s/round |", "| --- " * 6 + "|"]
    for name in names:
        path = out / f"{name}.json"
        if not path.exists():
            lines.append(f"| {name} | (no evaluation; see {name}.log) | | | | |")
            continue
        record = json.loads(path.read_text())
        seconds = sum(record["round_seconds"]) / max(1, len(record["round_seconds"]))
        for point in record["curve"]:
            gains = "; ".join(f"{k} {g['gain']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]"
                              for k, g in point["gains"].items())
            lines.append(f"| {name} | {point['round']} | {gains} | {point['kl']:.3f} | {point['response_tokens']:.1f}"
                         f" | {seconds:.1f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
