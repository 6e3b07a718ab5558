"""A FIRM client's state between rounds: the critic (value head), the running reward statistics,
the KL controller, and AdamW's moments when optimizer = adamw (adamw-reset and sgd start every
round fresh or have no state).

It lives in the node's own directory, one file per round written atomically after the round
(``round-NNN.safetensors``; it and the one before are kept) and read back at the start of the
next, so ``--resume`` continues it exactly, even after a crash in the middle of a round (round r
always starts from the latest state saved before round r):
- a node config ``state-dir=PATH`` (a deployed SuperNode: its own directory);
- else RUN_DIR/clients/<partition-id>/ when the run directory is on this host and the node
  allows it (``allow-server-run-dir``; `firm train`'s simulated nodes do);
- else Flower's in-memory ``context.state`` (lost when the node restarts).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from firm.config import FirmConfig
from firm.errors import FirmError
from firm.federation.node_policy import NODE_ALLOW_SERVER_RUN_DIR_KEY, node_allows
from firm.rundir import CONFIG_FILE, RunDir, atomic_write_bytes
from firm.trainer import FirmLocalTrainer

# A deployed node's own directory for its state (node config: --node-config "state-dir=PATH").
NODE_STATE_DIR_KEY = "state-dir"
# Names in Flower's in-memory node state (a node without a state directory).
STATE_VALUE_HEAD = "firm.value_head"
STATE_CLIENT = "firm.client_state"
STATE_OPTIMIZER = "firm.optimizer"
STATE_FORMAT = "firm-client-state"
STATE_FILE_PATTERN = re.compile(r"round-(\d{3,})\.safetensors")


class ClientStateError(FirmError, RuntimeError):
    """A client's saved state cannot be read; the message names the file."""


def state_file(directory: Path, firm_round: int) -> Path:
    return directory / f"round-{firm_round:03d}.safetensors"


def client_state_dir(cfg: FirmConfig, node_config) -> Path | None:
    """Where this node keeps its state: its node config's state-dir, else the run directory's
    clients/<partition-id>/ when the run directory is on this host and the node allows the server
    to name it; None: in memory only."""
    if NODE_STATE_DIR_KEY in node_config:
        return Path(str(node_config[NODE_STATE_DIR_KEY]))
    server_dir_allowed = node_allows(node_config, NODE_ALLOW_SERVER_RUN_DIR_KEY)
    if cfg.run_dir and server_dir_allowed and (Path(cfg.run_dir) / CONFIG_FILE).is_file():
        return RunDir(cfg.run_dir).client_dir(int(node_config.get("partition-id", 0)))
    return None


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as flat named tensors ("optimizer.<index>.<name>")."""
    return {f"optimizer.{index}.{name}": value.detach().cpu().contiguous()
            for index, state in optimizer.state_dict()["state"].items() for name, value in state.items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    saved = optimizer.state_dict()
    saved["state"] = state
    optimizer.load_state_dict(saved)  # moves each moment to its parameter's device


def trainer_state(trainer: FirmLocalTrainer, firm_round: int) -> bytes:
    """The critic, reward statistics and KL controller after ``firm_round``, as one safetensors file."""
    stats = trainer.reward_stats.state_dict()
    tensors = {f"value_head.{k}": v.detach().cpu().contiguous() for k, v in trainer.value_head.state_dict().items()}
    tensors["reward_stats.mean"] = torch.tensor(stats["mean"], dtype=torch.float64)
    tensors["reward_stats.var"] = torch.tensor(stats["var"], dtype=torch.float64)
    if trainer.keeps_optimizer_state:
        tensors.update(optimizer_tensors(trainer.optimizer))
    metadata = {"format": STATE_FORMAT, "round": str(firm_round), "reward_count": repr(float(stats["count"])),
                "kl_controller": json.dumps(trainer.kl_controller.state_dict())}
    return save_safetensors(tensors, metadata=metadata)


def load_trainer_state(trainer: FirmLocalTrainer, data: bytes, source: str) -> None:
    try:
        tensors = load_safetensors(data)
        metadata = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {})
        if metadata.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} file")
        trainer.value_head.load_state_dict({k.removeprefix("value_head."): v.to(trainer.value_head.linear.weight.device)
                                            for k, v in tensors.items() if k.startswith("value_head.")})
        trainer.reward_stats.load_state_dict({"mean": tensors["reward_stats.mean"].tolist(),
                                              "var": tensors["reward_stats.var"].tolist(),
                                              "count": float(metadata["reward_count"])})
        trainer.kl_controller.load_state_dict(json.loads(metadata["kl_controller"]))
        if trainer.keeps_optimizer_state:
            load_optimizer_tensors(trainer.optimizer, {k: v for k, v in tensors.items() if k.startswith("optimizer.")})
    except (SafetensorError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as err:
        raise ClientStateError(f"client state {source} cannot be read ({type(err).__name__}: {err}); "
                               "move it away to restart this client's state") from None


def saved_rounds(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := STATE_FILE_PATTERN.fullmatch(p.name)))


def restore_state(context: Context, trainer: FirmLocalTrainer, directory: Path | None, firm_round: int) -> None:
    """Load the state saved after the latest round before ``firm_round`` (none: a fresh start)."""
    if directory is not None:
        earlier = [r for r in saved_rounds(directory) if r < firm_round]
        if earlier:
            path = state_file(directory, earlier[-1])
            load_trainer_state(trainer, path.read_bytes(), str(path))
        return
    state = context.state
    if STATE_VALUE_HEAD in state.array_records:
        trainer.value_head.load_state_dict(state.array_records[STATE_VALUE_HEAD].to_torch_state_dict())
    if trainer.keeps_optimizer_state and STATE_OPTIMIZER in state.array_records:
        load_optimizer_tensors(trainer.optimizer, state.array_records[STATE_OPTIMIZER].to_torch_state_dict())
    if STATE_CLIENT in state.config_records:
        saved = state.config_records[STATE_CLIENT]
        trainer.reward_stats.load_state_dict({"mean": list(saved["reward_mean"]), "var": list(saved["reward_var"]),
                                              "count": float(saved["reward_count"])})
        trainer.kl_controller.load_state_dict(json.loads(str(saved["kl_controller"])))


def save_state(context: Context, trainer: FirmLocalTrainer, directory: Path | None, firm_round: int) -> None:
    """Write the state after ``firm_round`` atomically; keep it and the latest one before it (a
    round redone after a crash starts from that), remove older ones."""
    if directory is not None:
        atomic_write_bytes(state_file(directory, firm_round), trainer_state(trainer, firm_round))
        earlier = [r for r in saved_rounds(directory) if r < firm_round]
        for old in earlier[:-1]:
            state_file(directory, old).unlink(missing_ok=True)
        return
    context.state.array_records[STATE_VALUE_HEAD] = ArrayRecord(
        {name: tensor.cpu() for name, tensor in trainer.value_head.state_dict().items()})
    if trainer.keeps_optimizer_state:
        context.state.array_records[STATE_OPTIMIZER] = ArrayRecord(
            {k: v.float() if v.dtype == torch.float64 else v for k, v in optimizer_tensors(trainer.optimizer).items()})
    stats = trainer.reward_stats.state_dict()
    context.state.config_records[STATE_CLIENT] = ConfigRecord({
        "reward_mean": [float(x) for x in stats["mean"]],
        "reward_var": [float(x) for x in stats["var"]],
        "reward_count": float(stats["count"]),
        "kl_controller": json.dumps(trainer.kl_controller.state_dict()),
    })
