"""Preference pairs: what reward models are fitted and evaluated on.

A pair says that for a prompt (HH formulation, ending in "\\n\\nAssistant:") the ``chosen``
response was preferred to the ``rejected`` one. Pairs are read from a .jsonl / .jsonl.gz /
.json / .json.gz file or a hub dataset (firm.records), and split by prompt so that no prompt
is both trained on and tested on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from firm.hh import ASSISTANT, HH_HUMAN, as_hh_prompt, hh_turns, messages_to_hh, split_hh_transcript
from firm.records import HUB_PREFIX, HubDatasetError, Record, RecordFileError, hub_records, read_records
from firm.rewards.errors import PairFileError


@dataclass(frozen=True)
class PreferencePair:
    """One judgement: for ``prompt`` (HH formulation, ending in "\\n\\nAssistant:"), the
    ``chosen`` response was preferred to the ``rejected`` one. ``origin`` says where it came
    from ("path:line") so that later errors can point back at the data."""

    prompt: str
    chosen: str
    rejected: str
    origin: str = ""


def prompt_group_key(hh_prompt: str) -> str:
    """The key that decides which side of the train/test split a pair lands on: the first
    human turn, whitespace-normalised. Grouping on the opening request (not the whole
    transcript) keeps continuations of one conversation on the same side as well."""
    first_turn = hh_turns(hh_prompt)[0][1] if hh_prompt.startswith(HH_HUMAN) else hh_prompt
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
    if role != ASSISTANT:
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


def load_pairs(source: str | Path, limit: int | None = None) -> list[PreferencePair]:
    """Read preference pairs from a local .jsonl / .jsonl.gz / .json / .json.gz file or
    ``hf:OWNER/NAME[/DATA_DIR][:SPLIT]``.

    Every malformed record raises PairFileError("path:LINE: what is wrong"): a reward model
    silently trained on half-parsed data is worse than none."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        records, what = hub_records(text), "the dataset split is empty"
    else:
        path = Path(text)
        if not path.is_file():
            raise PairFileError(f"{path}: no such pair file")
        records, what = read_records(path), "no preference pairs in the file"
    try:
        pairs = _collect_pairs(records, limit)
    except (RecordFileError, HubDatasetError) as error:
        raise PairFileError(str(error)) from None
    if not pairs:
        raise PairFileError(f"{text}: {what}")
    return pairs


def _collect_pairs(records: Iterable[Record], limit: int | None) -> list[PreferencePair]:
    """Parse (where, record) items into pairs, naming the place of the first bad record."""
    pairs: list[PreferencePair] = []
    for where, record in records:
        try:
            prompt, chosen, rejected = parse_pair_record(record)
        except ValueError as error:  # HHFormatError is one
            raise PairFileError(f"{where}: {error}") from None
        pairs.append(PreferencePair(prompt, chosen, rejected, where))
        if limit is not None and len(pairs) >= limit:
            break
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
