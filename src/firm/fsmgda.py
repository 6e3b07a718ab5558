"""FSMGDA, the server-side multi-gradient baseline (its own file, as CleanRL gives a variant).

Client: from the same global adapter and the same rollouts, one local PPO update per objective
(fixed weights e_m, each pass from the same adapter, critic and a fresh optimiser), returning M
adapters. Server: average each objective's adapters over clients (FedAvg), take the updates
d_m = mean_c(adapter_{m,c}) - global, solve lambda = argmin_simplex |sum_m l_m d_m|^2
(+ beta |l - p|^2, 0 for the classic method) and step global += sum_m lambda_m d_m.
M times FIRM's upload.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch

from firm.mgda import solve_weights
from firm.models import adapter_state, load_adapter_state
from firm.prompts import Prompt
from firm.trainer import FirmLocalTrainer, RoundStats

OBJECTIVE_KEY = "objective-{m}/{name}"


def pack_objectives(adapters: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """M adapters into one flat dict ("objective-m/<tensor name>"), for one ArrayRecord."""
    return {OBJECTIVE_KEY.format(m=m, name=k): v for m, adapter in enumerate(adapters) for k, v in adapter.items()}


def split_objectives(packed: dict[str, np.ndarray], num_objectives: int) -> list[dict[str, np.ndarray]]:
    """Undo pack_objectives (values as float64 numpy arrays)."""
    parts: list[dict[str, np.ndarray]] = [{} for _ in range(num_objectives)]
    for key, array in packed.items():
        prefix, _, name = key.partition("/")
        parts[int(prefix.removeprefix("objective-"))][name] = np.asarray(array, dtype=np.float64)
    return parts


def fsmgda_combine(global_adapter: dict[str, np.ndarray], averaged: list[dict[str, np.ndarray]], beta: float,
                   preference: Sequence[float]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The FSMGDA server step: the new global adapter and the lambda the server chose."""
    keys = sorted(global_adapter)
    deltas = np.stack([np.concatenate([(avg[k] - global_adapter[k]).ravel() for k in keys]) for avg in averaged])
    weights = solve_weights(deltas @ deltas.T, beta=beta, preference=preference)
    new = {k: global_adapter[k] + sum(w * (avg[k] - global_adapter[k]) for w, avg in zip(weights, averaged))
           for k in keys}
    return new, weights


class FsmgdaLocalTrainer(FirmLocalTrainer):
    """FSMGDA's client: M local passes, one per objective, each with the weights e_m."""

    current_objective = 0

    def objective_weights(self, gram: np.ndarray) -> np.ndarray:
        return np.eye(self.num_objectives)[self.current_objective]

    def train_round_per_objective(self, shard: Sequence[Prompt], rng: random.Random
                                  ) -> tuple[RoundStats, list[dict[str, torch.Tensor]]]:
        stats = RoundStats()
        batches = [self.collect(shard, rng, stats) for _ in range(self.config.rollouts_per_round)]
        seeds = [rng.randrange(2**31) for _ in batches]
        start = adapter_state(self.policy)
        critic_start = {k: v.clone() for k, v in self.value_head.state_dict().items()}
        adapters = []
        for m in range(self.num_objectives):
            load_adapter_state(self.policy, start)
            self.value_head.load_state_dict(critic_start)  # every pass starts from the same critic
            self.optimizer = self.make_optimizer()
            self.current_objective = m
            for (rollout, advantages, returns), seed in zip(batches, seeds):
                self.ppo_epochs(rollout, advantages, returns, stats, seed)
            adapters.append(adapter_state(self.policy))
        return stats, adapters
