"""Rollouts: sample responses from the policy, and read its per-token log-probs.

``generate`` renders prompts with the chat template and samples with a KV cache (``sample``).
The behaviour log-probs and the hidden states the critic reads come out of that same pass (no
second forward; equal to a full forward to float rounding, tests/test_fast_paths.py). The LoRA
adapter is merged into the base while sampling and the base restored bit for bit after
(models.merged_lora). Each token is drawn by inverse CDF (``draw_tokens``: one uniform number
per row instead of one per vocabulary entry, the same distribution); ``multinomial_tokens``
reproduces transformers' generate() token for token. With ``sampling_dtype = bfloat16`` the
tokens come from a bfloat16 copy of the merged policy (models.BFloat16Sampler).

``policy_outputs`` is the training-side counterpart: one forward over query + response that
gives the same log-probs with a graph.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from firm.config import FirmConfig
from firm.models import BFloat16Sampler, merged_lora
from firm.prompts import Prompt


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generate() uses them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 for every token up to and including the first EOS, 0 after it."""
    is_eos = response_ids == eos_token_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).float()


def predicting_positions(response_length: int) -> slice:
    """The positions whose hidden states predict the last ``response_length`` tokens."""
    return slice(-response_length - 1, -1)


def policy_outputs(model, input_ids, attention_mask, response_length: int, temperature: float):
    """Per-token log-probs of the response tokens, the hidden states that predicted them, and the
    whole last hidden-state tensor [B, L, H] the log-probs were computed from (the representation
    every LoRA gradient flows through; gram = last-hidden differentiates with respect to it)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                output_hidden_states=True, use_cache=False, logits_to_keep=response_length + 1)
    logits = out.logits[:, :-1, :] / temperature
    targets = input_ids[:, -response_length:]
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    representation = out.hidden_states[-1]
    return logprobs, representation[:, predicting_positions(response_length)], representation


def policy_forward(model, input_ids, attention_mask, response_length: int, temperature: float):
    """Per-token log-probs of the response tokens and the hidden states that predicted them."""
    logprobs, hidden, _ = policy_outputs(model, input_ids, attention_mask, response_length, temperature)
    return logprobs, hidden


@dataclass
class Generation:
    input_ids: torch.Tensor  # [B, P + T] query (left-padded) + response
    attention_mask: torch.Tensor  # [B, P + T]
    response_mask: torch.Tensor  # [B, T]
    responses: list[str]
    logprobs: torch.Tensor  # [B, T] log-prob of each sampled token (tempered), 0 after EOS
    hidden: torch.Tensor  # [B, T, H] last hidden state that predicted each sampled token


def draw_tokens(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` ([B, V], unnormalised, >= 0) by inverse CDF: one uniform
    number per row, located in the row's running sum (float64). The same distribution as
    torch.multinomial(probs, 1), which draws one exponential number per vocabulary entry: with
    SmolLM2's 49,152 tokens that was 10% of generation on a 2-core CPU (docs/performance.md).
    Zero-probability tokens are never drawn."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def multinomial_tokens(probs: torch.Tensor) -> torch.Tensor:
    """transformers' generate() draw: the same tokens as generate() for the same seed."""
    return torch.multinomial(probs, num_samples=1).squeeze(1)


@torch.no_grad()
def sample(model, input_ids, attention_mask, max_new_tokens: int, temperature: float, top_p: float,
           eos_token_id: int, pad_token_id: int, draw=draw_tokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ancestral sampling with a KV cache: [B, T] tokens, the log-prob of each under the tempered
    distribution softmax(logits / temperature) it was drawn from, and the [B, T, H] last hidden
    states that predicted them. After a row's EOS it gets pad tokens; the loop stops when every
    row has finished. Positions skip left padding, as in policy_forward. ``draw`` picks a token
    per row from the probabilities (multinomial_tokens reproduces generate() token for token)."""
    batch = input_ids.shape[0]
    step_ids, mask, positions = input_ids, attention_mask, position_ids_from_mask(attention_mask)
    cache: dict = {}
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    tokens, logprobs, hidden = [], [], []
    for _ in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    output_hidden_states=True, logits_to_keep=1, **cache)
        # transformers >= 5 names the cache `cache`, 4.x `past_key_values`
        cache = {"cache": out.cache} if getattr(out, "cache", None) is not None else {
            "past_key_values": out.past_key_values}
        scores = out.logits[:, -1].float() / temperature
        probs = torch.softmax(scores, dim=-1)  # as transformers' sampling computes it
        next_tokens = draw(_top_p_filter(probs, top_p) if top_p < 1.0 else probs)
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
        tokens.append(next_tokens)
        # log of the drawn token's probability, one full-vocabulary pass fewer than a log_softmax
        # (a drawn token's probability is never 0; the pad after EOS may be, so it gets 0)
        drawn = probs.gather(-1, next_tokens[:, None]).squeeze(-1)
        logprobs.append(torch.where(unfinished, torch.log(drawn), torch.zeros_like(drawn)))
        hidden.append(out.hidden_states[-1][:, -1])
        unfinished &= next_tokens != eos_token_id
        if not unfinished.any():
            break
        step_ids = next_tokens[:, None]
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        positions = positions[:, -1:] + 1
    return torch.stack(tokens, 1), torch.stack(logprobs, 1), torch.stack(hidden, 1)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    return probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))


@torch.no_grad()
def generate(policy, tokenizer, prompts: Sequence[Prompt], cfg: FirmConfig, merge_lora: bool = True,
             sampler: BFloat16Sampler | None = None) -> Generation:
    """Render prompts with the chat template and sample responses (KV cache on). The behaviour
    log-probs and the critic's hidden states come out of the same pass (no second forward), and
    with ``merge_lora`` the adapter is folded into the base while sampling (models.merged_lora).
    With a ``sampler`` (sampling_dtype = bfloat16) the tokens, behaviour log-probs and hidden
    states come from its bfloat16 copy of the merged policy instead."""
    texts = [tokenizer.apply_chat_template(p.chat_messages(), tokenize=False, add_generation_prompt=True)
             for p in prompts]
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=cfg.max_prompt_tokens,
                    add_special_tokens=False)
    policy.eval()
    enc = enc.to(policy.device)
    if sampler is not None:
        response_ids, logprobs, hidden = sample(sampler.refresh(), enc.input_ids, enc.attention_mask,
                                                cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                                tokenizer.eos_token_id, tokenizer.pad_token_id)
    else:
        with merged_lora(policy) if merge_lora else contextlib.nullcontext():
            response_ids, logprobs, hidden = sample(policy, enc.input_ids, enc.attention_mask, cfg.max_new_tokens,
                                                    cfg.temperature, cfg.top_p, tokenizer.eos_token_id,
                                                    tokenizer.pad_token_id)
    response_mask = response_mask_from_ids(response_ids, tokenizer.eos_token_id)
    attention_mask = torch.cat([enc.attention_mask, response_mask.long()], dim=1)
    lengths = response_mask.sum(-1).long()
    responses = [tokenizer.decode(ids[:n], skip_special_tokens=True).strip() for ids, n in zip(response_ids, lengths)]
    return Generation(torch.cat([enc.input_ids, response_ids], dim=1), attention_mask, response_mask, responses,
                      logprobs * response_mask, hidden)
