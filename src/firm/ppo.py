"""PPO math for multi-objective RLHF, as small pure torch functions.

Shapes used throughout: B sequences in a batch, T response tokens, M objectives (reward
models). ``mask`` is [B, T] (bool or float): 1 on real response tokens, 0 on the padding
after EOS, so every row is a run of ones followed by zeros.

FIRM keeps ONE policy (one probability ratio per token) but M reward streams: every
objective gets its own rewards, values, advantages and clipped surrogate loss, and the
trainer differentiates each loss separately to get the per-objective gradients it feeds
to the MGDA solver (``firm.mgda``). Conventions follow lm-human-preferences (Ziegler et al.
2019) and TRL's PPO trainer: the KL penalty is a per-token reward, the sequence score is added
at the last response token, and GAE bootstraps with 0 after EOS.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from firm.numbers import finite_number

WHITEN_EPS = 1e-8
"""Added to the variance before the square root in ``whiten``, so a constant objective
(variance 0) maps to 0 instead of NaN."""

RUNNING_STD_EPS = 1e-8
"""Added to the running variance in ``RunningMeanStd.normalize`` for the same reason."""


# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------
def _broadcast_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return mask as x's dtype, with trailing singleton dims so it broadcasts over x.

    A [B, T] mask applies to a [B, T, M] tensor: every objective shares the token mask.
    """
    if mask.shape != x.shape[: mask.dim()]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must be a prefix of x shape {tuple(x.shape)}"
        )
    mask = mask.to(dtype=x.dtype, device=x.device)
    return mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim()))


def masked_mean(
    x: torch.Tensor,
    mask: torch.Tensor,
    dim: int | tuple[int, ...] | None = None,
    keepdim: bool = False,
) -> torch.Tensor:
    """Mean of x over the entries where mask is 1 (over ``dim``, or everything when None).

    Raises ValueError when a mean would be taken over no entries at all.
    """
    full_mask = _broadcast_mask(x, mask).expand_as(x)
    dims = tuple(range(x.dim())) if dim is None else dim
    count = full_mask.sum(dim=dims, keepdim=keepdim)
    if bool((count == 0).any()):
        raise ValueError("masked_mean over an empty mask (no entry has mask 1)")
    return (x * full_mask).sum(dim=dims, keepdim=keepdim) / count


