"""Split a prompt set over FIRM's federated clients with Flower Datasets' partitioners.

"iid" gives every client a balanced random share. "dirichlet" (alias "non-iid") draws, for
each prompt group (the category's top-level part: "ordinary" / "decline" for the embedded
set), the fraction each client gets from Dirichlet(alpha): with a small alpha some clients
see mostly requests to decline and others mostly ordinary ones, which is the heterogeneity
FIRM's in-client multi-objective step has to cope with. "category" is the most skewed case:
every client holds prompts of one group only (groups dealt to clients in turn, each group's
prompts shared evenly among its clients).

Before any partitioning, ``split_evaluation`` sets aside an evaluation split that no client
ever trains on; a prompt's side is decided by a hash of its text, so it does not depend on the
seed, the scheme or the number of clients.
"""

from __future__ import annotations

import random
import warnings
import zlib
from collections import Counter

import datasets
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from firm.config import PARTITIONS
from firm.errors import FirmError
from firm.prompts import Prompt

SCHEMES = PARTITIONS
SCHEME_ALIASES = {"non-iid": "dirichlet"}
INDEX_COLUMN, GROUP_COLUMN = "index", "group"
EVAL_HASH_BUCKETS = 10_000


class PartitionError(FirmError, ValueError):
    """Prompts cannot be split as asked; the message says what to change."""


def split_evaluation(prompts: list[Prompt], fraction: float) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, evaluation prompts): a prompt is held out for evaluation when the
    CRC-32 of its text falls in the lowest ``fraction`` of the hash range. Stable across seeds,
    partition schemes and client counts, so no client's shard ever holds an evaluation prompt."""
    if not 0 <= fraction < 1:
        raise PartitionError(f"eval_fraction must be in [0, 1), got {fraction}")
    cut = round(fraction * EVAL_HASH_BUCKETS)
    held_out = [zlib.crc32(p.text.encode()) % EVAL_HASH_BUCKETS < cut for p in prompts]
    train = [p for p, out in zip(prompts, held_out) if not out]
    evaluation = [p for p, out in zip(prompts, held_out) if out]
    if fraction > 0 and (not train or not evaluation):
        raise PartitionError(f"eval_fraction {fraction} leaves {len(train)} training and {len(evaluation)} "
                             f"evaluation prompts of {len(prompts)}; both sides need prompts")
    return train, evaluation


def partition_prompts(
    prompts: list[Prompt],
    num_partitions: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 1,
) -> list[list[Prompt]]:
    """Split `prompts` into `num_partitions` disjoint shards covering them all; same seed, same shards.

    `alpha` is the Dirichlet concentration (smaller = more skewed); "iid" ignores it but
    still checks it, so a bad config fails whichever scheme it names.
    """
    scheme = _canonical_scheme(scheme)
    _check_arguments(len(prompts), num_partitions, alpha, min_partition_size)
    table = datasets.Dataset.from_dict(
        {INDEX_COLUMN: list(range(len(prompts))), GROUP_COLUMN: [prompt.group for prompt in prompts]}
    )
    if scheme == "category":
        return _category_partitions(prompts, num_partitions, seed)
    if scheme == "iid":
        # IidPartitioner cuts contiguous shards, so shuffle first to make them random.
        partitioner: Partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = table.shuffle(seed=seed)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=GROUP_COLUMN,
            alpha=float(alpha),
            min_partition_size=min_partition_size,
            # keeps shard sizes near even: a client past the average size gets no more prompts
            self_balancing=True,
            shuffle=True,
            seed=seed,
        )
        partitioner.dataset = table
    return [[prompts[i] for i in indices] for indices in _partition_indices(partitioner, num_partitions, alpha)]


def training_shards(prompts: list[Prompt], eval_fraction: float, num_partitions: int, scheme: str, alpha: float,
                    seed: int) -> list[list[Prompt]]:
    """The clients' shards: the prompt set less its held-out evaluation split, partitioned."""
    train, _ = split_evaluation(prompts, eval_fraction)
    return partition_prompts(train, num_partitions, scheme=scheme, alpha=alpha, seed=seed)


def describe_partitions(parts: list[list[Prompt]]) -> list[dict]:
    """Size and per-group share of every partition, for the server's log.

    Every partition lists every group seen anywhere (share 0.0 where absent) so the rows
    line up; an empty partition reports shares of 0.0.
    """
    groups = sorted({prompt.group for part in parts for prompt in part})
    rows = []
    for partition_id, part in enumerate(parts):
        counts = Counter(prompt.group for prompt in part)
        shares = {group: (counts[group] / len(part) if part else 0.0) for group in groups}
        rows.append({"partition_id": partition_id, "size": len(part), "group_shares": shares})
    return rows


def _category_partitions(prompts: list[Prompt], num_partitions: int, seed: int) -> list[list[Prompt]]:
    """Client c holds only group c mod G (groups sorted by name); a group's prompts are shuffled
    and dealt evenly among its clients."""
    groups = sorted({p.group for p in prompts})
    if num_partitions < len(groups):
        raise PartitionError(f"the category partition gives every client one of the {len(groups)} prompt groups "
                             f"({', '.join(groups)}); it needs at least {len(groups)} clients, got {num_partitions}")
    parts: list[list[Prompt]] = [[] for _ in range(num_partitions)]
    rng = random.Random(seed)
    for g, group in enumerate(groups):
        members = [p for p in prompts if p.group == group]
        rng.shuffle(members)
        clients = list(range(g, num_partitions, len(groups)))
        if len(members) < len(clients):
            raise PartitionError(f"group {group!r} has {len(members)} prompts for {len(clients)} clients")
        for k, prompt in enumerate(members):
            parts[clients[k % len(clients)]].append(prompt)
    return parts


def _canonical_scheme(scheme: str) -> str:
    canonical = SCHEME_ALIASES.get(scheme, scheme)
    if canonical not in SCHEMES:
        accepted = SCHEMES + tuple(SCHEME_ALIASES)
        raise PartitionError(f"unknown partition scheme {scheme!r}; expected one of {accepted}")
    return canonical


def _check_arguments(num_prompts: int, num_partitions: int, alpha: float, min_partition_size: int) -> None:
    if num_partitions < 1:
        raise PartitionError(f"num_partitions must be at least 1, got {num_partitions}")
    if num_partitions > num_prompts:
        raise PartitionError(f"cannot split {num_prompts} prompts into {num_partitions} partitions: more partitions than prompts")
    if not alpha > 0:
        raise PartitionError(f"alpha must be > 0 (the Dirichlet concentration), got {alpha}")
    if min_partition_size < 0:
        raise PartitionError(f"min_partition_size must be >= 0, got {min_partition_size}")
    if min_partition_size * num_partitions > num_prompts:
        raise PartitionError(
            f"min_partition_size {min_partition_size} x {num_partitions} partitions needs more than the {num_prompts} prompts"
        )


def _partition_indices(partitioner: Partitioner, num_partitions: int, alpha: float) -> list[list[int]]:
    """Prompt indices of every partition.

    DirichletPartitioner redraws (up to 10 times, warning each time) when a shard comes out
    smaller than min_partition_size; the warnings are its normal retry chatter, and if every
    draw fails it raises, which is turned into an error that says what to change.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            return [list(partitioner.load_partition(i)[INDEX_COLUMN]) for i in range(num_partitions)]
    except ValueError as exc:
        raise PartitionError(
            f"Dirichlet partitioning with alpha={alpha} could not give each of the {num_partitions} partitions "
            f"enough prompts ({exc}); raise alpha, lower num_partitions or lower min_partition_size"
        ) from exc
