"""Pre-flight: every check made before a model loads, Flower starts or anything is written.

Each reads something small (a JSON config, a safetensors header, the policy's config, the
prompt file, the run's own records) and raises a FirmError that names the input when it cannot
be used. A new run: ``check_new_run`` (its directory can be made, the model files are safe to
read), then ``preflight`` (every input a client would otherwise fail on), then
``check_distinct_objectives``. A resumed run: ``check_model_inputs``, ``preflight``, then
``check_resumed_run`` (config.json still describes what the run saved). `firm eval` and
`firm reward` call the checks they need.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from transformers import AutoConfig, AutoModelForCausalLM

from firm.config import ConfigError, FirmConfig
from firm.errors import FirmError
from firm.models import (EMBEDDED_CACHE_NAME, EMBEDDED_POLICY, ModelLoadError, cache_root, embedded_gguf_path,
                         resolve_device, resolve_policy_path)
from firm.partition import training_shards
from firm.prompts import load_prompts
from firm.rewards import HF_CONFIG_FILE, parse_reward_spec
from firm.rewards.descriptor import DESCRIPTOR_FILE, read_descriptor
from firm.rewards.errors import RewardSpecError
from firm.rundir import METRICS_FILE, RunDir, RunDirError, split_torn_tail
from firm.tracking import check_reporters

# peft owns its file names
ADAPTER_CONFIG, ADAPTER_FILE = CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
ADAPTER_WEIGHTS = (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)
SAFE_WEIGHTS = ("*.safetensors",)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


# ---- files a run or an evaluation reads ----------------------------------------------------------
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


# ---- the policy --------------------------------------------------------------------------------
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


def check_context(policy: str, max_prompt_tokens: int, max_new_tokens: int) -> None:
    """Prompt and response fit the policy's context (reads its config only)."""
    limit = getattr(AutoConfig.from_pretrained(resolve_policy_path(policy)), "max_position_embeddings", None)
    if limit and max_prompt_tokens + max_new_tokens > limit:
        raise ConfigError(f"max_prompt_tokens + max_new_tokens = {max_prompt_tokens + max_new_tokens} "
                          f"exceeds the policy's context of {limit} tokens")


