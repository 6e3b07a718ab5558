"""FSMGDA's client: M local passes per round, one per objective (fixed weights e_m), each from
the same adapter, critic and a fresh optimiser, over the same rollouts; returns M adapters."""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch

from firm.models import adapter_state, load_adapter_state
from firm.prompts import Prompt
from firm.trainer import FirmLocalTrainer, RoundStats


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
