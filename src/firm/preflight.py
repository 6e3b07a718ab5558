"""Pre-flight: every check made before a model loads, Flower starts or anything is written.

Each reads something small (a JSON config, a safetensors header, the policy's config, the
prompt file) and raises a FirmError that names the input when it cannot be used. ``preflight``
is `firm train`'s whole set; `firm eval` and `firm reward` call the checks they need.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from firm.config import ConfigError, FirmConfig
from firm.errors import FirmError
from firm.models import EMBEDDED_POLICY, ModelLoadError, embedded_gguf_path, resolve_device, resolve_policy_path
from firm.partition import training_shards
from firm.prompts import load_prompts
from firm.rewards import HF_CONFIG_FILE, parse_reward_spec
from firm.rewards.descriptor import DESCRIPTOR_FILE, read_descriptor
from firm.rewards.errors import RewardSpecError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def read_json_object(path: Path, what: str, error: type[FirmError] = ConfigError) -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` naming the file when it is unreadable or not an object."""
    try:
        values = json.loads(Path(path).read_text())
    except OSError as err:
        raise error(f"{path}: cannot read {what} ({err.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: {what} is not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise error(f"{path}: {what} must be a JSON object, got {type(values).__name__}")
    return values


def check_safetensors(path: Path, error: type[FirmError] = ConfigError) -> None:
    """The file has a readable safetensors header and all the bytes that header promises."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 <= length <= size - 8:
                raise ValueError("no header")
            header = json.loads(f.read(length))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise error(f"{path}: not a safetensors file (its header is unreadable)") from None
    if size != 8 + length + end:
        raise error(f"{path}: truncated or padded safetensors file ({size} bytes, its header says {8 + length + end})")


def check_adapter(adapter: str | Path) -> None:
    """A peft adapter directory: a readable adapter_config.json and weights that are whole."""
    folder = Path(adapter)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{adapter} is not a peft adapter directory ({ADAPTER_CONFIG} missing)")
    read_json_object(folder / ADAPTER_CONFIG, "the adapter config")
    weights = [folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()]
    if not weights:
        raise ConfigError(f"{adapter}: the adapter has no weights ({' or '.join(ADAPTER_WEIGHTS)} missing)")
    if weights[0].suffix == ".safetensors":
        check_safetensors(weights[0])


def check_reward_spec(spec: str) -> None:
    """The spec names a reward (firm.rewards.parse_reward_spec), and a local model directory's
    config.json or firm_reward.json is readable, so a broken one fails here and not in a client."""
    parsed = parse_reward_spec(spec)
    folder = Path(parsed.target) if parsed.target else None
    if folder is None or not folder.is_dir():
        return  # a hub id is only checked on load
    if parsed.kind == "fitted":
        read_json_object(folder / DESCRIPTOR_FILE, f"the descriptor of reward {spec!r}", RewardSpecError)
        read_descriptor(folder)
    elif parsed.kind == "hf":
        read_json_object(folder / HF_CONFIG_FILE, f"the model config of reward {spec!r}", RewardSpecError)


def check_context(policy: str, max_prompt_tokens: int, max_new_tokens: int) -> None:
    """Prompt and response fit the policy's context (reads its config only)."""
    limit = getattr(AutoConfig.from_pretrained(resolve_policy_path(policy)), "max_position_embeddings", None)
    if limit and max_prompt_tokens + max_new_tokens > limit:
        raise ConfigError(f"max_prompt_tokens + max_new_tokens = {max_prompt_tokens + max_new_tokens} "
                          f"exceeds the policy's context of {limit} tokens")


def check_policy(name_or_path: str) -> None:
    """Cheap early check that a policy spec can be loaded (its config, not its weights)."""
    if name_or_path == EMBEDDED_POLICY:
        embedded_gguf_path()
        return
    try:
        AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load policy {name_or_path!r}: {str(err).splitlines()[0]}. "
            "Pass a local model directory, or use 'embedded' (SmolLM2-135M-Instruct, offline)."
        ) from err


def preflight(config: FirmConfig) -> None:
    """Fail before starting Flower (and before creating the run directory) on inputs that
    would otherwise only fail inside a client: prompts, partition, reward specs, policy and
    its LoRA targets and context length, device."""
    training_shards(load_prompts(config.prompts), config.eval_fraction, config.num_clients, config.partition,
                    config.dirichlet_alpha, config.partition_seed)
    for spec in config.reward_specs():
        check_reward_spec(spec)
    check_policy(config.policy)
    check_policy_settings(config)
    resolve_device(config.device)


def check_policy_settings(config: FirmConfig) -> None:
    """The LoRA target modules exist in the policy, and prompt + response fit its context. Reads
    the policy's config and builds its module tree on the meta device (no weights)."""
    check_context(config.policy, config.max_prompt_tokens, config.max_new_tokens)
    model_config = AutoConfig.from_pretrained(resolve_policy_path(config.policy))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules()
                     if isinstance(module, torch.nn.Linear)})
    missing = [name for name in config.target_modules() if name not in linear]
    if missing:
        raise ConfigError(f"lora_target_modules {', '.join(missing)} not found in the policy; its linear layers are: "
                          f"{', '.join(linear)}")
