"""Checks of a run's inputs that firm.federation.simulation.preflight does not make, run before
anything is written: the run directory's name, the policy's weights format, the model cache,
distinct objectives; and for ``--resume``, that config.json still describes the run that was saved
(its algorithm, objectives and adapter shapes). Each raises a FirmError naming the problem."""

from __future__ import annotations

import json
import os
from pathlib import Path

from firm.config import ConfigError, FirmConfig
from firm.models import EMBEDDED_CACHE_NAME, EMBEDDED_POLICY, cache_root
from firm.rundir import METRICS_FILE, RunDir, RunDirError, split_torn_tail

SAFE_WEIGHTS = ("*.safetensors",)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


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


def check_distinct_objectives(config: FirmConfig) -> None:
    from firm.federation.protocol import objective_names

    names = objective_names(config)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"rewards give the objective {', '.join(repeated)} more than once "
                          f"({config.rewards}); every objective must be its own")


def check_model_inputs(config: FirmConfig) -> None:
    """Before the shared pre-flight (which converts the embedded policy into the cache)."""
    check_policy_weights(config.policy)
    check_model_cache(config.policy)


def check_new_run(config: FirmConfig, run_dir: str) -> None:
    """Before the shared pre-flight: the run directory can be made, the models can be read."""
    check_folder_can_be_made(Path(run_dir), "run directory")
    check_model_inputs(config)


def check_resumed_run(run: RunDir, config: FirmConfig) -> None:
    """config.json still describes what the run saved: the algorithm and the objectives (in order)
    of its last round record, and the LoRA settings and tensor shapes of its last adapter. After
    the shared pre-flight (the reward specs are known to be readable)."""
    check_distinct_objectives(config)
    from firm.federation.protocol import objective_names

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


def policy_linear_shapes(policy: str) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every linear layer of the policy, by module name (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from firm.models import resolve_policy_path

    model_config = AutoConfig.from_pretrained(resolve_policy_path(policy))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    return {name: (m.out_features, m.in_features) for name, m in skeleton.named_modules()
            if isinstance(m, torch.nn.Linear)}
