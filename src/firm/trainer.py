"""The local FIRM update: one client, one round (read top to bottom).

1. Rollout: sample prompts from the client's shard, render them with the chat template,
   sample responses with a KV cache, and keep, from that same sampling pass, the per-token
   log-probs of the current (behaviour) policy and the hidden states the critic reads; then
   one forward of the reference (the same model with the LoRA adapter disabled).
2. Rewards: score every response with each of the M reward models, normalise each objective's
   scores with a running mean/std, add a per-token KL penalty, and run GAE per objective.
3. PPO epochs over minibatches. Each minibatch does ONE forward pass, builds the M clipped
   surrogate losses (one shared probability ratio, objective-specific advantages), takes the
   per-objective LoRA gradients g_m from that one graph, forms the Gram matrix
   G_ij = g_i . g_j, solves lambda = argmin_simplex l^T (G/trG) l + beta ||l - p||^2 and steps
   along sum_m lambda_m g_m (plus the critic's own gradient). Non-finite or all-zero gradients
   skip the step and are counted.

Tricks, named: left padding with explicit position ids; log-probs from the tempered
distribution that was sampled; reward whitening per objective (running stats); advantage
whitening per objective; clipped value loss on a detached-feature critic; gradient-norm
clipping of the combined direction; KL penalty at every token, score at the last token.

Speed tricks, all exact (tests/test_fast_paths.py compares each with the slow path; numbers in
docs/performance.md): no separate old-log-prob forward, the behaviour log-probs and the critic's
hidden states come out of the sampling pass (equal to a full forward to float rounding); the
LoRA adapter is merged into the base weights while sampling and the base is restored bit for
bit after (models.merged_lora); the sampling loop is transformers' generate() token for token
when given generate()'s multinomial draw, and by default draws each token by inverse CDF (one
uniform number per row instead of one per vocabulary entry; the same distribution, tested). Optional: the M per-objective gradients from one vmapped backward
(``batched_objective_gradients``) instead of M backward passes.

Approximate, opt-in (``gram = last-hidden``): MGDA-UB's weights from the gradients at the last
hidden states and one backward of the weighted loss; lambda's agreement with the exact one is
measured in docs/performance.md. Also opt-in (``sampling_dtype = bfloat16``): rollouts sampled
from a bfloat16 copy of the merged policy (models.BFloat16Sampler), whose log-probs are then the
behaviour log-probs; what that changes is measured in studies/bf16_sampling.py.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from firm.config import FirmConfig
from firm.mgda import cosine_similarity_matrix, solve_weights
from firm.models import BFloat16Sampler, MultiObjectiveValueHead, lora_parameters, merged_lora
from firm.ppo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMeanStd,
    clipped_surrogate_losses,
    clipped_value_loss,
    compute_rewards,
    gae,
    kl_penalty_loss,
    masked_mean,
    per_token_kl,
    whiten,
)
from firm.prompts import Prompt
from firm.rewards import RewardModel


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


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generate() uses them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 for every token up to and including the first EOS, 0 after it."""
    is_eos = response_ids == eos_token_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).float()


def predicting_positions(response_length: int) -> slice:
    """The positions whose hidden states predict the last ``response_length`` tokens."""
    return slice(-response_length - 1, -1)


