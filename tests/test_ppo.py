"""PPO math against hand-computed values on tiny tensors (arithmetic in the comments)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from firm.ppo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMeanStd,
    clipped_surrogate_losses,
    clipped_value_loss,
    compute_rewards,
    gae,
    masked_mean,
    masked_var,
    per_token_kl,
    whiten,
)

def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------ masked statistics
def test_masked_mean_and_var_ignore_padding() -> None:
    x = t([[1.0, 2.0, 100.0], [3.0, 4.0, -100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    # masked entries 1, 2, 3, 4: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(5 / 4)
    assert masked_var(x, mask, unbiased=True).item() == pytest.approx(5 / 3)
    # per row: (1 + 2) / 2 = 1.5 and (3 + 4) / 2 = 3.5
    torch.testing.assert_close(masked_mean(x, mask, dim=1), t([1.5, 3.5]))
    # per row deviations +-0.5 -> biased variance 0.25 each
    torch.testing.assert_close(masked_var(x, mask, unbiased=False, dim=1), t([0.25, 0.25]))
    # a [B, T] mask applies to every objective of a [B, T, M] tensor
    x3 = torch.stack([x, 10 * x], dim=-1)
    torch.testing.assert_close(masked_mean(x3, mask, dim=(0, 1)), t([2.5, 25.0]))


def test_masked_statistics_reject_empty_masks() -> None:
    x = t([[1.0, 2.0]])
    with pytest.raises(ValueError, match="empty mask"):
        masked_mean(x, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="at least 2 masked entries"):
        masked_var(x, t([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="prefix"):
        masked_mean(x, torch.ones(2, 1))


def test_whiten_hand_example() -> None:
    # 1, 2, 3: mean 2, unbiased variance (1 + 0 + 1) / 2 = 1 -> -1, 0, 1 (eps 1e-8 is negligible)
    x = t([[1.0, 2.0, 3.0, 50.0]])
    mask = t([[1, 1, 1, 0]])
    torch.testing.assert_close(whiten(x, mask), t([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-7, rtol=0)
    # shift_mean=False only rescales: -1 + 2, 0 + 2, 1 + 2
    torch.testing.assert_close(
        whiten(x, mask, shift_mean=False), t([[1.0, 2.0, 3.0, 0.0]]), atol=1e-7, rtol=0
    )


def test_whiten_is_per_objective_and_ignores_padding() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 2, generator=generator, dtype=torch.float64)
    x = x * t([1.0, 50.0]) + t([3.0, -7.0])  # very different scales and means per objective
    mask = t([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 5 + [0]])
    out = whiten(x, mask)
    torch.testing.assert_close(
        masked_mean(out, mask, dim=(0, 1)), t([0.0, 0.0]), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(masked_var(out, mask, dim=(0, 1)), t([1.0, 1.0]), atol=1e-6, rtol=0)
    assert torch.all(out[mask == 0] == 0)
    poisoned = x.clone()
    poisoned[mask == 0] = 1e6  # padding values must not leak into the statistics
    torch.testing.assert_close(whiten(poisoned, mask), out)
    # objective 0 whitened alone equals objective 0 of the joint call
    torch.testing.assert_close(whiten(x[..., 0], mask), out[..., 0])


# ------------------------------------------------------------------ rewards
def test_per_token_kl() -> None:
    # k1 estimator: log p - log p_ref
    torch.testing.assert_close(per_token_kl(t([[-1.0, -2.0]]), t([[-1.5, -1.0]])), t([[0.5, -1.0]]))
    with pytest.raises(ValueError, match="differ in shape"):
        per_token_kl(t([[-1.0, -2.0]]), t([[-1.0]]))


def test_compute_rewards_places_scores_at_last_token() -> None:
    scores = t([[1.0, -2.0], [3.0, 4.0]])
    kl = t([[0.1, 0.2, 0.3], [0.5, -0.5, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    rewards = compute_rewards(scores, kl, mask, kl_coef=0.1)
    # row 0: -0.1 * kl = -0.01, -0.02, -0.03; the scores 1 and -2 land on t = 2
    # row 1: -0.05, +0.05, padding 0; the scores 3 and 4 land on t = 1 (last real token)
    expected = t(
        [
            [[-0.01, -0.01], [-0.02, -0.02], [-0.03 + 1.0, -0.03 - 2.0]],
            [[-0.05, -0.05], [0.05 + 3.0, 0.05 + 4.0], [0.0, 0.0]],
        ]
    )
    torch.testing.assert_close(rewards, expected)


def test_compute_rewards_rejects_bad_masks() -> None:
    scores = t([[1.0], [2.0]])
    kl = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"sequences \[1\] have an empty response mask"):
        compute_rewards(scores, kl, t([[1, 0, 0], [0, 0, 0]]), kl_coef=0.1)
    with pytest.raises(ValueError, match="ones followed by zeros"):
        compute_rewards(scores, kl, t([[1, 0, 1], [1, 1, 1]]), kl_coef=0.1)
    with pytest.raises(ValueError, match="only 0 and 1"):
        compute_rewards(scores, kl, t([[1, 0.5, 0], [1, 1, 1]]), kl_coef=0.1)
    with pytest.raises(ValueError, match="scores has 1 rows"):
        compute_rewards(scores[:1], kl, torch.ones(2, 3), kl_coef=0.1)


# ------------------------------------------------------------------ GAE
def test_gae_gamma_one_lambda_one() -> None:
    # objective 0: r = (0, 0, 1), V = (0.5, 1.0, 1.5)
    #   delta_2 = 1 - 1.5 = -0.5                 -> A_2 = -0.5
    #   delta_1 = 0 + 1.5 - 1.0 = 0.5            -> A_1 = 0.5 - 0.5 = 0
    #   delta_0 = 0 + 1.0 - 0.5 = 0.5            -> A_0 = 0.5 + 0 = 0.5; returns = (1, 1, 1)
    # objective 1: r = (0.5, 0, -1), V = 0       -> A = reward-to-go = (-0.5, -1, -1)
    rewards = t([[[0.0, 0.5], [0.0, 0.0], [1.0, -1.0]]])
    values = t([[[0.5, 0.0], [1.0, 0.0], [1.5, 0.0]]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, t([[[0.5, -0.5], [0.0, -1.0], [-0.5, -1.0]]]))
    torch.testing.assert_close(returns, t([[[1.0, -0.5], [1.0, -1.0], [1.0, -1.0]]]))


def test_gae_discounted() -> None:
    # gamma = 0.9, lam = 0.95, gamma * lam = 0.855; r = (0, 0, 1), V = (0.5, 1.0, 1.5)
    #   delta_2 = 1 - 1.5 = -0.5                        A_2 = -0.5
    #   delta_1 = 0.9 * 1.5 - 1.0 = 0.35                A_1 = 0.35 + 0.855 * -0.5 = -0.0775
    #   delta_0 = 0.9 * 1.0 - 0.5 = 0.4                 A_0 = 0.4 + 0.855 * -0.0775 = 0.3337375
    #   returns = A + V = (0.8337375, 0.9225, 1.0)
    rewards = t([[[0.0], [0.0], [1.0]]])
    values = t([[[0.5], [1.0], [1.5]]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.95)
    torch.testing.assert_close(advantages.squeeze(), t([0.3337375, -0.0775, -0.5]))
    torch.testing.assert_close(returns.squeeze(), t([0.8337375, 0.9225, 1.0]))


def test_gae_with_padding_bootstraps_zero_after_eos() -> None:
    # mask (1, 1, 0, 0): the episode ends at t = 1, V after it is 0; padding holds garbage (7, 9)
    #   delta_1 = 1 + 0.9 * 0 - 2.0 = -1.0              A_1 = -1.0
    #   delta_0 = 0 + 0.9 * 2.0 - 0.5 = 1.3             A_0 = 1.3 + 0.855 * -1.0 = 0.445
    # row 1 is the unpadded example of test_gae_discounted padded by one token
    rewards = t([[[0.0], [1.0], [7.0], [7.0]], [[0.0], [0.0], [1.0], [7.0]]])
    values = t([[[0.5], [2.0], [9.0], [9.0]], [[0.5], [1.0], [1.5], [9.0]]])
    mask = t([[1, 1, 0, 0], [1, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    torch.testing.assert_close(
        advantages.squeeze(-1),
        t([[0.445, -1.0, 0.0, 0.0], [0.3337375, -0.0775, -0.5, 0.0]]),
    )
    torch.testing.assert_close(returns, advantages + values)


def test_gae_matches_direct_sum_definition() -> None:
    # A_t = sum_k (gamma lam)^k delta_{t+k} inside the episode, delta with V = 0 after the end
    generator = torch.Generator().manual_seed(1)
    rewards = torch.randn(3, 5, 2, generator=generator, dtype=torch.float64)
    values = torch.randn(3, 5, 2, generator=generator, dtype=torch.float64)
    lengths = [5, 3, 1]
    mask = t([[1.0 if i < n else 0.0 for i in range(5)] for n in lengths])
    gamma, lam = 0.97, 0.9
    advantages, _ = gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = torch.zeros_like(advantages)
    for b, n in enumerate(lengths):
        next_values = torch.cat([values[b, 1:n], torch.zeros(1, 2, dtype=torch.float64)])
        deltas = rewards[b, :n] + gamma * next_values - values[b, :n]
        for i in range(n):
            expected[b, i] = sum((gamma * lam) ** k * deltas[i + k] for k in range(n - i))
    torch.testing.assert_close(advantages, expected)


def test_gae_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="must both be"):
        gae(torch.zeros(1, 3, 2), torch.zeros(1, 3, 1), torch.ones(1, 3), 1.0, 1.0)
    with pytest.raises(ValueError, match="ones followed by zeros"):
        gae(torch.zeros(1, 3, 1), torch.zeros(1, 3, 1), t([[0, 1, 1]]), 1.0, 1.0)


# ------------------------------------------------------------------ losses
def surrogate_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # ratios 1.1 (inside [0.8, 1.2]), 0.5 (below), 1.5 (above), and a padding token with ratio 3
    ratios = t([[1.1, 0.5, 1.5, 3.0]])
    old_logprobs = t([[-1.0, -2.0, -0.5, -1.0]])
    logprobs = (old_logprobs + torch.log(ratios)).requires_grad_(True)
    advantages = t([[[1.0, -2.0], [1.0, -2.0], [1.0, -2.0], [100.0, 100.0]]])
    mask = t([[1, 1, 1, 0]])
    return logprobs, old_logprobs, advantages, mask


def test_clipped_surrogate_hand_values() -> None:
    logprobs, old_logprobs, advantages, mask = surrogate_example()
    losses, stats = clipped_surrogate_losses(
        logprobs, old_logprobs, advantages, mask, clip_range=0.2
    )
    # A = +1: max(-r, -clip(r)):
    #         r=1.1: -1.1 | r=0.5: max(-0.5, -0.8) = -0.5 | r=1.5: max(-1.5, -1.2) = -1.2
    #         mean = -2.8 / 3;  the clipped branch is active only at r = 1.5 -> clipfrac 1/3
    # A = -2: max(2r, 2 clip(r)):
    #         r=1.1: 2.2 | r=0.5: max(1.0, 1.6) = 1.6 | r=1.5: max(3.0, 2.4) = 3.0
    #         mean = 6.8 / 3;  the clipped branch is active only at r = 0.5 -> clipfrac 1/3
    torch.testing.assert_close(losses, t([-2.8 / 3, 6.8 / 3]))
    torch.testing.assert_close(stats["clipfrac"], t([1 / 3, 1 / 3]))
    expected_kl = 0.5 * (math.log(1.1) ** 2 + math.log(0.5) ** 2 + math.log(1.5) ** 2) / 3
    assert stats["approx_kl"].item() == pytest.approx(expected_kl)
    assert stats["ratio_mean"].item() == pytest.approx((1.1 + 0.5 + 1.5) / 3)
    assert not stats["approx_kl"].requires_grad
    # d loss / d logprob = d loss / d r * r; a clipped branch has zero gradient:
    #   A = +1: (-1.1, -0.5, 0, 0) / 3        A = -2: (2.2, 0, 3.0, 0) / 3
    (grad_0,) = torch.autograd.grad(losses[0], logprobs, retain_graph=True)
    (grad_1,) = torch.autograd.grad(losses[1], logprobs)
    torch.testing.assert_close(grad_0, t([[-1.1, -0.5, 0.0, 0.0]]) / 3)
    torch.testing.assert_close(grad_1, t([[2.2, 0.0, 3.0, 0.0]]) / 3)


def test_clipped_surrogate_rejects_bad_input() -> None:
    logprobs, old_logprobs, advantages, mask = surrogate_example()
    with pytest.raises(ValueError, match="clip_range must be > 0"):
        clipped_surrogate_losses(logprobs, old_logprobs, advantages, mask, clip_range=0.0)
    with pytest.raises(ValueError, match="advantages must be"):
        clipped_surrogate_losses(logprobs, old_logprobs, advantages[..., 0], mask, clip_range=0.2)


def test_clipped_value_loss_hand_values() -> None:
    old_values = torch.zeros(1, 3, 2, dtype=torch.float64)
    values = t([[[0.5, -0.5], [0.1, 0.3], [5.0, 5.0]]])  # t = 2 is padding
    returns = t([[[1.0, -1.0], [-1.0, 0.3], [0.0, 0.0]]])
    mask = t([[1, 1, 0]])
    loss, stats = clipped_value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    # objective 0: t0 v=0.5 -> clip 0.2: max(0.25, 0.64) = 0.64;  t1 v=0.1 inside: 1.21
    #              0.5 * (0.64 + 1.21) / 2 = 0.4625
    # objective 1: t0 v=-0.5 -> clip -0.2: max(0.25, 0.64) = 0.64
    #              t1 v=0.3 -> clip 0.2: max(0, 0.01) = 0.01
    #              0.5 * (0.64 + 0.01) / 2 = 0.1625
    # mean over objectives: 0.3125; clipped branch active in 3 of 4 token-objective entries
    assert loss.item() == pytest.approx(0.3125)
    torch.testing.assert_close(stats["value_loss_per_objective"], t([0.4625, 0.1625]))
    assert stats["vf_clipfrac"].item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="clip_range_value must be > 0"):
        clipped_value_loss(values, old_values, returns, mask, clip_range_value=-1.0)


def test_per_objective_gradients_from_one_forward() -> None:
    """autograd.grad on each loss of one forward pass equals each loss computed on its own."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 5)  # 4 features -> logits over a 5-token vocabulary
    inputs = torch.randn(2, 3, 4)
    actions = torch.randint(0, 5, (2, 3))
    mask = t([[1, 1, 1], [1, 1, 0]])
    advantages = torch.randn(2, 3, 2)

    def logprobs_of_actions() -> torch.Tensor:
        log_probs = torch.log_softmax(model(inputs), dim=-1)
        return log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)

    with torch.no_grad():  # the behaviour policy differed a bit: ratios away from 1, some clipped
        old_logprobs = logprobs_of_actions() + 0.3 * torch.randn(2, 3)
    params = list(model.parameters())
    losses, _ = clipped_surrogate_losses(logprobs_of_actions(), old_logprobs, advantages, mask, 0.2)
    shared = [torch.autograd.grad(losses[m], params, retain_graph=True) for m in range(2)]

    for m in range(2):
        alone, _ = clipped_surrogate_losses(
            logprobs_of_actions(), old_logprobs, advantages[..., m : m + 1], mask, 0.2
        )
        separate = torch.autograd.grad(alone[0], params)
        for got, want in zip(shared[m], separate):
            torch.testing.assert_close(got, want)
    assert not torch.allclose(shared[0][0], shared[1][0])  # the objectives really differ


