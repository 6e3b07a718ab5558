"""The local FIRM update: one client, one round (read top to bottom).

1. Rollout (firm.sampling): sample prompts from the client's shard, render them with the chat
   template, sample responses with a KV cache, and keep, from that same sampling pass, the
   per-token log-probs of the current (behaviour) policy and the hidden states the critic
   reads; then one forward of the reference (the same model with the LoRA adapter disabled).
2. Rewards: score every response with each of the M reward models, normalise each objective's
   scores with a running mean/std, add a per-token KL penalty, and run GAE per objective.
3. PPO epochs over minibatches. Each minibatch does ONE forward pass, builds the M clipped
   surrogate losses (one shared probability ratio, objective-specific advantages), takes the
   per-objective LoRA gradients g_m from that one graph (firm.gradients), forms the Gram matrix
   G_ij = g_i . g_j, solves lambda = argmin_simplex l^T (G/trG) l + beta ||l - p||^2 (firm.mgda)
   and steps along sum_m lambda_m g_m (plus the critic's own gradient). Non-finite or all-zero
   gradients skip the step and are counted.

Tricks, named: left padding with explicit position ids; log-probs from the tempered
distribution that was sampled; reward whitening per objective (running stats); advantage
whitening per objective; clipped value loss on a detached-feature critic; gradient-norm
clipping of the combined direction; KL penalty at every token, score at the last token.

Speed paths, exact either way (tests/test_fast_paths.py compares each with the slow path) and
chosen by constructor arguments: ``merge_lora_for_sampling`` (default on) and
``batched_objective_gradients`` (one vmapped backward instead of M; default off). Settings that
change the numbers are config fields: ``gram = last-hidden`` (MGDA-UB's approximate weights) and
``sampling_dtype = bfloat16`` (rollouts from a bfloat16 copy of the merged policy).

What the trainer owns for the rest of the package: its step count (``steps_per_rollout`` and
``max_local_steps``, from the same ``minibatch_slices`` the loop runs; the reply schema, the update
bound and the progress display count with them) and the metrics ``summarize`` writes
(``ROUND_METRICS``, ``PER_STEP_METRICS``; firm.federation.protocol builds the reply schema from them).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from firm.config import FirmConfig
from firm.gradients import last_hidden_gram, logprob_hidden_gradients, objective_gradients, token_loss_weights
from firm.mgda import gram_geometry, solve_weights
from firm.models import BFloat16Sampler, MultiObjectiveValueHead, lora_parameters
from firm.ppo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMeanStd,
    clipped_surrogate_losses,
    clipped_value_loss,
    compute_rewards,
    gae,
    kl_penalty_loss,
    per_token_kl,
    whiten,
)
from firm.prompts import Prompt
from firm.rewards import RewardModel
from firm.sampling import generate, policy_forward, policy_outputs, predicting_positions

# The metrics summarize writes beside one "reward/<name>" per objective, as (key, kind): "scalar",
# "objectives" (a list of M) or "pairs" (a list of M(M-1)/2).
REWARD_PREFIX = "reward/"
ROUND_METRICS = (
    ("kl", "scalar"), ("response_tokens", "scalar"), ("lambda_mean", "objectives"), ("lambda_last", "objectives"),
    ("grad_cosine", "pairs"), ("policy_loss", "scalar"), ("value_loss", "scalar"), ("approx_kl", "scalar"),
    ("clipfrac", "scalar"), ("steps", "scalar"), ("skipped_steps", "scalar"), ("num-examples", "scalar"),
)
# Per local step (taken or skipped), flattened step-major: one entry of this kind per step.
PER_STEP_METRICS = (("step_lambda", "objectives"), ("step_gram_distance", "pairs"), ("step_cosine", "pairs"),
                    ("step_norm_ratio", "scalar"), ("step_taken", "scalar"))


@dataclass
class Rollout:
    """One PPO batch. Sequences are query (left-padded) followed by response (right-padded)."""

    input_ids: torch.Tensor  # [B, P + T]
    attention_mask: torch.Tensor  # [B, P + T]
    response_mask: torch.Tensor  # [B, T] float, 1 up to and including EOS
    logprobs: torch.Tensor  # [B, T] behaviour policy
    ref_logprobs: torch.Tensor  # [B, T] reference policy (adapter disabled)
    values: torch.Tensor  # [B, T, M]
    scores: torch.Tensor  # [B, M] raw reward-model scores
    prompts: list[Prompt]
    responses: list[str]

    @property
    def response_length(self) -> int:
        return self.response_mask.shape[1]


@dataclass
class RoundStats:
    """What one client reports for one round."""

    scores: list[torch.Tensor] = field(default_factory=list)  # raw [B, M] per rollout
    kl_per_sequence: list[torch.Tensor] = field(default_factory=list)
    response_tokens: list[torch.Tensor] = field(default_factory=list)
    lambdas: list[np.ndarray] = field(default_factory=list)
    cosines: list[np.ndarray] = field(default_factory=list)
    policy_losses: list[float] = field(default_factory=list)
    value_losses: list[float] = field(default_factory=list)
    approx_kls: list[float] = field(default_factory=list)
    clipfracs: list[float] = field(default_factory=list)
    step_records: list["StepRecord"] = field(default_factory=list)  # one per local step, skipped ones too
    skipped_steps: int = 0
    steps: int = 0
    num_examples: int = 0
    samples: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class StepRecord:
    """The geometry of one local step: what claims 2 and 3 (smoothness, drift) are about."""

    weights: np.ndarray  # lambda [M] (zeros for a skipped step)
    gram_distance: np.ndarray  # |g_i - g_j|^2 / tr G per objective pair (i < j)
    cosine: np.ndarray  # cos(g_i, g_j) per objective pair
    norm_ratio: float  # smallest / largest gradient norm, in [0, 1]
    taken: bool
    gram: np.ndarray | None = None  # G = [g_i . g_j] the weights were solved on (None when skipped)


def minibatch_slices(n: int, num_minibatches: int) -> list[slice]:
    """The minibatches of one PPO epoch over n rollouts: n // num_minibatches each (at least 1);
    a remainder that does not fill one is left out of this epoch."""
    size = max(1, n // num_minibatches)
    return [slice(start, start + size) for start in range(0, n - size + 1, size)]


def steps_per_rollout(config: FirmConfig, batch: int) -> int:
    """The optimiser steps ppo_epochs takes on one rollout batch of ``batch`` prompts."""
    return config.ppo_epochs * len(minibatch_slices(batch, config.num_minibatches))


def max_local_steps(config: FirmConfig) -> int:
    """The most optimiser steps one local pass can take in a round: rollouts_per_round batches of
    n <= rollout_batch_size prompts (a shard may be smaller)."""
    most_per_rollout = max(steps_per_rollout(config, n) for n in range(1, config.rollout_batch_size + 1))
    return config.rollouts_per_round * most_per_rollout


def score_responses(rewards: Sequence[RewardModel], prompts: Sequence[Prompt], responses: list[str],
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, M] raw scores on ``device``, one column per reward model."""
    return torch.stack([r.score(list(prompts), responses).float().to(device) for r in rewards], dim=-1)


