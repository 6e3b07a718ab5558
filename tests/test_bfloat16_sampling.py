"""sampling_dtype = bfloat16 (opt-in): rollouts from a bfloat16 copy of the merged policy.

* The copy holds exactly the merged weights W + BA of the policy, rounded to bfloat16, follows
  the adapter from one refresh to the next, and leaves the float32 policy untouched.
* A rollout with it draws the tokens, behaviour log-probs and critic inputs of the copy (the
  same numbers as sampling the copy directly), which lie close to the float32 policy's own
  log-probs and far from those of the base without the adapter.
* A whole round trains on them; a merged policy or a non-float32 policy is refused.
"""

from __future__ import annotations

import random

import pytest
import torch

from firm.config import ConfigError
from firm.models import BFloat16Sampler, MultiObjectiveValueHead, lora_parameters, merged_lora
from firm.sampling import policy_forward, sample
from firm.trainer import FirmLocalTrainer, RoundStats

from test_fast_paths import nonzero_lora_policy
from test_trainer import LengthReward, LetterEReward, make_config, make_prompts

torch.set_num_threads(1)


@pytest.fixture
def policy(tiny_llama_config):
    policy = nonzero_lora_policy(tiny_llama_config)
    with torch.no_grad():  # an adapter large enough that sampling with or without it differs clearly
        for name, p in lora_parameters(policy).items():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return policy


def merged_bfloat16_state(policy) -> dict[str, torch.Tensor]:
    """The reference: peft's own merge, state-dict names without LoRA, cast to bfloat16."""
    with merged_lora(policy):
        return {name.replace(".base_layer.", "."): tensor.to(torch.bfloat16).clone()
                for name, tensor in policy.get_base_model().state_dict().items() if "lora_" not in name}


def assert_holds(sampler: BFloat16Sampler, expected: dict[str, torch.Tensor]) -> None:
    state = sampler.model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in state.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, expected[name]), name


def test_the_copy_holds_the_merged_weights_and_follows_the_adapter(policy):
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    sampler = BFloat16Sampler(policy)
    assert not any(p.requires_grad for p in sampler.model.parameters())
    assert_holds(sampler, merged_bfloat16_state(policy))  # as built
    sampler.refresh()
    assert_holds(sampler, merged_bfloat16_state(policy))
    for name, p in policy.named_parameters():  # the float32 policy is untouched, bit for bit
        assert torch.equal(p, before[name]), name

    with torch.no_grad():  # a training step later: a new adapter
        for name, p in lora_parameters(policy).items():
            p.add_(0.3 * torch.randn_like(p))
    stale = sampler.model.state_dict()["model.layers.0.self_attn.q_proj.weight"].clone()
    sampler.refresh()
    assert_holds(sampler, merged_bfloat16_state(policy))
    assert not torch.equal(stale, sampler.model.state_dict()["model.layers.0.self_attn.q_proj.weight"])

    with policy.disable_adapter():  # the reference: the base weights alone
        sampler.refresh()
        base = {name.replace(".base_layer.", "."): t.to(torch.bfloat16)
                for name, t in policy.get_base_model().state_dict().items() if "lora_" not in name}
    assert_holds(sampler, base)


def test_refresh_refuses_a_merged_policy_and_the_sampler_a_bfloat16_one(policy):
    sampler = BFloat16Sampler(policy)
    policy.merge_adapter()
    with pytest.raises(RuntimeError, match="merged"):
        sampler.refresh()
    policy.unmerge_adapter()
    with pytest.raises(ValueError, match="copy of a float32 policy"):
        BFloat16Sampler(policy.to(torch.bfloat16))


def test_a_bfloat16_rollout_is_the_copys_sampling(policy, tiny_tokenizer):
    config = make_config(sampling_dtype="bfloat16", max_new_tokens=12)
    trainer = FirmLocalTrainer(policy, tiny_tokenizer, MultiObjectiveValueHead(32, 2),
                               [LengthReward(), LetterEReward()], config)
    prompts = make_prompts()[:4]
    torch.manual_seed(3)
    rollout = trainer.rollout(prompts)
    T = rollout.response_length

    torch.manual_seed(3)  # the same prompts as the rollout encoded them, the same random numbers
    tokens, logprobs, hidden = sample(trainer.sampler.model, rollout.input_ids[:, :-T],
                                      rollout.attention_mask[:, :-T], T, config.temperature, config.top_p,
                                      tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
    keep = rollout.response_mask.bool()
    assert torch.equal(rollout.input_ids[:, -T:], tokens)
    assert torch.equal(rollout.logprobs[keep], logprobs[keep])
    assert rollout.values.dtype == torch.float32
    torch.testing.assert_close(rollout.values, trainer.value_head(hidden.float()) * rollout.response_mask[..., None])

    # Close to the float32 policy's log-probs of the same tokens (bfloat16 rounding), and much
    # closer than to the base's without the adapter: the copy is the merged policy.
    with torch.no_grad():
        own, _ = policy_forward(policy, rollout.input_ids, rollout.attention_mask, T, config.temperature)
        with policy.disable_adapter():
            base, _ = policy_forward(policy, rollout.input_ids, rollout.attention_mask, T, config.temperature)
    rounding = (rollout.logprobs - own)[keep].abs().max()
    without_adapter = (rollout.logprobs - base)[keep].abs().max()
    assert rounding < 0.1
    assert without_adapter > 5 * rounding


def test_a_round_trains_on_bfloat16_rollouts(policy, tiny_tokenizer):
    config = make_config(sampling_dtype="bfloat16")
    trainer = FirmLocalTrainer(policy, tiny_tokenizer, MultiObjectiveValueHead(32, 2),
                               [LengthReward(), LetterEReward()], config)
    before = {name: p.detach().clone() for name, p in lora_parameters(policy).items()}
    torch.manual_seed(0)
    stats = trainer.train_round(make_prompts(), random.Random(0))
    assert isinstance(stats, RoundStats)
    assert stats.steps == config.ppo_epochs * config.num_minibatches and stats.skipped_steps == 0
    assert all(abs(sum(lam) - 1) < 1e-6 for lam in stats.lambdas)
    assert any(not torch.equal(p, before[name]) for name, p in lora_parameters(policy).items())


def test_config_refuses_unknown_sampling_dtypes_and_bfloat16_policies():
    with pytest.raises(ConfigError, match="sampling_dtype must be one of"):
        make_config(sampling_dtype="float16").validate()
    with pytest.raises(ConfigError, match="copy of a float32 policy"):
        make_config(sampling_dtype="bfloat16", dtype="bfloat16").validate()