# ------------------------------------------------------------------ KL controllers
def test_adaptive_kl_controller_arithmetic() -> None:
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL 9: error 9/6 - 1 = 0.5 -> clipped to 0.2; x (1 + 0.2 * 256 / 10000) = 1.00512
    controller.update(9.0, n_steps=256)
    assert controller.value == pytest.approx(0.2 * 1.00512)
    # KL 3: error -0.5 -> -0.2; x (1 - 0.2 * 100 / 10000) = 0.998
    controller.update(torch.tensor(3.0), n_steps=100)
    assert controller.value == pytest.approx(0.2 * 1.00512 * 0.998)
    # KL 6.6: error 0.1 (inside the clip); x (1 + 0.1 * 1000 / 10000) = 1.01
    controller.update(6.6, n_steps=1000)
    assert controller.value == pytest.approx(0.2 * 1.00512 * 0.998 * 1.01)

    restored = AdaptiveKLController(init_kl_coef=1.0, target=1.0, horizon=1.0)
    restored.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert restored.state_dict() == controller.state_dict()
    with pytest.raises(ValueError, match="current_kl must be finite"):
        controller.update(float("nan"), n_steps=1)
    with pytest.raises(ValueError, match="target must be > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=1.0)
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({"value": 0.1})


def test_fixed_kl_controller() -> None:
    controller = FixedKLController(0.05)
    controller.update(100.0, n_steps=512)
    assert controller.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(controller.state_dict())
    assert other.value == 0.05
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        FixedKLController(-0.1)


# ------------------------------------------------------------------ reward normalisation
def test_running_mean_std_matches_numpy_on_concatenated_batches() -> None:
    rng = np.random.default_rng(0)
    # values exactly representable in float32, so float32 and float64 batches mean the same rows
    batches = [
        rng.normal([3.0, -1.0], [2.0, 0.1], size=(n, 2)).astype(np.float32).astype(np.float64)
        for n in (5, 1, 17, 8)
    ]
    stats = RunningMeanStd(num_objectives=2)
    for i, batch in enumerate(batches):
        stats.update(torch.tensor(batch, dtype=torch.float32 if i % 2 else torch.float64))
        seen = np.concatenate(batches[: i + 1])
        np.testing.assert_allclose(stats.mean.numpy(), seen.mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats.var.numpy(), seen.var(axis=0), rtol=1e-10, atol=1e-12)
        assert stats.count == len(seen)

    x = torch.tensor([[3.0, -1.0]], dtype=torch.float32)
    expected = (x.double() - stats.mean) / torch.sqrt(stats.var + 1e-8)
    normalized = stats.normalize(x)
    assert normalized.dtype == torch.float32
    torch.testing.assert_close(normalized, expected.float())

    state = json.loads(json.dumps(stats.state_dict()))  # plain lists and floats only
    restored = RunningMeanStd(num_objectives=2)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.normalize(x), normalized)


def test_running_mean_std_first_update_and_errors() -> None:
    stats = RunningMeanStd(num_objectives=1)
    with pytest.raises(RuntimeError, match="before any update"):
        stats.normalize(t([[1.0]]))
    stats.update(t([[2.0], [4.0]]))  # first update adopts the batch exactly: mean 3, var 1
    assert stats.mean.item() == 3.0 and stats.var.item() == 1.0 and stats.count == 2.0
    with pytest.raises(ValueError, match=r"x must be \[B, 1\]"):
        stats.update(t([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="finite"):
        stats.update(t([[float("nan")]]))
    with pytest.raises(ValueError, match="expected 1"):
        stats.load_state_dict({"mean": [0.0, 0.0], "var": [1.0, 1.0], "count": 3.0})
    with pytest.raises(ValueError, match="negative"):
        stats.load_state_dict({"mean": [0.0], "var": [-1.0], "count": 3.0})