class FirmLocalTrainer:
    """Holds one client's model, critic, reward models and optimiser state for a round."""

    def __init__(
        self,
        policy,
        tokenizer,
        value_head: MultiObjectiveValueHead,
        rewards: Sequence[RewardModel],
        config: FirmConfig,
        reward_stats: RunningMeanStd | None = None,
        kl_controller: AdaptiveKLController | FixedKLController | None = None,
        sampler: BFloat16Sampler | None = None,
        merge_lora_for_sampling: bool = True,
        batched_objective_gradients: bool = False,
    ):
        self.policy = policy
        self.tokenizer = tokenizer
        self.value_head = value_head.to(policy.device)  # the critic reads the policy's hidden states
        self.rewards = list(rewards)
        self.config = config
        self.num_objectives = len(self.rewards)
        self.preference = np.asarray(config.preference_vector(), dtype=np.float64)
        self.lora_params = list(lora_parameters(policy).values())
        if not self.lora_params:
            raise ValueError("the policy has no trainable LoRA parameters")
        self.reward_stats = reward_stats or RunningMeanStd(self.num_objectives)
        if kl_controller is None:
            kl_controller = (
                AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
                if config.adaptive_kl
                else FixedKLController(config.kl_coef)
            )
        self.kl_controller = kl_controller
        self.optimizer = self.make_optimizer()
        # Speed paths, exact either way (scripts/bench_step.py --variants measures each).
        self.merge_lora_for_sampling = merge_lora_for_sampling
        self.batched_objective_gradients = batched_objective_gradients
        # sampling_dtype = bfloat16 (opt-in): rollouts from a bfloat16 copy of the merged policy;
        # pass ``sampler`` to reuse one copy across rounds (building it costs a model copy).
        self.sampler = (sampler or BFloat16Sampler(policy)) if config.sampling_dtype == "bfloat16" else None
        if config.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Told "rollout" after each rollout and "update" after each local step (firm.progress).
        self.progress: Callable[[str], None] = lambda phase: None

    def make_optimizer(self) -> torch.optim.Optimizer:
        groups = [{"params": self.lora_params}, {"params": list(self.value_head.parameters())}]
        if self.config.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.config.learning_rate)
        return torch.optim.AdamW(groups, lr=self.config.learning_rate)  # adamw / adamw-reset

    @property
    def keeps_optimizer_state(self) -> bool:
        """optimizer = adamw: the client keeps AdamW's moments across rounds (firm.federation.client_state)."""
        return self.config.optimizer == "adamw"

    # ---- 1. rollout ----------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: Sequence[Prompt]) -> Rollout:
        cfg = self.config
        # One sampling pass yields the tokens, the behaviour log-probs and the critic's inputs.
        gen = generate(self.policy, self.tokenizer, prompts, cfg, merge_lora=self.merge_lora_for_sampling,
                       sampler=self.sampler)
        values = self.value_head(gen.hidden) * gen.response_mask.unsqueeze(-1)
        T = gen.response_mask.shape[1]
        with self.policy.disable_adapter():
            ref_logprobs, _ = policy_forward(self.policy, gen.input_ids, gen.attention_mask, T, cfg.temperature)
        scores = score_responses(self.rewards, prompts, gen.responses, gen.input_ids.device)
        return Rollout(gen.input_ids, gen.attention_mask, gen.response_mask, gen.logprobs, ref_logprobs, values,
                       scores, list(prompts), gen.responses)

    # ---- 2. rewards and advantages -------------------------------------------------------
    def advantages(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        scores = rollout.scores
        if not torch.isfinite(scores).all():
            raise FloatingPointError(f"a reward model returned non-finite scores: {scores.tolist()}")
        if cfg.normalize_rewards:
            self.reward_stats.update(scores)
            scores = self.reward_stats.normalize(scores)
        kl = per_token_kl(rollout.logprobs, rollout.ref_logprobs)
        # KL inside every objective's reward, or (kl_in_objectives = false) as a loss of its own
        # in firm_step, outside the combination the weights are solved for.
        kl_coef_in_rewards = self.kl_controller.value if cfg.kl_in_objectives else 0.0
        rewards = compute_rewards(scores, kl, rollout.response_mask, kl_coef_in_rewards)
        advantages, returns = gae(rewards, rollout.values, rollout.response_mask, cfg.gamma, cfg.gae_lambda)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, rollout.response_mask)
        return advantages, returns, kl

    # ---- 3. the FIRM step -----------------------------------------------------------------
    def objective_weights(self, gram: np.ndarray) -> np.ndarray:
        if self.config.algorithm_spec().fixed_weights:
            return self.preference.copy()
        return solve_weights(gram, beta=self.config.effective_beta(), preference=self.preference)

    def firm_step(self, rollout: Rollout, idx: torch.Tensor, advantages, returns, stats: RoundStats) -> None:
        cfg = self.config
        mask = rollout.response_mask[idx]
        self.policy.train()
        logprobs, hidden, representation = policy_outputs(self.policy, rollout.input_ids[idx],
                                                           rollout.attention_mask[idx], rollout.response_length,
                                                           cfg.temperature)
        losses, pg_stats = clipped_surrogate_losses(logprobs, rollout.logprobs[idx], advantages[idx], mask,
                                                    cfg.clip_range)
        # With the KL outside the objectives (kl_in_objectives = false) its loss is added to the
        # step after the weights are solved; it never enters the Gram matrix.
        kl_loss = (None if cfg.kl_in_objectives
                   else self.kl_controller.value * kl_penalty_loss(logprobs, rollout.ref_logprobs[idx], mask))
        values = self.value_head(hidden)
        value_loss, _ = clipped_value_loss(values, rollout.values[idx], returns[idx], mask, cfg.clip_range_value)

        policy_gradient = self.exact_policy_gradient if cfg.gram == "exact" else self.last_hidden_policy_gradient
        solved = policy_gradient(losses, kl_loss, logprobs, representation) if torch.isfinite(value_loss) else None
        if solved is None:
            stats.skipped_steps += 1  # never apply a non-finite or empty direction
            stats.step_records.append(self.skipped_record())
            self.optimizer.zero_grad(set_to_none=True)
            return
        gram, weights = solved
        (cfg.value_coef * value_loss).backward()  # the critic's gradient (head only)
        # Clip policy and critic separately: a large critic gradient must not shrink the
        # MGDA direction.
        torch.nn.utils.clip_grad_norm_(self.lora_params, cfg.max_grad_norm)
        torch.nn.utils.clip_grad_norm_(list(self.value_head.parameters()), cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        stats.steps += 1
        stats.lambdas.append(weights)
        distance, cosine, norm_ratio = gram_geometry(gram)
        stats.cosines.append(cosine)
        stats.step_records.append(StepRecord(np.asarray(weights, dtype=np.float64), distance, cosine, norm_ratio, True,
                                             gram))
        stats.policy_losses.append(float(torch.dot(torch.from_numpy(weights).to(losses), losses.detach())))
        stats.value_losses.append(float(value_loss.detach()))
        stats.approx_kls.append(float(pg_stats["approx_kl"]))
        stats.clipfracs.append(float(pg_stats["clipfrac"].mean()))

    def set_policy_gradient(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self.lora_params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    def exact_policy_gradient(self, losses: torch.Tensor, kl_loss: torch.Tensor | None, logprobs: torch.Tensor,
                              representation: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """gram = exact: the M per-objective LoRA gradients from the one graph (one forward, M
        backward passes; the KL loss, when outside the objectives, is one more row whose gradient
        is added after the weights are solved). Sets the LoRA grads to sum_m lambda_m g_m and
        returns (G, lambda); None when a gradient is non-finite or all of them are zero. (It takes
        the step's log-probs and hidden states as the last-hidden path does, unused here.)"""
        rows = losses if kl_loss is None else torch.cat([losses, kl_loss.reshape(1)])
        gradients = objective_gradients(rows, self.lora_params, batched=self.batched_objective_gradients)
        flat = gradients[: self.num_objectives]  # [M, D]
        kl_grad = None if kl_loss is None else gradients[self.num_objectives]
        if not torch.isfinite(flat).all() or not flat.abs().sum() > 0 \
                or (kl_grad is not None and not torch.isfinite(kl_grad).all()):
            return None
        gram = (flat @ flat.T).cpu().numpy()
        weights = self.objective_weights(gram)
        direction = torch.from_numpy(weights).to(flat) @ flat  # sum_m lambda_m g_m
        if kl_grad is not None:
            direction = direction + kl_grad
        self.set_policy_gradient(direction)
        return gram, weights

    def last_hidden_policy_gradient(self, losses: torch.Tensor, kl_loss: torch.Tensor | None,
                                    logprobs: torch.Tensor, representation: torch.Tensor
                                    ) -> tuple[np.ndarray, np.ndarray] | None:
        """gram = last-hidden (MGDA-UB): the weights from the Gram of the gradients at the last
        hidden states, built from one backward through the LM head (last_hidden_gram), then ONE
        backward from the hidden states down with the cotangent of sum_m lambda_m L_m (+ the KL
        loss): about the cost of the fixed-weight step. The step is exactly sum_m lambda_m g_m
        for the lambda it used; only lambda is approximate. Returns (that Gram, lambda) or None
        when the Gram or the step is non-finite or every gradient is zero."""
        M = self.num_objectives
        rows = losses if kl_loss is None else torch.cat([losses, kl_loss.reshape(1)])
        token_weights = token_loss_weights(rows, logprobs)  # [M (+1), B, T]
        hidden_gradients = logprob_hidden_gradients(logprobs, representation)  # [B, T, H]
        gram = last_hidden_gram(token_weights[:M], hidden_gradients)
        if not np.isfinite(gram).all() or not np.trace(gram) > 0:
            return None
        weights = self.objective_weights(gram)
        per_token = torch.einsum("m,mbt->bt", torch.from_numpy(weights).to(token_weights), token_weights[:M])
        if kl_loss is not None:
            per_token = per_token + token_weights[M]
        cotangent = torch.zeros_like(representation)
        cotangent[:, predicting_positions(logprobs.shape[1])] = (per_token.unsqueeze(-1) * hidden_gradients
                                                                 ).to(representation.dtype)
        torch.autograd.backward(representation, grad_tensors=cotangent)  # accumulates into the LoRA grads
        if not all(p.grad is None or torch.isfinite(p.grad).all() for p in self.lora_params):
            return None  # firm_step zeroes the grads
        return gram, weights

    def skipped_record(self) -> StepRecord:
        pairs = self.num_objectives * (self.num_objectives - 1) // 2
        return StepRecord(np.zeros(self.num_objectives), np.zeros(pairs), np.zeros(pairs), 0.0, False)

    # ---- one round --------------------------------------------------------------------------
    def collect(self, shard: Sequence[Prompt], rng: random.Random, stats: RoundStats):
        """Sample a batch from the shard, roll it out, score it and compute advantages."""
        batch = rng.sample(list(shard), k=min(self.config.rollout_batch_size, len(shard)))
        rollout = self.rollout(batch)
        advantages, returns, kl = self.advantages(rollout)
        seq_kl = (kl * rollout.response_mask).sum(-1)
        stats.scores.append(rollout.scores.cpu())
        stats.kl_per_sequence.append(seq_kl.cpu())
        stats.response_tokens.append(rollout.response_mask.sum(-1).cpu())
        stats.num_examples += len(batch)
        stats.samples.extend(zip([p.text for p in batch], rollout.responses))
        self.kl_controller.update(float(seq_kl.mean()), len(batch))
        self.progress("rollout")
        return rollout, advantages, returns

    def ppo_epochs(self, rollout: Rollout, advantages, returns, stats: RoundStats, seed: int) -> None:
        n = rollout.input_ids.shape[0]
        generator = torch.Generator().manual_seed(seed)
        for _epoch in range(self.config.ppo_epochs):
            order = torch.randperm(n, generator=generator).to(rollout.input_ids.device)
            for minibatch in minibatch_slices(n, self.config.num_minibatches):
                self.firm_step(rollout, order[minibatch], advantages, returns, stats)
                self.progress("update")

    def train_round(self, shard: Sequence[Prompt], rng: random.Random) -> RoundStats:
        """FIRM (and the mgda / linear ablations): rollout, PPO epochs, repeat."""
        stats = RoundStats()
        for _ in range(self.config.rollouts_per_round):
            rollout, advantages, returns = self.collect(shard, rng, stats)
            self.ppo_epochs(rollout, advantages, returns, stats, rng.randrange(2**31))
        return stats


def summarize(stats: RoundStats, reward_names: Sequence[str]) -> dict[str, float | list[float]]:
    """Flatten a round's stats into flat metrics: one ``reward/<name>`` per objective, then
    ROUND_METRICS and PER_STEP_METRICS.

    Every key is present whatever happened (a federation needs identical keys across replies), and
    no value is NaN: in a round where every step was skipped, lambda is reported as the uniform
    vector, the losses as 0, and steps = 0 with skipped_steps > 0 says so.
    """
    M = len(reward_names)
    scores = torch.cat(stats.scores).double()
    metrics: dict[str, float | list[float]] = {}
    for m, name in enumerate(reward_names):
        metrics[f"{REWARD_PREFIX}{name}"] = float(scores[:, m].mean())
    metrics["kl"] = float(torch.cat(stats.kl_per_sequence).mean())
    metrics["response_tokens"] = float(torch.cat(stats.response_tokens).mean())
    if stats.lambdas:
        lam = np.stack(stats.lambdas)
        metrics["lambda_mean"] = lam.mean(0).tolist()
        metrics["lambda_last"] = lam[-1].tolist()
        metrics["grad_cosine"] = np.stack(stats.cosines).mean(0).tolist()
        metrics["policy_loss"] = float(np.mean(stats.policy_losses))
        metrics["value_loss"] = float(np.mean(stats.value_losses))
        metrics["approx_kl"] = float(np.mean(stats.approx_kls))
        metrics["clipfrac"] = float(np.mean(stats.clipfracs))
    else:
        uniform = [1.0 / M] * M
        metrics["lambda_mean"] = uniform
        metrics["lambda_last"] = uniform
        metrics["grad_cosine"] = [0.0] * (M * (M - 1) // 2)
        metrics["policy_loss"] = metrics["value_loss"] = metrics["approx_kl"] = metrics["clipfrac"] = 0.0
    # Per local step, flattened (step-major), so smoothness and drift can be measured per step.
    records = stats.step_records
    metrics["step_lambda"] = [float(x) for r in records for x in r.weights]
    metrics["step_gram_distance"] = [float(x) for r in records for x in r.gram_distance]
    metrics["step_cosine"] = [float(x) for r in records for x in r.cosine]
    metrics["step_norm_ratio"] = [r.norm_ratio for r in records]
    metrics["step_taken"] = [float(r.taken) for r in records]
    metrics["steps"] = stats.steps
    metrics["skipped_steps"] = stats.skipped_steps
    metrics["num-examples"] = stats.num_examples
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"client metric {key} is not finite: {value}")
    return metrics


