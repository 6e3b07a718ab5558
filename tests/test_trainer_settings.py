"""The local settings that decide whether lambda can matter: SGD steps along
-lr * sum lambda g, the KL term inside or outside the combination, per-step geometry records,
and three objectives end to end."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from firm.ppo import kl_penalty_loss
from firm.mgda import gram_geometry, solve_weights
from firm.trainer import RoundStats, summarize
from test_trainer import (ConstantReward, LengthReward, LetterEReward, RecordingTrainer, make_config, make_prompts,
                          make_trainer, one_minibatch, wrap, make_base)


@pytest.fixture
def policy(tiny_llama_config):
    return wrap(make_base(tiny_llama_config))


def lora_vector(trainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainer.lora_params]).double().clone()


def test_sgd_step_is_minus_lr_times_the_weighted_sum_of_objective_gradients(policy, tiny_tokenizer, monkeypatch):
    lr = 0.05
    trainer = make_trainer(policy, tiny_tokenizer, make_config(optimizer="sgd", learning_rate=lr, max_grad_norm=1e12),
                           trainer_cls=RecordingTrainer)
    rollout, idx, advantages, returns = one_minibatch(trainer)
    grads: list[torch.Tensor] = []
    real_grad = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):
        result = real_grad(outputs, inputs, *args, **kwargs)
        if list(inputs) == trainer.lora_params:
            grads.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                    for g, p in zip(result, trainer.lora_params)]).double())
        return result

    monkeypatch.setattr(torch.autograd, "grad", spy)
    before = lora_vector(trainer)
    trainer.firm_step(rollout, idx, advantages, returns, RoundStats())
    [lam] = trainer.weights
    expected = before - lr * (torch.from_numpy(lam) @ torch.stack(grads[:2]))
    torch.testing.assert_close(lora_vector(trainer), expected, rtol=1e-5, atol=1e-7)
    assert isinstance(trainer.optimizer, torch.optim.SGD)


def test_kl_outside_the_objectives_leaves_the_gram_matrix_free_of_kl(tiny_llama_config, tiny_tokenizer):
    """With kl_in_objectives = false the solver sees the same Gram matrix whatever kl_coef is;
    with the KL inside every reward, kl_coef changes it (once the policy has moved off the
    reference, which the first step of the round makes it do)."""
    def grams(kl_in_objectives: bool, kl_coef: float) -> list[np.ndarray]:
        policy = wrap(make_base(tiny_llama_config))
        trainer = make_trainer(policy, tiny_tokenizer, make_config(kl_in_objectives=kl_in_objectives, kl_coef=kl_coef,
                                                                   normalize_rewards=False, whiten_advantages=False),
                               trainer_cls=RecordingTrainer)
        torch.manual_seed(0)
        with torch.no_grad():  # move the adapter off zero so that pi != pi_ref
            for p in trainer.lora_params:
                p.add_(0.05 * torch.randn_like(p))
        trainer.train_round(make_prompts(), random.Random(0))
        return trainer.grams

    outside_small, outside_large = grams(False, 0.0), grams(False, 5.0)
    inside_small, inside_large = grams(True, 0.0), grams(True, 5.0)
    np.testing.assert_allclose(outside_small[0], outside_large[0], rtol=1e-9)
    assert not np.allclose(inside_small[0], inside_large[0], rtol=1e-3)


def test_kl_penalty_loss_is_zero_at_the_reference_and_positive_elsewhere():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert float(kl_penalty_loss(logp, logp, mask)) == 0.0
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.1]]))
    delta = (ref - logp)[0, :2]
    expected = float((torch.exp(delta) - delta - 1).mean())
    assert float(kl_penalty_loss(logp, ref, mask)) == pytest.approx(expected)
    assert expected > 0


def test_per_step_records_have_one_entry_per_local_step(policy, tiny_tokenizer):
    config = make_config(ppo_epochs=3, num_minibatches=2, rollouts_per_round=2)
    trainer = make_trainer(policy, tiny_tokenizer, config)
    stats = trainer.train_round(make_prompts(), random.Random(0))
    steps = config.rollouts_per_round * config.ppo_epochs * config.num_minibatches
    assert len(stats.step_records) == steps == stats.steps + stats.skipped_steps
    metrics = summarize(stats, ["length", "letter_e"])
    assert len(metrics["step_lambda"]) == 2 * steps and len(metrics["step_taken"]) == steps
    assert len(metrics["step_gram_distance"]) == len(metrics["step_cosine"]) == len(metrics["step_norm_ratio"]) == steps
    lam = np.asarray(metrics["step_lambda"]).reshape(steps, 2)
    np.testing.assert_allclose(lam.sum(1), 1.0)
    assert all(0 <= d <= 2 for d in metrics["step_gram_distance"])
    assert all(0 <= r <= 1 for r in metrics["step_norm_ratio"])
    for record in stats.step_records:  # each step keeps the Gram matrix its weights were solved on
        if record.taken:
            np.testing.assert_allclose(record.weights, solve_weights(record.gram, config.beta), atol=1e-12)


def test_gram_geometry_matches_its_definition():
    g = np.array([[3.0, 0.0], [1.0, 1.0]])
    gram = g @ g.T
    distance, cosine, ratio = gram_geometry(gram)
    assert distance[0] == pytest.approx(np.sum((g[0] - g[1]) ** 2) / np.trace(gram))
    assert cosine[0] == pytest.approx(3.0 / (3.0 * np.sqrt(2.0)))
    assert ratio == pytest.approx(np.sqrt(2.0) / 3.0)
    assert gram_geometry(np.zeros((2, 2)))[2] == 0.0


def test_three_objectives_keep_lambda_on_the_simplex_at_every_step(policy, tiny_tokenizer):
    rewards = [LengthReward(), LetterEReward(), ConstantReward()]
    config = make_config(rewards="a,b,c", max_grad_norm=1e12)
    trainer = make_trainer(policy, tiny_tokenizer, config, rewards=rewards)
    stats = trainer.train_round(make_prompts(), random.Random(0))
    assert stats.steps >= 1
    for record in stats.step_records:
        if record.taken:
            assert record.weights.shape == (3,) and record.weights.min() >= 0
            assert record.weights.sum() == pytest.approx(1.0)
            assert record.gram_distance.shape == record.cosine.shape == (3,)


@pytest.mark.parametrize("in_memory", [False, True])
def test_adamw_state_round_trips_through_the_client_state(tiny_llama_config, tiny_tokenizer, tmp_path, in_memory):
    """optimizer = adamw: the moments a client's AdamW built in round 1 are the ones it starts
    round 2 with, whether the state lives in a directory or in Flower's node state."""
    from flwr.app import Context, RecordDict

    from firm.federation.client_state import optimizer_tensors, restore_state, save_state

    config = make_config(optimizer="adamw")
    trainer = make_trainer(wrap(make_base(tiny_llama_config)), tiny_tokenizer, config)
    trainer.train_round(make_prompts(), random.Random(0))
    saved = optimizer_tensors(trainer.optimizer)
    assert saved and any(k.endswith(".exp_avg_sq") for k in saved)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    directory = None if in_memory else tmp_path / "client"
    save_state(context, trainer, directory, firm_round=1)

    fresh = make_trainer(wrap(make_base(tiny_llama_config)), tiny_tokenizer, config)
    assert optimizer_tensors(fresh.optimizer) == {}
    restore_state(context, fresh, directory, firm_round=2)
    restored = optimizer_tensors(fresh.optimizer)
    assert restored.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(restored[key], saved[key], rtol=0, atol=0)
    reset = make_trainer(wrap(make_base(tiny_llama_config)), tiny_tokenizer, make_config(optimizer="adamw-reset"))
    restore_state(context, reset, directory, firm_round=2)
    assert optimizer_tensors(reset.optimizer) == {}  # adamw-reset starts every round fresh
