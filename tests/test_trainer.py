"""The local FIRM update on a tiny randomly initialised Llama (2 layers, hidden 32).

Two cheap deterministic reward models that want different things (long responses vs. responses
full of the letter 'e') give the trainer two genuinely different per-objective gradients. Each
test checks one promise of `firm.trainer` against an independent computation: lambda on the
simplex, only LoRA moves, the reference is the base model, the update is sum_m lambda_m g_m from
ONE forward pass, linear/MGDA weights, skipped steps, and the Flower-facing summary.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from transformers import LlamaForCausalLM

import firm.federation.client_app as client_app
from firm.federation import client_state
from firm.fsmgda.client import FsmgdaLocalTrainer
from firm.config import FirmConfig
from firm.mgda import solve_weights
from firm.models import MultiObjectiveValueHead, adapter_state, add_lora, load_adapter_state, lora_parameters
from firm.prompts import Prompt
from firm.sampling import policy_forward, position_ids_from_mask, response_mask_from_ids
from firm.trainer import FirmLocalTrainer, RoundStats, summarize

torch.set_num_threads(1)

PROMPT_TEXTS = (
    "How can I bake bread at home?",
    "Why is the sky blue?",
    "Tell me a story about a dragon.",
    "What is the capital of France?",
    "Please explain how to knead dough.",
    "Thank you for the kind question!",
)


# ---- reward models ----------------------------------------------------------------------------
@dataclass
class LengthReward:
    """Longer is better: the number of characters of the response."""

    name: str = "length"

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        return torch.tensor([float(len(r)) for r in responses])


@dataclass
class LetterEReward:
    """The fraction of characters that are the letter 'e' (0 for an empty response)."""

    name: str = "letter_e"

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        return torch.tensor([r.count("e") / len(r) if r else 0.0 for r in responses])


@dataclass
class ConstantReward:
    name: str = "constant"

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        return torch.full((len(responses),), 3.0)


@dataclass
class NaNReward:
    name: str = "nan"

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        return torch.full((len(responses),), float("nan"))


# ---- builders ---------------------------------------------------------------------------------
def make_prompts() -> list[Prompt]:
    return [Prompt(messages=(("user", text),), category="ordinary/x") for text in PROMPT_TEXTS]


def make_config(**overrides) -> FirmConfig:
    values = dict(
        rollout_batch_size=4,
        max_new_tokens=8,
        ppo_epochs=2,
        num_minibatches=2,
        max_prompt_tokens=32,
        rewards="a,b",  # placeholders: the trainer receives reward objects directly
        lora_r=4,
        lora_alpha=8,
        learning_rate=1e-2,
    )
    values.update(overrides)
    return FirmConfig(**values).validate()


def make_base(tiny_llama_config) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config).eval()


def wrap(base: LlamaForCausalLM):
    torch.manual_seed(1)
    return add_lora(base, r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))


def make_trainer(policy, tokenizer, config: FirmConfig, rewards=None, trainer_cls=FirmLocalTrainer):
    rewards = rewards if rewards is not None else [LengthReward(), LetterEReward()]
    hidden = policy.get_base_model().config.hidden_size
    value_head = MultiObjectiveValueHead(hidden, len(rewards))
    return trainer_cls(policy, tokenizer, value_head, rewards, config)


@pytest.fixture
def policy(tiny_llama_config):
    return wrap(make_base(tiny_llama_config))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def one_minibatch(trainer: FirmLocalTrainer, seed: int = 0):
    """A rollout and its advantages, ready for firm_step on the first two sequences."""
    torch.manual_seed(seed)
    rollout = trainer.rollout(make_prompts()[:4])
    advantages, returns, _ = trainer.advantages(rollout)
    return rollout, torch.tensor([0, 1]), advantages, returns


class RecordingTrainer(FirmLocalTrainer):
    """Records every Gram matrix handed to the weight solver and the weights it returned."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grams: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []

    def objective_weights(self, gram: np.ndarray) -> np.ndarray:
        weights = super().objective_weights(gram)
        self.grams.append(gram.copy())
        self.weights.append(weights.copy())
        return weights


