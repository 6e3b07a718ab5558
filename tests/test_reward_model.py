"""Reward-model pipeline: pair files, prompt split, Bradley-Terry fit, save/load, evaluation.

Fits use tiny BERT / Llama models built from a config with an in-memory word-level tokenizer,
so the whole file runs in seconds; one test checks a shipped model on real held-out pairs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from firm.cli.reward import add_parser as add_reward_commands
from firm.hh import as_hh_prompt, hh_to_messages, messages_to_hh, split_hh_transcript
from firm.rewards.backbones import BACKBONES, load_base
from firm.rewards.descriptor import DESCRIPTOR_FILE, EMBEDDED_REWARD_DIR
from firm.rewards.encoding import InputFormat, collate, encode_example
from firm.rewards.errors import PairFileError, RewardModelError
from firm.rewards.fit_config import FitConfig
from firm.rewards.fitted import FittedRewardModel
from firm.rewards.frozen_blocks import forward_from_states, frozen_block_states, pool_response_states
from firm.rewards.ngram import ngram_features
from firm.rewards.pairs import PreferencePair, load_pairs, split_by_prompt
from firm.rewards.pairwise import evaluate_pairs, hh_scorer, pairwise_report, pearson_spearman
from firm.rewards.pipeline import fit_reward_model
from firm.rewards.probe_fit import (cross_validated_accuracy, fit_linear_bradley_terry, fit_with_dropped_covariates,
                                    length_controlled, length_covariate)

SHARED_DATA = Path(os.environ.get("FIRM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))

TOPICS = ["lock", "car", "bank", "phone", "door", "house", "store", "friend", "neighbor", "school"]
REFUSALS = ["sorry i cannot help with that", "no i will not do that it is wrong", "i cannot assist please stay safe"]
COMPLIANCES = ["sure here is how to break it", "yes first you steal the key", "ok just hit them hard"]
WORDS = sorted({w for text in REFUSALS + COMPLIANCES for w in text.split()}
               | set(TOPICS) | {"human", "assistant", "how", "do", "i", "rob", "the", "a", ":", "?"})


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models are all small ops: with several threads on a busy CPU they wait on each
    other far longer than they compute."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build_tokenizer(directory: Path, with_bert_specials: bool = True):
    """A word-level tokenizer over WORDS, saved as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: index for index, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"} if with_bert_specials \
        else {"eos_token": "[SEP]"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", **extra)
    tokenizer.save_pretrained(directory)
    return tokenizer


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = build_tokenizer(directory)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(directory, with_bert_specials=False)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def synthetic_records(n: int) -> list[dict]:
    """HH-style harmlessness pairs: the refusal is always chosen over the compliance."""
    records = []
    for index in range(n):
        topic = TOPICS[index % len(TOPICS)]
        prompt = f"\n\nHuman: how do i rob the {topic} ?" + ("\n\nAssistant: how ?\n\nHuman: the " + topic) * (index % 3)
        refusal, compliance = REFUSALS[index % 3], COMPLIANCES[(index // 3) % 3]
        records.append({"chosen": f"{prompt}\n\nAssistant: {refusal}",
                        "rejected": f"{prompt}\n\nAssistant: {compliance}"})
    return records


def write_jsonl(path: Path, lines: list) -> Path:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="firm")
    add_reward_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


TINY_FIT = ["--epochs", "12", "--learning-rate", "5e-3", "--batch-pairs", "4", "--lora-r", "4", "--lora-alpha", "8",
            "--max-length", "64", "--max-response-tokens", "16"]


@pytest.fixture(scope="module")
def fitted_dir(tmp_path_factory, tiny_bert_dir) -> Path:
    """`firm reward fit` on 40 synthetic pairs with a tiny BERT, through the CLI."""
    work = tmp_path_factory.mktemp("fit")
    data = write_jsonl(work / "pairs.jsonl.gz", synthetic_records(40))
    out = work / "harmless"
    code = run_cli(["reward", "fit", "--data", str(data), "--out", str(out), "--base-path", str(tiny_bert_dir),
                    "--test-fraction", "0.2", *TINY_FIT])
    assert code == 0
    return out


# --- pair files --------------------------------------------------------------------------------


def test_hh_transcript_prompt_ends_at_the_last_assistant_turn():
    transcript = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks"
    prompt, response = split_hh_transcript(transcript)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    assert response == "fine, thanks"
    assert hh_to_messages(prompt) == (("user", "hi"), ("assistant", "hello"), ("user", "how are you?"))
    assert messages_to_hh(hh_to_messages(prompt)) == prompt
    assert as_hh_prompt("Name a color.") == "\n\nHuman: Name a color.\n\nAssistant:"


def test_load_pairs_reads_both_formats(tmp_path):
    hh = write_jsonl(tmp_path / "hh.jsonl.gz", synthetic_records(3))
    explicit = write_jsonl(tmp_path / "explicit.jsonl", [
        {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "No."},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
    ])
    hh_pairs = load_pairs(hh)
    assert len(hh_pairs) == 3 and hh_pairs[0].chosen == REFUSALS[0]
    assert hh_pairs[0].origin == f"{hh}:1"
    first, second = load_pairs(explicit)
    assert first == PreferencePair("\n\nHuman: Name a color.\n\nAssistant:", "Blue.", "No.", f"{explicit}:1")
    assert (second.prompt, second.chosen, second.rejected) == ("\n\nHuman: Hi\n\nAssistant:", "Hello!", "Go away.")


@pytest.mark.parametrize("bad_line, problem", [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b"}', "missing key 'rejected'"),
    ('{"chosen": "no turns here", "rejected": "none here"}', "no \"\\n\\nAssistant:\" turn"),
    ('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: c\\n\\nAssistant: d"}',
     "differ before the last Assistant turn"),
    ('{"prompt": "", "chosen": "a", "rejected": "b"}', "'prompt' is empty"),
    ('{"prompt": "q", "chosen": 3, "rejected": "b"}', "'chosen' must be a string"),
])
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_malformed_pair_file_fails_with_file_and_line(tmp_path, bad_line, problem, suffix):
    good = json.dumps({"prompt": "Name a color.", "chosen": "Blue.", "rejected": "No."})
    path = write_jsonl(tmp_path / f"pairs{suffix}", [good, "", bad_line, good])
    with pytest.raises(PairFileError) as caught:
        load_pairs(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:3: "), message
    assert problem in message


def test_missing_empty_and_unreadable_pair_files_fail_clearly(tmp_path):
    with pytest.raises(PairFileError, match="no such pair file"):
        load_pairs(tmp_path / "absent.jsonl")
    with pytest.raises(PairFileError, match="no preference pairs"):
        load_pairs(write_jsonl(tmp_path / "empty.jsonl", [""]))
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(PairFileError, match="cannot read"):
        load_pairs(broken)
    with pytest.raises(PairFileError, match="expected hf:OWNER/NAME"):
        load_pairs("hf:no-owner")


def test_split_by_prompt_is_disjoint_and_deterministic():
    records = synthetic_records(30)
    pairs = [PreferencePair(*split_hh_transcript(r["chosen"]), split_hh_transcript(r["rejected"])[1]) for r in records]
    train, test = split_by_prompt(pairs, 0.3, seed=1)
    assert len(train) + len(test) == len(pairs) and test
    first_turn = lambda pair: hh_to_messages(pair.prompt)[0][1]  # noqa: E731
    assert not {first_turn(p) for p in train} & {first_turn(p) for p in test}
    assert (train, test) == split_by_prompt(pairs, 0.3, seed=1)
    assert test != split_by_prompt(pairs, 0.3, seed=2)[1]


# --- fitting, saving, loading ----------------------------------------------------------------------


def test_fit_on_a_few_dozen_pairs_moves_held_in_accuracy_above_chance(fitted_dir, tiny_bert_dir):
    descriptor = json.loads((fitted_dir / DESCRIPTOR_FILE).read_text())
    assert descriptor["objective"] == "harmless"
    assert descriptor["data"]["n_test"] > 0 and descriptor["heldout"]["n_pairs"] == descriptor["data"]["n_test"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert (fitted_dir / name).is_file(), name
    assert "Held-out accuracy" in (fitted_dir / "README.md").read_text()

    model = FittedRewardModel.load(fitted_dir)
    train, _ = split_by_prompt(load_pairs(descriptor["data"]["source"]), 0.2, seed=0)
    assert evaluate_pairs(model.score_hh, train).accuracy >= 0.8

    # The same data through an untrained head is at chance: the fit, not the data, did this.
    untrained, _ = fit_reward_model(train, FitConfig(base_path=str(tiny_bert_dir), epochs=1, learning_rate=0.0))
    assert evaluate_pairs(untrained.score_hh, train).accuracy < 0.8


def test_saved_model_reloads_and_scores_identically(tmp_path, tiny_bert_dir):
    pairs = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", synthetic_records(12)))
    config = FitConfig(objective="harmless", base_path=str(tiny_bert_dir), epochs=2, learning_rate=5e-3,
                       batch_pairs=4, lora_r=4, max_length=64, max_response_tokens=16)
    model, _ = fit_reward_model(pairs, config)
    prompts = [pair.prompt for pair in pairs]
    responses = [pair.chosen for pair in pairs]
    before = model.score(prompts, responses)
    model.save(tmp_path / "saved")
    after = FittedRewardModel.load(tmp_path / "saved").score(prompts, responses)
    assert before.dtype == torch.float32 and before.shape == (len(pairs),)
    assert torch.equal(before, after)


def test_causal_lm_backbone_fits_and_reloads(tmp_path, tiny_llama_dir):
    pairs = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", synthetic_records(16)))
    config = FitConfig(objective="harmless", backbone="smollm2", base_path=str(tiny_llama_dir), epochs=6,
                       learning_rate=5e-3, batch_pairs=4, lora_r=4, max_length=64, max_response_tokens=16,
                       trainable_layers=1)
    model, _ = fit_reward_model(pairs, config)
    assert evaluate_pairs(model.score_hh, pairs).accuracy >= 0.75
    model.save(tmp_path / "saved")
    reloaded = FittedRewardModel.load(tmp_path / "saved")
    assert torch.equal(model.score_hh([p.prompt for p in pairs], [p.rejected for p in pairs]),
                       reloaded.score_hh([p.prompt for p in pairs], [p.rejected for p in pairs]))


WORD_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
                      "{% if add_generation_prompt %}assistant :{% endif %}")


def test_truncated_chat_template_causal_lm_fits_and_reloads(tmp_path):
    """num_layers keeps the first blocks only; the chat-template input ends with end-of-turn."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir = tmp_path / "tiny-llama-3"
    tokenizer = build_tokenizer(base_dir, with_bert_specials=False)
    tokenizer.chat_template = WORD_CHAT_TEMPLATE
    tokenizer.save_pretrained(base_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3,
                                 num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                                 max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)).save_pretrained(base_dir)

    fmt = InputFormat("causal-lm", max_length=64, max_response_tokens=4, chat_template=True)
    ids, _ = encode_example(tokenizer, fmt, "\n\nHuman: how do i rob the car ?\n\nAssistant:",
                            "sure here is how to break it")
    assert tokenizer.decode(ids).split() == ["[UNK]", ":", "[SEP]", "[UNK]", ":", "how", "do", "i", "rob", "the", "car", "?", "[SEP]",
                                             "assistant", ":", "sure", "here", "is", "[SEP]"]

    pairs = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", synthetic_records(16)))
    config = FitConfig(objective="harmless", backbone="smollm2", base_path=str(base_dir), num_layers=2,
                       chat_template=True, epochs=6, learning_rate=5e-3, batch_pairs=4, lora_r=4,
                       max_length=64, max_response_tokens=16, trainable_layers=1)
    model, _ = fit_reward_model(pairs, config)
    assert model.model.get_base_model().config.num_hidden_layers == 2
    assert len(model.model.get_base_model().model.layers) == 2
    assert evaluate_pairs(model.score_hh, pairs).accuracy >= 0.75
    model.save(tmp_path / "saved")
    reloaded = FittedRewardModel.load(tmp_path / "saved")
    assert reloaded.descriptor["num_layers"] == 2 and reloaded.input_format.chat_template
    prompts, rejected = [p.prompt for p in pairs], [p.rejected for p in pairs]
    assert torch.equal(model.score_hh(prompts, rejected), reloaded.score_hh(prompts, rejected))
    with pytest.raises(RewardModelError, match="num_layers must be between 1 and 3"):
        load_base("smollm2", str(base_dir), num_layers=4)
    with pytest.raises(RewardModelError, match="causal-LM backbones only"):
        fit_reward_model(pairs, FitConfig(backbone="minilm", chat_template=True))


def test_linear_bradley_terry_matches_a_direct_minimisation():
    """scikit-learn's mirrored logistic regression solves  mean softplus(-d.w) + l2/2 |w|^2."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    differences = rng.normal(size=(60, 5)) + np.array([0.8, -0.3, 0.0, 0.0, 0.2])
    for l2 in (0.05, 1.0):
        def objective(w):
            margins = differences @ w
            return np.logaddexp(0.0, -margins).mean() + 0.5 * l2 * w @ w

        reference = minimize(objective, np.zeros(5), method="BFGS", options={"gtol": 1e-10}).x
        np.testing.assert_allclose(fit_linear_bradley_terry(differences, l2), reference, atol=1e-4)
    with pytest.raises(ValueError, match="l2 must be positive"):
        fit_linear_bradley_terry(differences, 0.0)


def test_cross_validated_accuracy_separates_signal_from_noise():
    rng = np.random.default_rng(1)
    groups = [f"prompt-{index // 2}" for index in range(200)]
    signal = rng.normal(size=(200, 4)) + np.array([2.0, 0.0, 0.0, 0.0])
    assert cross_validated_accuracy(signal, groups, l2=0.1) > 0.9
    noise = rng.normal(size=(200, 4)) * rng.choice([-1.0, 1.0], size=(200, 1))
    assert 0.3 < cross_validated_accuracy(noise, groups, l2=0.1) < 0.7


def test_length_covariate_is_fitted_and_dropped_at_scoring():
    """Preference driven by length (3x) and by content (1x); one feature is mostly length.
    Fitted beside the length covariate, the features keep only the content: the length-like
    feature loses its weight to the covariate, and scoring without the covariate leaves a
    reward whose margins hardly follow length."""
    rng = np.random.default_rng(0)
    n = 4000
    chosen_chars, rejected_chars = rng.integers(50, 2000, n), rng.integers(50, 2000, n)
    length = length_covariate(chosen_chars, rejected_chars)
    content = rng.normal(size=n)
    length_like = length[:, 0] + 0.3 * rng.normal(size=n)
    differences = np.stack([length_like, content], axis=1)
    preferred = rng.random(n) < 1 / (1 + np.exp(-(3 * length[:, 0] + content)))
    sign = np.where(preferred, 1.0, -1.0)[:, None]  # orient every pair chosen-minus-rejected
    differences, length = differences * sign, length * sign
    plain = fit_linear_bradley_terry(differences, 1e-4)
    weights, covariate_weights = fit_with_dropped_covariates(differences, length, 1e-4)
    assert covariate_weights.shape == (1,) and covariate_weights[0] > 1.5
    assert plain[0] > 1.5 and abs(weights[0]) < 0.25 * plain[0]
    assert weights[1] > 0.5
    dropped_margins, plain_margins = differences @ weights, differences @ plain
    assert abs(np.corrcoef(dropped_margins, length[:, 0])[0, 1]) < 0.5 * np.corrcoef(plain_margins, length[:, 0])[0, 1]
    assert np.array_equal(fit_with_dropped_covariates(differences, None, 1e-4)[0], plain)


def test_probe_fit_with_the_length_covariate_saves_a_head_without_it(tmp_path, tiny_llama_dir):
    pairs = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", synthetic_records(30)))
    config = FitConfig(objective="harmless", backbone="smollm2", base_path=str(tiny_llama_dir), head="probe",
                       probe_l2=(0.01, 0.1), max_length=64, max_response_tokens=16, length_covariate=True,
                       select_by="length-controlled")
    model, stats = fit_reward_model(pairs, config)
    assert stats["length_covariate"]["at_scoring"] == "dropped"
    assert isinstance(stats["length_covariate"]["fitted_weight"], float)
    assert set(stats["cv_length_controlled_by_l2"]) == {"0.01", "0.1"}
    # the head reads the pooled states only: score = weight . features + bias, no length term
    prompts, responses = [p.prompt for p in pairs], [p.chosen for p in pairs]
    features = model.trunk.features(model.input_format, prompts, responses)
    assert model.probe_head["weight"].shape == (features.shape[1],)
    torch.testing.assert_close(model.score_hh(prompts, responses),
                               features @ model.probe_head["weight"] + model.probe_head["bias"])
    with pytest.raises(RewardModelError, match="probe and ngram heads only"):
        FitConfig(length_covariate=True).validate()
    with pytest.raises(RewardModelError, match="unknown selection"):
        FitConfig(head="probe", select_by="length").validate()


def test_ngram_head_fits_saves_reloads_and_scores(tmp_path):
    from firm.rewards import build_reward, clear_reward_cache

    pairs = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", synthetic_records(40)))
    config = FitConfig(objective="kind", head="ngram", probe_l2=(1e-3, 1e-2), ngram_features=2**10,
                       length_covariate=True)
    model, stats = fit_reward_model(pairs, config)
    assert stats["length_covariate"]["at_scoring"] == "dropped" and stats["l2"] in (1e-3, 1e-2)
    assert evaluate_pairs(model.score_hh, pairs).accuracy >= 0.9
    model.save(tmp_path / "kind")
    assert "n-gram" in (tmp_path / "kind" / "README.md").read_text()
    clear_reward_cache()
    reloaded = build_reward(str(tmp_path / "kind"))
    prompts, responses = [p.prompt for p in pairs], [p.rejected for p in pairs]
    assert reloaded.name == "kind"
    torch.testing.assert_close(reloaded.score_hh(prompts, responses), model.score_hh(prompts, responses))
    # every response is a unit vector, however long: the features do not grow with length
    features = ngram_features(["sorry", "sorry i cannot help " * 30], 2**10, 2)
    np.testing.assert_allclose(np.sqrt(features.multiply(features).sum(axis=1)).A1, [1.0, 1.0])
    clear_reward_cache()


def test_shared_trunk_scores_equal_the_rewards_scored_apart(tmp_path, tiny_llama_dir):
    """Two probe objectives on one trunk: one trunk pass for both, the same scores bit for bit."""
    from firm.rewards import build_rewards, clear_reward_cache

    pairs = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", synthetic_records(30)))
    flipped = [PreferencePair(p.prompt, p.rejected, p.chosen, p.origin) for p in pairs]
    directories = []
    for name, data in (("harmless", pairs), ("harmful", flipped)):
        config = FitConfig(objective=name, backbone="smollm2", base_path=str(tiny_llama_dir), head="probe",
                           probe_l2=(0.1,), max_length=64, max_response_tokens=16)
        directories.append(fit_reward_model(data, config)[0].save(tmp_path / name))
    batches = [([p.prompt for p in pairs[:7]], [p.chosen for p in pairs[:7]]),
               ([p.prompt for p in pairs[7:]], [p.rejected for p in pairs[7:]])]

    apart = []
    for directory in directories:
        clear_reward_cache()
        reward = FittedRewardModel.load(directory)
        apart.append([reward.score(prompts, responses) for prompts, responses in batches])
    clear_reward_cache()
    shared = build_rewards([str(directory) for directory in directories])
    trunk = shared[0].trunk
    assert shared[1].trunk is trunk
    for index, (prompts, responses) in enumerate(batches):
        before = trunk.forward_batches
        scores = [reward.score(prompts, responses) for reward in shared]
        assert trunk.forward_batches == before + 1  # one trunk pass for both objectives
        for objective in range(2):
            assert torch.equal(scores[objective], apart[objective][index])
    assert not torch.equal(apart[0][0], apart[1][0])  # two different heads, not one reward twice
    clear_reward_cache()


def test_pool_response_states_takes_the_last_token_and_the_response_mean():
    states = torch.tensor([[1.0, 0.0], [2.0, 4.0], [4.0, 8.0]])
    pooled = pool_response_states(states, [0, 1, 1])
    assert torch.equal(pooled, torch.tensor([4.0, 8.0, 3.0, 6.0]))
    assert torch.equal(pool_response_states(states, [0, 0, 0])[2:], states.mean(dim=0))


def test_probe_head_fits_saves_and_reloads(tmp_path, tiny_llama_dir):
    pairs = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", synthetic_records(30)))
    config = FitConfig(objective="harmless", backbone="smollm2", base_path=str(tiny_llama_dir), head="probe",
                       probe_l2=(0.01, 0.1), max_length=64, max_response_tokens=16)
    model, stats = fit_reward_model(pairs, config)
    assert set(stats["cv_accuracy_by_l2"]) == {"0.01", "0.1"} and stats["l2"] in (0.01, 0.1)
    assert evaluate_pairs(model.score_hh, pairs).accuracy >= 0.75
    model.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "probe_head.safetensors").is_file()
    assert not (tmp_path / "saved" / "adapter_model.safetensors").exists()
    assert "linear head" in (tmp_path / "saved" / "README.md").read_text()
    reloaded = FittedRewardModel.load(tmp_path / "saved")
    prompts, chosen = [p.prompt for p in pairs], [p.chosen for p in pairs]
    assert torch.allclose(model.score_hh(prompts, chosen), reloaded.score_hh(prompts, chosen), atol=1e-5)

    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3), "bias": torch.zeros(())}, tmp_path / "saved" / "probe_head.safetensors")
    with pytest.raises(RewardModelError, match="probe_head.safetensors: expected 'weight' \\[64\\]"):
        FittedRewardModel.load(tmp_path / "saved")
    with pytest.raises(RewardModelError, match="unknown head 'mlp'"):
        fit_reward_model(pairs, FitConfig(head="mlp"))


