"""Slow poisoning through the real server strategy: how far hostile clients steer the global adapter.

Every round each client replies to FirmFedAvg.aggregate_train with a whole, schema-valid reply
(real ``flwr.app.Message`` objects, as in tests/test_strategy.py); the strategy's new global
adapter is the next round's. Nothing here knows how the strategy defends itself, so the same
script measures any version of the code (run it with that version first on PYTHONPATH).

- Honest clients: update = 0.3 x the update bound (the measured honest updates are 0.26-0.30 of
  the auto bound, firm.federation.strategy), direction = a per-round direction all honest
  clients share plus each client's own noise (cosine about 0.5 between two honest clients).
- Attackers: update = 0.999 x the bound (just inside it), always the same direction u; or the size
  of an honest update (0.3 x), always the same direction.
- Drift = <global after the last round - initial global, u> / bound.

    PYTHONPATH=src python studies/poisoning_drift.py [--rounds 20] [--shared 1] [--set KEY=VALUE] [--json out.json]

``--before REV`` also measures the code of git revision REV (its src/ is extracted to a temporary
folder and this script runs on it) and prints "before -> now"; the table in docs/deployment.md is
``--before 4a4dc59`` (the code before the payload checks and the slow-poisoning defence).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from firm.config import FirmConfig
from firm.federation.protocol import REPLY_METRICS, kind_length, objective_names
from firm.federation.strategy import make_strategy
from firm.trainer import PER_STEP_METRICS, REWARD_PREFIX

# LoRA-like tensors (8,192 parameters): the defence's statistics need a realistic dimension.
SHAPES = {"q.lora_A.weight": (16, 128), "q.lora_B.weight": (128, 16), "v.lora_A.weight": (16, 128),
          "v.lora_B.weight": (128, 16)}
BOUND = 1.0
HONEST_NORM = 0.3
ATTACK_NORM = 0.999
AGGREGATORS = ("fedavg", "median", "trimmed-mean")
# (name, clients in the federation, attackers, honest nodes that never answer, attack size / bound)
SCENARIOS = (("1 of 6", 6, 1, 0, ATTACK_NORM), ("1 of 6, one honest node silent", 6, 1, 1, ATTACK_NORM),
             ("2 of 6", 6, 2, 0, ATTACK_NORM), ("1 of 6 at honest size (0.3x)", 6, 1, 0, HONEST_NORM),
             ("2 of 6 at honest size (0.3x)", 6, 2, 0, HONEST_NORM), ("no attacker", 6, 0, 0, ATTACK_NORM))


class Grid:
    def __init__(self, nodes: list[int]):
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


# Plausible values of an honest client's reply metrics (4 local steps); a key the schema adds later
# is sent as 0 of its kind, so the replies stay schema-valid whatever the trainer reports.
PLAUSIBLE = {"kl": 0.5, "response_tokens": 30.0, "grad_cosine": 0.1, "value_loss": 0.5, "approx_kl": 0.01, "steps": 4,
             "num-examples": 8, "kl_coef": 0.05, "step_gram_distance": 0.5, "step_cosine": 0.1, "step_norm_ratio": 0.9,
             "step_taken": 1.0}


def metrics(config: FirmConfig) -> dict:
    """Every metric an honest client sends, keys and kinds from their owners (firm.trainer's
    ROUND_METRICS and PER_STEP_METRICS, firm.federation.protocol's CLIENT_METRICS); lambda and
    the preference uniform."""
    names = objective_names(config)
    uniform = [1.0 / len(names)] * len(names)
    steps = int(PLAUSIBLE["steps"])

    def value(key: str, kind: str) -> float | list[float]:
        if kind == "objectives":
            return list(uniform)
        if kind == "pairs":
            return [PLAUSIBLE.get(key, 0.0)] * kind_length(kind, len(names))
        return PLAUSIBLE.get(key, 0.0)

    out: dict = {f"{REWARD_PREFIX}{name}": 0.1 * (i + 1) for i, name in enumerate(names)}
    out.update({key: value(key, kind) for key, kind in REPLY_METRICS})
    for key, kind in PER_STEP_METRICS:
        one = value(key, kind)
        out[key] = (one if isinstance(one, list) else [one]) * steps
    return out


def flatten(adapter: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(adapter[k], np.float64).ravel() for k in SHAPES])


def unflatten(vector: np.ndarray) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for key, shape in SHAPES.items():
        size = int(np.prod(shape))
        out[key] = vector[start:start + size].reshape(shape)
        start += size
    return out


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def reply(node: int, adapter: np.ndarray, honest_metrics: dict) -> Message:
    instruction = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    arrays = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
                          for k, v in unflatten(adapter).items()})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(honest_metrics)}), reply_to=instruction)


def simulate(aggregator: str, num_clients: int, attackers: int, silent: int, rounds: int, seed: int = 0,
             shared: float = 1.0, settings: dict | None = None, attack_norm: float = ATTACK_NORM) -> float:
    """The drift along the attack after ``rounds`` rounds, in units of the update bound."""
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 0  # what a ServerApp process sets
    rng = np.random.default_rng(seed)
    dim = sum(int(np.prod(s)) for s in SHAPES.values())
    attack = unit(rng.normal(size=dim))
    config = FirmConfig.from_dict({"num_clients": num_clients, "min_clients": 3, "max_update_norm": BOUND,
                                   "aggregator": aggregator, "rewards": "relevance,civility", "rollout_batch_size": 8,
                                   **(settings or {})}).validate()
    strategy = make_strategy(config, on_round_end=lambda result: None, sleep=lambda s: None)
    reply_metrics = metrics(config)
    nodes = list(range(101, 101 + num_clients))
    hostile, answering = nodes[:attackers], nodes[:num_clients - silent]
    start = np.asarray(rng.normal(scale=0.02, size=dim), np.float32).astype(np.float64)
    current = start.copy()
    for r in range(1, rounds + 1):
        arrays = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
                              for k, v in unflatten(current).items()})
        list(strategy.configure_train(r, arrays, ConfigRecord(), Grid(nodes)))
        common = unit(rng.normal(size=dim))
        replies = []
        for node in answering:
            if node in hostile:
                update = attack_norm * BOUND * attack
            else:
                update = HONEST_NORM * BOUND * unit(shared * common + unit(rng.normal(size=dim)))
            replies.append(reply(node, current + update, reply_metrics))
        new, _ = strategy.aggregate_train(r, replies)
        current = flatten({k: v.numpy() for k, v in new.items()})
    return float(np.dot(current - start, attack) / BOUND)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--shared", type=float, default=1.0,
                        help="weight of the honest clients' shared direction against their own (0: independent)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a FirmConfig setting of the server, repeatable (e.g. contribution_budget=0)")
    parser.add_argument("--json", help="also write the table here as JSON")
    parser.add_argument("--before", metavar="REV", help="also measure git revision REV and print before -> now")
    args = parser.parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.set)
    logging.getLogger("flwr").setLevel(logging.ERROR)  # the silent node's timeouts, every round
    table = {name: {agg: simulate(agg, n, a, s, args.rounds, shared=args.shared, settings=settings,
                                     attack_norm=size) for agg in AGGREGATORS}
             for name, n, a, s, size in SCENARIOS}
    before = measure_revision(args.before, argv or sys.argv[1:]) if args.before else None
    print(f"drift along the attack after {args.rounds} rounds, in units of the update bound"
          + (f" ({args.before} -> this code)" if before else ""))
    print(f"{'scenario':36s}" + "".join(f"{agg:>16s}" for agg in AGGREGATORS))
    for name, row in table.items():
        cells = [f"{before[name][agg]:.2f} -> {row[agg]:.2f}" if before else f"{row[agg]:.2f}" for agg in AGGREGATORS]
        print(f"{name:36s}" + "".join(f"{cell:>16s}" for cell in cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "drift": table}, f, indent=2)
    return 0


def measure_revision(revision: str, argv: list[str]) -> dict:
    """This script's table for the code of git revision ``revision`` (its src/ on PYTHONPATH)."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(root), "archive", revision, "src"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        out = Path(tmp) / "table.json"
        rest = [a for i, a in enumerate(argv) if a != "--before" and (i == 0 or argv[i - 1] != "--before")
                and not a.startswith("--before=")]
        subprocess.run([sys.executable, __file__, *rest, "--json", str(out)], check=True, cwd=tmp,
                       env={**os.environ, "PYTHONPATH": str(Path(tmp) / "src")}, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["drift"]


if __name__ == "__main__":
    sys.exit(main())
