"""``firm_reward.json``: the file that makes a directory a fitted reward model.

It says what to load (backbone, base weights, head), how inputs are built, how the model was
fitted and on what, and how accurate it is on held-out pairs. Fitted models that ship inside
the package live in EMBEDDED_REWARD_DIR, one folder each ("embedded:<folder name>").
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from firm.rewards.backbones import BACKBONES
from firm.rewards.encoding import InputFormat
from firm.rewards.errors import RewardModelError
from firm.rewards.fit_config import FitConfig

DESCRIPTOR_FILE = "firm_reward.json"
PROBE_HEAD_FILE = "probe_head.safetensors"
NGRAM_HEAD_FILE = "ngram_head.safetensors"
FORMAT_NAME = "firm-reward"
FORMAT_VERSION = 1
EMBEDDED_REWARD_DIR = Path(__file__).resolve().parents[1] / "data" / "reward_models"


def new_descriptor(config: FitConfig, fmt: InputFormat, stats: dict[str, Any], weights: str) -> dict[str, Any]:
    """The descriptor of a fresh fit: what to load, how inputs are built, how it was trained.
    ``weights`` describes the weight file; the pipeline adds the data and held-out results."""
    ngram = config.head == "ngram"  # no trunk: hashed n-grams of the response
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "objective": config.objective,
        "backbone": None if ngram else config.backbone,
        "base_path": None if ngram else config.base_path,
        "base_hub_id": BACKBONES[config.backbone]["hub_id"] if config.base_path is None and not ngram else None,
        "num_layers": config.num_layers,
        "head": config.head,
        "input_format": asdict(fmt),
        "formulation": ("hashed word n-grams of the response (the prompt is not read)" if ngram
                        else "cross-encoder over [CLS] HH prompt [SEP] response [SEP]" if fmt.kind == "encoder"
                        else "chat-template conversation + response + end-of-turn token" if fmt.chat_template
                        else "HH transcript prompt + ' ' + response"),
        "weights": weights,
        "fit_config": asdict(config),
        "training": stats,
    }


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


def write_descriptor(directory: Path, descriptor: dict[str, Any]) -> None:
    (directory / DESCRIPTOR_FILE).write_text(json.dumps(descriptor, indent=2) + "\n")