def policy_outputs(model, input_ids, attention_mask, response_length: int, temperature: float):
    """Per-token log-probs of the response tokens, the hidden states that predicted them, and the
    whole last hidden-state tensor [B, L, H] the log-probs were computed from (the representation
    every LoRA gradient flows through; gram = last-hidden differentiates with respect to it)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=True,
        use_cache=False,
        logits_to_keep=response_length + 1,
    )
    logits = out.logits[:, :-1, :] / temperature
    targets = input_ids[:, -response_length:]
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    representation = out.hidden_states[-1]
    return logprobs, representation[:, predicting_positions(response_length)], representation


def policy_forward(model, input_ids, attention_mask, response_length: int, temperature: float):
    """Per-token log-probs of the response tokens and the hidden states that predicted them."""
    logprobs, hidden, _ = policy_outputs(model, input_ids, attention_mask, response_length, temperature)
    return logprobs, hidden


@dataclass
class Generation:
    input_ids: torch.Tensor  # [B, P + T] query (left-padded) + response
    attention_mask: torch.Tensor  # [B, P + T]
    response_mask: torch.Tensor  # [B, T]
    responses: list[str]
    logprobs: torch.Tensor  # [B, T] log-prob of each sampled token (tempered), 0 after EOS
    hidden: torch.Tensor  # [B, T, H] last hidden state that predicted each sampled token


def draw_tokens(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` ([B, V], unnormalised, >= 0) by inverse CDF: one uniform
    number per row, located in the row's running sum (float64). The same distribution as
    torch.multinomial(probs, 1), which draws one exponential number per vocabulary entry: with
    SmolLM2's 49,152 tokens that was 10% of generation on a 2-core CPU (docs/performance.md).
    Zero-probability tokens are never drawn."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def multinomial_tokens(probs: torch.Tensor) -> torch.Tensor:
    """transformers' generate() draw: the same tokens as generate() for the same seed."""
    return torch.multinomial(probs, num_samples=1).squeeze(1)


