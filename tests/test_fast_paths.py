"""The fast paths of firm.trainer against the slow ones they replace, on the tiny Llama.

* The sampling loop draws exactly the tokens transformers' generate() draws (same seed, LoRA
  unmerged, generate()'s multinomial draw), its default inverse-CDF draw has the distribution it
  is given, and the log-probs and hidden states it keeps equal a separate full forward over
  the sampled sequences (the old-log-prob forward it replaces), merged or not.
* merged_lora gives the base back bit for bit, and a merged forward equals the unmerged one.
* The batched per-objective backward equals M separate backward passes.
* A FIRM step on a rollout from the fast path takes the same lambda and the same update as on
  the same rollout with the log-probs and values of the slow path.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from firm.models import MultiObjectiveValueHead, add_lora, lora_parameters, merged_lora
from firm.ppo import clipped_surrogate_losses
from firm.gradients import objective_gradients
from firm.sampling import _top_p_filter, draw_tokens, multinomial_tokens, policy_forward, response_mask_from_ids, sample
from firm.trainer import FirmLocalTrainer, RoundStats

from test_trainer import LengthReward, LetterEReward, make_config, make_prompts

torch.set_num_threads(1)
TOL = dict(rtol=1e-5, atol=1e-5)


def nonzero_lora_policy(tiny_llama_config):
    """A LoRA-wrapped tiny Llama whose adapter is not zero (so merging changes the weights)."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config).eval()
    torch.manual_seed(1)
    policy = add_lora(base, r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    with torch.no_grad():
        for name, p in lora_parameters(policy).items():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return policy


def encoded_prompts(tokenizer, n=4):
    texts = [tokenizer.apply_chat_template(p.chat_messages(), tokenize=False, add_generation_prompt=True)
             for p in make_prompts()[:n]]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.fixture
def policy(tiny_llama_config):
    return nonzero_lora_policy(tiny_llama_config)


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_sample_draws_the_tokens_transformers_generate_draws(policy, tiny_tokenizer, top_p):
    enc = encoded_prompts(tiny_tokenizer)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    for seed in range(3):
        torch.manual_seed(seed)
        reference = policy.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=True,
                                    temperature=0.8, top_p=top_p, top_k=0, max_new_tokens=12, pad_token_id=pad,
                                    eos_token_id=eos, use_cache=True)
        torch.manual_seed(seed)
        tokens, _, _ = sample(policy, enc.input_ids, enc.attention_mask, 12, 0.8, top_p, eos, pad,
                              draw=multinomial_tokens)
        assert torch.equal(tokens, reference[:, enc.input_ids.shape[1]:])


def test_inverse_cdf_draw_has_the_distribution_it_is_given():
    """draw_tokens (the default draw) against the probabilities, by a chi-square test per row on
    60,000 draws; tokens of probability zero never come up, and rows need not be normalised."""
    from scipy.stats import chisquare

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 40) * 2, -1)
    probs[:, ::7] = 0.0  # as top-p leaves them
    probs[1] *= 0.37  # unnormalised, as _top_p_filter returns them
    draws = 60_000

    def pvalue(row_probs: torch.Tensor, drawn: torch.Tensor, expected_probs: torch.Tensor) -> float:
        counts = torch.bincount(drawn, minlength=40).double()
        assert counts[expected_probs == 0].sum() == 0  # zero-probability tokens never come up
        keep = expected_probs > 0
        expected = (expected_probs[keep].double() / expected_probs[keep].double().sum()).numpy() * draws
        return chisquare(counts[keep].numpy(), expected * (draws / expected.sum())).pvalue

    samples = draw_tokens(probs.repeat_interleave(draws, 0)).reshape(3, draws)
    for row in range(3):
        assert pvalue(probs[row], samples[row], probs[row]) > 1e-3
    biased = probs[0].clone()
    biased[biased.argmax()] *= 1.1  # the test can fail: draws with the likeliest token 10 % heavier
    assert pvalue(probs[0], draw_tokens(biased[None].repeat(draws, 1)), probs[0]) < 1e-6


@pytest.mark.parametrize("merge", [False, True])
def test_sampled_logprobs_and_hidden_equal_a_full_forward(policy, tiny_tokenizer, merge):
    enc = encoded_prompts(tiny_tokenizer)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    torch.manual_seed(0)
    with merged_lora(policy) if merge else torch.no_grad():
        tokens, logprobs, hidden = sample(policy, enc.input_ids, enc.attention_mask, 16, 0.8, 1.0, eos, pad)
    mask = response_mask_from_ids(tokens, eos)
    input_ids = torch.cat([enc.input_ids, tokens], dim=1)
    attention_mask = torch.cat([enc.attention_mask, mask.long()], dim=1)
    with torch.no_grad():
        full_logprobs, full_hidden = policy_forward(policy, input_ids, attention_mask, tokens.shape[1], 0.8)
    keep = mask.bool()
    assert keep.sum() > 8
    assert torch.isfinite(logprobs).all() and (logprobs[~keep] == 0).all()  # the pad after EOS adds nothing
    torch.testing.assert_close(logprobs[keep], full_logprobs[keep], **TOL)
    torch.testing.assert_close(hidden[keep], full_hidden[keep], **TOL)


