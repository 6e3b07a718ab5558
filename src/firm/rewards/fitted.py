"""The fitted reward model: a Bradley-Terry reward that FIRM trains, ships and loads offline.

A fitted reward directory holds ``firm_reward.json`` (firm.rewards.descriptor), a README.md
model card and the trained weights: for a "lora" head, a Hugging Face PEFT adapter (LoRA
matrices and the scalar head); for a "probe" head, ``probe_head.safetensors`` (a linear head on
the frozen backbone's pooled top-block states). Only the trained parts are stored, so a fitted
MiniLM reward is about 2 MB; the base weights come from the packaged backbone at load time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from peft.utils import CONFIG_NAME

from firm.hh import as_hh_prompt
from firm.rewards.backbones import BACKBONES, load_base
from firm.rewards.card import model_card
from firm.rewards.descriptor import PROBE_HEAD_FILE, read_descriptor, write_descriptor
from firm.rewards.encoding import Example, InputFormat, collate, encode_example, length_sorted_batches
from firm.rewards.errors import RewardModelError
from firm.rewards.trunk import SharedTrunk, shared_trunk


class FittedRewardModel:
    """A Bradley-Terry reward: higher score = the response is more preferred for the prompt.

    Holds a PEFT-wrapped sequence classifier (or, with ``probe_head``, the frozen base model and
    a linear head), its tokenizer and the ``firm_reward.json`` descriptor. ``name`` is the
    objective label ("helpful", "harmless", ...)."""

    def __init__(self, model, tokenizer, descriptor: dict[str, Any], device: str = "cpu",
                 probe_head: dict[str, torch.Tensor] | None = None, trunk: SharedTrunk | None = None):
        self.model = model.to(device).eval()
        # A "probe" model: frozen backbone, linear head on pooled features (firm.rewards.probe_fit).
        # Its trunk is shared with the other objectives' probes on the same backbone when loaded
        # (firm.rewards.trunk), or private to this model when fitted or built by hand.
        self.probe_head = probe_head
        self.trunk = trunk if trunk is not None or probe_head is None else SharedTrunk(self.model, tokenizer, device)
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
        if self.trunk is not None:
            features = self.trunk.features(self.input_format, hh_prompts, responses, batch_size)
            return features @ self.probe_head["weight"] + self.probe_head["bias"]
        examples = [encode_example(self.tokenizer, self.input_format, p, r) for p, r in zip(hh_prompts, responses)]
        return _score_examples(self.model, examples, self.tokenizer.pad_token_id,
                               self.input_format.kind, batch_size, self.device)

    def save(self, directory: str | Path) -> Path:
        """Write the weights (PEFT adapter or probe head), ``firm_reward.json`` and README.md."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.probe_head is not None:
            from safetensors.torch import save_file

            save_file({name: value.contiguous() for name, value in self.probe_head.items()},
                      directory / PROBE_HEAD_FILE)
        else:
            self.model.save_pretrained(directory)
            _set_adapter_base_name(directory, self.descriptor)
        write_descriptor(directory, self.descriptor)
        (directory / "README.md").write_text(model_card(self.descriptor))
        return directory

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "FittedRewardModel":
        """Load a fitted reward directory (one holding ``firm_reward.json``)."""
        from peft import PeftModel

        directory = Path(path)
        descriptor = read_descriptor(directory)
        if descriptor.get("head", "lora") == "probe":
            trunk = shared_trunk(descriptor["backbone"], descriptor.get("base_path"), descriptor.get("num_layers"),
                                 device)
            return cls(trunk.model, trunk.tokenizer, descriptor, device,
                       probe_head=_load_probe_head(directory, trunk.model), trunk=trunk)
        base, tokenizer = load_base(descriptor["backbone"], descriptor.get("base_path"), descriptor.get("num_layers"))
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


def _set_adapter_base_name(directory: Path, descriptor: dict[str, Any]) -> None:
    """Point adapter_config.json at the hub id of the packaged base, not at this machine's
    site-packages path, so ``AutoPeftModelForSequenceClassification`` works where the hub is
    reachable. A custom base keeps its own path."""
    if descriptor.get("base_path") is not None:
        return
    config_path = directory / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BACKBONES[descriptor["backbone"]]["hub_id"]
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _score_examples(model, examples: Sequence[Example], pad_id: int, kind: str, batch_size: int,
                    device: str) -> torch.Tensor:
    scores = torch.empty(len(examples), dtype=torch.float32)
    for batch in length_sorted_batches([len(ids) for ids, _ in examples], batch_size):
        inputs = collate([examples[index] for index in batch], pad_id, kind)
        logits = model(**{key: value.to(device) for key, value in inputs.items()}).logits
        scores[batch] = logits[:, 0].float().cpu()
    return scores
