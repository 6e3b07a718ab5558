"""One frozen trunk under several probe heads: M objectives for about the price of one forward.

A probe reward (firm.rewards.probe_fit) is a linear head on the pooled states of a frozen,
truncated backbone. When several objectives' probes read the same trunk (same backbone, base
weights and number of blocks), the trunk is loaded once per process (``shared_trunk``) and
remembers the pooled features of the last batch it ran, keyed on the exact (input format,
prompts, responses, batch size). The trainer scores one rollout batch with each objective in
turn, so the first reward runs the trunk and every other one reads the remembered features:
each objective keeps its own ``RewardModel.score(prompts, responses)``, and the scores are
bit-for-bit those of running the trunk again.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from firm.rewards.backbones import load_base
from firm.rewards.encoding import InputFormat, encode_example
from firm.rewards.frozen_blocks import probe_features


class SharedTrunk:
    """A frozen backbone (eval mode, on ``device``) that pools its top block for probe heads and
    keeps the features of the last batch it was asked about. ``forward_batches`` counts the
    batches it actually ran (tests and benchmarks read it)."""

    def __init__(self, model, tokenizer, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.forward_batches = 0
        self._last: tuple[Hashable, torch.Tensor] | None = None

    @torch.no_grad()
    def features(self, fmt: InputFormat, hh_prompts: Sequence[str], responses: Sequence[str],
                 batch_size: int = 32) -> torch.Tensor:
        """[B, 2H] pooled features (last token, mean over the response) of each (prompt, response);
        the same batch asked again returns the remembered tensor without running the trunk."""
        key = (fmt, tuple(hh_prompts), tuple(responses), batch_size)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        examples = [encode_example(self.tokenizer, fmt, p, r) for p, r in zip(hh_prompts, responses)]
        features = probe_features(self.model, examples, self.tokenizer.pad_token_id, fmt.kind, batch_size)
        self.forward_batches += 1
        self._last = (key, features)
        return features

    def forget(self) -> None:
        """Drop the remembered batch (the next request runs the trunk)."""
        self._last = None


_TRUNKS: dict[tuple[Hashable, ...], SharedTrunk] = {}


def shared_trunk(backbone: str, base_path: str | None, num_layers: int | None, device: str = "cpu") -> SharedTrunk:
    """The process's one trunk for (backbone, base weights, blocks, device), loaded on first use."""
    key = (backbone, base_path, num_layers, str(device))
    if key not in _TRUNKS:
        model, tokenizer = load_base(backbone, base_path, num_layers)
        _TRUNKS[key] = SharedTrunk(model, tokenizer, str(device))
    return _TRUNKS[key]


def forget_trunk_features() -> None:
    """Make every loaded trunk forget its remembered batch (benchmarks time a cold batch)."""
    for trunk in _TRUNKS.values():
        trunk.forget()


def clear_trunks() -> None:
    """Unload every shared trunk (the next probe reward loads its trunk again)."""
    _TRUNKS.clear()
