"""How a (prompt, response) pair becomes the token ids a fitted reward model reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from firm.hh import SYSTEM, hh_to_messages

Example = tuple[list[int], list[int]]
"""(token ids, token types) of one (prompt, response); type 1 marks the response."""


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


def encode_example(tokenizer, fmt: InputFormat, hh_prompt: str, response: str) -> Example:
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
        if not messages or messages[0]["role"] != SYSTEM:
            messages.insert(0, {"role": SYSTEM, "content": ""})
        prompt_ids = tokens(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        # The end-of-turn token closes the reply even when the reply is cut: the head reads it.
        response_ids = tokens(response)[: fmt.max_response_tokens - 1] + [tokenizer.eos_token_id]
    else:
        # The HH transcript (firm.hh.hh_transcript), prompt and " " + response tokenized apart.
        response_ids = tokens(" " + response)[: fmt.max_response_tokens]
    room = max(fmt.max_length - len(response_ids), 0)
    prompt_ids = prompt_ids[max(len(prompt_ids) - room, 0):] if room else []
    return [*prompt_ids, *response_ids], [0] * len(prompt_ids) + [1] * len(response_ids)


def encode_pairs(tokenizer, fmt: InputFormat, pairs: Sequence) -> tuple[list[Example], list[Example]]:
    """The encoded chosen and the encoded rejected response of every preference pair."""
    chosen = [encode_example(tokenizer, fmt, pair.prompt, pair.chosen) for pair in pairs]
    rejected = [encode_example(tokenizer, fmt, pair.prompt, pair.rejected) for pair in pairs]
    return chosen, rejected


def collate(examples: Sequence[Example], pad_id: int, kind: str) -> dict[str, torch.Tensor]:
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


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length, so padding costs little."""
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
