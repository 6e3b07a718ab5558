"""Tests for firm.rewards: spec parsing, the HF reward path on tiny saved models, the offline
proxies (relevance, civility), fitted/embedded dispatch, caching and error messages."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from firm import rewards
from firm.prompts import Prompt
from firm.rewards import RewardSpecError, build_reward, build_rewards, describe_reward
from firm.rewards.scorers import format_hh_input

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_reward_cache():
    """Each test sees an empty process cache, so caching assertions test this test's builds."""
    rewards.clear_reward_cache()
    yield
    rewards.clear_reward_cache()


def make_prompt(text: str) -> Prompt:
    return Prompt(messages=(("user", text),), category="ordinary/test")


def save_tiny_gpt2_reward(directory: Path, tokenizer) -> Path:
    """GPT-2 style: the tokenizer has no pad token and the config no pad_token_id."""
    torch.manual_seed(0)
    tokenizer.pad_token = None
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=4,
        num_labels=1, pad_token_id=None, eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2ForSequenceClassification(config)
    with torch.no_grad():  # an O(1) head, so a wrong pooled token moves scores far beyond 1e-5
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_llama_reward(directory: Path, tokenizer, config: LlamaConfig, num_labels: int = 1) -> Path:
    torch.manual_seed(1)
    config.num_labels = num_labels
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


PROMPTS = [
    make_prompt("How do I bake bread?"),
    make_prompt("Why is the sky blue? Please explain it to a child in a few short sentences."),
    make_prompt("What is the capital of France?"),
    make_prompt("Tell me a story about a dragon."),
    make_prompt("Hi"),
]
RESPONSES = [
    "Mix flour, water, yeast and salt, knead, let it rise and bake.",
    "Sunlight is scattered by the air.",
    "Paris.",
    "Once upon a time a dragon learned to read books, and it read every book in the land.",
    "Hello! How can I help you today?",
]


# ------------------------------------------------------------------------------------------
# Hugging Face sequence-classification reward models
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_hf_reward_scores_are_per_pair_deterministic_and_batch_size_invariant(
    architecture, tmp_path, tiny_tokenizer, tiny_llama_config
):
    if architecture == "gpt2":
        path = save_tiny_gpt2_reward(tmp_path / "tiny-gpt2-rm", tiny_tokenizer)
    else:
        path = save_tiny_llama_reward(tmp_path / "tiny-llama-rm", tiny_tokenizer, tiny_llama_config)

    one_at_a_time = build_reward(str(path), batch_size=1)
    batched = build_reward(str(path), batch_size=4)  # 5 pairs: a padded batch of 4, then 1

    scores = batched.score(PROMPTS, RESPONSES)
    assert scores.shape == (len(PROMPTS),)
    assert scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.equal(scores, batched.score(PROMPTS, RESPONSES))
    torch.testing.assert_close(scores, one_at_a_time.score(PROMPTS, RESPONSES), rtol=0, atol=1e-5)
    assert scores.std() > 1e-2, "scores should differ between pairs, else the test proves nothing"
    assert batched.name == path.name


def test_hf_reward_pad_token_falls_back_to_eos_for_gpt2_style_tokenizers(tmp_path, tiny_tokenizer):
    path = save_tiny_gpt2_reward(tmp_path / "rm", tiny_tokenizer)
    reward = build_reward(f"hf:{path}")
    assert reward.tokenizer.pad_token == reward.tokenizer.eos_token
    assert reward.model.config.pad_token_id == reward.tokenizer.pad_token_id


def test_hf_reward_truncates_from_the_left_so_the_response_survives(tmp_path, tiny_tokenizer, tiny_llama_config):
    path = save_tiny_llama_reward(tmp_path / "rm", tiny_tokenizer, tiny_llama_config)
    reward = build_reward(str(path), max_length=24)
    shared_tail = " and then tell me more about the blue sky over the quiet city tonight please"
    prompt_a = make_prompt("apple " * 40 + shared_tail)
    prompt_b = make_prompt("zebra " * 40 + shared_tail)
    good, bad = "Sunlight is scattered.", "Paris is big."

    scores = reward.score([prompt_a, prompt_b, prompt_a], [good, good, bad])

    # Heads differ and are cut off; the kept end (tail + response) is identical.
    assert scores[0].item() == pytest.approx(scores[1].item(), abs=1e-5)
    # The response is inside the kept window, so changing it changes the score.
    assert abs(scores[0].item() - scores[2].item()) > 1e-3


def test_hf_reward_reads_the_hh_formulation():
    prompt = make_prompt("Why is the sky blue?")
    assert format_hh_input(prompt, "Scattering.") == (
        "\n\nHuman: Why is the sky blue?\n\nAssistant: Scattering."
    )


