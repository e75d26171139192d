"""NodeBook: node -> partition, partition -> base version, nodes to ask again."""

from __future__ import annotations

import logging

import pytest

from lora_flwr.server.nodes import NodeBook


@pytest.fixture
def flwr_caplog(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture the WARNINGs of Flower's logger, which the node book writes to."""
    caplog.set_level(logging.WARNING, logger="flwr")
    return caplog


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "flwr" and r.levelno == logging.WARNING
    ]


def test_assign_records_each_claimed_partition() -> None:
    # Prepare
    book = NodeBook(3)

    # Execute
    book.assign([("b", 2), ("a", 0), ("c", None)])

    # Assert: a node that did not answer (None) stays unknown.
    assert book.partition_of == {"a": 0, "b": 2}
    assert book.unknown(["a", "b", "c"]) == ["c"]


def test_assign_refuses_partitions_out_of_range(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    book = NodeBook(3)

    # Execute
    book.assign([("n1", 3), ("n2", -1), ("n3", 1)])

    # Assert
    assert book.partition_of == {"n3": 1}
    assert _warnings(flwr_caplog) == [
        "node n1 claims partition 3 of 3; ignored",
        "node n2 claims partition -1 of 3; ignored",
    ]


def test_assign_refuses_a_partition_already_owned(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: "x" owns partition 1 from an earlier handshake.
    book = NodeBook(4)
    book.assign([("x", 1)])

    # Execute: "y" claims it again; "b" and "a" both claim partition 2.
    book.assign([("y", 1), ("b", 2), ("a", 2)])

    # Assert: the first owner keeps it; among new claims the node ids decide.
    assert book.partition_of == {"x": 1, "a": 2}
    assert _warnings(flwr_caplog) == [
        "node b claims partition 2, already owned; ignored",
        "node y claims partition 1, already owned; ignored",
    ]


def test_a_returning_partition_gets_an_unknown_version() -> None:
    # Prepare: partition 0 reported version 3, then its node left.
    book = NodeBook(2)
    book.assign([("old", 0)])
    book.note_version(0, 3)
    book.forget_absent([])

    # Execute: a new node claims it.
    book.assign([("new", 0), ("other", 1)])

    # Assert: it may have lost its state: the whole delta next (None); a partition
    # that never reported a version gets no entry (the default 0 applies).
    assert book.partition_of == {"new": 0, "other": 1}
    assert book.versions == {0: None}


def test_note_version_keeps_only_integers() -> None:
    # Prepare
    book = NodeBook(3)

    # Execute
    book.note_version(0, 4)
    book.note_version(1, "4")
    book.note_version(2, None)
    book.note_version(None, 7)  # a reply of a node that was sent nothing

    # Assert
    assert book.versions == {0: 4, 1: None, 2: None}


def test_contradicted_forgets_the_node_and_asks_it_from_then_on() -> None:
    # Prepare
    book = NodeBook(3)
    book.assign([("a", 0), ("b", 1)])

    # Execute
    book.contradicted("a")
    book.contradicted("ghost")  # not in the book: no error

    # Assert: its partition is free again and it is asked every time.
    assert book.partition_of == {"b": 1}
    assert book.ask_only == {"a", "ghost"}
    assert book.unknown(["a", "b"]) == ["a"]
    book.assign([("c", 0)])
    assert book.partition_of == {"b": 1, "c": 0}


def test_forget_absent_frees_only_the_partitions_of_nodes_that_left() -> None:
    # Prepare
    book = NodeBook(3)
    book.assign([("a", 0), ("b", 1), ("c", 2)])
    book.note_version(1, 2)

    # Execute
    book.forget_absent({"a", "c", "unrelated"})

    # Assert: versions are kept (a partition's, not a node's).
    assert book.partition_of == {"a": 0, "c": 2}
    assert book.versions == {1: 2}


def test_forget_versions_makes_every_partition_unknown() -> None:
    # Prepare
    book = NodeBook(3)
    book.note_version(0, 5)

    # Execute
    book.forget_versions()

    # Assert
    assert book.versions == {0: None, 1: None, 2: None}
