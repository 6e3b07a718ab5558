"""Prompt sets for FIRM's PPO rollouts.

Every client samples prompts from its shard, renders them with the policy's chat template
(`Prompt.chat_messages`) and asks the reward models to score the replies; HH-trained reward
models want the transcript in the HH-RLHF "Human:/Assistant:" form (`Prompt.hh_text`).

Sources accepted by `load_prompts`:
- "embedded": the package's own set (src/firm/data/prompts.jsonl), about 60% ordinary
  requests and 40% requests a careful assistant should decline, so both objectives
  (helpfulness and harmlessness) have something to push on without any download.
- a local .jsonl / .jsonl.gz / .json / .json.gz file whose records are, detected per record:
    * explicit prompts   {"prompt": "..."}  (plain text, or an HH transcript starting with
      "\\n\\nHuman:"); the AlpacaEval preference pairs are of this form,
    * instruction lists  {"instruction": "...", "input": "...", "subset": "..."},
    * HH-RLHF pairs      {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}:
      the prompt is `chosen` up to and including its last "\\n\\nAssistant:".
- "hf:<owner>/<name>[/<data_dir>][:split]": `datasets.load_dataset`, records mapped as above.

Files and hub datasets are read by firm.records, HH transcripts parsed by firm.hh.

Categories name where a prompt comes from as "group/subgroup"; the group (the part before
the first "/") is what the non-IID partitioner skews clients by: "ordinary"/"decline" for
the embedded set, "hh" for HH-RLHF transcripts, "instruction" for instruction data.
"""

from __future__ import annotations

import importlib.resources
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firm.errors import FirmError
from firm.hh import ASSISTANT, HH_HUMAN, USER, HHFormatError, parse_hh_transcript, render_hh, split_hh_transcript
from firm.records import HUB_FORM, HUB_PREFIX, RecordFileError, hub_records, jsonl_records, read_records

EMBEDDED_RESOURCE = "data/prompts.jsonl"
ACCEPTED_SOURCES = (
    "'embedded' (the package's prompt set), "
    "a path to an existing .jsonl, .jsonl.gz, .json or .json.gz file, "
    f"or '{HUB_FORM}' (Hugging Face Hub, needs network)"
)


class PromptFormatError(FirmError, ValueError):
    """A prompt source is malformed; the message names the file and 1-based line."""


@dataclass(frozen=True)
class Prompt:
    """A conversation that ends with the user's turn, waiting for the assistant's reply."""

    messages: tuple[tuple[str, str], ...]
    """((role, content), ...) with roles "user"/"assistant"; the last one is "user"."""
    category: str
    """"group/subgroup", e.g. "ordinary/coding", "decline/violence", "hh", "instruction/oasst"."""

    def __post_init__(self) -> None:
        if not self.messages:
            raise PromptFormatError("a prompt needs at least one message")
        for position, message in enumerate(self.messages, start=1):
            if not (isinstance(message, tuple) and len(message) == 2 and all(isinstance(x, str) for x in message)):
                raise PromptFormatError(f"message {position} must be a (role, content) pair of strings, got {message!r}")
            if message[0] not in (USER, ASSISTANT):
                raise PromptFormatError(f"message {position} has role {message[0]!r}; expected 'user' or 'assistant'")
        if self.messages[-1][0] != USER:
            raise PromptFormatError("the last message must come from the user (the policy writes the next reply)")
        if not self.messages[-1][1].strip():
            raise PromptFormatError("empty prompt: the last user message has no text")
        if not self.category.strip():
            raise PromptFormatError("the category must be a non-empty string")

    @property
    def text(self) -> str:
        """The last user message: what the policy is answering."""
        return self.messages[-1][1]

    @property
    def group(self) -> str:
        """Top-level part of the category ("ordinary" for "ordinary/coding"): the label non-IID splits skew by."""
        return self.category.split("/", 1)[0]

    def chat_messages(self) -> list[dict[str, str]]:
        """The conversation in the form `tokenizer.apply_chat_template` takes."""
        return [{"role": role, "content": content} for role, content in self.messages]

    def hh_text(self) -> str:
        """The HH-RLHF formulation "\\n\\nHuman: ...\\n\\nAssistant:" that HH reward models were trained on."""
        return render_hh(self.messages)