def test_hf_reward_rejects_multi_label_classifiers(tmp_path, tiny_tokenizer, tiny_llama_config):
    path = save_tiny_llama_reward(tmp_path / "classifier", tiny_tokenizer, tiny_llama_config, num_labels=2)
    with pytest.raises(RewardSpecError, match="num_labels=2"):
        build_reward(str(path))


def test_hf_reward_rejects_a_language_model_without_reward_head(tmp_path, tiny_tokenizer, tiny_llama_config):
    tiny_llama_config.num_labels = 1
    LlamaForCausalLM(tiny_llama_config).save_pretrained(tmp_path / "plain-lm")
    tiny_tokenizer.save_pretrained(tmp_path / "plain-lm")
    with pytest.raises(RewardSpecError, match="no reward head"):
        build_reward(str(tmp_path / "plain-lm"))


def test_missing_local_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(RewardSpecError, match="no such directory"):
        build_reward(str(missing))
    with pytest.raises(RewardSpecError, match="no such directory"):
        build_reward(f"hf:{missing}")


def test_directory_without_model_files_is_a_clear_error(tmp_path):
    with pytest.raises(RewardSpecError, match="neither firm_reward.json nor config.json"):
        build_reward(str(tmp_path))
    with pytest.raises(RewardSpecError, match="has no config.json"):
        build_reward(f"hf:{tmp_path}")


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network wait
    with pytest.raises(RewardSpecError) as caught:
        build_reward("hf:no-such-org/no-such-reward-model")
    message = str(caught.value)
    assert "could not load reward model 'no-such-org/no-such-reward-model'" in message
    assert "pass a local path or use an embedded reward" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# ------------------------------------------------------------------------------------------
# Offline proxies
# ------------------------------------------------------------------------------------------


def test_relevance_prefers_relevant_over_unrelated_responses():
    reward = build_reward("relevance")
    prompts = [
        make_prompt("How do I bake a loaf of bread at home?"),
        make_prompt("Why is the sky blue?"),
        make_prompt("What is the capital of France?"),
    ]
    relevant = [
        "Mix flour, water, yeast and salt, knead the dough, let it rise, then bake it in a hot oven.",
        "Air molecules scatter blue sunlight more strongly than red light, so the sky looks blue.",
        "Paris is the capital city of France.",
    ]
    unrelated = [
        "The stock market closed higher on Tuesday after strong earnings reports.",
        "My favourite football team lost the match last weekend.",
        "Use a wrench to tighten the bolts on the bicycle wheel.",
    ]
    relevant_scores = reward.score(prompts, relevant)
    unrelated_scores = reward.score(prompts, unrelated)
    assert reward.name == "relevance"
    assert relevant_scores.shape == (3,) and relevant_scores.dtype == torch.float32
    assert torch.all(relevant_scores > unrelated_scores + 0.1), (relevant_scores, unrelated_scores)
    assert torch.all(relevant_scores.abs() <= 1.0 + 1e-5)


def test_civility_scores_abuse_below_politeness():
    reward = build_reward("civility")
    prompt = make_prompt("Can you help me with my homework?")
    scores = reward.score([prompt, prompt], [
        "Shut up, you stupid worthless idiot. Go to hell.",
        "Of course, I would be glad to help. Which subject is it?",
    ])
    assert reward.name == "civility"
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert 0.0 <= scores.min() and scores.max() <= 1.0
    assert scores[0] < 0.5 < scores[1]


@pytest.mark.parametrize("spec", ["relevance", "civility"])
def test_score_checks_batch_shapes(spec):
    reward = build_reward(spec)
    assert reward.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        reward.score([make_prompt("a"), make_prompt("b")], ["x"])
    with pytest.raises(ValueError, match="not a str"):
        reward.score([make_prompt("a")], [[1, 2, 3]])


# ------------------------------------------------------------------------------------------
# Fitted and embedded reward models
# ------------------------------------------------------------------------------------------


class FakeFittedRewardModel:
    """Stands in for firm.rewards.fitted.FittedRewardModel, recording how it was loaded."""

    def __init__(self, path: str, device: str):
        self.path, self.device = path, device
        self.name = Path(path).name + "-fitted"

    @classmethod
    def load(cls, path, device="cpu"):
        return cls(str(path), device)

    def score(self, prompts, responses):
        return torch.zeros(len(responses))


@pytest.fixture
def fake_fitted_module(monkeypatch):
    module = types.ModuleType("firm.rewards.fitted")
    module.FittedRewardModel = FakeFittedRewardModel
    monkeypatch.setitem(sys.modules, "firm.rewards.fitted", module)
    return module


def make_fitted_dir(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "firm_reward.json").write_text("{}")
    (directory / "config.json").write_text("{}")  # fitted takes precedence over an HF config
    return directory