# ---- train_round ------------------------------------------------------------------------------
def test_train_round_keeps_lambda_on_simplex_and_moves_only_lora(policy, tiny_tokenizer):
    config = make_config()
    trainer = make_trainer(policy, tiny_tokenizer, config)
    before = snapshot(policy)

    stats = trainer.train_round(make_prompts(), random.Random(0))

    assert stats.skipped_steps == 0
    assert stats.steps == config.ppo_epochs * config.num_minibatches > 0
    assert len(stats.lambdas) == stats.steps
    for lam in stats.lambdas:
        assert lam.shape == (2,)
        assert np.all(lam >= 0)
        assert abs(lam.sum() - 1.0) <= 1e-9
    assert stats.num_examples == config.rollout_batch_size

    lora = lora_parameters(policy)
    lora_b = [p for name, p in lora.items() if "lora_B" in name]
    assert lora_b and any(bool(p.abs().sum() > 0) for p in lora_b), "lora_B is still all zero"
    for name, param in policy.named_parameters():
        if "lora_" in name:
            continue
        assert not param.requires_grad, f"base parameter {name} is trainable"
        assert torch.equal(param, before[name]), f"base parameter {name} changed"
    assert any(not torch.equal(lora[name], before[name]) for name in lora)


def test_train_round_runs_on_a_half_precision_policy(tiny_llama_config, tiny_tokenizer):
    # GPU users load the base in bfloat16; the float32 critic and the float64 MGDA direction
    # must meet it without dtype errors, and the LoRA update must still happen.
    policy = wrap(make_base(tiny_llama_config).to(torch.bfloat16))
    trainer = make_trainer(policy, tiny_tokenizer, make_config(dtype="bfloat16"))
    before = {name: p.detach().clone() for name, p in lora_parameters(policy).items()}
    stats = trainer.train_round(make_prompts(), random.Random(0))
    assert stats.skipped_steps == 0 and stats.steps > 0
    assert all(np.isfinite(stats.value_losses)) and all(np.isfinite(stats.policy_losses))
    assert any(not torch.equal(p, before[name]) for name, p in lora_parameters(policy).items())


def test_reference_logprobs_are_the_base_model(tiny_llama_config, tiny_tokenizer):
    base = make_base(tiny_llama_config)
    untouched_base = copy.deepcopy(base)
    policy = wrap(base)
    trainer = make_trainer(policy, tiny_tokenizer, make_config())
    trainer.train_round(make_prompts(), random.Random(0))  # LoRA is now non-zero

    torch.manual_seed(3)
    rollout = trainer.rollout(make_prompts()[:4])
    with torch.no_grad():
        base_logprobs, _ = policy_forward(untouched_base, rollout.input_ids, rollout.attention_mask,
                                          rollout.response_length, trainer.config.temperature)
    mask = rollout.response_mask.bool()
    assert torch.equal(rollout.ref_logprobs[mask], base_logprobs[mask])
    # ... and the behaviour log-probs are those of the adapted policy, which differ.
    assert not torch.allclose(rollout.logprobs[mask], base_logprobs[mask], atol=1e-6)


def test_update_direction_is_lambda_weighted_sum_of_objective_gradients(policy, tiny_tokenizer, monkeypatch):
    config = make_config(max_grad_norm=1e12)  # no clipping: the step sees the raw direction
    trainer = make_trainer(policy, tiny_tokenizer, config, trainer_cls=RecordingTrainer)
    rollout, idx, advantages, returns = one_minibatch(trainer)

    lora = trainer.lora_params
    objective_grads: list[torch.Tensor] = []
    real_grad = torch.autograd.grad

    def spy_grad(outputs, inputs, *args, **kwargs):
        grads = real_grad(outputs, inputs, *args, **kwargs)
        if list(inputs) == lora:
            # one call per objective, or one batched call (is_grads_batched) holding all of them
            rows = range(len(outputs)) if kwargs.get("is_grads_batched") else [None]
            for m in rows:
                objective_grads.append(torch.cat([
                    (g if g is not None else torch.zeros_like(p))[() if m is None else m].reshape(-1)
                    for g, p in zip(grads, lora)
                ]).detach().clone())
        return grads

    applied: list[torch.Tensor] = []
    real_step = trainer.optimizer.step

    def spy_step(*args, **kwargs):
        applied.append(torch.cat([p.grad.reshape(-1) for p in lora]).detach().clone())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy_grad)
    monkeypatch.setattr(trainer.optimizer, "step", spy_step)
    stats = RoundStats()
    trainer.firm_step(rollout, idx, advantages, returns, stats)

    assert stats.steps == 1 and stats.skipped_steps == 0
    assert len(objective_grads) == 2 and len(applied) == 1
    flat = torch.stack(objective_grads).double()
    [gram], [lam] = trainer.grams, trainer.weights
    np.testing.assert_allclose(gram, (flat @ flat.T).numpy(), rtol=1e-12)
    assert np.array_equal(lam, stats.lambdas[0])
    cosine = gram[0, 1] / np.sqrt(gram[0, 0] * gram[1, 1])
    assert cosine < 0.999, "the two rewards should pull in different directions"
    expected = (torch.from_numpy(lam) @ flat).float()
    torch.testing.assert_close(applied[0], expected, rtol=1e-6, atol=1e-12)


