"""The node book: each node's partition, each partition's base version and rank.

The server samples partitions, not nodes (seeded, reproducible), so it must know
each node's partition; a merging rule (FLoRA, FedEx) must know which base-weight
version each partition's node holds to send it only the catch-up it lacks.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence

from lora_flwr.aggregation import ClientInfo

# Flower's logger: the server's warnings read as Flower's own log lines.
log = logging.getLogger("flwr")


class NodeBook:
    """Node id -> partition; partition -> base version and rank; nodes to ask again.

    Parameters
    ----------
    num_partitions
        ``fed.num_clients``: partition ids are ``0 .. num_partitions - 1``.
    ranks
        Each partition's rank tier (default: none, for a book that plans nothing).
    """

    def __init__(
        self, num_partitions: int, ranks: Mapping[int, int] | None = None
    ) -> None:
        self.num_partitions = num_partitions
        self.ranks: dict[int, int] = dict(ranks or {})
        self.partition_of: dict[str, int] = {}
        # Base version each partition holds; None: unknown (gets the whole delta).
        self.versions: dict[int, int | None] = {}
        # Nodes whose reply contradicted the directory: asked from then on.
        self.ask_only: set[str] = set()

    def forget_absent(self, present: Collection[str]) -> None:
        """Forget nodes that left: their partitions are free to be claimed again."""
        for node in [n for n in self.partition_of if n not in present]:
            del self.partition_of[node]

    def unknown(self, present: Sequence[str]) -> list[str]:
        """Return the nodes in ``present`` whose partition is not known yet."""
        return [n for n in present if n not in self.partition_of]

    def assign(self, answers: Sequence[tuple[str, int | None]]) -> None:
        """Record each node's partition, refusing out-of-range or taken ones."""
        claimed = set(self.partition_of.values())
        for node, pid in sorted(answers, key=lambda a: a[0]):
            if pid is None:
                continue
            if not 0 <= pid < self.num_partitions:
                log.warning(
                    "node %s claims partition %s of %d; ignored",
                    node,
                    pid,
                    self.num_partitions,
                )
                continue
            if pid in claimed:
                log.warning(
                    "node %s claims partition %d, already owned; ignored", node, pid
                )
                continue
            self.partition_of[node] = pid
            claimed.add(pid)
            if pid in self.versions:
                # A returning node may have lost its state: send it everything.
                self.versions[pid] = None

    def contradicted(self, node: str) -> None:
        """Forget a node that reported another partition; ask it from now on."""
        self.partition_of.pop(node, None)
        self.ask_only.add(node)

    def note_version(self, partition: int | None, version: object) -> None:
        """Record the base version a partition reports (None: unknown, send all)."""
        if partition is not None:
            self.versions[partition] = version if isinstance(version, int) else None

    def client_info(self, partition: int) -> ClientInfo:
        """Return what a rule plans a partition's call from: rank, held version."""
        return ClientInfo(
            partition, self.ranks[partition], self.versions.get(partition, 0)
        )

    def forget_versions(self) -> None:
        """After a resume: every partition's base version is unknown."""
        self.versions = {pid: None for pid in range(self.num_partitions)}
