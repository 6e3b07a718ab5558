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
- "hf:<dataset>[:split]": `datasets.load_dataset`, records mapped as above.

Categories name where a prompt comes from as "group/subgroup"; the group (the part before
the first "/") is what the non-IID partitioner skews clients by: "ordinary"/"decline" for
the embedded set, "hh" for HH-RLHF transcripts, "instruction" for instruction data.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firm.errors import FirmError

USER, ASSISTANT = "user", "assistant"
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_HH_ROLE = {"Human": USER, "Assistant": ASSISTANT}
_HH_SPEAKER = {USER: "Human", ASSISTANT: "Assistant"}
_HH_TURN_MARKER = re.compile(r"\n\n(Human|Assistant):")

EMBEDDED_RESOURCE = "data/prompts.jsonl"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
JSON_SUFFIXES = (".json", ".json.gz")
ACCEPTED_SOURCES = (
    "'embedded' (the package's prompt set), "
    "a path to an existing .jsonl, .jsonl.gz, .json or .json.gz file, "
    "or 'hf:<dataset_name>[:split]' (Hugging Face Hub, needs network)"
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
        turns = "".join(f"\n\n{_HH_SPEAKER[role]}: {content}" for role, content in self.messages)
        return turns + HH_ASSISTANT


def parse_hh_transcript(text: str) -> tuple[tuple[str, str], ...]:
    """Split an HH-RLHF transcript "\\n\\nHuman: a\\n\\nAssistant: b..." into (role, content) turns.

    A trailing empty "\\n\\nAssistant:" is the cue for the reply to come, not a turn, so it is
    dropped: parsing `Prompt.hh_text()` gives back the prompt's messages. Contents are
    stripped. Empty turns before the last are kept (the full HH-RLHF set may hold some);
    only the final user message must have text, which `Prompt` checks.
    """
    if not text.startswith(HH_HUMAN):
        raise PromptFormatError(f"an HH transcript must start with {HH_HUMAN!r}, got {text[:40]!r}")
    if HH_ASSISTANT not in text:
        raise PromptFormatError(f"an HH transcript must contain {HH_ASSISTANT!r}")
    pieces = _HH_TURN_MARKER.split(text)  # ["", "Human", " a", "Assistant", " b", ...]
    turns = [(_HH_ROLE[speaker], content.strip()) for speaker, content in zip(pieces[1::2], pieces[2::2])]
    if turns[-1] == (ASSISTANT, ""):
        turns.pop()
    return tuple(turns)


def load_prompts(source: str, *, limit: int | None = None, seed: int = 0) -> list[Prompt]:
    """Load unique prompts from `source` ("embedded", a local file, or "hf:<name>[:split]").

    Duplicates (same messages) are dropped keeping the first: preference data repeats each
    prompt once per compared pair. `limit` takes a random subset of that size, the same one
    for the same seed, kept in source order.
    """
    if source == "embedded":
        prompts = load_embedded_prompts()
    elif source.startswith("hf:"):
        prompts = _load_hub_prompts(source)
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
    lines = _split_lines(resource.read_text(encoding="utf-8"))
    return _unique_prompts(_prompts_from_records(_jsonl_records(lines, name), name), name)


def _load_file_prompts(path: Path) -> list[Prompt]:
    name = str(path)
    lowered = path.name.lower()
    if lowered.endswith(JSONL_SUFFIXES):
        records = list(_jsonl_records(_split_lines(_read_text(path)), name))
    elif lowered.endswith(JSON_SUFFIXES):
        records = list(_json_document_records(_read_text(path), name))
    else:
        raise PromptFormatError(f"{name}: unsupported file type; expected one of {JSONL_SUFFIXES + JSON_SUFFIXES}")
    return _unique_prompts(_prompts_from_records(records, name), name)


def _read_text(path: Path) -> str:
    """Whole file as UTF-8 text, gunzipped when the name ends in .gz."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                return handle.read()
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise PromptFormatError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc


def _split_lines(text: str) -> list[str]:
    """JSONL lines; split on "\n" only, since str.splitlines also breaks on U+2028 that JSON strings may hold."""
    return text.split("\n")


def _jsonl_records(lines: Iterable[str], name: str) -> Iterator[tuple[str, Any]]:
    """(location "name:LINE", decoded object) for every non-blank line."""
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}:{line_number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFormatError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def _json_document_records(text: str, name: str) -> Iterator[tuple[str, Any]]:
    """Records of a .json file (a list of objects, or one object) with the line each starts on.

    The whole document is decoded once to report syntax errors with their line; a second
    pass walks the list with `raw_decode` only to learn where each element starts, so that
    an error about record 412 points at its line rather than at "record 412".
    """
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptFormatError(f"{name}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(document, list):
        yield f"{name}:{_line_of(text, _skip_whitespace(text, 0))}", document
        return
    decoder = json.JSONDecoder()
    position = _skip_whitespace(text, _skip_whitespace(text, 0) + 1)  # just past "["
    for element in document:
        _, end = decoder.raw_decode(text, position)
        yield f"{name}:{_line_of(text, position)}", element
        position = _skip_whitespace(text, end)
        if text[position] == ",":
            position = _skip_whitespace(text, position + 1)


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def _prompts_from_records(records: Iterable[tuple[str, Any]], name: str) -> list[Prompt]:
    prompts = []
    for where, record in records:
        try:
            prompts.append(prompt_from_record(record))
        except PromptFormatError as exc:
            raise PromptFormatError(f"{where}: {exc}") from None
    return prompts


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
            messages, default_category = parse_hh_transcript(prompt_text), "hh"
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
        messages, default_category = parse_hh_transcript(_hh_prompt_part(_string_field(record, "chosen"))), "hh"
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


def _hh_prompt_part(transcript: str) -> str:
    """Everything up to and including the last "\\n\\nAssistant:": the conversation before the judged reply."""
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise PromptFormatError(f"field 'chosen' is not an HH transcript: it has no {HH_ASSISTANT!r}")
    return transcript[: cut + len(HH_ASSISTANT)]


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


def _load_hub_prompts(source: str) -> list[Prompt]:
    """Load "hf:<name>[:split]" with `datasets`; the split defaults to "train"."""
    name, _, split = source[len("hf:"):].partition(":")
    split = split or "train"
    if not name:
        raise ValueError(f"prompt source {source!r} names no dataset; expected 'hf:<dataset_name>[:split]'")
    import datasets  # deferred: importing it costs seconds and only this path needs it

    try:
        rows = datasets.load_dataset(name, split=split)
    except OSError as exc:  # ConnectionError when offline, FileNotFoundError for unknown names
        raise ConnectionError(
            f"could not load {name!r} (split {split!r}) from the Hugging Face Hub: {exc}. The hub may be "
            "unreachable from this machine (or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set); download the data "
            "and pass a local .jsonl, .jsonl.gz, .json or .json.gz path as the prompt source instead."
        ) from exc
    records = ((f"{source} row {index}", row) for index, row in enumerate(rows))
    return _unique_prompts(_prompts_from_records(records, source), source)
