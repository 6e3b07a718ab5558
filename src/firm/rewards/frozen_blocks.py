"""What the frozen blocks of a backbone compute, computed once.

When LoRA adapts only the top k blocks, the blocks below give the same output in every epoch.
Computing them once and replaying their output turns each later epoch into a pass through k
blocks, which is what makes fitting on a shared 2-core CPU take minutes, not hours. The replay
goes through the model's own forward (masks, pooler, head), with two swaps: the block list
holds only the top blocks, and the embedding layer's output is replaced by the cached states.

A probe head keeps every block frozen: its features are the pooled states of the top block
(`probe_features`), computed the same way.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from firm.rewards.backbones import backbone_parts
from firm.rewards.encoding import Example, collate, length_sorted_batches


@contextmanager
def _run_blocks(model, start: int, stop: int | None, embedding_output: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block, the model's forward runs only blocks[start:stop], fed with
    ``embedding_output`` in place of what the embedding layer computes (if given)."""
    embeddings, holder, attribute = backbone_parts(model)
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
def frozen_block_states(model, examples: Sequence[Example], n_frozen: int, pad_id: int,
                        kind: str, batch_size: int = 32, dtype: torch.dtype = torch.float16) -> list[torch.Tensor]:
    """Per example, the hidden states [tokens, hidden] after the first ``n_frozen`` blocks
    (on the CPU, whatever device the model runs on).

    Stored in half precision by default: they are training inputs, and halving them keeps
    a few thousand 256-token sequences within a few GB."""
    states: list[torch.Tensor | None] = [None] * len(examples)
    _, holder, attribute = backbone_parts(model)
    last_frozen = getattr(holder, attribute)[n_frozen - 1]
    captured: list[torch.Tensor] = []
    hook = last_frozen.register_forward_hook(
        lambda module, inputs, output: captured.append(output[0] if isinstance(output, tuple) else output))
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with _run_blocks(model, 0, n_frozen):
            for batch in length_sorted_batches([len(ids) for ids, _ in examples], batch_size):
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


def forward_from_states(model, examples: Sequence[Example], states: Sequence[torch.Tensor], n_frozen: int,
                        pad_id: int, kind: str) -> torch.Tensor:
    """Rewards [B] of a batch whose first ``n_frozen`` blocks were computed earlier."""
    inputs = collate(examples, pad_id, kind)
    with _run_blocks(model, n_frozen, None, embedding_output=_pad_states(states)):
        return model(**inputs).logits[:, 0]


def pool_response_states(states: torch.Tensor, types: Sequence[int]) -> torch.Tensor:
    """[2H] features of one example: the state of its last token, then the mean state over its
    response tokens (token type 1; all tokens when none are marked)."""
    mask = torch.tensor(types, dtype=torch.bool)
    response = states[mask] if mask.any() else states
    return torch.cat([states[-1], response.mean(dim=0)])


def probe_features(model, examples: Sequence[Example], pad_id: int, kind: str,
                   batch_size: int = 32) -> torch.Tensor:
    """[N, 2H] float32: pooled outputs of the model's top block for each example."""
    states = frozen_block_states(model, examples, model.config.num_hidden_layers, pad_id, kind, batch_size,
                                 dtype=torch.float32)
    return torch.stack([pool_response_states(state, types) for state, (_, types) in zip(states, examples)])
