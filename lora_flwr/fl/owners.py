"""Which partition an authenticated SuperNode owns: its key decides, not its claim.

Under SuperNode authentication each node id belongs to one registered public key,
and the ServerApp's grid reports that key per node (``Grid.get_nodes()``). With
``fed.partition_owners`` = ``"SHA256:<fp>=0,SHA256:<fp>=1,..."`` (the OpenSSH
fingerprints ``ssh-keygen -lf`` prints, as ``lora_flwr/deploy/local.py`` records in
``deploy/nodes.json``) a node gets the partition its key owns; a node whose key is
not in the table, or whose own ``partition-id`` says otherwise, gets none. So an
authenticated node cannot take another owner's partition, and everything the
server keys on a partition (seeded sampling, rank tier, training seed, fold
versions) follows the owner's key. See docs/DEPLOYMENT.md. The table itself is
parsed (and refused when malformed) by the config:
:func:`lora_flwr.config.parse_partition_owners`.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization


def fingerprint(public_key: bytes) -> str:
    """OpenSSH SHA-256 fingerprint of a PEM (or OpenSSH) public key."""
    if public_key.startswith(b"ssh-") or public_key.startswith(b"ecdsa-"):
        key: Any = serialization.load_ssh_public_key(public_key)
    else:
        key = serialization.load_pem_public_key(public_key)
    line = key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    digest = hashlib.sha256(base64.b64decode(line.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def node_fingerprints(nodes: Iterable[Any]) -> dict[str, str | None]:
    """Node id (as the strategy's ``cid``) -> key fingerprint, from grid nodes.

    A node that reports no key (simulation, or a SuperLink without node
    authentication) maps to None.
    """
    out: dict[str, str | None] = {}
    for node in nodes:
        key = getattr(node, "public_key", b"") or b""
        try:
            out[str(node.node_id)] = fingerprint(bytes(key)) if key else None
        except ValueError:
            out[str(node.node_id)] = None
    return out


def owned_partition(
    cid: str,
    claim: int | None,
    keys: Mapping[str, str | None],
    owners: Mapping[str, int],
) -> tuple[int | None, str]:
    """Return the partition node ``cid`` owns by its key, or None and why not."""
    fp = keys.get(cid)
    if fp is None:
        return None, (
            f"node {cid} has no registered key (fed.partition_owners needs a "
            "SuperLink with --enable-supernode-auth)"
        )
    owned = owners.get(fp)
    if owned is None:
        return None, f"node {cid} (key {fp}) is not in fed.partition_owners"
    if claim is not None and claim != owned:
        return None, (
            f"node {cid} (key {fp}) claims partition {claim} but its key owns "
            f"partition {owned}; it would train another owner's share"
        )
    return owned, ""
