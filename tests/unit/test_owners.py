"""fed.partition_owners: under node authentication the key decides the partition."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any
from unittest.mock import MagicMock

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from test_strategy import _manager, _node, _strategy

from lora_flwr.config import FedConfig
from lora_flwr.config import parse_partition_owners as parse_owners
from lora_flwr.fl.owners import fingerprint


def _key() -> tuple[bytes, str]:
    """A fresh ECDSA key: PEM public key (as the grid reports it), fingerprint."""
    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, fingerprint(pem)


def test_the_fingerprint_is_the_openssh_one_from_pem_or_openssh() -> None:
    # Prepare
    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ssh = public.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )

    # Execute / Assert: the same key, the same 'SHA256:' + 43 base64 characters.
    assert fingerprint(pem) == fingerprint(ssh)
    assert fingerprint(pem).startswith("SHA256:") and len(fingerprint(pem)) == 50


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("SHA256:abc=0", "should be 'SHA256:<43 base64"),
        ("nope", "should be 'SHA256:<43 base64"),
        ("SHA256:" + "A" * 43 + "=x", "should be 'SHA256:<43 base64"),
        ("SHA256:" + "A" * 43 + "=9", "partition 9 but there are"),
        ("SHA256:" + "A" * 43 + "=0,SHA256:" + "A" * 43 + "=1", "twice"),
        ("SHA256:" + "A" * 43 + "=0,SHA256:" + "B" * 43 + "=0", "lists 0 twice"),
    ],
)
def test_a_malformed_table_is_refused_by_the_config(text: str, match: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=match):
        FedConfig(num_clients=4, partition_owners=text)


def test_the_table_parses() -> None:
    # Prepare
    a, b = "SHA256:" + "A" * 43, "SHA256:" + "b+/9" * 10 + "xyz"

    # Execute / Assert
    assert parse_owners(f"{a}=2, {b}=0", 4) == {a: 2, b: 0}
    assert parse_owners("", 4) == {}


def _nodes_with_keys(claims: dict[str, int], keys: dict[str, bytes]) -> list[MagicMock]:
    """Client proxies claiming partitions, all on one grid that reports the keys."""
    grid = MagicMock()
    grid.get_nodes.return_value = [
        SimpleNamespace(node_id=int(cid), public_key=key) for cid, key in keys.items()
    ]
    proxies = []
    for cid, pid in claims.items():
        proxy = _node(cid, pid)
        proxy.grid = grid
        proxies.append(proxy)
    return proxies


def test_a_node_gets_the_partition_its_key_owns_and_nothing_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: four registered keys; node 13 claims node 11's partition, node 14
    # has a key nobody listed, node 15 reports no key.
    (k0, f0), (k1, f1), (k2, f2), (k3, _) = (_key() for _ in range(4))
    table = f"{f0}=0,{f1}=1,{f2}=2"
    strategy = _strategy(fed={"partition_owners": table})
    proxies = _nodes_with_keys(
        {"11": 1, "12": 0, "13": 1, "14": 3, "15": 2},
        {"11": k1, "12": k0, "13": k2, "14": k3, "15": b""},
    )
    manager = _manager(*proxies)

    # Execute
    with caplog.at_level("WARNING", logger="flwr"):
        strategy.handshake.learn(manager, 1)

    # Assert: 11 and 12 own their partitions; 13 (another owner's claim), 14
    # (unlisted key) and 15 (no key) get none, each with a warning saying why.
    assert strategy.partition_of == {"11": 1, "12": 0}
    text = caplog.text
    assert f"node 13 (key {f2}) claims partition 1 but its key owns partition 2" in text
    assert "node 14 (key" in text and "is not in fed.partition_owners" in text
    assert "node 15 has no registered key" in text


def test_without_a_table_claims_decide_as_before() -> None:
    # Prepare
    strategy = _strategy()
    manager = _manager(_node("21", 0), _node("22", 1))

    # Execute
    strategy.handshake.learn(manager, 1)

    # Assert
    assert strategy.partition_of == {"21": 0, "22": 1}


def test_a_grid_without_node_keys_trusts_no_node(caplog: Any) -> None:
    # Prepare: simulation proxies have no grid with keys.
    _, f0 = _key()
    strategy = _strategy(fed={"partition_owners": f"{f0}=0"})
    manager = _manager(_node("31", 0), _node("32", 1))

    # Execute
    strategy.handshake.learn(manager, 1)

    # Assert
    assert strategy.partition_of == {}
