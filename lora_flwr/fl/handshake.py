"""Which node owns which partition, learned from Flower; then the round's sample.

The simulation engine's own node -> partition map needs no message; a deployed
node is asked once (``get_properties``, in parallel). Under node authentication
(``fed.partition_owners``) a node's registered key decides its partition, not
its claim. The answers go into the round core's :class:`NodeBook`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from logging import WARNING

from flwr.common import GetPropertiesIns, log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy

from lora_flwr.config import ExperimentConfig, parse_partition_owners
from lora_flwr.fl.directory import PartitionDirectory
from lora_flwr.fl.owners import node_fingerprints, owned_partition
from lora_flwr.profiling import HANDSHAKE
from lora_flwr.protocol import PARTITION_ID
from lora_flwr.server.core import RoundCore
from lora_flwr.server.sampling import sample_count, sample_partitions

# Seconds a node may take to report its partition (a deployed node starts a fresh
# ClientApp process per message); one that does not answer is asked again next round.
HANDSHAKE_TIMEOUT = 600.0
# Seconds to wait for the simulation engine's partition map once nodes are seen.
DIRECTORY_TIMEOUT = 60.0


class Handshake:
    """Learn new nodes' partitions and sample a round's partitions."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        core: RoundCore,
        directory: PartitionDirectory | None,
    ) -> None:
        self.cfg = cfg
        self.core = core
        self.directory = directory
        # Key fingerprint -> partition (deployment under node authentication).
        self.owners = parse_partition_owners(
            cfg.fed.partition_owners, cfg.fed.num_clients
        )
        self.asked = 0  # get_properties messages sent this round
        self.seconds = 0.0  # this round's time learning new nodes

    def sample(
        self,
        client_manager: ClientManager,
        server_round: int,
        fraction: float,
        minimum: int,
        stream: int,
    ) -> list[tuple[ClientProxy, int]]:
        """Return the sampled ``(node, partition)`` pairs, seeded per round."""
        start = time.perf_counter()
        self.asked = 0
        with self.core.phase(HANDSHAKE):  # messages to new nodes: Flower's time
            self.learn(client_manager, server_round)
        self.seconds = time.perf_counter() - start
        proxies = client_manager.all()
        by_pid = {
            pid: proxies[cid]
            for cid, pid in self.core.nodes.partition_of.items()
            if cid in proxies
        }
        num = sample_count(len(by_pid), fraction, minimum)
        chosen = sample_partitions(
            list(by_pid),
            num,
            seed=self.cfg.seed,
            server_round=server_round,
            stream=stream,
        )
        return [(by_pid[pid], pid) for pid in chosen]

    def learn(self, client_manager: ClientManager, server_round: int) -> None:
        """Learn the partition of every node not seen before."""
        nodes = self.core.nodes
        # Virtual nodes register asynchronously: wait for the ones we mean to use.
        client_manager.wait_for(self.cfg.sampling.min_available, timeout=3600)
        proxies = client_manager.all()
        # A node that left frees its partition: it may come back under a new id.
        nodes.forget_absent(proxies)
        unknown = [proxies[cid] for cid in nodes.unknown(list(proxies))]
        if not unknown:
            return
        answers: list[tuple[str, int | None]] = []
        if self.directory is not None and not self.owners:
            # Simulation: the engine's own assignment, no message needed.
            known = self.directory.lookup(DIRECTORY_TIMEOUT)
            for proxy in unknown:
                if proxy.cid in known and proxy.cid not in nodes.ask_only:
                    answers.append((proxy.cid, known[proxy.cid]))
            told = {cid for cid, _ in answers}
            unknown = [p for p in unknown if p.cid not in told]
        if unknown:
            answers += self._ask(unknown, server_round)
        if self.owners:
            answers = self._owned(answers, unknown)
        nodes.assign(answers)

    def _ask(
        self, unknown: Sequence[ClientProxy], server_round: int
    ) -> list[tuple[str, int | None]]:
        """Ask each node in ``unknown`` which partition it owns (in parallel)."""
        self.asked += len(unknown)
        ins = GetPropertiesIns(config={})

        def ask(proxy: ClientProxy) -> tuple[str, int | None]:
            try:
                res = proxy.get_properties(
                    ins, timeout=HANDSHAKE_TIMEOUT, group_id=server_round
                )
                value = res.properties.get(PARTITION_ID)
                return proxy.cid, value if isinstance(value, int) else None
            except Exception as exc:  # a node that cannot answer is skipped
                log(WARNING, "node %s did not report its partition: %r", proxy.cid, exc)
                return proxy.cid, None

        with ThreadPoolExecutor(max_workers=min(32, len(unknown))) as pool:
            return list(pool.map(ask, unknown))

    def _owned(
        self, answers: Sequence[tuple[str, int | None]], asked: Sequence[ClientProxy]
    ) -> list[tuple[str, int | None]]:
        """Under node authentication the key decides a node's partition."""
        keys = _fingerprints(asked)
        out: list[tuple[str, int | None]] = []
        for cid, claim in sorted(answers, key=lambda a: a[0]):
            pid, why = owned_partition(cid, claim, keys, self.owners)
            if pid is None:
                log(WARNING, "%s; ignored", why)
            out.append((cid, pid))
        return out


def _fingerprints(proxies: Sequence[ClientProxy]) -> dict[str, str | None]:
    """Each node's registered key fingerprint, from the deployment's grid."""
    grid = getattr(proxies[0], "grid", None) if proxies else None
    if grid is None:
        return {}
    try:
        return node_fingerprints(grid.get_nodes())
    except Exception as exc:  # a grid without node info: no node is trusted
        log(WARNING, "could not read the nodes' keys from the grid: %r", exc)
        return {}