def test_per_objective_gradients_come_from_one_forward_pass(policy, tiny_tokenizer):
    trainer = make_trainer(policy, tiny_tokenizer, make_config())
    rollout, idx, advantages, returns = one_minibatch(trainer)
    calls = []
    trunk = policy.get_base_model().model  # the decoder stack every policy forward runs through
    handle = trunk.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        stats = RoundStats()
        trainer.firm_step(rollout, idx, advantages, returns, stats)
    finally:
        handle.remove()
    assert stats.steps == 1
    assert len(calls) == 1


# ---- algorithms -------------------------------------------------------------------------------
def test_linear_uses_the_preference_exactly(policy, tiny_tokenizer):
    config = make_config(algorithm="linear", preference="0.3,0.7")
    trainer = make_trainer(policy, tiny_tokenizer, config)
    stats = trainer.train_round(make_prompts(), random.Random(0))
    assert stats.steps > 0
    for lam in stats.lambdas:
        assert np.array_equal(lam, np.array([0.3, 0.7]))


@pytest.mark.parametrize("algorithm, expected_beta", [("mgda", 0.0), ("firm", 0.5)])
def test_mgda_and_firm_solve_with_their_beta(policy, tiny_tokenizer, algorithm, expected_beta):
    config = make_config(algorithm=algorithm, beta=0.5, preference="0.2,0.8")
    trainer = make_trainer(policy, tiny_tokenizer, config, trainer_cls=RecordingTrainer)
    stats = trainer.train_round(make_prompts(), random.Random(0))
    assert stats.steps == len(trainer.grams) > 0
    for gram, lam in zip(trainer.grams, stats.lambdas):
        assert np.array_equal(lam, solve_weights(gram, beta=expected_beta, preference=[0.2, 0.8]))


def test_fsmgda_client_update_is_one_linear_round_per_unit_preference(tiny_llama_config, tiny_tokenizer):
    """FSMGDA's M adapters are M independent single-objective updates from the same start and
    the same rollouts: adapter m equals a linear round with preference e_m (no clipping, so the
    critic, which the M passes share, cannot touch the LoRA step)."""

    def fresh_trainer(trainer_cls=FirmLocalTrainer, **overrides):
        policy = wrap(make_base(tiny_llama_config))
        return make_trainer(policy, tiny_tokenizer, make_config(max_grad_norm=1e12, **overrides),
                            trainer_cls=trainer_cls)

    trainer = fresh_trainer(FsmgdaLocalTrainer, algorithm="fsmgda")
    start = adapter_state(trainer.policy)
    torch.manual_seed(5)
    stats, adapters = trainer.train_round_per_objective(make_prompts(), random.Random(0))

    assert len(adapters) == 2
    steps_per_objective = trainer.config.ppo_epochs * trainer.config.num_minibatches
    assert stats.steps == 2 * steps_per_objective and stats.num_examples == trainer.config.rollout_batch_size
    unit_vectors = [[1.0, 0.0]] * steps_per_objective + [[0.0, 1.0]] * steps_per_objective
    assert [lam.tolist() for lam in stats.lambdas] == unit_vectors
    for m, preference in enumerate(("1,0", "0,1")):
        linear = fresh_trainer(algorithm="linear", preference=preference)
        assert all(torch.equal(v, start[k]) for k, v in adapter_state(linear.policy).items())
        torch.manual_seed(5)
        linear.train_round(make_prompts(), random.Random(0))
        for key, value in adapter_state(linear.policy).items():
            assert torch.equal(adapters[m][key], value), f"objective {m}: {key} differs from the linear round"
    assert any(not torch.equal(adapters[0][k], adapters[1][k]) for k in start)


# ---- skipped steps and bad rewards ------------------------------------------------------------
@pytest.mark.parametrize("gram", ["exact", "last-hidden"])
def test_all_zero_gradients_skip_every_step_and_leave_lora_unchanged(policy, tiny_tokenizer, gram):
    config = make_config(kl_coef=0.0, gram=gram)
    trainer = make_trainer(policy, tiny_tokenizer, config, rewards=[ConstantReward(), ConstantReward("c2")])
    before = snapshot(policy)
    head_before = snapshot(trainer.value_head)

    stats = trainer.train_round(make_prompts(), random.Random(0))

    assert stats.steps == 0
    assert stats.skipped_steps == config.ppo_epochs * config.num_minibatches
    assert stats.lambdas == []
    for name, param in policy.named_parameters():
        assert torch.equal(param, before[name]), f"{name} changed in an all-skipped round"
    for name, param in trainer.value_head.named_parameters():
        assert torch.equal(param, head_before[name])
    metrics = summarize(stats, ["constant", "c2"])
    assert metrics["skipped_steps"] == stats.skipped_steps and metrics["steps"] == 0