def masked_var(
    x: torch.Tensor,
    mask: torch.Tensor,
    unbiased: bool = True,
    dim: int | tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Variance of x over the masked entries (over ``dim``, or everything when None).

    ``unbiased`` applies Bessel's correction n / (n - 1), which needs at least 2 entries.
    """
    mean = masked_mean(x, mask, dim=dim, keepdim=True)
    variance = masked_mean((x - mean) ** 2, mask, dim=dim)
    if unbiased:
        dims = tuple(range(x.dim())) if dim is None else dim
        count = _broadcast_mask(x, mask).expand_as(x).sum(dim=dims)
        if bool((count < 2).any()):
            raise ValueError("unbiased masked_var needs at least 2 masked entries")
        variance = variance * count / (count - 1)
    return variance


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise each objective to mean 0 / variance 1 over its masked entries.

    x is [B, T, M] (statistics per objective m over the masked B x T entries of x[..., m]) or
    [B, T] (one objective). Uses the unbiased variance and adds ``WHITEN_EPS`` (1e-8) before
    the square root. With ``shift_mean=False`` the mean is added back (only the scale changes),
    as TRL does for rewards. Padding positions are set to 0 in the output.
    """
    if x.dim() not in (2, 3):
        raise ValueError(f"whiten expects x of shape [B, T] or [B, T, M], got {tuple(x.shape)}")
    if mask.dim() != 2:
        raise ValueError(f"whiten expects mask of shape [B, T], got {tuple(mask.shape)}")
    mean = masked_mean(x, mask, dim=(0, 1))  # [M] or scalar
    variance = masked_var(x, mask, unbiased=True, dim=(0, 1))
    whitened = (x - mean) * torch.rsqrt(variance + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * _broadcast_mask(x, mask)


# --------------------------------------------------------------------------------------------
# Rewards and advantages
# --------------------------------------------------------------------------------------------
def _check_response_mask(mask: torch.Tensor) -> None:
    """A response mask must be 0/1 and, in every row, ones followed by zeros (padding after EOS)."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    as_float = mask.to(torch.float64)
    if not bool(((as_float == 0) | (as_float == 1)).all()):
        raise ValueError("mask must contain only 0 and 1")
    if mask.shape[1] > 1 and bool((as_float[:, 1:] > as_float[:, :-1]).any()):
        raise ValueError(
            "mask must be ones followed by zeros in every row (response then padding), "
            "got a 0 before a 1"
        )


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 KL estimator per token: ``log pi(a_t) - log pi_ref(a_t)``, [B, T].

    Unbiased for KL(pi || pi_ref) under samples from pi; single tokens can be negative.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} "
            "differ in shape"
        )
    return logprobs - ref_logprobs


def compute_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards [B, T, M]: ``-kl_coef * kl`` on every response token (the same for every
    objective) plus ``scores[:, m]`` on the last response token of each sequence.

    Raises ValueError for a sequence with an all-zero mask: an empty response has no last token
    to carry its score, and silently dropping the score would bias the update.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, M], got shape {tuple(scores.shape)}")
    if kl.shape != mask.shape:
        raise ValueError(f"kl {tuple(kl.shape)} and mask {tuple(mask.shape)} differ in shape")
    if scores.shape[0] != kl.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} rows but kl has {kl.shape[0]}")
    _check_response_mask(mask)
    batch, length = kl.shape
    num_objectives = scores.shape[1]
    mask_f = mask.to(kl.dtype)
    lengths = mask_f.sum(dim=1).long()
    empty = torch.nonzero(lengths == 0).flatten().tolist()
    if empty:
        raise ValueError(
            f"sequences {empty} have an empty response mask: no last token for the score"
        )
    kl_reward = -kl_coef * kl * mask_f
    rewards = kl_reward.unsqueeze(-1).expand(batch, length, num_objectives).clone()
    last_index = lengths - 1
    rows = torch.arange(batch, device=kl.device)
    rewards[rows, last_index, :] += scores.to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation per objective, right to left (Schulman et al. 2016).

    rewards and values are [B, T, M]. The episode ends at the last response token, so the value
    after it is 0: ``delta_t = r_t + gamma * V_{t+1} * mask_{t+1} - V_t`` and
    ``A_t = (delta_t + gamma * lam * A_{t+1}) * mask_t``. Padding positions get advantage 0.
    Returns (advantages, returns) with ``returns = advantages + values``. Pass detached tensors.
    """
    if rewards.dim() != 3 or rewards.shape != values.shape:
        raise ValueError(
            "rewards and values must both be [B, T, M], "
            f"got {tuple(rewards.shape)} and {tuple(values.shape)}"
        )
    if mask.shape != rewards.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} must be [B, T] = {tuple(rewards.shape[:2])}")
    _check_response_mask(mask)
    length = rewards.shape[1]
    mask_f = mask.to(rewards.dtype).unsqueeze(-1)  # [B, T, 1]
    advantages_reversed = []
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask_f[:, t]
        advantages_reversed.append(next_advantage)
        next_value = values[:, t] * mask_f[:, t]
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
def clipped_surrogate_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip policy loss for each objective from ONE shared probability ratio.

    ``r = exp(logprobs - old_logprobs)`` is [B, T]; advantages are [B, T, M]. Returns
    ``losses`` [M] (masked token mean of ``max(-A r, -A clip(r, 1-eps, 1+eps))`` per objective)
    that keep the autograd graph, so the trainer can call ``autograd.grad`` on each ``losses[m]``
    after one forward pass, and detached stats: ``approx_kl`` (masked mean of 0.5 logratio^2),
    ``clipfrac`` [M] (fraction of tokens where the clipped branch is the active one) and
    ``ratio_mean``.
    """
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and "
            f"mask {tuple(mask.shape)} must all be [B, T]"
        )
    if advantages.dim() != 3 or advantages.shape[:2] != logprobs.shape:
        raise ValueError(
            f"advantages must be [B, T, M] with [B, T] = {tuple(logprobs.shape)}, "
            f"got {tuple(advantages.shape)}"
        )
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio).unsqueeze(-1)  # [B, T, 1], shared by every objective
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    losses = masked_mean(torch.maximum(unclipped, clipped), mask, dim=(0, 1))
    with torch.no_grad():
        stats = {
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask, dim=(0, 1)),
            "ratio_mean": masked_mean(ratio.squeeze(-1), mask),
        }
    return losses, stats


def kl_penalty_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The KL term as a loss of its own (kl_in_objectives = false): the masked token mean of the
    k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` (Schulman 2020; GRPO's choice): >= 0,
    unbiased for KL(pi || pi_ref) under samples from pi, 0 where the policies agree."""
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must all be [B, T]")
    delta = ref_logprobs - logprobs
    return masked_mean(torch.exp(delta) - delta - 1.0, mask)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss averaged over objectives (scalar), plus detached stats.

    ``0.5 * masked_mean(max((v - R)^2, (clip(v, old - eps, old + eps) - R)^2))`` per objective,
    then the mean over the M objectives. Stats: ``vf_clipfrac`` (fraction of token-objective
    entries where the clipped branch is active) and ``value_loss_per_objective`` [M].
    """
    if values.dim() != 3 or values.shape != old_values.shape or values.shape != returns.shape:
        raise ValueError(
            f"values {tuple(values.shape)}, old_values {tuple(old_values.shape)} and returns "
            f"{tuple(returns.shape)} must all be the same [B, T, M]"
        )
    if not clip_range_value > 0:
        raise ValueError(f"clip_range_value must be > 0, got {clip_range_value}")
    clipped_values = old_values + torch.clamp(
        values - old_values, -clip_range_value, clip_range_value
    )
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    worst_error = torch.maximum(unclipped_error, clipped_error)
    per_objective = 0.5 * masked_mean(worst_error, mask, dim=(0, 1))
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean((clipped_error > unclipped_error).to(values.dtype), mask),
            "value_loss_per_objective": per_objective.detach(),
        }
    return per_objective.mean(), stats


# --------------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------------
class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019): steer the measured KL towards a target.

    ``update`` computes the proportional error ``clip(KL / target - 1, -0.2, 0.2)`` and scales the
    coefficient by ``1 + error * n_steps / horizon``; the clip bounds how fast it can move.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value = finite_number(init_kl_coef, "init_kl_coef")
        self.target = finite_number(target, "target")
        self.horizon = finite_number(horizon, "horizon")
        if self.value < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {self.value}")
        if self.target <= 0:
            raise ValueError(f"target must be > 0, got {self.target}")
        if self.horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {self.horizon}")

    def update(self, current_kl: float, n_steps: int) -> None:
        current = finite_number(current_kl, "current_kl")
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        proportional_error = min(max(current / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        missing = {"value", "target", "horizon"} - set(state)
        if missing:
            raise ValueError(f"AdaptiveKLController state is missing {sorted(missing)}")
        restored = AdaptiveKLController(state["value"], state["target"], state["horizon"])
        self.value, self.target, self.horizon = restored.value, restored.target, restored.horizon


class FixedKLController:
    """Constant KL coefficient with the same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float) -> None:
        self.value = finite_number(kl_coef, "kl_coef")
        if self.value < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.value}")

    def update(self, current_kl: float, n_steps: int) -> None:
        finite_number(current_kl, "current_kl")  # a NaN KL is a bug upstream, even here
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        if "value" not in state:
            raise ValueError("FixedKLController state is missing ['value']")
        self.value = FixedKLController(state["value"]).value


