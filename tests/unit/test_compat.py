"""Flower-version patches: one guard, tested on the installed Flower and another."""

from __future__ import annotations

from unittest.mock import MagicMock

import flwr
import pytest
from flwr.server.superlink.fleet.vce import vce_api
from flwr.superlink.grid import InMemoryGrid
from test_grid import _ScriptedGrid

from lora_flwr.fl import compat
from lora_flwr.fl.compat import (
    FLOWER_REQUIREMENT,
    FLOWER_VERSION_TESTED,
    FlowerVersionError,
    check_flower_version,
    prompt_grid,
    simulation_partitions,
)
from lora_flwr.fl.grid import PromptGrid


def test_the_guard_passes_on_the_installed_flower() -> None:
    # Execute
    version = check_flower_version()

    # Assert
    assert version == flwr.__version__
    assert version.startswith(FLOWER_VERSION_TESTED + ".")


def test_the_guard_fails_loudly_on_another_flower(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    monkeypatch.setattr(flwr, "__version__", "1.43.0")

    # Execute
    with pytest.raises(FlowerVersionError) as caught:
        check_flower_version()

    # Assert: one line that names the version found and what to install
    message = str(caught.value)
    assert "\n" not in message
    assert "Flower 1.43.0 is installed" in message
    assert f"install '{FLOWER_REQUIREMENT}'" in message
    assert "lora_flwr/fl/compat.py" in message


@pytest.mark.parametrize("version", ["1.42.0", "1.42.7", "1.42.1rc2"])
def test_every_1_42_release_passes(version: str) -> None:
    assert check_flower_version(version) == version


@pytest.mark.parametrize("version", ["1.41.2", "1.43.0", "2.42.0", "1.420.0", "1.4"])
def test_any_other_release_is_refused(version: str) -> None:
    with pytest.raises(FlowerVersionError, match=f"Flower {version} is installed"):
        check_flower_version(version)


def test_the_requirement_is_the_tested_minor_release() -> None:
    assert FLOWER_REQUIREMENT == "flwr[simulation]>=1.42,<1.43"
    assert FLOWER_VERSION_TESTED == "1.42"


def test_the_partition_patch_records_the_engines_map() -> None:
    # Prepare
    from flwr.supercore.run import Run

    original = vce_api._register_node_info_stores
    run = Run.create_empty(run_id=3)

    # Execute
    with simulation_partitions() as directory:
        vce_api._register_node_info_stores(
            nodes_mapping={11: 1, 12: 0}, run=run, app_dir=None
        )

    # Assert
    assert directory.lookup(timeout=0) == {"11": 1, "12": 0}
    assert vce_api._register_node_info_stores is original


def test_the_partition_patch_is_refused_on_another_flower(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    original = vce_api._register_node_info_stores

    # Execute
    with pytest.raises(FlowerVersionError, match="1.43.0"):
        with simulation_partitions():
            raise AssertionError("the block must not run")

    # Assert: nothing was patched
    assert vce_api._register_node_info_stores is original


def test_a_deployments_grid_is_wrapped_and_the_in_memory_one_is_not() -> None:
    # Prepare: the simulation's own grid class, and a stand-in for the gRPC one
    in_memory = InMemoryGrid(state_factory=MagicMock())
    deployed = _ScriptedGrid({}, [0.0])

    # Execute
    kept = prompt_grid(in_memory)
    wrapped = prompt_grid(deployed)

    # Assert
    assert kept is in_memory
    assert isinstance(wrapped, PromptGrid)
    assert wrapped.inner is deployed


def test_the_grid_wrapper_is_refused_on_another_flower(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    monkeypatch.setattr(flwr, "__version__", "1.41.0")

    # Execute / Assert
    with pytest.raises(FlowerVersionError, match="1.41.0"):
        prompt_grid(_ScriptedGrid({}, [0.0]))


def test_the_module_exports_every_patch() -> None:
    # Assert: one place to look when Flower moves
    assert set(compat.__all__) >= {
        "simulation_partitions",
        "prompt_grid",
        "PromptGrid",
        "ClientAppCallable",
        "Mod",
        "check_flower_version",
        "FLOWER_VERSION_TESTED",
    }
    assert all(hasattr(compat, name) for name in compat.__all__)