def load_prompts(source: str, *, limit: int | None = None, seed: int = 0) -> list[Prompt]:
    """Load unique prompts from `source` ("embedded", a local file, or "hf:<owner>/<name>[:split]").

    Duplicates (same messages) are dropped keeping the first: preference data repeats each
    prompt once per compared pair. `limit` takes a random subset of that size, the same one
    for the same seed, kept in source order.
    """
    if source == "embedded":
        prompts = load_embedded_prompts()
    elif source.startswith(HUB_PREFIX):
        prompts = _prompts_from_records(hub_records(source), source)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt source {source!r} is not an existing file; accepted forms: {ACCEPTED_SOURCES}")
        prompts = _load_file_prompts(path)
    return _take_random_subset(prompts, limit, seed, source) if limit is not None else prompts


def load_embedded_prompts() -> list[Prompt]:
    """The package's own prompt set: ordinary requests and requests to decline."""
    resource = importlib.resources.files("firm").joinpath(EMBEDDED_RESOURCE)
    name = f"firm/{EMBEDDED_RESOURCE}"
    lines = resource.read_text(encoding="utf-8").split("\n")
    return _prompts_from_records(jsonl_records(lines, name), name)


def _load_file_prompts(path: Path) -> list[Prompt]:
    return _prompts_from_records(read_records(path), str(path))


def _prompts_from_records(records: Iterable[tuple[str, Any]], name: str) -> list[Prompt]:
    """The unique prompts of (where, record) items; errors name the record's place."""
    prompts = []
    try:
        for where, record in records:
            try:
                prompts.append(prompt_from_record(record))
            except PromptFormatError as exc:
                raise PromptFormatError(f"{where}: {exc}") from None
    except RecordFileError as exc:
        raise PromptFormatError(str(exc)) from None
    return _unique_prompts(prompts, name)


def prompt_from_record(record: Any) -> Prompt:
    """Map one record (explicit prompt, instruction, or HH-RLHF pair) to a Prompt.

    Field precedence is prompt > instruction > chosen, since preference pairs with an
    explicit prompt also carry a `chosen` reply that is not a transcript.
    """
    if not isinstance(record, dict):
        raise PromptFormatError(f"expected a JSON object, got {type(record).__name__}")
    if "prompt" in record:
        prompt_text = _string_field(record, "prompt")
        if prompt_text.startswith(HH_HUMAN):
            messages, default_category = _parse_hh(prompt_text, "prompt"), "hh"
        else:
            messages, default_category = ((USER, prompt_text.strip()),), "instruction"
    elif "instruction" in record:
        instruction = _string_field(record, "instruction").strip()
        extra_input = _string_field(record, "input").strip() if record.get("input") is not None else ""
        if not instruction:
            raise PromptFormatError("empty prompt: the 'instruction' field has no text")
        text = f"{instruction}\n\n{extra_input}" if extra_input else instruction
        messages, default_category = ((USER, text),), "instruction"
    elif "chosen" in record:
        messages, default_category = _parse_hh(_string_field(record, "chosen"), "chosen", prompt_part=True), "hh"
    else:
        raise PromptFormatError(
            f"record has none of the fields 'prompt', 'instruction', 'chosen' (it has {sorted(record)})"
        )
    return Prompt(messages=messages, category=_category(record, default_category))


def _string_field(record: dict, field: str) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise PromptFormatError(f"field {field!r} must be a string, got {type(value).__name__}")
    return value


def _parse_hh(text: str, field: str, prompt_part: bool = False) -> tuple[tuple[str, str], ...]:
    """The turns of an HH transcript field; with ``prompt_part``, of the conversation before its
    last "\\n\\nAssistant:" (the judged reply of a preference pair is not part of the prompt)."""
    try:
        return parse_hh_transcript(split_hh_transcript(text)[0] if prompt_part else text)
    except HHFormatError as exc:
        raise PromptFormatError(f"field {field!r} is not an HH transcript: {exc}") from None


def _category(record: dict, default_group: str) -> str:
    """An explicit `category` wins; else the record's `subset` under the format's group; else the group."""
    if record.get("category") is not None:
        return _string_field(record, "category").strip()
    if record.get("subset") is not None:
        return f"{default_group}/{_string_field(record, 'subset').strip()}"
    return default_group


def _unique_prompts(prompts: list[Prompt], name: str) -> list[Prompt]:
    seen: set[tuple[tuple[str, str], ...]] = set()
    unique = []
    for prompt in prompts:
        if prompt.messages not in seen:
            seen.add(prompt.messages)
            unique.append(prompt)
    if not unique:
        raise PromptFormatError(f"{name}: no prompts found")
    return unique


def _take_random_subset(prompts: list[Prompt], limit: int, seed: int, source: str) -> list[Prompt]:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if limit > len(prompts):
        raise ValueError(f"limit {limit} exceeds the {len(prompts)} unique prompts in {source!r}")
    chosen = sorted(random.Random(seed).sample(range(len(prompts)), limit))
    return [prompts[i] for i in chosen]