@torch.no_grad()
def sample(model, input_ids, attention_mask, max_new_tokens: int, temperature: float, top_p: float,
           eos_token_id: int, pad_token_id: int, draw=draw_tokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ancestral sampling with a KV cache: [B, T] tokens, the log-prob of each under the tempered
    distribution softmax(logits / temperature) it was drawn from, and the [B, T, H] last hidden
    states that predicted them. After a row's EOS it gets pad tokens; the loop stops when every
    row has finished. Positions skip left padding, as in policy_forward. ``draw`` picks a token
    per row from the probabilities (multinomial_tokens reproduces generate() token for token)."""
    batch = input_ids.shape[0]
    step_ids, mask, positions = input_ids, attention_mask, position_ids_from_mask(attention_mask)
    cache: dict = {}
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    tokens, logprobs, hidden = [], [], []
    for _ in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    output_hidden_states=True, logits_to_keep=1, **cache)
        # transformers >= 5 names the cache `cache`, 4.x `past_key_values`
        cache = {"cache": out.cache} if getattr(out, "cache", None) is not None else {
            "past_key_values": out.past_key_values}
        scores = out.logits[:, -1].float() / temperature
        probs = torch.softmax(scores, dim=-1)  # as transformers' sampling computes it
        next_tokens = draw(_top_p_filter(probs, top_p) if top_p < 1.0 else probs)
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
        tokens.append(next_tokens)
        # log of the drawn token's probability, one full-vocabulary pass fewer than a log_softmax
        # (a drawn token's probability is never 0; the pad after EOS may be, so it gets 0)
        drawn = probs.gather(-1, next_tokens[:, None]).squeeze(-1)
        logprobs.append(torch.where(unfinished, torch.log(drawn), torch.zeros_like(drawn)))
        hidden.append(out.hidden_states[-1][:, -1])
        unfinished &= next_tokens != eos_token_id
        if not unfinished.any():
            break
        step_ids = next_tokens[:, None]
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        positions = positions[:, -1:] + 1
    return torch.stack(tokens, 1), torch.stack(logprobs, 1), torch.stack(hidden, 1)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    return probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))


@torch.no_grad()
def generate(policy, tokenizer, prompts: Sequence[Prompt], cfg: FirmConfig, merge_lora: bool = True,
             sampler: BFloat16Sampler | None = None) -> Generation:
    """Render prompts with the chat template and sample responses (KV cache on). The behaviour
    log-probs and the critic's hidden states come out of the same pass (no second forward), and
    with ``merge_lora`` the adapter is folded into the base while sampling (models.merged_lora).
    With a ``sampler`` (sampling_dtype = bfloat16) the tokens, behaviour log-probs and hidden
    states come from its bfloat16 copy of the merged policy instead."""
    texts = [tokenizer.apply_chat_template(p.chat_messages(), tokenize=False, add_generation_prompt=True)
             for p in prompts]
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=cfg.max_prompt_tokens,
                    add_special_tokens=False)
    policy.eval()
    enc = enc.to(policy.device)
    if sampler is not None:
        response_ids, logprobs, hidden = sample(sampler.refresh(), enc.input_ids, enc.attention_mask,
                                                cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                                tokenizer.eos_token_id, tokenizer.pad_token_id)
    else:
        with merged_lora(policy) if merge_lora else contextlib.nullcontext():
            response_ids, logprobs, hidden = sample(policy, enc.input_ids, enc.attention_mask, cfg.max_new_tokens,
                                                    cfg.temperature, cfg.top_p, tokenizer.eos_token_id,
                                                    tokenizer.pad_token_id)
    response_mask = response_mask_from_ids(response_ids, tokenizer.eos_token_id)
    attention_mask = torch.cat([enc.attention_mask, response_mask.long()], dim=1)
    lengths = response_mask.sum(-1).long()
    responses = [tokenizer.decode(ids[:n], skip_special_tokens=True).strip() for ids, n in zip(response_ids, lengths)]
    return Generation(torch.cat([enc.input_ids, response_ids], dim=1), attention_mask, response_mask, responses,
                      logprobs * response_mask, hidden)


def objective_gradients(losses: torch.Tensor, params: Sequence[torch.Tensor], batched: bool = False) -> torch.Tensor:
    """[M, D] float64: row m is the gradient of losses[m] with respect to ``params``, flattened.

    Default: M backward passes through the one graph (retained between them). ``batched``: one
    vmapped backward with the M unit vectors as grad_outputs (autograd's is_grads_batched);
    the same numbers, faster or slower depending on the hardware (scripts/bench_step.py).
    """
    M = losses.shape[0]
    if batched:
        eye = torch.eye(M, dtype=losses.dtype, device=losses.device)
        grads = torch.autograd.grad(losses, list(params), grad_outputs=eye, is_grads_batched=True, allow_unused=True)
        return torch.cat([(g if g is not None else p.new_zeros((M, *p.shape))).reshape(M, -1)
                          for g, p in zip(grads, params)], dim=1).double()
    rows = []
    for m in range(M):
        grads = torch.autograd.grad(losses[m], list(params), retain_graph=m < M - 1, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows).double()


def token_loss_weights(rows: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """[R, B, T]: d rows[r] / d logprobs[b, t], each loss row's weight on each response token's
    log-prob. A backward through the loss arithmetic only; the model's graph is kept."""
    return torch.stack([torch.autograd.grad(row, logprobs, retain_graph=True)[0] for row in rows])


def logprob_hidden_gradients(logprobs: torch.Tensor, representation: torch.Tensor) -> torch.Tensor:
    """[B, T, H]: the gradient of each response token's log-prob at the last hidden state that
    predicted it (``representation`` is policy_outputs' [B, L, H] tensor). A log-prob reads only
    its own position's hidden state, so the gradient of their sum separates by position: ONE
    backward through the LM head gives all of them. The model's graph is kept."""
    (grad,) = torch.autograd.grad(logprobs, representation, grad_outputs=torch.ones_like(logprobs),
                                  retain_graph=True)
    return grad[:, predicting_positions(logprobs.shape[1])]


def last_hidden_gram(token_weights: torch.Tensor, hidden_gradients: torch.Tensor) -> np.ndarray:
    """[M, M] float64 MGDA-UB Gram (Sener & Koltun, 2018) of the M losses' gradients at the last
    hidden states. Loss m's gradient there is token_weights[m, b, t] * hidden_gradients[b, t] at
    each response position (the chain rule through that position's log-prob), so
    G_ij = sum_{b,t} w_i w_j |v_bt|^2: no per-objective backward at all."""
    weights = token_weights.double().reshape(token_weights.shape[0], -1)
    squared_norms = hidden_gradients.double().pow(2).sum(-1).reshape(1, -1)
    return ((weights * squared_norms) @ weights.T).cpu().numpy()


def score_responses(rewards: Sequence[RewardModel], prompts: Sequence[Prompt], responses: list[str],
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, M] raw scores on ``device``, one column per reward model."""
    return torch.stack([r.score(list(prompts), responses).float().to(device) for r in rewards], dim=-1)


def ignore_progress(phase: str) -> None:
    """The trainer's progress callback when nobody watches."""


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
        # Speed switches, exact either way (scripts/bench_step.py --variants measures each).
        self.merge_lora_for_sampling = True
        self.batched_objective_gradients = False
        # sampling_dtype = bfloat16 (opt-in): rollouts from a bfloat16 copy of the merged policy;
        # pass ``sampler`` to reuse one copy across rounds (building it costs a model copy).
        self.sampler = (sampler or BFloat16Sampler(policy)) if config.sampling_dtype == "bfloat16" else None
        if config.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Told "rollout" after each rollout and "update" after each local step (firm.progress).
        self.progress: Callable[[str], None] = ignore_progress

    def make_optimizer(self) -> torch.optim.Optimizer:
        groups = [{"params": self.lora_params}, {"params": list(self.value_head.parameters())}]
        if self.config.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.config.learning_rate)
        return torch.optim.AdamW(groups, lr=self.config.learning_rate)  # adamw / adamw-reset

    @property
    def keeps_optimizer_state(self) -> bool:
        """optimizer = adamw: the client keeps AdamW's moments across rounds (saved with its state)."""
        return self.config.optimizer == "adamw"

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """AdamW's per-parameter state as flat named tensors ("optimizer.<index>.<name>")."""
        return {f"optimizer.{index}.{name}": value.detach().cpu().contiguous()
                for index, state in self.optimizer.state_dict()["state"].items() for name, value in state.items()}

    def load_optimizer_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
        saved = self.optimizer.state_dict()
        saved["state"] = state
        self.optimizer.load_state_dict(saved)  # moves each moment to its parameter's device

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

        solved = None
        if torch.isfinite(value_loss):
            if cfg.gram == "exact":
                solved = self.exact_policy_gradient(losses, kl_loss)
            else:
                solved = self.last_hidden_policy_gradient(losses, kl_loss, logprobs, representation)
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

    def exact_policy_gradient(self, losses: torch.Tensor, kl_loss: torch.Tensor | None
                              ) -> tuple[np.ndarray, np.ndarray] | None:
        """gram = exact: the M per-objective LoRA gradients from the one graph (one forward, M
        backward passes; the KL loss, when outside the objectives, is one more row whose gradient
        is added after the weights are solved). Sets the LoRA grads to sum_m lambda_m g_m and
        returns (G, lambda); None when a gradient is non-finite or all of them are zero."""
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
        minibatch = max(1, n // self.config.num_minibatches)
        generator = torch.Generator().manual_seed(seed)
        for _epoch in range(self.config.ppo_epochs):
            order = torch.randperm(n, generator=generator).to(rollout.input_ids.device)
            for start in range(0, n - minibatch + 1, minibatch):
                self.firm_step(rollout, order[start : start + minibatch], advantages, returns, stats)
                self.progress("update")

    def train_round(self, shard: Sequence[Prompt], rng: random.Random) -> RoundStats:
        """FIRM (and the mgda / linear ablations): rollout, PPO epochs, repeat."""
        stats = RoundStats()
        for _ in range(self.config.rollouts_per_round):
            rollout, advantages, returns = self.collect(shard, rng, stats)
            self.ppo_epochs(rollout, advantages, returns, stats, rng.randrange(2**31))
        return stats


def summarize(stats: RoundStats, reward_names: Sequence[str]) -> dict[str, float | list[float]]:
    """Flatten a round's stats into the per-client metrics that go into Flower's MetricRecord.

    Every key is present whatever happened (Flower requires identical keys across replies), and
    no value is NaN: in a round where every step was skipped, lambda is reported as the uniform
    vector, the losses as 0, and steps = 0 with skipped_steps > 0 says so.
    """
    M = len(reward_names)
    scores = torch.cat(stats.scores).double()
    metrics: dict[str, float | list[float]] = {}
    for m, name in enumerate(reward_names):
        metrics[f"reward/{name}"] = float(scores[:, m].mean())
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