def test_nan_reward_raises_before_any_update(policy, tiny_tokenizer):
    trainer = make_trainer(policy, tiny_tokenizer, make_config(), rewards=[LengthReward(), NaNReward()])
    before = snapshot(policy)
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.train_round(make_prompts(), random.Random(0))
    for name, param in policy.named_parameters():
        assert torch.equal(param, before[name])
    assert trainer.optimizer.state_dict()["state"] == {}
    assert trainer.reward_stats.count == 0


# ---- masks and positions ----------------------------------------------------------------------
def test_response_mask_covers_tokens_up_to_and_including_first_eos():
    eos = 2
    ids = torch.tensor([
        [5, 2, 7, 2],  # EOS in the middle: keep it, drop what follows
        [5, 6, 7, 8],  # no EOS: every token counts
        [2, 2, 2, 2],  # immediate EOS, then padding (pad = eos)
    ])
    expected = torch.tensor([
        [1.0, 1.0, 0.0, 0.0],
        [1.0, 1.0, 1.0, 1.0],
        [1.0, 0.0, 0.0, 0.0],
    ])
    mask = response_mask_from_ids(ids, eos)
    assert mask.dtype == torch.float32
    assert torch.equal(mask, expected)


def test_position_ids_skip_left_padding():
    attention_mask = torch.tensor([
        [0, 0, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [0, 1, 1, 1, 0],
    ])
    expected = torch.tensor([
        [0, 0, 0, 1, 2],
        [0, 1, 2, 3, 4],
        [0, 0, 1, 2, 2],
    ])
    assert torch.equal(position_ids_from_mask(attention_mask), expected)


def test_left_padded_logprobs_equal_unpadded_logprobs(tiny_llama_config):
    """A left-padded row scores like the same row alone: padding is masked out of attention.
    (Llama's rotary positions are relative, so this checks the mask, not the position ids.)"""
    model = make_base(tiny_llama_config)
    short = torch.tensor([[7, 8, 9, 10, 11]])
    padded = torch.tensor([[2, 2, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
    padded_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone, _ = policy_forward(model, short, torch.ones_like(short), 3, 0.8)
        batch, _ = policy_forward(model, padded, padded_mask, 3, 0.8)
    torch.testing.assert_close(batch[0], alone[0], rtol=1e-5, atol=1e-5)


# ---- summarize --------------------------------------------------------------------------------
def hand_made_stats(with_steps: bool) -> RoundStats:
    stats = RoundStats(
        scores=[torch.tensor([[1.0, 0.1], [3.0, 0.3]])],
        kl_per_sequence=[torch.tensor([0.5, 1.5])],
        response_tokens=[torch.tensor([4.0, 8.0])],
        num_examples=2,
    )
    if with_steps:
        stats.lambdas = [np.array([0.25, 0.75]), np.array([0.75, 0.25])]
        stats.cosines = [np.array([-0.5]), np.array([0.1])]
        stats.policy_losses, stats.value_losses = [0.1, 0.3], [1.0, 2.0]
        stats.approx_kls, stats.clipfracs = [0.01, 0.03], [0.0, 0.5]
        stats.steps = 2
    else:
        stats.skipped_steps = 4
    return stats


def test_summarize_has_identical_keys_and_shapes_whatever_happened():
    names = ["length", "letter_e"]
    trained = summarize(hand_made_stats(with_steps=True), names)
    skipped = summarize(hand_made_stats(with_steps=False), names)

    assert list(trained) == list(skipped)
    for key in trained:
        assert isinstance(trained[key], list) == isinstance(skipped[key], list), key
        if isinstance(trained[key], list):
            assert len(trained[key]) == len(skipped[key]), key
    assert trained["reward/length"] == pytest.approx(2.0)
    assert trained["reward/letter_e"] == pytest.approx(0.2)
    assert trained["kl"] == pytest.approx(1.0)
    assert trained["response_tokens"] == pytest.approx(6.0)
    assert trained["lambda_mean"] == pytest.approx([0.5, 0.5])
    assert trained["lambda_last"] == pytest.approx([0.75, 0.25])
    assert trained["grad_cosine"] == pytest.approx([-0.2])
    assert trained["num-examples"] == 2 and trained["steps"] == 2 and trained["skipped_steps"] == 0
    assert skipped["steps"] == 0 and skipped["skipped_steps"] == 4
    assert sum(skipped["lambda_mean"]) == pytest.approx(1.0)


def test_summarize_rejects_a_non_finite_metric():
    stats = hand_made_stats(with_steps=True)
    stats.value_losses = [float("nan"), 1.0]
    with pytest.raises(FloatingPointError, match="value_loss"):
        summarize(stats, ["length", "letter_e"])


# ---- the ClientApp's round, without messaging -------------------------------------------------
def test_run_local_update_keeps_critic_and_reward_stats_across_rounds(policy, tiny_tokenizer, monkeypatch):
    config = make_config()
    prompts = make_prompts()
    monkeypatch.setattr(client_app, "get_policy", lambda cfg: (policy, tiny_tokenizer))
    monkeypatch.setattr(client_app, "build_rewards", lambda specs, device: [LengthReward(), LetterEReward()])
    monkeypatch.setattr(client_app, "client_shard", lambda cfg, node_config: prompts)

    seen: list[dict] = []  # the trainer's state at the start of each round, after restore

    class SpyTrainer(FirmLocalTrainer):
        def train_round(self, shard, rng):
            seen.append({
                "adapter": adapter_state(self.policy),
                "head": {k: v.clone() for k, v in self.value_head.state_dict().items()},
                "count": self.reward_stats.count,
            })
            return super().train_round(shard, rng)

    monkeypatch.setattr(client_app, "FirmLocalTrainer", SpyTrainer)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2, "allow-server-models": "true"},
                      state=RecordDict(), run_config={})
    adapter0 = adapter_state(policy)

    adapter1, metrics1, samples1 = client_app.run_local_update(config, adapter0, context, 1)
    assert client_state.STATE_VALUE_HEAD in context.state.array_records
    assert client_state.STATE_CLIENT in context.state.config_records
    saved = context.state.config_records[client_state.STATE_CLIENT]
    assert saved["reward_count"] == config.rollout_batch_size
    head1 = context.state.array_records[client_state.STATE_VALUE_HEAD].to_torch_state_dict()
    assert any(bool(v.abs().sum() > 0) for v in head1.values()), "the critic did not train"
    assert metrics1["partition-id"] == 0 and metrics1["num-examples"] == config.rollout_batch_size
    assert samples1 == []  # sample_responses = 0: no private prompts leave the node
    assert any(not torch.equal(adapter1[k], adapter0[k]) for k in adapter0)

    load_adapter_state(policy, adapter0)  # the cached policy must not carry round 1 over by itself
    adapter2, metrics2, _ = client_app.run_local_update(config, adapter1, context, 2)

    assert seen[0]["count"] == 0
    assert seen[1]["count"] == config.rollout_batch_size  # restored from context.state
    for key, value in head1.items():
        assert torch.equal(seen[1]["head"][key], value), f"value head {key} not restored"
    for key, value in adapter1.items():
        assert torch.equal(seen[1]["adapter"][key], value), f"global adapter {key} not loaded"
    saved = context.state.config_records[client_state.STATE_CLIENT]
    assert saved["reward_count"] == 2 * config.rollout_batch_size
    assert list(metrics1) == list(metrics2)
    assert set(adapter2) == set(adapter0)


def test_run_local_update_for_fsmgda_packs_one_adapter_per_objective(policy, tiny_tokenizer, monkeypatch):
    config = make_config(algorithm="fsmgda")
    monkeypatch.setattr(client_app, "get_policy", lambda cfg: (policy, tiny_tokenizer))
    monkeypatch.setattr(client_app, "build_rewards", lambda specs, device: [LengthReward(), LetterEReward()])
    monkeypatch.setattr(client_app, "client_shard", lambda cfg, node_config: make_prompts())
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 2, "allow-server-models": "true"},
                      state=RecordDict(), run_config={})
    start = adapter_state(policy)

    upload, metrics, _ = client_app.run_local_update(config, start, context, 1)

    assert set(upload) == {f"objective-{m}/{k}" for m in range(2) for k in start}
    for key in start:
        assert upload[f"objective-0/{key}"].shape == start[key].shape
    assert any(not torch.equal(upload[f"objective-0/{k}"], upload[f"objective-1/{k}"]) for k in start)
    assert metrics["partition-id"] == 1
