"""The defence against slow poisoning: a cap on each node's cumulative pull away from the others.

A reply within the update bound can still be hostile when it pushes the same way round after
round: the bound limits one round, not the sum. Every honest client's update differs from the
others' by something that changes direction from round to round, so the sum of those differences
grows like a random walk (sqrt(rounds)); a client that always pulls the same way grows it linearly.
So, per round, over the accepted updates u_c = upload_c - global (flattened):

1. each node's deviation d_c = u_c - median of the others' updates (coordinate-wise, leave-one-out:
   a node is never compared with itself, and colluders outside the majority barely move it);
2. the round's scale s = the median of |d_c| over the nodes;
3. each node's budget after its rounds r_1..r_k = ``contribution_budget`` x sqrt(s_1^2 + ... + s_k^2),
   the distance a random walk of typical (median) deviations reaches;
4. a reply that would take the node's running sum E_c of used deviations beyond that budget is
   left out of the round's aggregate (recorded); otherwise it is used as it came and E_c += d_c.
   Whether a node is compared with a median that counts a far reply changes its deviation, so
   steps 1-4 are repeated SETTLING_PASSES times with the medians over the replies kept so far.

A node that has used its budget can only add what the budget grows by (sqrt(rounds)); whatever
it sends beyond is left out, round after round, so it cannot steer the run however long it
pushes. Its replies are not rejected: honest nodes whose deviations happen to add up are left out
for a round and come back as their random walk turns.
Measured with studies/poisoning_drift.py (docs/deployment.md, "One hostile node cannot stop or
steer the run"). It needs a
majority to compare with: rounds with fewer than MIN_REPLIES accepted replies are not limited.
Its state (E_c and the sum of squared scales per node id) persists in the run directory, so a
resumed run keeps every budget; node ids are a deployment's (Flower's simulation engine draws new
ones when it starts, so a resumed simulation starts its budgets afresh).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from firm.errors import FirmError

# Fewer accepted replies than this and there is no majority to compare a node with.
MIN_REPLIES = 3
# Passes of comparing every node with the others that are kept (ContributionLedger.limit).
SETTLING_PASSES = 3
LEDGER_FORMAT = "firm-contribution-ledger"


class LedgerError(FirmError, RuntimeError):
    """The saved contribution ledger cannot be read; the message names the file."""


@dataclass
class NodeAccount:
    deviation: np.ndarray  # the running sum E_c of the node's used deviations (float64 holding float32 values)
    scale_sq: float = 0.0  # the sum of the squared round scales over the rounds it took part in


@dataclass
class Limit:
    """What the defence did with one node's reply this round."""

    node: int
    kept: bool  # False: left out of the aggregate, its deviation would leave the budget
    deviation: float  # |d_c| this round
    cumulative: float  # |E_c| after this round
    budget: float


