"""FSMGDA's server side: the packed upload of M adapters and the server's combine step (numpy
only; the server and the synthetic benchmark import it without the client trainer)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from firm.mgda import solve_weights

OBJECTIVE_KEY = "objective-{m}/{name}"


def pack_objectives(adapters: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """M adapters into one flat dict ("objective-m/<tensor name>"), for one ArrayRecord."""
    return {OBJECTIVE_KEY.format(m=m, name=k): v for m, adapter in enumerate(adapters) for k, v in adapter.items()}


def split_objectives(packed: dict[str, np.ndarray], num_objectives: int) -> list[dict[str, np.ndarray]]:
    """Undo pack_objectives (values as float64 numpy arrays)."""
    parts: list[dict[str, np.ndarray]] = [{} for _ in range(num_objectives)]
    for key, array in packed.items():
        prefix, _, name = key.partition("/")
        parts[int(prefix.removeprefix("objective-"))][name] = np.asarray(array, dtype=np.float64)
    return parts


def fsmgda_combine(global_adapter: dict[str, np.ndarray], averaged: list[dict[str, np.ndarray]], beta: float,
                   preference: Sequence[float]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The FSMGDA server step: the new global adapter and the lambda the server chose."""
    keys = sorted(global_adapter)
    deltas = np.stack([np.concatenate([(avg[k] - global_adapter[k]).ravel() for k in keys]) for avg in averaged])
    weights = solve_weights(deltas @ deltas.T, beta=beta, preference=preference)
    new = {k: global_adapter[k] + sum(w * (avg[k] - global_adapter[k]) for w, avg in zip(weights, averaged))
           for k in keys}
    return new, weights
