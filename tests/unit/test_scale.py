"""Scale: what a process keeps per client stays bounded however many clients exist."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import pytest
from flwr.common import FitRes, ndarrays_to_parameters
from test_node_cache import _cfg, _forbid_partitioning, _same
from test_strategy import NO_PARAMS, OK, _full, _manager, _node, _strategy

from lora_flwr import experiment
from lora_flwr.fl import handshake as handshake_module
from lora_flwr.fl.directory import PartitionDirectory, simulation_partitions
from lora_flwr.protocol import BASE_VERSION, PARTITION_ID


def _held(cfg: Any) -> list[int]:
    """Partition ids of this config held in memory, least recently used first."""
    return [key[-2] for key in experiment._CLIENT_DATA if key[0] == cfg.data]


def test_a_process_holds_at_most_client_cache_size_partitions(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setattr(experiment, "CLIENT_CACHE_SIZE", 3)
    cfg = _cfg()
    ws = experiment.get_workspace(cfg)

    # Execute: one actor serving 8 different clients in turn.
    first = experiment.client_datasets(ws, cfg, 0, 8)
    for pid in range(1, 8):
        experiment.client_datasets(ws, cfg, pid, 8)

    # Assert: only the three most recent stay; every one was stored on disk.
    assert _held(cfg) == [5, 6, 7]
    assert len(list((cache / "partitions").glob("*.safetensors"))) == 8
    # An evicted partition comes back from disk, identical, without partitioning.
    calls = _forbid_partitioning(monkeypatch)
    again = experiment.client_datasets(ws, cfg, 0, 8)
    assert calls == []
    _same(first[0], again[0])
    _same(first[1], again[1])
    assert _held(cfg) == [6, 7, 0]


def test_a_partition_in_use_is_kept_over_older_ones(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setattr(experiment, "CLIENT_CACHE_SIZE", 2)
    cfg = _cfg()
    ws = experiment.get_workspace(cfg)
    a = experiment.client_datasets(ws, cfg, 0, 4)
    experiment.client_datasets(ws, cfg, 1, 4)

    # Execute: partition 0 is used again, then a third one arrives.
    again = experiment.client_datasets(ws, cfg, 0, 4)
    experiment.client_datasets(ws, cfg, 2, 4)

    # Assert: the same objects are served from memory; 1 was the one dropped.
    assert again[0] is a[0] and again[1] is a[1]
    assert _held(cfg) == [0, 2]


def test_global_splits_do_not_take_client_slots(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setattr(experiment, "CLIENT_CACHE_SIZE", 1)
    cfg = _cfg()
    ws = experiment.get_workspace(cfg)

    # Execute
    held_out = experiment.heldout_data(ws, cfg)
    experiment.client_datasets(ws, cfg, 0, 2)
    experiment.client_datasets(ws, cfg, 1, 2)

    # Assert: the held-out set is still the same object; one client partition.
    assert experiment.heldout_data(ws, cfg) is held_out
    assert _held(cfg) == [1]
    other = dataclasses.replace(cfg, seed=cfg.seed + 1)
    experiment.client_datasets(experiment.get_workspace(other), other, 0, 2)
    assert len(experiment._CLIENT_DATA) == 1


# ------------------------------------------------- partitions without a handshake
def _directory(nodes: dict[str, int]) -> PartitionDirectory:
    directory = PartitionDirectory()
    directory.fill({int(cid.split("-")[1]): pid for cid, pid in nodes.items()})
    return directory


def _nodes(num: int) -> list[MagicMock]:
    # Each node's own claim is its index; ids look like the engine's integers.
    return [_node(f"node-{i}", i) for i in range(num)]


def _numeric(nodes: list[MagicMock]) -> list[MagicMock]:
    for node in nodes:
        node.cid = node.cid.split("-")[1]
    return nodes


def test_the_engines_map_replaces_the_handshake() -> None:
    # Prepare: the engine put node i on partition 3 - i (not what ids suggest).
    nodes = _numeric(_nodes(4))
    directory = PartitionDirectory()
    directory.fill({i: 3 - i for i in range(4)})
    strategy = _strategy()
    strategy.handshake.directory = directory

    # Execute
    strategy.configure_fit(1, NO_PARAMS, _manager(*nodes))

    # Assert: no node was asked; the map decided.
    assert all(not n.get_properties.called for n in nodes)
    assert strategy.partition_of == {str(i): 3 - i for i in range(4)}
    assert strategy.core.record.to_dict()["handshake_messages"] == 0


def test_nodes_missing_from_the_map_are_asked_and_only_they() -> None:
    # Prepare: the map knows nodes 0 and 1 only.
    nodes = _numeric(_nodes(4))
    directory = PartitionDirectory()
    directory.fill({0: 0, 1: 1})
    strategy = _strategy()
    strategy.handshake.directory = directory

    # Execute
    strategy.configure_fit(1, NO_PARAMS, _manager(*nodes))

    # Assert
    assert [n.get_properties.called for n in nodes] == [False, False, True, True]
    assert strategy.partition_of == {str(i): i for i in range(4)}
    assert strategy.core.record.to_dict()["handshake_messages"] == 2
    # Known nodes are never asked again.
    strategy.configure_fit(2, NO_PARAMS, _manager(*nodes))
    assert strategy.core.record.to_dict()["handshake_messages"] == 0
    assert sum(n.get_properties.call_count for n in nodes) == 2


def test_without_a_map_every_new_node_is_asked_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a directory the engine never filled (another Flower version).
    monkeypatch.setattr(handshake_module, "DIRECTORY_TIMEOUT", 0.01)
    nodes = _numeric(_nodes(4))
    strategy = _strategy()
    strategy.handshake.directory = PartitionDirectory()

    # Execute
    strategy.configure_fit(1, NO_PARAMS, _manager(*nodes))

    # Assert
    assert [n.get_properties.call_count for n in nodes] == [1, 1, 1, 1]
    assert strategy.partition_of == {str(i): i for i in range(4)}
    assert strategy.core.record.to_dict()["handshake_messages"] == 4


def _reply(partition: int) -> FitRes:
    return FitRes(
        status=OK,
        parameters=ndarrays_to_parameters(_full(1.0)),
        num_examples=3,
        metrics={PARTITION_ID: partition, BASE_VERSION: 0},
    )


def test_a_reply_from_another_partition_than_the_map_said_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the map swaps nodes 0 and 1 against what they own and report.
    nodes = _numeric(_nodes(2))
    directory = PartitionDirectory()
    directory.fill({0: 1, 1: 0})
    strategy = _strategy(fed={"num_clients": 2}, sampling={"min_available": 2})
    strategy.handshake.directory = directory
    sent = strategy.configure_fit(1, NO_PARAMS, _manager(*nodes))
    results = [(proxy, _reply(int(proxy.cid))) for proxy, _ in sent]

    # Execute
    params, metrics = strategy.aggregate_fit(1, results, [])

    # Assert: both dropped, the global kept; next round the nodes are asked.
    assert params is None
    assert strategy.core.record.to_dict()["fit_dropped"] == 2
    assert any("reports partition 0 but was sampled as" in m for m in caplog.messages)
    strategy.core.finish_round()
    strategy.configure_fit(2, NO_PARAMS, _manager(*nodes))
    assert [n.get_properties.call_count for n in nodes] == [1, 1]
    assert strategy.partition_of == {"0": 0, "1": 1}


def test_a_reply_from_the_partition_it_was_sampled_as_is_kept() -> None:
    # Prepare
    nodes = _numeric(_nodes(2))
    strategy = _strategy(fed={"num_clients": 2}, sampling={"min_available": 2})
    strategy.handshake.directory = _directory({"node-0": 0, "node-1": 1})
    sent = strategy.configure_fit(1, NO_PARAMS, _manager(*nodes))
    results = [(proxy, _reply(int(proxy.cid))) for proxy, _ in sent]

    # Execute
    params, metrics = strategy.aggregate_fit(1, results, [])

    # Assert
    assert params is not None
    assert metrics["fit_ok"] == 2 and metrics["fit_dropped"] == 0


def test_simulation_partitions_records_what_flower_gives_each_node() -> None:
    # Prepare: Flower's own engine function, as start_vce calls it.
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.supercore.run import Run

    original = vce_api._register_node_info_stores
    nodes = {9_001: 0, 42: 1, 7: 2}
    run = Run.create_empty(run_id=5)

    # Execute
    with simulation_partitions() as directory:
        stores = vce_api._register_node_info_stores(
            nodes_mapping=nodes, run=run, app_dir=None
        )

    # Assert: the map is the partition-id each node's context carries, and the
    # engine's function is restored afterwards.
    found = directory.lookup(timeout=0)
    assert found == {"9001": 0, "42": 1, "7": 2}
    for node_id, store in stores.items():
        context = store.retrieve_context(run_id=5)
        assert context.node_config["partition-id"] == found[str(node_id)]
        assert context.node_config["num-partitions"] == 3
    assert vce_api._register_node_info_stores is original
