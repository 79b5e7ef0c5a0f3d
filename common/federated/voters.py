"""One partition, one voter: which node's reply may count for which share of the data.

A node's reply counts for the partition it holds. Without a check, a node can claim a
partition another node already holds, or one the planned federation does not have, and
six such nodes outvote five honest ones. :class:`VoterRoll` keeps, for the whole run,

* the planned partitions ``[0, num_partitions)`` (the server's ``min-available-nodes``:
  the federation it waits for); a claim outside them is refused;
* for each partition the first node ever seen holding it (sticky across rounds): a second
  node claiming it is refused, and so is a node that holds one partition and claims another.

A node's partition is the server's own record where it has one (``registered``: node id ->
partition id, e.g. the simulation's registration order); a node missing from that record is
refused. Only where the server has no record does the partition the node reports (the
reply's ``partition-id`` metric) count, and a reply without one is refused.

The roll is kept in memory for one server process: a resumed run starts a fresh roll, because
node ids need not survive a restart (the simulation draws new ones), and a stored roll would
then refuse every honest node. A SuperNode that comes back under a new node id within a run
(an insecure deployment; with SuperNode authentication a registered key keeps its node id) is
refused its partition until the server restarts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class VoterRoll:
    """The nodes that vote, one per planned partition; see the module docstring."""

    num_partitions: int
    """The planned partitions ``[0, num_partitions)``; 0: no plan (only uniqueness is enforced)."""
    holders: dict[int, int] = field(default_factory=dict)
    """Partition id -> the node id first seen holding it in this run."""

    def __post_init__(self) -> None:
        if isinstance(self.num_partitions, bool) or not isinstance(self.num_partitions, int) \
                or self.num_partitions < 0:
            raise ValueError(f"num_partitions must be a whole number >= 0, got {self.num_partitions!r}")

    def partition_of(self, node_id: int, reported: int | None,
                     registered: Mapping[int, int] | None = None) -> int | None:
        """The partition ``node_id``'s reply counts for: the server's record where it has one, else
        what the node ``reported``; None where neither says."""
        if registered:
            return registered.get(node_id)
        return reported

    def refusal(self, node_id: int, reported: int | None, registered: Mapping[int, int] | None = None) -> str | None:
        """Why ``node_id``'s reply may not vote (a sentence with the claimed partition), or None: it
        votes, and if its partition had no holder yet, the node now holds it for the rest of the run."""
        if registered and node_id not in registered:
            return (f"claims partition {reported}, but the server's record of the federation's nodes "
                    f"({len(registered)} registered) does not hold this node; only registered nodes vote")
        partition = self.partition_of(node_id, reported, registered)
        if partition is None:
            return ("reports no partition-id, and the server has no record of its partition; one partition, "
                    "one voter: a node must say which share of the data it trained on")
        if self.num_partitions and not 0 <= partition < self.num_partitions:
            return (f"claims partition {partition}, outside the planned federation's partitions "
                    f"0..{self.num_partitions - 1} (min-available-nodes {self.num_partitions}); a node beyond "
                    "the plan does not vote")
        holder = self.holders.get(partition)
        if holder is not None and holder != node_id:
            return (f"claims partition {partition}, which node {holder} holds (the first node seen for it in "
                    "this run); one partition, one voter")
        held = next((p for p, n in self.holders.items() if n == node_id and p != partition), None)
        if held is not None:
            return (f"claims partition {partition}, but it holds partition {held} in this run; a node votes "
                    "for one partition")
        self.holders[partition] = node_id
        return None