def policy_linear_shapes(policy: str) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every linear layer of the policy, by module name: its config
    and its module tree on the meta device, no weights."""
    model_config = AutoConfig.from_pretrained(resolve_policy_path(policy))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    return {name: (m.out_features, m.in_features) for name, m in skeleton.named_modules()
            if isinstance(m, torch.nn.Linear)}


def check_policy_settings(config: FirmConfig) -> None:
    """The LoRA target modules exist in the policy, and prompt + response fit its context."""
    check_context(config.policy, config.max_prompt_tokens, config.max_new_tokens)
    linear = sorted({name.rsplit(".", 1)[-1] for name in policy_linear_shapes(config.policy)})
    missing = [name for name in config.target_modules() if name not in linear]
    if missing:
        raise ConfigError(f"lora_target_modules {', '.join(missing)} not found in the policy; its linear layers are: "
                          f"{', '.join(linear)}")


def check_policy_weights(policy: str) -> None:
    """A local policy folder holds safetensors weights: loading pickle weights (.bin, .pt) can run
    code, so FIRM refuses them rather than fail (or worse) in a client."""
    folder = Path(policy)
    if policy == EMBEDDED_POLICY or not folder.is_dir():
        return
    if any(any(folder.glob(pattern)) for pattern in SAFE_WEIGHTS):
        return
    pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    if pickled:
        raise ConfigError(f"policy {policy}: its weights are pickle files ({', '.join(pickled[:3])}); FIRM loads only "
                          "safetensors (convert with save_pretrained(dir, safe_serialization=True))")


def check_model_cache(policy: str) -> None:
    """The embedded policy is converted once into the cache: the cache must be creatable first."""
    if policy == EMBEDDED_POLICY and not (cache_root() / EMBEDDED_CACHE_NAME / "config.json").is_file():
        check_folder_can_be_made(cache_root(), "the model cache (FIRM_CACHE)")


def check_model_inputs(config: FirmConfig) -> None:
    """Before ``preflight`` (which converts the embedded policy into the cache)."""
    check_policy_weights(config.policy)
    check_model_cache(config.policy)


# ---- a run -------------------------------------------------------------------------------------
def preflight(config: FirmConfig) -> None:
    """Fail before starting Flower (and before creating the run directory) on inputs that
    would otherwise only fail inside a client: prompts, partition, reward specs, policy and
    its LoRA targets and context length, device, reporters."""
    training_shards(load_prompts(config.prompts), config.eval_fraction, config.num_clients, config.partition,
                    config.dirichlet_alpha, config.partition_seed)
    for spec in config.reward_specs():
        check_reward_spec(spec)
    check_policy(config.policy)
    check_policy_settings(config)
    resolve_device(config.device)
    check_reporters(config.report_to)


def check_folder_can_be_made(path: Path, what: str) -> None:
    """``path`` can become a folder: every name in it fits the file system, nothing on the way is
    a file, and the nearest existing folder above it is writable."""
    path = Path(path)
    limit = os.pathconf("/", "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    long = [part for part in path.parts if len(os.fsencode(part)) > limit]
    if long:
        raise ConfigError(f"{what} {path}: the name {long[0][:40]}... is longer than the file system allows "
                          f"({len(os.fsencode(long[0]))} bytes, at most {limit})")
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if existing == path and path.is_dir():
        return
    if not existing.is_dir():
        raise ConfigError(f"{what} {path}: cannot create a folder there ({existing} is a file)")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"{what} {path}: cannot create a folder there ({existing} is not writable)")


def check_new_run(config: FirmConfig, run_dir: str) -> None:
    """Before ``preflight``: the run directory can be made, the models can be read."""
    check_folder_can_be_made(Path(run_dir), "run directory")
    check_model_inputs(config)


def check_distinct_objectives(config: FirmConfig) -> None:
    """After ``preflight`` (the reward specs are known to be readable): no objective twice."""
    from firm.federation.protocol import objective_names  # loads Flower: only the run checks need it

    names = objective_names(config)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"rewards give the objective {', '.join(repeated)} more than once "
                          f"({config.rewards}); every objective must be its own")


def check_resumed_run(run: RunDir, config: FirmConfig) -> None:
    """config.json still describes what the run saved: the algorithm and the objectives (in order)
    of its last round record, and the LoRA settings and tensor shapes of its last adapter. After
    ``preflight`` (the reward specs are known to be readable)."""
    from firm.federation.protocol import objective_names

    check_distinct_objectives(config)
    rounds = completed_round_records(run)
    config_file = run.path / "config.json"
    if rounds:
        last = rounds[-1]
        if last.get("algorithm") != config.algorithm:
            raise ConfigError(f"{config_file}: algorithm is {config.algorithm!r} but the run's rounds were trained "
                              f"with {last.get('algorithm')!r}; restore it or start a new run")
        saved = [k.split("/", 1)[1] for k in last if k.startswith("reward/")]
        names = objective_names(config)
        if saved != names:
            raise ConfigError(f"{config_file}: the objectives are {names} but the run's rounds were trained on "
                              f"{saved} (names and order must match); restore them or start a new run")
    adapter = run.last_adapter()
    if adapter is not None:
        check_adapter_matches(adapter, config)


def completed_round_records(run: RunDir) -> list[dict]:
    """The round records of the completed rounds, read without changing the log (a torn last
    line, left by a crash in the middle of an append, is skipped: resume moves it aside later)."""
    path = run.path / METRICS_FILE
    if not path.exists():
        return []
    whole, _ = split_torn_tail(path.read_bytes())
    records = []
    for number, line in enumerate(whole.decode(errors="replace").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RunDirError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    done = run.completed_rounds
    return [r for r in records if isinstance(r, dict) and r.get("type") == "round" and r.get("round", 0) <= done]


def check_adapter_matches(adapter: Path, config: FirmConfig) -> None:
    """The saved adapter has the config's LoRA rank, alpha and target modules, and tensor shapes
    that fit the config's policy (read from its safetensors header and the policy's module tree
    on the meta device: no weights load)."""
    try:
        saved = json.loads((adapter / ADAPTER_CONFIG).read_text())
        header_bytes = (adapter / ADAPTER_FILE).read_bytes()
        header = json.loads(header_bytes[8:8 + int.from_bytes(header_bytes[:8], "little")])
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise RunDirError(f"{adapter}: the last adapter cannot be read ({err}); the run cannot be resumed") from None
    wanted = {"r": config.lora_r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules())}
    found = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
             "target_modules": sorted(saved.get("target_modules") or [])}
    for key in wanted:
        if wanted[key] != found[key]:
            raise ConfigError(f"{adapter.parent.parent / 'config.json'}: LoRA {key} is {wanted[key]} but the run's "
                              f"adapter {adapter.name} has {found[key]}; restore it or start a new run")
    linear = policy_linear_shapes(config.policy)
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        shape = tuple(spec.get("shape", ()))
        if module not in linear:
            raise ConfigError(f"{adapter}: tensor {key} belongs to no linear layer of policy {config.policy!r}; "
                              "the run was trained on another policy")
        out_features, in_features = linear[module]
        expected = (config.lora_r, in_features) if part.startswith("A") else (out_features, config.lora_r)
        if shape != expected:
            raise ConfigError(f"{adapter}: tensor {key} has shape {shape}, but policy {config.policy!r} with "
                              f"lora_r {config.lora_r} needs {expected}; the run was trained on another policy")