def test_merged_lora_restores_the_base_bit_for_bit_and_matches_the_unmerged_forward(policy, tiny_tokenizer):
    enc = encoded_prompts(tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    with torch.no_grad():
        unmerged = policy(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        with merged_lora(policy):
            assert any(not torch.equal(p, before[n]) for n, p in policy.named_parameters() if "base_layer" in n)
            merged = policy(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    torch.testing.assert_close(merged, unmerged, **TOL)
    for name, p in policy.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed"
    with torch.no_grad(), policy.disable_adapter():  # and the reference is still the plain base
        torch.testing.assert_close(policy(input_ids=enc.input_ids).logits,
                                   policy.get_base_model()(input_ids=enc.input_ids).logits, rtol=0, atol=0)


def test_merged_lora_leaves_a_bfloat16_base_unmerged(tiny_llama_config):
    policy = nonzero_lora_policy(tiny_llama_config).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    with merged_lora(policy):
        assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())


def test_top_p_filter_keeps_the_nucleus_transformers_keeps():
    from transformers.generation.logits_process import TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    for top_p in (0.3, 0.9):
        expected = TopPLogitsWarper(top_p)(None, logits.clone()) > -float("inf")
        kept = _top_p_filter(torch.softmax(logits, -1), top_p) > 0
        assert torch.equal(kept, expected)


def test_batched_objective_gradients_equal_separate_backward_passes(policy, tiny_tokenizer):
    enc = encoded_prompts(tiny_tokenizer)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    torch.manual_seed(0)
    tokens, old_logprobs, _ = sample(policy, enc.input_ids, enc.attention_mask, 8, 0.8, 1.0, eos, pad)
    mask = response_mask_from_ids(tokens, eos)
    ids = torch.cat([enc.input_ids, tokens], 1)
    am = torch.cat([enc.attention_mask, mask.long()], 1)
    advantages = torch.randn(*mask.shape, 3)
    params = list(lora_parameters(policy).values())
    grads = {}
    for batched in (False, True):
        logprobs, _ = policy_forward(policy, ids, am, tokens.shape[1], 0.8)
        losses, _ = clipped_surrogate_losses(logprobs, old_logprobs - 0.1, advantages, mask, 0.2)
        grads[batched] = objective_gradients(losses, params, batched=batched)
    assert grads[False].shape == (3, sum(p.numel() for p in params))
    assert grads[False].abs().sum() > 0
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("batched", [False, True])
def test_firm_step_on_the_fast_rollout_equals_the_slow_path(tiny_llama_config, tiny_tokenizer, batched):
    """Same tokens; log-probs and values from the sampling pass (fast) or from a separate forward
    (slow, as the code did before the fast paths): the same lambda, the same new adapter and critic."""
    policy = nonzero_lora_policy(tiny_llama_config)
    config = make_config(max_grad_norm=1e12)

    def trainer_for(p):
        value_head = MultiObjectiveValueHead(p.get_base_model().config.hidden_size, 2)
        torch.nn.init.normal_(value_head.linear.weight, std=0.1)
        return FirmLocalTrainer(p, tiny_tokenizer, value_head, [LengthReward(), LetterEReward()], config,
                                batched_objective_gradients=batched)

    fast = trainer_for(policy)
    torch.manual_seed(4)
    rollout = fast.rollout(make_prompts()[:4])
    slow_rollout = copy.copy(rollout)
    with torch.no_grad():
        logprobs, hidden = policy_forward(policy, rollout.input_ids, rollout.attention_mask,
                                          rollout.response_length, config.temperature)
        slow_rollout.logprobs = logprobs
        slow_rollout.values = fast.value_head(hidden)
    keep = rollout.response_mask.bool()
    torch.testing.assert_close(rollout.logprobs[keep], slow_rollout.logprobs[keep], **TOL)
    torch.testing.assert_close(rollout.values[keep], slow_rollout.values[keep], **TOL)

    slow = trainer_for(copy.deepcopy(policy))
    slow.value_head.load_state_dict(fast.value_head.state_dict())
    results = []
    for trainer, ro in ((fast, rollout), (slow, slow_rollout)):
        advantages, returns, _ = trainer.advantages(ro)
        stats = RoundStats()
        trainer.firm_step(ro, torch.arange(4), advantages, returns, stats)
        assert stats.steps == 1
        results.append((stats.lambdas[0], lora_parameters(trainer.policy), trainer.value_head.state_dict()))
    (lam_fast, lora_fast, head_fast), (lam_slow, lora_slow, head_slow) = results
    np.testing.assert_allclose(lam_fast, lam_slow, rtol=1e-4, atol=1e-6)
    for name in lora_fast:
        torch.testing.assert_close(lora_fast[name], lora_slow[name], **TOL)
    for name in head_fast:
        torch.testing.assert_close(head_fast[name], head_slow[name], **TOL)


def test_rollout_runs_one_full_forward_the_reference(policy, tiny_tokenizer, monkeypatch):
    """The behaviour log-probs and values come from the sampling pass: the only full forward
    left in a rollout is the reference's, with the adapter disabled."""
    import firm.trainer as trainer_module

    trainer = FirmLocalTrainer(policy, tiny_tokenizer, MultiObjectiveValueHead(32, 2),
                               [LengthReward(), LetterEReward()], make_config())
    calls = []
    real_forward = trainer_module.policy_forward

    def spy(model, *args, **kwargs):
        calls.append(any(getattr(m, "disable_adapters", False) for m in model.modules()))
        return real_forward(model, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "policy_forward", spy)
    torch.manual_seed(0)
    rollout = trainer.rollout(make_prompts()[:4])
    assert calls == [True]
    assert rollout.logprobs.shape == rollout.response_mask.shape
    assert rollout.values.shape == (*rollout.response_mask.shape, 2)
    assert torch.equal(rollout.logprobs, rollout.logprobs * rollout.response_mask)