def test_directory_with_firm_reward_json_loads_a_fitted_model(tmp_path, fake_fitted_module):
    path = make_fitted_dir(tmp_path / "helpful")
    reward = build_reward(str(path), device="cpu")
    assert isinstance(reward, FakeFittedRewardModel)
    assert reward.path == str(path.resolve()) and reward.device == "cpu"
    assert reward.name == "helpful-fitted"
    assert build_reward(str(path), batch_size=3) is reward  # one load per (path, device)


def test_fitted_model_unavailable_is_a_clear_error(tmp_path, monkeypatch):
    path = make_fitted_dir(tmp_path / "helpful")
    monkeypatch.setitem(sys.modules, "firm.rewards.fitted", None)  # makes the import fail
    with pytest.raises(RewardSpecError, match="fitted reward models are not available"):
        build_reward(str(path))


def test_embedded_spec_resolves_inside_the_package_folder(tmp_path, monkeypatch, fake_fitted_module):
    monkeypatch.setattr(rewards, "embedded_rewards_dir", lambda: tmp_path)
    make_fitted_dir(tmp_path / "harmless")
    make_fitted_dir(tmp_path / "helpful")
    (tmp_path / "not-a-model").mkdir()

    reward = build_reward("embedded:harmless")
    assert reward.path == str((tmp_path / "harmless").resolve())
    assert rewards.available_embedded_rewards() == ["harmless", "helpful"]
    with pytest.raises(RewardSpecError, match=r"no embedded reward model named 'kind'.*harmless, helpful"):
        build_reward("embedded:kind")


def test_embedded_spec_with_no_embedded_models_says_none(tmp_path, monkeypatch):
    monkeypatch.setattr(rewards, "embedded_rewards_dir", lambda: tmp_path / "absent")
    with pytest.raises(RewardSpecError, match="none are installed"):
        build_reward("embedded:helpful")
    with pytest.raises(RewardSpecError, match="plain folder name"):
        build_reward("embedded:../helpful")


# ------------------------------------------------------------------------------------------
# Specs, names, caching
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["bogus-reward", "", "   ", "org/model-without-hf-prefix"])
def test_unknown_spec_lists_accepted_forms(spec):
    with pytest.raises(RewardSpecError) as caught:
        build_reward(spec)
    message = str(caught.value)
    assert repr(spec) in message
    if spec.strip():
        assert "accepted forms" in message and "'hf:<hub id or local path>'" in message


def test_build_rewards_rejects_two_specs_with_the_same_name(tmp_path, tiny_tokenizer):
    first = save_tiny_gpt2_reward(tmp_path / "a" / "rm", tiny_tokenizer)
    second = save_tiny_gpt2_reward(tmp_path / "b" / "rm", tiny_tokenizer)
    with pytest.raises(RewardSpecError, match="both give the objective name 'rm'"):
        build_rewards([str(first), str(second)])
    with pytest.raises(RewardSpecError, match="listed twice"):
        build_rewards(["civility", "civility"])
    with pytest.raises(RewardSpecError, match="single string"):
        build_rewards("civility")
    with pytest.raises(RewardSpecError, match="no reward specs"):
        build_rewards([])


def test_build_rewards_returns_one_named_model_per_objective(tmp_path, tiny_tokenizer):
    path = save_tiny_gpt2_reward(tmp_path / "tiny-rm", tiny_tokenizer)
    built = build_rewards([f"hf:{path}", "civility"], batch_size=2)
    assert [reward.name for reward in built] == ["tiny-rm", "civility"]
    assert built[0].batch_size == 2


def test_cache_returns_the_same_object_and_shares_weights(tmp_path, tiny_tokenizer):
    assert build_reward("civility") is build_reward("civility")
    path = save_tiny_gpt2_reward(tmp_path / "rm", tiny_tokenizer)
    plain = build_reward(str(path))
    assert build_reward(f"hf:{path}") is plain  # same directory, same object
    other_batch = build_reward(str(path), batch_size=1)
    assert other_batch is not plain and other_batch.model is plain.model


def test_describe_reward_is_one_line_per_kind(tmp_path, tiny_tokenizer):
    path = save_tiny_gpt2_reward(tmp_path / "rm", tiny_tokenizer)
    for spec, expected in [("relevance", "topical echo"), ("civility", "53.5%"), (str(path), str(path))]:
        description = describe_reward(spec)
        assert expected in description and "\n" not in description
    with pytest.raises(RewardSpecError):
        describe_reward("bogus-reward")


def test_build_reward_rejects_bad_settings():
    with pytest.raises(ValueError, match="batch_size"):
        build_reward("civility", batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        build_reward("civility", max_length=1)