# --------------------------------------------------------------------------------------------
# Reward normalisation
# --------------------------------------------------------------------------------------------
class RunningMeanStd:
    """Running per-objective mean and (population) variance of reward scores.

    ``update`` merges a batch with Chan et al.'s parallel algorithm, so after any sequence of
    updates the statistics equal ``mean``/``var`` (ddof=0) of all the rows seen so far. The count
    starts at 0 (no epsilon pseudo-count): the first update then adopts the batch statistics
    exactly, since the merge weights the empty history by 0. ``normalize`` before any update
    raises, because there is nothing to normalise with. Statistics are kept in float64.
    """

    def __init__(self, num_objectives: int) -> None:
        if num_objectives < 1:
            raise ValueError(f"num_objectives must be >= 1, got {num_objectives}")
        self.num_objectives = int(num_objectives)
        self.mean = torch.zeros(self.num_objectives, dtype=torch.float64)
        self.var = torch.ones(self.num_objectives, dtype=torch.float64)
        self.count = 0.0

    def update(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.num_objectives:
            raise ValueError(f"x must be [B, {self.num_objectives}], got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("x must have at least one row")
        batch = x.detach().to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(batch).all()):
            raise ValueError("x must be finite, got NaN or inf")
        batch_mean = batch.mean(dim=0)
        batch_var = batch.var(dim=0, unbiased=False)
        batch_count = float(batch.shape[0])
        total = self.count + batch_count
        delta = batch_mean - self.mean
        merged_m2 = (
            self.var * self.count
            + batch_var * batch_count
            + delta**2 * self.count * batch_count / total
        )
        self.mean = self.mean + delta * batch_count / total
        self.var = merged_m2 / total
        self.count = total

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / sqrt(var + 1e-8)`` per objective, in x's dtype and device."""
        if self.count == 0:
            raise RuntimeError("RunningMeanStd.normalize called before any update")
        if x.shape[-1] != self.num_objectives:
            raise ValueError(
                f"x must end in {self.num_objectives} objectives, got shape {tuple(x.shape)}"
            )
        mean = self.mean.to(device=x.device, dtype=x.dtype)
        std = torch.sqrt(self.var + RUNNING_STD_EPS).to(device=x.device, dtype=x.dtype)
        return (x - mean) / std

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "count": float(self.count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"mean", "var", "count"} - set(state)
        if missing:
            raise ValueError(f"RunningMeanStd state is missing {sorted(missing)}")
        mean = torch.tensor([float(v) for v in state["mean"]], dtype=torch.float64)
        var = torch.tensor([float(v) for v in state["var"]], dtype=torch.float64)
        count = float(state["count"])
        if mean.shape != (self.num_objectives,) or var.shape != (self.num_objectives,):
            raise ValueError(
                f"RunningMeanStd state has {mean.numel()} means and {var.numel()} variances, "
                f"expected {self.num_objectives}"
            )
        finite = bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all())
        if not (finite and math.isfinite(count)):
            raise ValueError("RunningMeanStd state must be finite")
        if bool((var < 0).any()) or count < 0:
            raise ValueError(
                f"RunningMeanStd state has a negative variance or count (count={count})"
            )
        self.mean, self.var, self.count = mean, var, count