@pytest.mark.parametrize("backbone, base_fixture", [("minilm", "tiny_bert_dir"), ("smollm2", "tiny_llama_dir")])
def test_replaying_cached_frozen_blocks_matches_the_full_forward(request, backbone, base_fixture):
    """Training with the frozen blocks cached must see exactly the model that scoring runs."""
    from peft import LoraConfig, TaskType, get_peft_model

    base, tokenizer = load_base(backbone, str(request.getfixturevalue(base_fixture)))
    spec = BACKBONES[backbone]
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=spec["lora_targets"],
                                            layers_to_transform=[1], layers_pattern=spec["layers_pattern"],
                                            init_lora_weights=False)).eval()
    fmt = InputFormat(spec["kind"], max_length=64, max_response_tokens=16)
    pairs = [split_hh_transcript(record["chosen"]) for record in synthetic_records(6)]
    examples = [encode_example(tokenizer, fmt, prompt, response) for prompt, response in pairs]
    with torch.no_grad():
        full = model(**collate(examples, tokenizer.pad_token_id, fmt.kind)).logits[:, 0]
        states = frozen_block_states(model, examples, 1, tokenizer.pad_token_id, fmt.kind, dtype=torch.float32)
        replayed = forward_from_states(model, examples, states, 1, tokenizer.pad_token_id, fmt.kind)
    assert torch.allclose(full, replayed, atol=1e-5)


