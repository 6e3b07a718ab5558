"""gram = last-hidden (MGDA-UB): the weights are solved on the Gram of the gradients at
the policy's last hidden states, and the step is still exactly sum_m lambda_m g_m for the lambda
it used. Checked against per-objective gradients taken one by one."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from firm.config import ConfigError, build_config
from firm.mgda import solve_weights
from firm.ppo import clipped_surrogate_losses, kl_penalty_loss
from firm.gradients import last_hidden_gram, logprob_hidden_gradients, objective_gradients, token_loss_weights
from firm.sampling import policy_forward, policy_outputs
from test_trainer import RecordingTrainer, make_base, make_config, make_prompts, make_trainer, one_minibatch, wrap


@pytest.fixture
def policy(tiny_llama_config):
    return wrap(make_base(tiny_llama_config))


def minibatch_losses(trainer, rollout, idx, advantages):
    cfg = trainer.config
    logprobs, hidden, representation = policy_outputs(trainer.policy, rollout.input_ids[idx],
                                                      rollout.attention_mask[idx], rollout.response_length,
                                                      cfg.temperature)
    losses, _ = clipped_surrogate_losses(logprobs, rollout.logprobs[idx], advantages[idx],
                                         rollout.response_mask[idx], cfg.clip_range)
    return logprobs, losses, representation


def test_policy_forward_is_policy_outputs_without_the_representation(policy, tiny_tokenizer):
    trainer = make_trainer(policy, tiny_tokenizer, make_config())
    rollout, idx, _, _ = one_minibatch(trainer)
    with torch.no_grad():
        logprobs, hidden = policy_forward(policy, rollout.input_ids, rollout.attention_mask,
                                          rollout.response_length, 0.8)
        same_logprobs, same_hidden, representation = policy_outputs(policy, rollout.input_ids,
                                                                   rollout.attention_mask, rollout.response_length, 0.8)
    torch.testing.assert_close(logprobs, same_logprobs, rtol=0, atol=0)
    torch.testing.assert_close(hidden, same_hidden, rtol=0, atol=0)
    T = rollout.response_length
    torch.testing.assert_close(representation[:, -T - 1:-1], hidden, rtol=0, atol=0)


def spy(function, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)
    return wrapped


def representation_gram(losses, representation):
    """The reference: the per-objective gradients at the last hidden states, taken whole by one
    vmapped backward, and their Gram."""
    eye = torch.eye(losses.shape[0], dtype=losses.dtype)
    (z,) = torch.autograd.grad(losses, [representation], grad_outputs=eye, is_grads_batched=True, retain_graph=True)
    z = z.reshape(losses.shape[0], -1).double()
    assert z.abs().sum() > 0
    return (z @ z.T).numpy()


def test_each_hidden_gradient_is_its_own_tokens_log_prob_gradient(policy, tiny_tokenizer):
    trainer = make_trainer(policy, tiny_tokenizer, make_config())
    rollout, idx, advantages, _ = one_minibatch(trainer)
    logprobs, _, representation = minibatch_losses(trainer, rollout, idx, advantages)
    hidden_gradients = logprob_hidden_gradients(logprobs, representation)
    B, T = logprobs.shape
    assert hidden_gradients.shape == (B, T, representation.shape[-1])
    L = representation.shape[1]
    for b, t in [(0, 0), (B - 1, T - 1), (B // 2, T // 2)]:
        (alone,) = torch.autograd.grad(logprobs[b, t], representation, retain_graph=True)
        position = L - T - 1 + t
        torch.testing.assert_close(hidden_gradients[b, t], alone[b, position], rtol=1e-5, atol=1e-7)
        alone[b, position] = 0  # nothing anywhere else: the factorisation last_hidden_gram relies on
        assert alone.abs().max() == 0


def test_last_hidden_gram_is_the_gram_of_the_gradients_at_the_last_hidden_states(policy, tiny_tokenizer):
    trainer = make_trainer(policy, tiny_tokenizer, make_config())
    rollout, idx, advantages, _ = one_minibatch(trainer)
    logprobs, losses, representation = minibatch_losses(trainer, rollout, idx, advantages)
    gram = last_hidden_gram(token_loss_weights(losses, logprobs), logprob_hidden_gradients(logprobs, representation))
    np.testing.assert_allclose(gram, representation_gram(losses, representation), rtol=1e-5)


@pytest.mark.parametrize("kl_in_objectives, checkpointing", [(True, False), (False, False), (True, True)])
def test_last_hidden_step_is_the_weighted_sum_of_exact_gradients_for_its_lambda(policy, tiny_tokenizer,
                                                                                kl_in_objectives, checkpointing):
    """Also with gradient checkpointing: the step's backward starts at the hidden states, where
    the recomputed blocks must still deliver the same gradients."""
    config = make_config(gram="last-hidden", kl_in_objectives=kl_in_objectives, kl_coef=0.5,
                         gradient_checkpointing=checkpointing)
    trainer = make_trainer(policy, tiny_tokenizer, config, trainer_cls=RecordingTrainer)
    with torch.no_grad():  # off the reference, so that the KL loss has a gradient
        for p in trainer.lora_params:
            p.add_(0.05 * torch.randn_like(p))
    rollout, idx, advantages, _ = one_minibatch(trainer)
    trainer.policy.train()  # as firm_step does: checkpointing only acts in training mode
    checkpointed = []
    if checkpointing:
        layer = trainer.policy.get_base_model().model.layers[0]
        layer._gradient_checkpointing_func = spy(layer._gradient_checkpointing_func, checkpointed)
    logprobs, losses, representation = minibatch_losses(trainer, rollout, idx, advantages)
    assert bool(checkpointed) == checkpointing  # the graph below the hidden states is a checkpointed one
    kl_loss = None if kl_in_objectives else config.kl_coef * kl_penalty_loss(
        logprobs, rollout.ref_logprobs[idx], rollout.response_mask[idx])
    # what the step should be, from the exact per-objective gradients of the same graph
    rows = losses if kl_loss is None else torch.cat([losses, kl_loss.reshape(1)])
    exact = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(row, trainer.lora_params,
                                                                               retain_graph=True)])
                         for row in rows]).double()
    expected_gram = representation_gram(losses, representation)
    solved = trainer.last_hidden_policy_gradient(losses, kl_loss, logprobs, representation)
    assert solved is not None
    gram, weights = solved
    np.testing.assert_allclose(gram, expected_gram, rtol=1e-5)
    np.testing.assert_allclose(weights, solve_weights(gram, beta=config.beta, preference=trainer.preference),
                               rtol=1e-10)
    expected = torch.from_numpy(weights) @ exact[:2] + (0 if kl_loss is None else exact[2])
    applied = torch.cat([p.grad.reshape(-1) for p in trainer.lora_params]).double()
    torch.testing.assert_close(applied, expected, rtol=1e-4, atol=1e-8)


def test_a_non_finite_last_hidden_gram_is_refused_and_sets_no_gradient(policy, tiny_tokenizer):
    trainer = make_trainer(policy, tiny_tokenizer, make_config(gram="last-hidden"))
    rollout, idx, advantages, _ = one_minibatch(trainer)
    advantages = advantages.clone()
    advantages[idx[0], 0, 1] = float("nan")  # one token of one objective, inside the minibatch
    logprobs, losses, representation = minibatch_losses(trainer, rollout, idx, advantages)
    assert trainer.last_hidden_policy_gradient(losses, None, logprobs, representation) is None
    assert all(p.grad is None for p in trainer.lora_params)


def test_a_round_with_the_last_hidden_gram_records_lambda_on_the_simplex(policy, tiny_tokenizer):
    trainer = make_trainer(policy, tiny_tokenizer, make_config(gram="last-hidden"), trainer_cls=RecordingTrainer)
    stats = trainer.train_round(make_prompts(), random.Random(0))
    assert stats.steps == 4 and stats.skipped_steps == 0
    for weights in stats.lambdas:
        assert np.all(weights >= 0) and weights.sum() == pytest.approx(1.0)
    assert len(trainer.grams) == 4


def test_last_hidden_gram_differs_from_the_exact_one(policy, tiny_tokenizer):
    """It is an approximation: same graph, different Gram (so it must stay opt-in)."""
    trainer = make_trainer(policy, tiny_tokenizer, make_config())
    rollout, idx, advantages, _ = one_minibatch(trainer)
    _, losses, representation = minibatch_losses(trainer, rollout, idx, advantages)
    approx = representation_gram(losses, representation)  # keeps the graph
    g = objective_gradients(losses, trainer.lora_params)
    exact = (g @ g.T).numpy()
    assert not np.allclose(approx / np.trace(approx), exact / np.trace(exact), rtol=1e-3)


def test_gram_setting_is_validated():
    assert build_config("default", {"gram": "last-hidden"}).gram == "last-hidden"
    with pytest.raises(ConfigError, match="gram must be one of"):
        build_config("default", {"gram": "approx"})
    with pytest.raises(ConfigError, match="fsmgda solves its weights on the server"):
        build_config("default", {"gram": "last-hidden", "algorithm": "fsmgda"})
