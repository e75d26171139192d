"""Which partition each simulated node owns, as Flower's simulation engine assigned it.

The strategy samples partitions, not nodes (seeded, reproducible), so it must know
each node's partition. A deployed node is the only one that knows its own
``partition-id`` (its operator's ``--node-config``): the server asks it once
(``get_properties``). In the in-process simulation the engine itself gives node
``i`` its ``partition-id``: :func:`simulation_partitions` records that
assignment as the engine makes it, so the strategy needs no message to learn it.
With 1,000 virtual clients that handshake was 1,000 Ray messages before round 1,
each paid in the engine's message store scan (see docs/BENCHMARKS.md).

Every reply still carries the node's own ``partition_id`` and the strategy
checks it against what it used, so a node the directory got wrong is caught.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any


class PartitionDirectory:
    """Node id (the strategy's ``cid``) -> partition id, filled once by the engine."""

    def __init__(self) -> None:
        self._partitions: dict[str, int] = {}
        self._ready = threading.Event()

    def fill(self, nodes: Mapping[int, int]) -> None:
        """Record the engine's ``node_id -> partition_id`` assignment."""
        self._partitions = {str(node): int(pid) for node, pid in nodes.items()}
        self._ready.set()

    def lookup(self, timeout: float) -> dict[str, int]:
        """Return the assignment, waiting up to ``timeout`` s; ``{}`` if none came.

        The engine registers the nodes just before it assigns their partitions,
        so a strategy that saw the nodes may have to wait a moment for this.
        """
        self._ready.wait(timeout)
        return dict(self._partitions)


@contextmanager
def simulation_partitions() -> Iterator[PartitionDirectory]:
    """Record, while the block runs, how the simulation engine assigns partitions.

    Wraps the Flower 1.42 engine function that gives every virtual node its node
    config (``partition-id`` = the node's index in its node-to-partition map) so
    the map is also handed to a :class:`PartitionDirectory`. With a Flower that
    lacks the function the directory stays empty and the strategy asks the nodes,
    as in a deployment. Runs call it through
    :func:`lora_flwr.fl.compat.simulation_partitions`, which first refuses any
    Flower but 1.42.x.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    directory = PartitionDirectory()
    original = getattr(vce_api, "_register_node_info_stores", None)
    if original is None:
        yield directory
        return

    def register(*args: Any, **kwargs: Any) -> Any:
        nodes = kwargs["nodes_mapping"] if "nodes_mapping" in kwargs else args[0]
        directory.fill(nodes)
        return original(*args, **kwargs)

    vce_api._register_node_info_stores = register
    try:
        yield directory
    finally:
        vce_api._register_node_info_stores = original