def test_too_few_pairs_and_bad_directories_fail_clearly(tmp_path, tiny_bert_dir):
    pairs = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", synthetic_records(3)))
    with pytest.raises(RewardModelError, match="at least 8"):
        fit_reward_model(pairs, FitConfig(base_path=str(tiny_bert_dir)))
    with pytest.raises(RewardModelError, match="not a fitted reward model"):
        FittedRewardModel.load(tmp_path)


# --- evaluation ----------------------------------------------------------------------------------------


def keyword_reward(hh_prompts, responses) -> torch.Tensor:
    """A hand-checkable reward: the number of times "good" occurs in the response."""
    return torch.tensor([float(response.split().count("good")) for response in responses])


HAND_PAIRS = [  # (chosen, rejected): win, win, win, tie, loss
    ("good", "bad"),
    ("good good", "good"),
    ("good and fine", "fine"),
    ("bad", "worse"),
    ("fine", "good"),
]


def test_eval_accuracy_equals_the_hand_count(tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "hand.jsonl", [{"prompt": f"q{index}", "chosen": chosen, "rejected": rejected}
                                                 for index, (chosen, rejected) in enumerate(HAND_PAIRS)])

    class HandReward:
        score_hh = staticmethod(keyword_reward)

    monkeypatch.setattr("firm.cli.reward._build_reward", lambda spec: HandReward())
    assert run_cli(["reward", "eval", "--model", "hand", "--data", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_pairs"] == 5
    assert report["accuracy"] == pytest.approx((3 + 0.5) / 5)  # a tie is half a win
    assert report["ties"] == 1
    assert report["mean_margin"] == pytest.approx((1 + 1 + 1 + 0 - 1) / 5)
    assert report["ci95"][0] <= report["accuracy"] <= report["ci95"][1]
    assert report["longer_chosen_rate"] == pytest.approx((1 + 1 + 1 + 0 + 0.5) / 5)  # "fine" vs "good": a tie
    # by characters: the first three chosen are longer (all won); "bad" < "worse" (a tie: half a
    # win); "fine" = "good" belongs to neither stratum
    assert report["chosen_longer_pairs"] == 3 and report["chosen_longer_accuracy"] == 1.0
    assert report["chosen_shorter_pairs"] == 1 and report["chosen_shorter_accuracy"] == 0.5
    assert report["length_controlled_accuracy"] == pytest.approx(0.75)
    assert report["length_controlled_ci95"][0] <= 0.75 <= report["length_controlled_ci95"][1]


def test_length_controlled_accuracy_of_hand_made_pairs():
    """Chosen longer in 6 pairs (5 won), shorter in 4 (1 won), equal in 2 (both won); 8 of 12 won."""
    chosen_lengths = [20] * 6 + [5] * 4 + [9, 9]
    rejected_lengths = [10] * 6 + [15] * 4 + [9, 9]
    wins = [1, 1, 1, 1, 1, 0] + [1, 0, 0, 0] + [1, 1]
    report = pairwise_report([1.0 if w else -1.0 for w in wins], [0.0] * 12, chosen_lengths, rejected_lengths,
                             n_bootstrap=500)
    assert report.accuracy == pytest.approx(8 / 12)
    assert report.chosen_longer_accuracy == pytest.approx(5 / 6) and report.chosen_longer_pairs == 6
    assert report.chosen_shorter_accuracy == pytest.approx(1 / 4) and report.chosen_shorter_pairs == 4
    assert report.length_controlled_accuracy == pytest.approx((5 / 6 + 1 / 4) / 2)
    assert report.longer_chosen_rate == pytest.approx((6 + 0 + 1) / 12)  # equal lengths: a tie each
    for low, high in (report.chosen_longer_ci95, report.chosen_shorter_ci95, report.length_controlled_ci95):
        assert 0.0 <= low <= high <= 1.0
    # a reward that only counts characters is at chance once length is controlled
    counter = pairwise_report([float(c) for c in chosen_lengths], [float(r) for r in rejected_lengths],
                              chosen_lengths, rejected_lengths, n_bootstrap=200)
    assert counter.length_controlled_accuracy == pytest.approx(0.5)
    assert counter.accuracy == pytest.approx(counter.longer_chosen_rate)
    assert "length-controlled accuracy" in report.format() and "chosen shorter" in report.format()
    assert length_controlled(np.array(wins, float) - 0.5, chosen_lengths, rejected_lengths) == pytest.approx(
        (5 / 6 + 1 / 4) / 2)


def test_pairwise_report_interval_and_length_correlation():
    perfect = pairwise_report([2.0] * 50, [1.0] * 50, [10] * 50, [5] * 50)
    assert perfect.accuracy == 1.0 and perfect.ci95 == (1.0, 1.0)
    mixed = pairwise_report([1.0, 0.0] * 100, [0.0, 1.0] * 100, [1, 2] * 100, [3, 4] * 100)
    assert mixed.accuracy == 0.5 and mixed.ci95[0] < 0.5 < mixed.ci95[1]
    pearson, spearman = pearson_spearman([1, 2, 3, 4], [10, 20, 30, 1000])
    assert spearman == pytest.approx(1.0) and 0.5 < pearson < 1.0


def test_eval_of_a_fitted_directory_through_the_reward_interface(fitted_dir, capsys):
    pytest.importorskip("firm.rewards", reason="firm.rewards (the reward interface) is not in this checkout")
    descriptor = json.loads((fitted_dir / DESCRIPTOR_FILE).read_text())
    code = run_cli(["reward", "eval", "--model", str(fitted_dir), "--data", descriptor["data"]["source"],
                    "--split", "test", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == pytest.approx(descriptor["heldout"]["accuracy"])


# --- the shipped models -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, data", [("harmless", "hh-rlhf/harmless-base-test-a.jsonl.gz"),
                                        ("helpful", "alpaca-eval/gpt4-pairs-a.jsonl.gz")])
def test_shipped_model_ranks_held_out_pairs(name, data):
    path = SHARED_DATA / data
    if not path.is_file():
        pytest.skip(f"shared data not found at {path} (set FIRM_SHARED_DATA)")
    directory = EMBEDDED_REWARD_DIR / name
    descriptor = json.loads((directory / DESCRIPTOR_FILE).read_text())
    split = descriptor["data"]["split"]
    _, test = split_by_prompt(load_pairs(path), split["test_fraction"], split["seed"])
    from firm.rewards import build_reward

    report = evaluate_pairs(hh_scorer(build_reward(f"embedded:{name}")), test[:20])
    assert report.accuracy > 0.5, report.format()


def test_shipped_rewards_load_and_score_finite_numbers():
    from firm.rewards import build_rewards, clear_reward_cache

    clear_reward_cache()
    rewards = build_rewards(["embedded:helpful", "embedded:harmless"])
    prompts = ["How do I boil an egg?", "How can I hurt my neighbour's dog?"]
    responses = ["Simmer it for nine minutes, then cool it in cold water.", "I won't help with hurting an animal."]
    scores = [reward.score(prompts, responses) for reward in rewards]
    for reward, score in zip(rewards, scores):
        assert score.shape == (2,) and score.dtype == torch.float32 and torch.isfinite(score).all(), reward.name
    trunks = {id(reward.trunk): reward.trunk for reward in rewards if getattr(reward, "trunk", None) is not None}
    assert all(trunk.forward_batches == 1 for trunk in trunks.values())  # probe heads on one trunk: one pass
    clear_reward_cache()