@dataclass
class ContributionLedger:
    factor: float
    accounts: dict[int, NodeAccount] = field(default_factory=dict)

    def limit(self, nodes: list[int], updates: list[np.ndarray]) -> list[Limit]:
        """Which updates the aggregator may use this round (``Limit.kept``), one entry per node (none
        when the defence is off or the round has too few replies to compare with); updates the ledger."""
        if self.factor <= 0 or len(updates) < MIN_REPLIES:
            return []
        accounts = [self.accounts.get(node) or NodeAccount(np.zeros_like(update))
                    for node, update in zip(nodes, updates)]
        stacked = np.stack(updates)
        kept = [True] * len(updates)
        # A far update biases a median that counts it, and so every other node's deviation: compare
        # each node with the others that are kept, and settle which are kept over a few passes.
        for _ in range(SETTLING_PASSES):
            deviations = []
            for i, update in enumerate(updates):
                others = [j for j in range(len(updates)) if j != i]
                compared = [j for j in others if kept[j]] or others
                deviations.append(update - np.median(stacked[compared], axis=0))
            scale = float(np.median([np.linalg.norm(d) for d in deviations]))
            budgets = [self.factor * math.sqrt(a.scale_sq + scale ** 2) for a in accounts]
            fits = [bool(np.linalg.norm(a.deviation + d) <= b) for a, d, b in zip(accounts, deviations, budgets)]
            kept = fits if any(fits) else [True] * len(updates)  # no node within its budget: nothing to single out
        report = []
        for node, account, deviation, budget, keep in zip(nodes, accounts, deviations, budgets, kept):
            account.scale_sq += scale ** 2
            if keep:  # kept in float32, as saved, so a resumed run decides exactly as one that never stopped
                account.deviation = (account.deviation + deviation).astype(np.float32).astype(np.float64)
            self.accounts[node] = account
            report.append(Limit(node, keep, float(np.linalg.norm(deviation)), float(np.linalg.norm(account.deviation)),
                                budget))
        return report

    # ---- persistence -----------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        tensors = {f"{node}.deviation": account.deviation.astype(np.float32)
                   for node, account in self.accounts.items()}
        tensors.update({f"{node}.scale_sq": np.array([account.scale_sq]) for node, account in self.accounts.items()})
        return save_safetensors(tensors, metadata={"format": LEDGER_FORMAT, "factor": repr(self.factor)})

    @classmethod
    def from_file(cls, path: Path, factor: float) -> "ContributionLedger":
        try:
            tensors = load_safetensors(path.read_bytes())
            ledger = cls(factor)
            for key in tensors:
                node, _, part = key.partition(".")
                if part == "deviation":
                    ledger.accounts[int(node)] = NodeAccount(np.asarray(tensors[key], np.float64),
                                                             float(tensors[f"{node}.scale_sq"][0]))
            return ledger
        except (OSError, ValueError, KeyError, IndexError, SafetensorError) as err:
            raise LedgerError(f"{path}: the contribution ledger cannot be read ({type(err).__name__}: {err})") from None


# ---- robust aggregation sized by the replies that arrived ---------------------------------------
def trim_count(replies: int, fraction: float) -> int:
    """Replies cut from each end per coordinate by trimmed-mean: ``fraction`` of the replies that
    arrived, at least one (a trimmed mean that cuts nothing is a plain mean), at most what leaves
    one reply in the middle."""
    return min(max(1, int(fraction * replies)), (replies - 1) // 2)


def trimmed_mean(stacked: np.ndarray, fraction: float) -> np.ndarray:
    """The coordinate-wise mean of the replies (axis 0) less the ``trim_count`` lowest and highest."""
    cut = trim_count(len(stacked), fraction)
    ordered = np.sort(stacked, axis=0)
    return ordered[cut:len(stacked) - cut].mean(axis=0)


# ---- the ledger in the run directory ---------------------------------------------------------------
LEDGER_DIR = "server"


def ledger_file(run_path: Path, firm_round: int) -> Path:
    return Path(run_path) / LEDGER_DIR / f"ledger-round-{firm_round:03d}.safetensors"


def load_ledger(run_path: Path, completed_rounds: int, factor: float) -> ContributionLedger:
    """The ledger after ``completed_rounds`` (a fresh one before round 1, or for a run directory
    written before the ledger existed)."""
    path = ledger_file(run_path, completed_rounds)
    if completed_rounds == 0 or not path.exists():
        return ContributionLedger(factor)
    return ContributionLedger.from_file(path, factor)


def save_ledger(run_path: Path, firm_round: int, ledger: ContributionLedger) -> None:
    """Write the ledger after ``firm_round`` atomically; keep it and the one before (a round redone
    after a crash starts from that), remove older ones."""
    from firm.rundir import atomic_write_bytes

    atomic_write_bytes(ledger_file(run_path, firm_round), ledger.to_bytes())
    for old in sorted(ledger_file(run_path, 0).parent.glob("ledger-round-*.safetensors")):
        number = int(old.stem.rsplit("-", 1)[1])
        if number < firm_round - 1:
            old.unlink(missing_ok=True)
